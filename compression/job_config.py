"""What every YAML-driven compression job names: a model and a dataset, by spec string.

The library never resolves the specs (it takes built objects); the CLI does, through
`lyceum.proto.specs`, which also checks them here (`check_spec`: the same reading as every
other spec of Lyceum, dotted attributes and inline JSON kwargs included). The fields live
here once so that `lyceum prune` and `lyceum quantize` configs read alike: the model, its
weights or the float epochs that train it first, the data, the output directory and the
progress switch; so does the name of the report both write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from lyceum.compression.training import train_epochs
from lyceum.proto.display import plural
from lyceum.proto.specs import Spec, check_spec, parse_spec

REPORT_FILE = "report.json"
"""The report every compression job writes into its `out_dir`."""


class JobConfig(BaseModel):
    """A compression job's model and data; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        description="Model factory spec 'module:callable' (keyword arguments may follow as "
        "inline JSON, or go in model_kwargs)."
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the model factory."
    )
    checkpoint: Path | None = Field(
        default=None,
        description="Trained weights (.safetensors, or a torch state dict read with "
        "weights_only=True); loaded by the caller that builds the model.",
    )
    dataset: str = Field(
        description="Dataset factory spec 'module:callable', called with split= (keyword "
        "arguments may follow as inline JSON, or go in dataset_kwargs)."
    )
    dataset_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments of the dataset factory."
    )
    float_epochs: int = Field(
        default=0,
        ge=0,
        description="Plain float training epochs before compressing (for a model with no "
        "checkpoint: without either, the job compresses an untrained model).",
    )
    float_lr: float = Field(
        default=1e-2, gt=0, description="Adam learning rate of the float_epochs pre-training."
    )
    train_split: str = Field(default="train", description="Split used for training.")
    test_split: str = Field(default="test", description="Split of the before/after accuracy.")
    out_dir: Path = Field(description="Directory for the compressed model and the report.")
    progress: bool = Field(
        default=True,
        description="Show progress: a bar on a terminal, a log line every 30 s otherwise; "
        "false shows none.",
    )

    @field_validator("model", "dataset")
    @classmethod
    def _spec(cls, value: str) -> str:
        return check_spec(value)

    def model_spec(self) -> Spec:
        """The model factory with its keyword arguments (inline ones and `model_kwargs`)."""
        return parse_spec(self.model, self.model_kwargs)

    def model_origin(self) -> str:
        """The model and where its weights come from, for the job's plan line."""
        model = str(self.model_spec())
        if self.checkpoint is None and not self.float_epochs:
            return f"{model}, untrained (no checkpoint, float_epochs 0)"
        if self.checkpoint is None:
            return f"{model} trained {plural(self.float_epochs, 'float epoch')} first"
        if not self.float_epochs:
            return f"{model} from {self.checkpoint}"
        more = plural(self.float_epochs, "more float epoch")
        return f"{model} from {self.checkpoint}, then trained {more}"

    def untrained_note(self) -> str | None:
        """For a job's summary: what the 'before' figures are when nothing trained the model."""
        if self.checkpoint is not None or self.float_epochs:
            return None
        return (
            "note: the uncompressed model is the untrained model as built (no checkpoint, "
            "float_epochs 0); set checkpoint: or float_epochs: in the config to compress a "
            "trained one"
        )


def train_float_first(
    config: JobConfig, model: nn.Module, train_data: Dataset, *, batch_size: int, seed: int
) -> None:
    """The `float_epochs` of plain training a job starts with (none when it is 0)."""
    if config.float_epochs:
        train_epochs(
            model,
            train_data,
            epochs=config.float_epochs,
            lr=config.float_lr,
            batch_size=batch_size,
            seed=seed,
            progress=config.progress,
            desc="float training",
        )
