"""What every YAML-driven compression job names: a model and a dataset, by spec string.

The library never resolves the specs (it takes built objects); the CLI does, through
`lyceum.proto.specs`. The fields live here once so that `lyceum prune` and `lyceum quantize`
configs read alike.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class JobConfig(BaseModel):
    """A compression job's model and data; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Model factory spec 'module:callable'.")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the model factory."
    )
    checkpoint: Path | None = Field(
        default=None,
        description="Trained weights (.safetensors, or a torch state dict read with "
        "weights_only=True); loaded by the caller that builds the model.",
    )
    dataset: str = Field(description="Dataset factory spec 'module:callable', called with split=.")
    dataset_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments of the dataset factory."
    )
    train_split: str = Field(default="train", description="Split used for training.")
    test_split: str = Field(default="test", description="Split of the before/after accuracy.")
    out_dir: Path = Field(description="Directory for the compressed model and the report.")

    @field_validator("model", "dataset")
    @classmethod
    def _spec(cls, value: str) -> str:
        if not _SPEC.fullmatch(value):
            raise ValueError(
                f"expected a 'module:callable' spec such as 'lyceum.deploy.examples:resnet_cnn', "
                f"got {value!r}"
            )
        return value
