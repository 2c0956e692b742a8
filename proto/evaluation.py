"""Scoring a classifier: top-1 accuracy, and the eval mode it and latency timings run in.

Kept in `proto` because the student trainer (validation accuracy), compression (the figures
before and after pruning or quantization) and the demo all score models this way and import
nothing of each other: one function, so that their figures are comparable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["eval_mode", "top1_accuracy"]


def _set_training(model: object, mode: bool) -> None:
    if isinstance(model, nn.Module):
        # A module from `ExportedProgram.module()` refuses train()/eval(): it runs in the mode
        # it was exported in (programs from save_program are exported in eval mode).
        with contextlib.suppress(NotImplementedError):
            model.train(mode)


@contextlib.contextmanager
def eval_mode(model: Callable[..., Any]) -> Iterator[None]:
    """Eval mode inside the block, the module's own mode restored after it; a plain callable
    (a compiled program) or a module that refuses a mode change runs as it is."""
    was_training = isinstance(model, nn.Module) and model.training
    _set_training(model, False)
    try:
        yield
    finally:
        if was_training:
            _set_training(model, True)


def top1_accuracy(
    model: Callable[[torch.Tensor], Any],
    dataset: Dataset,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> float:
    """The fraction, in [0, 1], of a map-style dataset's `(input, label)` items whose
    largest output is the label.

    Runs in eval mode (`eval_mode`) without gradients, in batches of `batch_size`, each
    input batch moved to `device` when one is given. A model that returns a mapping (a
    student with features) is scored on its `"logits"`. An empty dataset is a ValueError."""
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for inputs, labels in DataLoader(dataset, batch_size=batch_size):
            out = model(inputs if device is None else inputs.to(device))
            logits = out["logits"] if isinstance(out, Mapping) else out
            correct += int((logits.argmax(dim=1).cpu() == labels).sum())
            total += len(labels)
    if total == 0:
        raise ValueError(
            "top1_accuracy: the dataset is empty (0 samples): there is nothing to score; "
            "check the dataset spec and its arguments (split, path, limit)"
        )
    return correct / total
