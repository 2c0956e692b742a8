"""A trainer config's in-process teacher entry, and how `teachers:` entries are told apart.

    teachers:
      big: {model: lyceum.deploy.examples:teacher_cnn, model_kwargs: {width: 32},
            checkpoint: runs/teacher/model.safetensors,
            outputs: [logits=@output, layer2, layer3], device: cuda:1}

An entry with `model:` is an in-process teacher (`InProcessTeacher`); one with `endpoints:`
or `dir:` an online teacher or an offline dump (`TeacherConfig`). `TEACHER_ENTRY` is the
type of a `teachers:` value: a discriminated union picked by that key, so a mistake is
reported against the kind of teacher the entry is, never as a failed match of every kind.

Import these names from `lyceum.student_client.trainer_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lyceum.proto.specs import Spec, check_spec, parse_spec
from lyceum.student_client.inprocess import DEFAULT_OUTPUTS, Precision, parse_outputs

__all__ = ["InProcessTeacherConfig", "teacher_kind"]


class InProcessTeacherConfig(BaseModel):
    """A teacher model run inside the student's process (PaddleSlim's "naive" distillation):
    no server, no dump; the knowledge an offline dump of it would hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Teacher model spec `module:callable`.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="kwargs of `model`.")
    checkpoint: Path | None = Field(
        default=None,
        description="The teacher's weights (a model.safetensors, or a pruned model's). None: "
        "the factory's own weights (e.g. a pretrained model it downloads).",
    )
    outputs: tuple[str, ...] = Field(
        default=DEFAULT_OUTPUTS,
        description="Knowledge fields, as `lyceum teacher dump --output`: NAME=@output, "
        "NAME=@output.KEY, NAME=MODULE.PATH, or a bare module path without dots (layer3), a "
        "field of that name: the teacher side of a feature pair.",
    )
    device: str | None = Field(
        default=None,
        description="Where the teacher runs: cpu, cuda or cuda:N, its own device. None: the "
        "student's device.",
    )
    precision: Precision = Field(
        default="fp32", description="dtype of its float knowledge, as a dump's --precision."
    )

    @model_validator(mode="before")
    @classmethod
    def _other_kinds(cls, data: Any) -> Any:
        if isinstance(data, dict):
            foreign = sorted(k for k in data if k not in cls.model_fields)
            if foreign:
                raise ValueError(
                    f"{foreign} are not keys of an in-process teacher (an entry with 'model:'), "
                    f"which takes {list(cls.model_fields)}; an online teacher has 'endpoints:' "
                    f"and an offline dump 'dir:' instead of 'model:'"
                )
        return data

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return check_spec(value)

    @field_validator("outputs")
    @classmethod
    def _check_outputs(cls, outputs: tuple[str, ...]) -> tuple[str, ...]:
        parse_outputs(outputs, "outputs")
        return outputs

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str | None) -> str | None:
        if device is not None and device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
        return device

    def model_spec(self) -> Spec:
        return parse_spec(self.model, self.model_kwargs)


def teacher_kind(entry: Any) -> str:
    """The union tag of a `teachers:` entry: `in_process` with a `model` key, else `remote`."""
    if isinstance(entry, InProcessTeacherConfig):
        return "in_process"
    if isinstance(entry, dict) and "model" in entry:
        return "in_process"
    return "remote"
