"""The student trainer's configuration: one YAML file, validated by pydantic.

Without `teachers:` (absent or empty) a run is plain supervised training on the labels, how
the teacher the other examples need is made (`losses:` may then be left out, or hold only
`task_weight`, > 0):

    model: lyceum.deploy.examples:teacher_cnn
    dataset: {train: lyceum.deploy.examples:digits, validation: lyceum.deploy.examples:digits,
              validation_kwargs: {split: val}}
    epochs: 10
    checkpoint_dir: runs/teacher      # model.safetensors: what --checkpoint takes

With teachers, the student is distilled:

    model: lyceum.deploy.examples:student_mlp
    model_kwargs: {hidden: 32}
    dataset: {train: lyceum.deploy.examples:digits, train_kwargs: {split: train},
              validation: lyceum.deploy.examples:digits, validation_kwargs: {split: val},
              labeled: 100}   # only ids < 100 keep their labels; the rest is a transfer set
    teachers:
      cnn: {endpoints: ["grpc://10.0.0.5:50051", "grpc://10.0.0.6:50051"], mode: index}
      dump: {dir: /data/knowledge/cnn}
      here: {model: lyceum.deploy.examples:teacher_cnn, checkpoint: runs/teacher/model.safetensors,
             outputs: [logits=@output, layer3]}   # run in this process (InProcessTeacher)
      secure: {endpoints: ["zmq://10.0.0.7:5555"], curve_server_key_file: keys/teacher.key,
               curve_secret_key_file: keys/student.key_secret}
    merge: {logits: mean}     # or "my_package.merging:geometric_mean", code of your own
    losses:
      task_weight: 1.0
      terms: [{name: kd, kind: soft_label, field: logits, weight: 1.0, temperature: 4.0}]
    optimizer: {name: adam, lr: 0.01}
    schedule: {name: cosine}
    epochs: 10
    checkpoint_dir: runs/student

Distillation terms (`losses.terms`): each has a `name`, a `kind` (the loss, one of `LOSSES`),
a `weight` (1.0), the knowledge `field` it reads and the `student` output it compares (a
student returning a mapping names its outputs; a plain tensor is `logits`), then its loss's
own keys. The teacher's meaning, temperature and channel counts come from its schema. A
`student` key that the student's forward does not return is a module path of the student
(`features.1`), captured by a forward hook.

    - {name: kd, kind: soft_label, field: logits, temperature: 4.0}     # SoftLabelKD, dense
    - {name: tok, kind: topk, field: logits, temperature: 2.0,          # TopKKD, a --topk field
       missing: uniform}      # zero (default) | uniform: needs the teacher's log_probs or probs
    - {name: feat, kind: mse, field: feat, student: feat,               # FeatureMSE
       student_channels: 16, spatial: true}   # optional adapter to the teacher's channels
    - {name: hint, kind: hint, field: layer2, student: block1,          # HintLoss (FitNets),
       student_channels: 16, kernel_size: 3}  # [C, H, W] maps, a learned k x k regressor
    - {name: fsp, kind: fsp, field: [layer2, layer3], student: [block1, block2],   # FSPLoss
       pairs: [[0, 1]]}       # positions in those lists; default: each map with the next

`task: causal_lm` trains a language model on token items from token-level knowledge; its
`lm:` section and a teacher's `vocab:` are described in `_lm_config`. Logit terms take
`divergence` (forward_kl, reverse_kl, jsd with beta, skew_kl / skew_reverse_kl with alpha,
tv) and top-k terms `missing: zero | uniform | tail`.

YAML is read with `yaml.safe_load` (data only). A bad value raises `ValueError` naming the
key, the value and what was expected (`load_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lyceum.proto.configs import read_yaml_mapping, validate_mapping
from lyceum.proto.schema import KnowledgeSchema
from lyceum.proto.specs import Spec, check_spec, parse_spec
from lyceum.student_client._inprocess_config import InProcessTeacherConfig
from lyceum.student_client._lm_config import LMConfig, VocabConfig
from lyceum.student_client._loss_terms import (
    LOSSES,
    FeatureMSETerm,
    FSPTerm,
    HintTerm,
    LossTerm,
    LossTermConfig,
    SoftLabelTerm,
    TopKTerm,
)
from lyceum.student_client._strategies import STRATEGIES, is_strategy_spec
from lyceum.student_client._teacher_config import TeacherConfig, TeacherEntry
from lyceum.student_client.losses import DistillObjective

__all__ = [
    "LOSSES",
    "DatasetConfig",
    "FSPTerm",
    "FeatureMSETerm",
    "HintTerm",
    "InProcessTeacherConfig",
    "LMConfig",
    "LossTerm",
    "LossTermConfig",
    "LossesConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "SoftLabelTerm",
    "TeacherConfig",
    "TeacherEntry",
    "TopKTerm",
    "TrainConfig",
    "VocabConfig",
    "load_config",
    "validate_config",
]

_STRATEGY_NAMES = tuple(sorted(STRATEGIES))


class DatasetConfig(BaseModel):
    """Where the student's data comes from: map-style datasets of `(input, label)` items."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: str = Field(description="Training dataset spec `module:callable`; its index is the id.")
    train_kwargs: dict[str, Any] = Field(default_factory=dict, description="kwargs of `train`.")
    validation: str | None = Field(default=None, description="Validation dataset spec, if any.")
    validation_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="kwargs of `validation`."
    )
    labeled: int | None = Field(
        default=None,
        gt=0,
        description="Only samples with id < labeled use their labels (task loss); the others "
        "learn from the teachers alone (without teachers: not at all). None: every label is "
        "used.",
    )

    @field_validator("train", "validation")
    @classmethod
    def _check_specs(cls, value: str | None) -> str | None:
        return None if value is None else check_spec(value)

    def train_spec(self) -> Spec:
        return parse_spec(self.train, self.train_kwargs)

    def validation_spec(self) -> Spec | None:
        return parse_spec(self.validation, self.validation_kwargs) if self.validation else None


class LossesConfig(BaseModel):
    """The task loss (cross-entropy on labels) plus the distillation terms."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_weight: float = Field(
        default=1.0,
        ge=0,
        description="Weight of the cross-entropy on the labels; > 0 without teachers (it is "
        "then the whole loss).",
    )
    terms: tuple[LossTermConfig, ...] = Field(
        default=(),
        description=f"Distillation terms, at least one with teachers and none without; each "
        f"picks its loss by 'kind' ({', '.join(LOSSES)}).",
    )

    @field_validator("terms")
    @classmethod
    def _unique_names(cls, terms: tuple[LossTerm, ...]) -> tuple[LossTerm, ...]:
        names = [t.name for t in terms]
        taken = sorted({n for n in names if names.count(n) > 1})
        if taken:
            raise ValueError(f"terms share the names {taken}; give each term its own name")
        return terms

    def objective(self, schema: KnowledgeSchema) -> DistillObjective:
        """The objective these terms make with knowledge of `schema` (the merged teachers')."""
        return DistillObjective(
            [t.distill_term(schema) for t in self.terms], task_weight=self.task_weight
        )


class OptimizerConfig(BaseModel):
    """The optimizer of the student (and of any learned adapters of the losses)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["adam", "adamw", "sgd"] = Field(default="adam", description="Optimizer.")
    lr: float = Field(default=1e-2, gt=0, description="Learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="Weight decay.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum.")


class ScheduleConfig(BaseModel):
    """Learning-rate schedule, stepped after every batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["constant", "cosine", "step"] = Field(
        default="constant", description="constant; cosine to 0 over all steps; step decay."
    )
    step_epochs: int = Field(default=10, gt=0, description="step: epochs between decays.")
    gamma: float = Field(default=0.1, gt=0, le=1, description="step: decay factor.")


class TrainConfig(BaseModel):
    """Everything `lyceum student train` needs (see the module docstring for an example)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["classification", "causal_lm"] = Field(
        default="classification",
        description="classification: (input, label) items, cross-entropy on the labels, "
        "validation accuracy. causal_lm: token items (input_ids, labels, attention_mask, "
        "loss_mask), shifted cross-entropy, token-level knowledge, validation perplexity "
        "(see `lm`).",
    )
    lm: LMConfig | None = Field(
        default=None,
        description="task causal_lm only: labels, packing, the logits output, the validation "
        "teacher. None: the defaults.",
    )
    model: str = Field(description="Student model spec `module:callable`.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="kwargs of `model`.")
    checkpoint: Path | None = Field(
        default=None,
        description="Weights the student starts from (a model.safetensors): e.g. a `lyceum "
        "prune` out_dir's, whose prune_plan.json beside it rebuilds the pruned layers, to "
        "fine-tune or distil into the pruned student (the plan is copied to checkpoint_dir, "
        "so the run's model.safetensors loads the same way). None: the factory's own init.",
    )
    dataset: DatasetConfig = Field(description="Training and validation data.")
    teachers: dict[str, TeacherEntry] = Field(
        default_factory=dict,
        description="Teacher name -> online endpoints, offline dump dir, or a model run in "
        "this process (model:). None (absent or empty): plain supervised training on the "
        "labels (no losses.terms).",
    )
    merge: dict[str, str | dict[str, float]] = Field(
        default_factory=dict,
        description=f"Field -> strategy ({', '.join(_STRATEGY_NAMES)}), {{teacher: weight}} "
        f"for a weighted mean, or a 'module:attribute' spec of your own strategy (a "
        f"MergeStrategy class or a function (list[Tensor]) -> Tensor; JSON kwargs may follow "
        f"in braces). Needed for every field several teachers send.",
    )
    renames: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Teacher -> {their field: our field}, before merging."
    )
    losses: LossesConfig = Field(
        default_factory=LossesConfig,
        validate_default=True,
        description="Task loss weight and distillation terms (needed with teachers; without, "
        "the task loss alone).",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="LR schedule.")
    epochs: int = Field(gt=0, description="Passes over the training set.")
    batch_size: int = Field(default=64, gt=0, description="Samples per batch and rank.")
    accumulate: int = Field(
        default=1,
        gt=0,
        description="Loader batches per optimizer step (gradient accumulation): each batch's "
        "loss weighted by its share of the group's samples, so accumulate: 2 at batch_size 16 "
        "steps as batch_size 32 does; an epoch's last, shorter group steps too. The LR "
        "schedule counts optimizer steps.",
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="fp32; bf16: the student's forward under bfloat16 autocast on the run's "
        "device (losses and softmaxes in float32, weights and optimizer state in float32).",
    )
    clip_grad_norm: float | None = Field(
        default=None,
        gt=0,
        description="Clip the gradients' total L2 norm to this before each optimizer step "
        "(the norm before clipping is StepInfo.grad_norm). None: no clipping.",
    )
    window: int = Field(default=4, ge=0, description="Batches of knowledge requested ahead.")
    seed: int = Field(default=0, ge=0, description="Seeds the model init and the shuffle.")
    checkpoint_dir: Path | None = Field(
        default=None,
        description="Where checkpoints go: every epoch, and when a run stops early (SIGINT, "
        "SIGTERM, teachers unavailable). A new run refuses a directory holding another run's "
        "checkpoints unless resumed (--resume) or overwritten (--overwrite).",
    )
    device: str = Field(default="cpu", description="cpu, cuda or cuda:N (DDP: the local rank's).")
    parallel: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="Under torchrun (WORLD_SIZE > 1): ddp, a whole model per rank; fsdp, the "
        "student's parameters, gradients and optimizer state sharded over the ranks (FSDP2 "
        "fully_shard, per block), for a student that does not fit one device. Checkpoints "
        "hold the full state either way (the same files). One process: ignored.",
    )
    num_workers: int = Field(default=0, ge=0, description="DataLoader workers for the inputs.")
    progress: bool = Field(
        default=True,
        description="Show epoch progress (rank 0): a bar on a terminal, log lines otherwise, "
        "and a line per epoch.",
    )
    log_every_s: float = Field(
        default=30.0,
        ge=0,
        description="When stderr is not a terminal: seconds between progress lines within an "
        "epoch (0: one per batch).",
    )

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return check_spec(value)

    @field_validator("merge")
    @classmethod
    def _check_merge(cls, merge: dict[str, str | dict[str, float]]) -> dict[str, Any]:
        for name, strategy in merge.items():
            if not isinstance(strategy, str) or strategy in _STRATEGY_NAMES:
                continue
            if not is_strategy_spec(strategy):
                raise ValueError(
                    f"field {name!r}: unknown strategy {strategy!r}; expected one of "
                    f"{list(_STRATEGY_NAMES)}, a mapping of teacher weights, or a "
                    f"'module:attribute' spec of your own strategy"
                )
            try:
                check_spec(strategy)
            except ValueError as exc:
                raise ValueError(f"field {name!r}: strategy {strategy!r}: {exc}") from None
        return merge

    @field_validator("losses")
    @classmethod
    def _check_losses(cls, losses: LossesConfig, info: ValidationInfo) -> LossesConfig:
        if "teachers" not in info.data:  # refused itself: that error says what to fix
            return losses
        teachers = list(info.data["teachers"])
        if teachers and not losses.terms:
            raise ValueError(
                f"the config has teachers {teachers} but no losses.terms to learn from them: "
                f"add one, e.g. terms: [{{name: kd, kind: soft_label, field: logits, "
                f"temperature: 4.0}}], or remove 'teachers:' for plain supervised training"
            )
        if not teachers and losses.terms:
            raise ValueError(
                f"losses.terms {[t.name for t in losses.terms]} are distillation terms, but "
                f"the config has no teachers whose knowledge they could read: add a "
                f"'teachers:' section (online endpoints or an offline dump dir) to distil, or "
                f"remove losses.terms for plain supervised training on the labels"
            )
        if not teachers and losses.task_weight == 0:
            raise ValueError(
                "losses.task_weight is 0 and the config has no teachers: nothing would train "
                "the student; give task_weight > 0 (supervised training on the labels, 1.0 by "
                "default) or add 'teachers:' and losses.terms to distil"
            )
        return losses

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
        return device

    @model_validator(mode="after")
    def _check_references(self) -> TrainConfig:
        if not self.teachers and (self.merge or self.renames):
            given = [k for k in ("merge", "renames") if getattr(self, k)]
            raise ValueError(
                f"{' and '.join(given)} combine the teachers' fields, but the config has no "
                f"teachers: remove {' and '.join(given)} for plain supervised training, or add "
                f"'teachers:'"
            )
        for name, strategy in self.merge.items():
            if isinstance(strategy, dict):
                unknown = [t for t in strategy if t not in self.teachers]
                if unknown:
                    raise ValueError(
                        f"merge.{name}: weights name teachers {unknown}; the teachers are "
                        f"{list(self.teachers)}"
                    )
        unknown = [t for t in self.renames if t not in self.teachers]
        if unknown:
            raise ValueError(
                f"renames name teachers {unknown}; the teachers are {list(self.teachers)}"
            )
        if self.lm is not None and self.task != "causal_lm":
            raise ValueError("'lm' is for task: causal_lm; add it, or remove 'lm'")
        packing = self.lm is not None and self.lm.pack_tokens is not None
        # In-process teachers take the batch's rows as inputs, as query-mode ones do.
        queried = [
            n
            for n, t in self.teachers.items()
            if isinstance(t, InProcessTeacherConfig) or (t.dir is None and t.mode == "query")
        ]
        if packing and queried:
            raise ValueError(
                f"lm.pack_tokens packs several items into a row, but teachers {queried} are "
                f"asked with the batch's rows as inputs (query mode, or in this process): use "
                f"mode: index or an offline dump for them, or leave out pack_tokens"
            )
        return self

    @property
    def lm_config(self) -> LMConfig:
        """The `lm` section, its defaults when left out."""
        return self.lm if self.lm is not None else LMConfig()

    @property
    def supervised(self) -> bool:
        """True without teachers: the run learns from the labels alone."""
        return not self.teachers

    def model_spec(self) -> Spec:
        return parse_spec(self.model, self.model_kwargs)


def validate_config(raw: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Validate a config mapping; errors name every bad key, its value and what was expected."""
    return validate_mapping(TrainConfig, raw, source, "trainer")


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML config (data only: `yaml.safe_load`); a syntax error names the
    file and line, an unreadable file raises its `OSError`."""
    return validate_config(read_yaml_mapping(path, "trainer"), str(path))
