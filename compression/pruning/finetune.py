"""Fine-tuning after pruning: cross-entropy, optionally distilled from the unpruned model.

The distillation loss is a plain callable `distill_loss(student_logits, teacher_logits)` so
that this package depends on nothing of the service: `lyceum prune` passes the student
client's `soft_label_kd`, a Python caller any loss of that shape. Accuracy before and after
is `lyceum.proto.evaluation.top1_accuracy`, the one the trainer and the demo report.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.utils.data import Dataset

from lyceum.compression.distillation import DistillLoss, distilled_loss
from lyceum.compression.training import cross_entropy, train_epochs

__all__ = ["DistillLoss", "candidate_finetune", "finetune"]


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
    progress: bool = True,
) -> nn.Module:
    """Train `model` (in place) with Adam on `(input, label)` batches; returns it in eval mode.

    Loss: cross-entropy, or with `teacher` and `distill_loss`,
    `(1 - alpha) * CE + alpha * distill_loss(student_logits, teacher_logits)`; the teacher
    (typically the unpruned model) runs in eval mode without gradients. `progress` shows the
    batches done (`lyceum.proto.display.Progress`).
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
        model,
        dataset,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        loss_fn=loss_fn,
        progress=progress,
        desc="fine-tune",
    )
    return model


def candidate_finetune(
    dataset: Dataset, *, epochs: int, batch_size: int, lr: float, seed: int
) -> Callable[[nn.Module], None]:
    """What a search fine-tunes each pruned candidate with before scoring it: `finetune`
    with cross-entropy, quietly (the search's own progress counts the candidates; a bar
    each would drown it)."""

    def run(candidate: nn.Module) -> None:
        finetune(
            candidate,
            dataset,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            progress=False,
        )

    return run
