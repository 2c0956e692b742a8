"""The one training loop: float pre-training, pruning fine-tuning, QAT and the demo's students.

Each of them trains a model in place with Adam, one optimizer step per batch; they differ in
where the batches come from (shuffled epochs of a dataset: `train_epochs`; the demo draws its
own with replacement) and in the loss (cross-entropy, a distillation mix from
`lyceum.compression.distillation.distilled_loss`, the demo's knowledge term). So the loop
lives here once, as `train_steps`, and a fix (or a new option) reaches every one of them, and
so does the progress bar. Public because the demo and the examples (`lyceum.deploy`) train
with it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lyceum.proto.display import Progress

__all__ = ["LossFn", "StepLoss", "cross_entropy", "train_epochs", "train_steps"]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""`loss_fn(outputs, inputs, labels) -> scalar`; a distillation loss can run its teacher on `inputs`."""

Batch = TypeVar("Batch")

StepLoss = Callable[[nn.Module, Batch], torch.Tensor]
"""`step_loss(model, batch) -> scalar`: the loss of one step, forward pass included."""


def cross_entropy(
    outputs: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The plain task loss, as a `LossFn`."""
    return nn.functional.cross_entropy(outputs, labels)


def train_steps(
    model: nn.Module,
    batches: Iterable[Batch],
    step_loss: StepLoss[Batch],
    *,
    lr: float,
    total: int,
    per_epoch: int | None = None,
    progress: bool = True,
    desc: str = "training",
) -> None:
    """Train `model` in place with Adam at `lr`, one step per item of `batches`, whose loss
    is `step_loss(model, batch)`; the model is left in eval mode.

    `total` is how many batches there are and `per_epoch` how many make an epoch (default:
    all of them): with `progress`, one `Progress` named `desc` counts the batches and shows
    the epoch and the last batch's loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = per_epoch or total
    epochs = -(-total // per_epoch) if per_epoch else 0
    model.train()
    with Progress(total=total, desc=desc, unit="batch", enabled=progress and total > 0) as bar:
        for step, batch in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            loss = step_loss(model, batch)
            loss.backward()
            optimizer.step()
            bar.update(1, epoch=f"{step // per_epoch + 1}/{epochs}", loss=f"{loss.item():.4f}")
    # Not `return model.eval()`: a QAT-prepared GraphModule's eval() returns None.
    model.eval()


def train_epochs(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
    progress: bool = True,
    desc: str = "training",
) -> None:
    """Train `model` in place with Adam for `epochs` passes over `dataset` of `(input, label)`
    items, shuffled by `seed` (`train_steps`); the model is left in eval mode. Callers check
    their own arguments (what is valid differs: QAT needs at least one epoch, fine-tuning may
    take zero).

    With `progress`, one `Progress` named `desc` counts the batches of every epoch and shows
    the epoch and the last batch's loss."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )

    def step_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        inputs, labels = batch
        return loss_fn(model(inputs), inputs, labels)

    train_steps(
        model,
        # Lazy: each epoch's shuffle is drawn when the epoch starts, as `for x, y in loader` does.
        (batch for _ in range(epochs) for batch in loader),
        step_loss,
        lr=lr,
        total=epochs * len(loader),
        per_epoch=len(loader),
        progress=progress,
        desc=desc,
    )
