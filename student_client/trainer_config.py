"""The student trainer's configuration: one YAML file, validated by pydantic.

    model: lyceum.deploy.examples:student_mlp
    model_kwargs: {hidden: 32}
    dataset:
      train: lyceum.deploy.examples:digits
      train_kwargs: {split: train}
      validation: lyceum.deploy.examples:digits
      validation_kwargs: {split: val}
      labeled: 100            # only ids < 100 keep their labels; the rest is a transfer set
    teachers:
      cnn: {endpoints: ["grpc://10.0.0.5:50051", "grpc://10.0.0.6:50051"], mode: index}
      dump: {dir: /data/knowledge/cnn}
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

YAML is read with `yaml.safe_load` (data only). A bad value raises `ValueError` naming the
key, the value and what was expected (`load_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lyceum.proto.specs import Spec, parse_spec
from lyceum.student_client._credentials import CredentialOptions
from lyceum.student_client._strategies import STRATEGIES, is_strategy_spec

__all__ = [
    "DatasetConfig",
    "LossTermConfig",
    "LossesConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TeacherConfig",
    "TrainConfig",
    "load_config",
    "validate_config",
]

_STRATEGY_NAMES = tuple(sorted(STRATEGIES))


def _check_spec(value: str) -> str:
    module, sep, attr = value.partition("{")[0].partition(":")
    if not sep or not module.strip() or not attr.strip():
        raise ValueError(
            "expected a spec 'package.module:callable', e.g. 'lyceum.deploy.examples:student_mlp'"
        )
    return value


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
        "learn from the teachers alone. None: every label is used.",
    )

    @field_validator("train", "validation")
    @classmethod
    def _check_specs(cls, value: str | None) -> str | None:
        return None if value is None else _check_spec(value)

    def train_spec(self) -> Spec:
        return parse_spec(self.train, self.train_kwargs)

    def validation_spec(self) -> Spec | None:
        return parse_spec(self.validation, self.validation_kwargs) if self.validation else None


class TeacherConfig(BaseModel):
    """One teacher: online `endpoints` (replicas of one model) or an offline dump `dir`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: tuple[str, ...] | None = Field(
        default=None,
        description="grpc://host:port, grpcs://, zmq://host:port or dns:///name:port; several "
        "endpoints are replicas of the same teacher.",
    )
    dir: Path | None = Field(default=None, description="Directory of a `lyceum teacher dump`.")
    mode: Literal["query", "index"] = Field(
        default="query", description="Online only: send inputs (query) or only ids (index)."
    )
    tls: bool = Field(default=False, description="Online only: TLS for grpc:// endpoints.")
    tls_ca: Path | None = Field(default=None, description="CA certificate (PEM) of the teacher.")
    tls_cert: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    tls_key: Path | None = Field(default=None, description="Client key (mutual TLS).")
    tls_server_name: str | None = Field(
        default=None,
        description="gRPC: the name the teacher's certificate was issued for, when it differs "
        "from the endpoint's host (e.g. an IP address).",
    )
    token_file: Path | None = Field(default=None, description="File holding the bearer token.")
    curve_server_key: str | None = Field(
        default=None,
        description="ZeroMQ: the teacher's CURVE public key, 40 z85 characters (quote it in "
        "YAML); or give curve_server_key_file.",
    )
    curve_server_key_file: Path | None = Field(
        default=None,
        description="ZeroMQ: file with the teacher's CURVE public key (bare z85 or a zmq "
        "certificate).",
    )
    curve_secret_key_file: Path | None = Field(
        default=None,
        description="ZeroMQ: the student's CURVE secret key (bare z85 or a zmq .key_secret "
        "certificate), for a teacher with an allow-list; its public key follows from it. A "
        "file only: secrets stay out of the YAML.",
    )
    timeout_s: float = Field(
        default=60.0, gt=0, description="Fail if no replica answers for this long."
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="Re-ask a request another replica after this long."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> TeacherConfig:
        if (self.endpoints is None) == (self.dir is None):
            raise ValueError(
                "give exactly one of 'endpoints' (an online teacher) or 'dir' (an offline dump)"
            )
        if self.dir is not None:
            online = sorted(self.model_fields_set - {"dir"})
            if online:
                raise ValueError(
                    f"{online} are for online teachers (endpoints); a teacher read from 'dir' "
                    f"takes no other key"
                )
            return self
        if not self.endpoints:
            raise ValueError("'endpoints' is empty: list at least one, e.g. grpc://host:50051")
        self.credential_options().check(self.endpoints)
        return self

    def credential_options(self) -> CredentialOptions:
        """This teacher's security options, as `OnlineTeacher` takes them."""
        return CredentialOptions(
            token_file=self.token_file,
            tls=self.tls,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_server_name=self.tls_server_name,
            curve_server_key=self.curve_server_key,
            curve_server_key_file=self.curve_server_key_file,
            curve_secret_key_file=self.curve_secret_key_file,
        )


class LossTermConfig(BaseModel):
    """One distillation term: `weight * loss(student[student], knowledge[field])`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Name of the term in logs; unique.")
    kind: Literal["soft_label", "topk", "mse"] = Field(
        description="soft_label: Hinton KL on dense logits; topk: KL on a top-k field; "
        "mse: L2 between features."
    )
    field: str = Field(description="Field of the merged knowledge, e.g. logits.")
    student: str = Field(default="logits", description="Key of the student's outputs.")
    weight: float = Field(default=1.0, ge=0, description="Weight in the total loss.")
    temperature: float = Field(default=1.0, gt=0, description="Softmax temperature (KL terms).")


class LossesConfig(BaseModel):
    """The task loss (cross-entropy on labels) plus the distillation terms."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_weight: float = Field(default=1.0, ge=0, description="Weight of the cross-entropy.")
    terms: tuple[LossTermConfig, ...] = Field(min_length=1, description="Distillation terms.")


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

    model: str = Field(description="Student model spec `module:callable`.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="kwargs of `model`.")
    dataset: DatasetConfig = Field(description="Training and validation data.")
    teachers: dict[str, TeacherConfig] = Field(
        min_length=1, description="Teacher name -> online endpoints or offline dump."
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
    losses: LossesConfig = Field(description="Task loss weight and distillation terms.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="LR schedule.")
    epochs: int = Field(gt=0, description="Passes over the training set.")
    batch_size: int = Field(default=64, gt=0, description="Samples per batch and rank.")
    window: int = Field(default=4, ge=0, description="Batches of knowledge requested ahead.")
    seed: int = Field(default=0, ge=0, description="Seeds the model init and the shuffle.")
    checkpoint_dir: Path | None = Field(
        default=None, description="Where checkpoints go (every epoch and on SIGTERM)."
    )
    device: str = Field(default="cpu", description="cpu, cuda or cuda:N (DDP: the local rank's).")
    num_workers: int = Field(default=0, ge=0, description="DataLoader workers for the inputs.")
    progress: bool = Field(default=True, description="Show a tqdm progress bar (rank 0).")

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return _check_spec(value)

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
                _check_spec(strategy)
            except ValueError as exc:
                raise ValueError(f"field {name!r}: strategy {strategy!r}: {exc}") from None
        return merge

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
        return device

    @model_validator(mode="after")
    def _check_references(self) -> TrainConfig:
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
        return self

    def model_spec(self) -> Spec:
        return parse_spec(self.model, self.model_kwargs)


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def validate_config(raw: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Validate a config mapping; errors name every bad key, its value and what was expected."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            value = err.get("input")
            shown = "(missing)" if err["type"] == "missing" else repr(value)
            if len(shown) > 120:
                shown = shown[:117] + "..."
            message = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"  key '{_where(err['loc'])}': got {shown}: {message}")
        raise ValueError(f"{source}: invalid trainer config:\n" + "\n".join(lines)) from None


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML config (data only: `yaml.safe_load`)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the trainer config: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path}: expected a YAML mapping at the top level, got {type(raw).__name__}"
        )
    return validate_config(raw, str(path))
