"""A candidate's training, optionally distilled from a teacher's knowledge of the training set.

Every candidate of a search (and every subnet of a once-for-all supernet, `ofa_train`) trains
on the same samples, so the teacher is asked once: its outputs for the whole training set
(`TeacherKnowledge.outputs`, row i = sample i) are fetched by the caller (the CLI reads an
offline dump or asks online endpoints, through `lyceum.student_client`) and each batch takes
its rows by sample index (`_Indexed`). Compression imports nothing of the service: the loss
(e.g. `lyceum.student_client.losses.soft_label_kd` with the teacher's meaning and temperature)
is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lyceum.compression.distillation import DistillLoss
from lyceum.compression.training import train_epochs, train_steps

__all__ = ["NASDistillation", "TeacherKnowledge", "train_candidate"]


class NASDistillation(BaseModel):
    """The teacher a NAS search distils candidates from: an offline dump or online endpoints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    knowledge_dir: str | None = Field(
        default=None,
        description="An offline dump of the training split (`lyceum teacher dump` with the "
        "same dataset and split=train): sample ids are the dataset's indices.",
    )
    endpoints: list[str] | None = Field(
        default=None, description="Online teacher replicas, e.g. ['grpc://127.0.0.1:50061']."
    )
    mode: str = Field(
        default="query",
        description="Online only: 'query' sends the inputs, 'index' only the sample ids "
        "(the teacher reads the same dataset itself).",
    )
    field: str = Field(default="logits", description="The knowledge field to distil (dense).")
    temperature: float = Field(default=4.0, gt=0, description="Soft-label KD temperature.")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the distillation term.")

    @model_validator(mode="after")
    def _one_teacher(self) -> NASDistillation:
        if (self.knowledge_dir is None) == (self.endpoints is None):
            raise ValueError(
                "give exactly one teacher, knowledge_dir (an offline dump) or "
                "endpoints (online replicas)"
            )
        if self.mode not in ("query", "index"):
            raise ValueError(f"mode {self.mode!r}: expected 'query' or 'index'")
        return self


@dataclass(frozen=True)
class TeacherKnowledge:
    """The teacher's outputs for every training sample and how to learn from them:
    `(1 - alpha) * cross_entropy + alpha * loss(student_outputs, teacher_rows)`."""

    outputs: torch.Tensor
    loss: DistillLoss
    alpha: float

    def check(self, data: Dataset) -> None:
        """Refuse a training set whose samples are not the rows' (another split or size)."""
        size = len(data)  # type: ignore[arg-type]
        if self.outputs.shape[0] != size:
            raise ValueError(
                f"teacher knowledge has {self.outputs.shape[0]} rows and the training set "
                f"{size} samples: dump (or serve) the teacher on the same training split"
            )

    def mixed_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """`(1 - alpha) * cross_entropy + alpha * loss` of a batch of samples `index`."""
        hard = nn.functional.cross_entropy(logits, labels)
        return (1 - self.alpha) * hard + self.alpha * self.loss(logits, self.outputs[index])


class _Indexed(Dataset[Any]):
    """`data` whose items carry their index, `(x, y, i)`, so a batch finds its teacher rows.

    Wrapping does not change a seeded shuffle (the sampler draws from the length and the
    generator alone): a distilled run sees the batches an undistilled one does."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y = self.data[i]
        return x, y, i


def train_candidate(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    teacher: TeacherKnowledge | None = None,
    progress: bool = False,
    desc: str = "training",
) -> None:
    """Train `model` in place (Adam), on cross-entropy or distilled from `teacher`; the batch
    order is the same either way (one seeded shuffle), so the two rewards compare."""
    if teacher is None:
        train_epochs(
            model,
            data,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            desc=desc,
        )
        return
    teacher.check(data)
    loader = DataLoader(
        _Indexed(data),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )

    def step_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        inputs, labels, index = batch
        return teacher.mixed_loss(model(inputs), labels, index)

    train_steps(
        model,
        (batch for _ in range(epochs) for batch in loader),
        step_loss,
        lr=lr,
        total=epochs * len(loader),
        per_epoch=len(loader),
        progress=progress,
        desc=desc,
    )
