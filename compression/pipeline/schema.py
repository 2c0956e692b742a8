"""The pipeline's YAML: one model and data set, then stages that train, prune and quantize it.

Two forms. Sequential stages, each with its own `epochs` (prune: its fine-tune; PTQ: none),
run one after the other:

    model: lyceum.deploy.examples:student_mlp
    dataset: lyceum.deploy.examples:digits
    out_dir: runs/compress
    stages:
      - {name: distil, kind: train, epochs: 4, teachers: {cnn: {dir: runs/dump}},
         losses: {terms: [{name: kd, kind: soft_label, field: logits, temperature: 4.0}]}}
      - {name: prune, kind: prune, epochs: 2, strategy: {kind: uniform, flops: -0.5}}
      - {name: int8, kind: quantize, scheme: {kind: ptq}}

Or PaddleSlim's epoch windows over one run of `epochs` epochs (`compressor.epoch`): each
stage has `start_epoch` and `end_epoch` (inclusive, counted from 0), windows may overlap, and
stages starting at the same epoch start in listed order. Distil epochs 0-29, then QAT 30-34
while distillation goes on (fake quantization in the forward, the teachers' loss kept):

    epochs: 35
    stages:
      - {name: distil, kind: train, start_epoch: 0, end_epoch: 34, teachers: ..., losses: ...}
      - {name: qat, kind: quantize, start_epoch: 30, end_epoch: 34, scheme: {kind: qat}}

A point stage (PTQ, a prune without fine-tune) has `start_epoch` only: it runs before that
epoch trains (`start_epoch: epochs` runs it after the last one). The windows are checked
here, each refusal naming the key: inside the total, every epoch in some window, one
training stage at a time, one prune and one quantization, quantization last (nothing starts
after it, nothing trains after it ends), and `distill_from` naming a stage that has ended
before the reader starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lyceum.compression.distillation import Distillation
from lyceum.compression.pruning.config import AutoPruning, SensitivityPruning, UniformPruning
from lyceum.compression.quantization.config import PTQ, QAT
from lyceum.proto.configs import read_yaml_mapping, validate_mapping
from lyceum.proto.specs import Spec, check_spec, parse_spec
from lyceum.student_client.trainer_config import (
    LossesConfig,
    OptimizerConfig,
    TeacherEntry,
)

__all__ = [
    "PipelineConfig",
    "PruneStage",
    "QuantizeStage",
    "Stage",
    "TrainStage",
    "Window",
    "load_pipeline",
    "validate_pipeline",
]


@dataclass(frozen=True)
class Window:
    """The epochs a stage spans: `start`..`end` inclusive; `end` None for a point stage,
    which runs before epoch `start` trains."""

    start: int
    end: int | None

    @property
    def epochs(self) -> range:
        return (
            range(self.start, self.start) if self.end is None else range(self.start, self.end + 1)
        )


class _StageBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="The stage's name: its row in the report and its folder, out_dir/stages/NAME.",
    )
    epochs: int | None = Field(
        default=None,
        ge=0,
        description="Sequential form: the stage's epochs (train, QAT: > 0; prune: its "
        "fine-tune; PTQ: none). Leave out in the windowed form.",
    )
    start_epoch: int | None = Field(
        default=None, ge=0, description="Windowed form: the first epoch of the stage (from 0)."
    )
    end_epoch: int | None = Field(
        default=None,
        ge=0,
        description="Windowed form: the last epoch of the stage, inclusive; left out for a "
        "point stage (PTQ, a prune without fine-tune).",
    )

    @model_validator(mode="after")
    def _one_form(self) -> _StageBase:
        windowed = self.start_epoch is not None or self.end_epoch is not None
        if windowed and self.epochs is not None:
            raise ValueError(
                "give 'epochs' (sequential stages) or 'start_epoch'/'end_epoch' (epoch "
                "windows), not both"
            )
        if self.end_epoch is not None and self.start_epoch is None:
            raise ValueError("'end_epoch' needs 'start_epoch'")
        start, end = self.start_epoch, self.end_epoch
        if start is not None and end is not None and end < start:
            raise ValueError(
                f"end_epoch {end} is before start_epoch {start}; end_epoch is the stage's "
                f"last epoch, inclusive"
            )
        return self

    @property
    def windowed(self) -> bool:
        return self.start_epoch is not None

    @property
    def trains(self) -> bool:
        """Whether the stage's window holds epochs of training (not a point)."""
        return self.epochs != 0 and not (self.windowed and self.end_epoch is None)


class TrainStage(_StageBase):
    """Train the model: distilled from `teachers:` (the trainer's sections: online endpoints
    or offline dumps, merged, with `losses.terms`) or from an earlier stage's model
    (`distill_from`), else supervised on the labels."""

    kind: Literal["train"] = Field(description="Selects this stage: 'train'.")
    teachers: dict[str, TeacherEntry] = Field(
        default_factory=dict,
        description="As the trainer's teachers: name -> online endpoints, an offline dump "
        "dir, or a model run in this process.",
    )
    merge: dict[str, str | dict[str, float]] = Field(
        default_factory=dict, description="As the trainer's merge: field -> strategy."
    )
    renames: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="As the trainer's renames: teacher -> {their: ours}."
    )
    losses: LossesConfig = Field(
        default_factory=LossesConfig,
        description="As the trainer's losses: task_weight and, with teachers, the terms.",
    )
    distill_from: str | None = Field(
        default=None,
        description="Distil from the model an earlier stage wrote (its name), run in this "
        "process: (1 - alpha) * CE + alpha * soft-label KD (see distillation).",
    )
    distillation: Distillation = Field(
        default_factory=Distillation,
        description="distill_from's temperature and alpha.",
    )
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig,
        description="The optimizer from this stage's first epoch on.",
    )

    @model_validator(mode="after")
    def _knowledge(self) -> TrainStage:
        if self.teachers and self.distill_from is not None:
            raise ValueError(
                "give 'teachers' or 'distill_from', not both: a stage learns from one source"
            )
        if self.teachers and not self.losses.terms:
            raise ValueError(
                f"teachers {list(self.teachers)} but no losses.terms to learn from them: add "
                f"one, e.g. terms: [{{name: kd, kind: soft_label, field: logits}}]"
            )
        if not self.teachers and self.losses.terms:
            raise ValueError(
                f"losses.terms {[t.name for t in self.losses.terms]} read teachers' knowledge "
                f"but the stage has no 'teachers'"
            )
        if not self.teachers and (self.merge or self.renames):
            raise ValueError("'merge' and 'renames' combine teachers: add 'teachers' or drop them")
        if self.epochs == 0:
            raise ValueError("epochs 0: a train stage needs at least one epoch")
        if self.windowed and self.end_epoch is None:
            raise ValueError("a train stage needs 'end_epoch' (its last epoch)")
        return self


PruneStrategy = Annotated[
    UniformPruning | SensitivityPruning | AutoPruning, Field(discriminator="kind")
]


class PruneStage(_StageBase):
    """Prune the model (uniform, sensitivity or auto) before its window's first epoch; the
    window's epochs are its fine-tune (with the distillation of a train stage covering them)."""

    kind: Literal["prune"] = Field(description="Selects this stage: 'prune'.")
    strategy: PruneStrategy = Field(description="Pruning strategy, selected by its 'kind' key.")
    candidate_finetune_epochs: int = Field(
        default=1, ge=0, description="Auto pruning: fine-tuning epochs of each candidate."
    )
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=1e-3),
        description="The optimizer of the fine-tune (a new one: the parameters changed).",
    )


class QuantizeStage(_StageBase):
    """int8 quantization, last: QAT trains with fake quantization over its window (any
    distillation covering it goes on), then converts; PTQ calibrates at its point."""

    kind: Literal["quantize"] = Field(description="Selects this stage: 'quantize'.")
    scheme: Annotated[QAT | PTQ, Field(discriminator="kind")] = Field(
        description="QAT(...) or PTQ(...) scheme, selected by its 'kind' key ('qat' or 'ptq')."
    )
    calibration_batches: int = Field(default=8, ge=1, description="PTQ calibration batches.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=1e-3),
        description="QAT: the optimizer of the fake-quantized model.",
    )

    @model_validator(mode="after")
    def _scheme_window(self) -> QuantizeStage:
        qat = isinstance(self.scheme, QAT)
        if qat and (self.epochs == 0 or (self.windowed and self.end_epoch is None)):
            raise ValueError("QAT trains: give it epochs > 0, or an end_epoch")
        if not qat and (self.epochs or self.end_epoch is not None):
            raise ValueError(
                "PTQ only calibrates: leave out 'epochs' and 'end_epoch' (a point stage; "
                "start_epoch alone in the windowed form)"
            )
        return self


Stage = Annotated[TrainStage | PruneStage | QuantizeStage, Field(discriminator="kind")]


class PipelineConfig(BaseModel):
    """Everything `lyceum compress PIPELINE.yaml` needs; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Model factory spec 'module:callable'.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="kwargs of `model`.")
    checkpoint: Path | None = Field(
        default=None,
        description="Weights the model starts from (a model.safetensors); None: the "
        "factory's own init.",
    )
    dataset: str = Field(
        description="Dataset factory spec 'module:callable', called with split=; its index "
        "is the sample id (offline teachers' dumps are of the training split)."
    )
    dataset_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments of the dataset factory."
    )
    labeled: int | None = Field(
        default=None,
        gt=0,
        description="Only training samples with id < labeled use their labels (the task loss "
        "of every stage, auto pruning's candidate fine-tune); the others learn from a train "
        "stage's teachers alone. None: every label is used.",
    )
    train_split: str = Field(default="train", description="Split the stages train on.")
    val_split: str = Field(default="val", description="Split scoring pruning candidates.")
    test_split: str = Field(default="test", description="Split of the report's accuracy.")
    epochs: int | None = Field(
        default=None,
        gt=0,
        description="Windowed form: the run's epochs (0..epochs-1), every stage window inside. "
        "Sequential form: the sum of the stages' epochs (may be left out).",
    )
    batch_size: int = Field(default=64, ge=2, description="Samples per batch.")
    seed: int = Field(default=0, ge=0, description="Seeds the model init and the shuffle.")
    window: int = Field(default=4, ge=0, description="Batches of knowledge requested ahead.")
    checkpoint_every: int = Field(
        default=0,
        ge=0,
        description="Also checkpoint every N batches inside an epoch (0: after every epoch "
        "and at stage boundaries only); --resume continues from the batch after it.",
    )
    latency: bool = Field(default=True, description="Measure each stage's CPU latency.")
    latency_runs: int = Field(default=30, ge=1, description="Timed runs of the latency median.")
    out_dir: Path = Field(description="The run directory: checkpoint/, stages/, report.")
    progress: bool = Field(default=True, description="Progress bars (log lines off a terminal).")
    stages: tuple[Stage, ...] = Field(min_length=1, description="The stages, in order.")

    @field_validator("model", "dataset")
    @classmethod
    def _spec(cls, value: str) -> str:
        return check_spec(value)

    @model_validator(mode="after")
    def _check_stages(self) -> PipelineConfig:
        from lyceum.compression.pipeline._windows import check_windows

        check_windows(self)
        if self.labeled is not None:
            for i, stage in enumerate(self.stages):
                if getattr(stage, "distill_from", None) is not None:
                    raise ValueError(
                        f"key 'stages.{i}.distill_from' (stage {stage.name!r}): its loss mixes "
                        f"every label in with the earlier stage's soft labels, but 'labeled' "
                        f"hides the labels of ids >= {self.labeled}; leave out 'labeled', or "
                        f"distil from a teacher under 'teachers:'"
                    )
        return self

    def model_spec(self) -> Spec:
        return parse_spec(self.model, self.model_kwargs)

    def windows(self) -> list[Window]:
        """Each stage's window, the sequential form laid end to end."""
        if self.stages[0].windowed:
            return [Window(s.start_epoch or 0, s.end_epoch) for s in self.stages]
        out, epoch = [], 0
        for stage in self.stages:
            n = stage.epochs or 0
            out.append(Window(epoch, epoch + n - 1 if n else None))
            epoch += n
        return out

    def total_epochs(self) -> int:
        if self.epochs is not None:
            return self.epochs
        return sum(s.epochs or 0 for s in self.stages)


def validate_pipeline(raw: Mapping[str, Any], source: str = "pipeline") -> PipelineConfig:
    """Validate a pipeline mapping; errors name every bad key and what was expected."""
    return validate_mapping(PipelineConfig, raw, source, "pipeline")


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML (data only: `yaml.safe_load`)."""
    return validate_mapping(
        PipelineConfig, read_yaml_mapping(path, "pipeline"), str(path), "pipeline"
    )
