"""The one training loop of compression: float pre-training, pruning fine-tuning and QAT.

Each of them trains a model in place with Adam over shuffled `(input, label)` batches; they
differ only in the loss (cross-entropy, or a distillation mix from
`lyceum.compression.distillation.distilled_loss`) and in their settings, so the loop lives
here once and a fix (or a new option) reaches all three.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["LossFn", "cross_entropy", "train_epochs"]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""`loss_fn(outputs, inputs, labels) -> scalar`; a distillation loss can run its teacher on `inputs`."""


def cross_entropy(
    outputs: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The plain task loss, as a `LossFn`."""
    return nn.functional.cross_entropy(outputs, labels)


def train_epochs(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
) -> None:
    """Train `model` in place with Adam for `epochs` passes over `dataset`, shuffled by
    `seed`; the model is left in eval mode. Callers check their own arguments (what is
    valid differs: QAT needs at least one epoch, fine-tuning may take zero)."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), x, y).backward()
            optimizer.step()
    # Not `return model.eval()`: a QAT-prepared GraphModule's eval() returns None.
    model.eval()
