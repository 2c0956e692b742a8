"""Distillation during compression fine-tuning: the settings, and the loss that mixes them in.

Compression imports nothing of the service, so the distillation loss itself (e.g.
`lyceum.student_client.losses.soft_label_kd`) is passed in by the caller as a callable
`distill_loss(student_logits, teacher_logits) -> scalar`; the CLI does that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

DistillLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Distillation(BaseModel):
    """Fine-tune with `(1 - alpha) * cross-entropy + alpha * distill_loss(student, teacher)`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=4.0, gt=0, description="Soft-label KD temperature.")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the distillation term.")


def distilled_loss(
    teacher: nn.Module, distill_loss: DistillLoss, alpha: float
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`loss(outputs, inputs, labels)` mixing cross-entropy with the teacher's soft labels;
    the teacher runs in eval mode without gradients."""
    teacher.eval()

    def loss(outputs: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        hard = nn.functional.cross_entropy(outputs, labels)
        return (1 - alpha) * hard + alpha * distill_loss(outputs, teacher_logits)

    return loss
