"""Fine-tuning after pruning: cross-entropy, optionally distilled from the unpruned model.

The distillation loss is a plain callable `distill_loss(student_logits, teacher_logits)` so
that this package depends on nothing of the service (the student client's losses module plugs
in unchanged once it exists).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lyceum.compression._train import cross_entropy, train_epochs
from lyceum.compression.distillation import DistillLoss, distilled_loss

__all__ = ["DistillLoss", "evaluate_accuracy", "finetune"]


def finetune(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    teacher: nn.Module | None = None,
    distill_loss: DistillLoss | None = None,
    alpha: float = 0.5,
) -> nn.Module:
    """Train `model` (in place) with Adam on `(input, label)` batches; returns it in eval mode.

    Loss: cross-entropy, or with `teacher` and `distill_loss`,
    `(1 - alpha) * CE + alpha * distill_loss(student_logits, teacher_logits)`; the teacher
    (typically the unpruned model) runs in eval mode without gradients.
    """
    if epochs < 0:
        raise ValueError(f"finetune: epochs must be >= 0, got {epochs}")
    if (teacher is None) != (distill_loss is None):
        raise ValueError(
            "finetune: distillation needs both teacher= and distill_loss= "
            f"(got teacher={'set' if teacher is not None else None}, "
            f"distill_loss={'set' if distill_loss is not None else None})"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"finetune: alpha must be in [0, 1], got {alpha}")
    loss_fn = (
        distilled_loss(teacher, distill_loss, alpha)
        if teacher is not None and distill_loss is not None
        else cross_entropy
    )
    train_epochs(
        model, dataset, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, loss_fn=loss_fn
    )
    return model


def evaluate_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] (eval mode, no gradients)."""
    loader = DataLoader(dataset, batch_size=batch_size)
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluate_accuracy: the dataset is empty")
    return correct / total
