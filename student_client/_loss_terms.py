"""The losses a trainer config can name: one registry of loss terms, picked by `kind`.

Each loss of `lyceum.student_client.losses` has one term class here: its YAML keys (the
loss's own parameters, validated by pydantic) and how it becomes a `DistillTerm` once the
teachers' knowledge schema is known (the teacher's meaning, temperature and channel counts
come from the schema, not from the YAML). `LOSSES` lists them by `kind`; `LossTermConfig`, the
type of `losses.terms` items, is the union of exactly those classes, so the YAML, its
validation and the trainer cannot disagree about which losses exist. To add a loss: write its
term class (a `LossTerm` with a `kind` literal and `build`) and add it to `LOSSES`.

Import these names from `lyceum.student_client.trainer_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Literal, TypeAlias, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from torch import nn

from lyceum.proto.schema import FieldSpec, KnowledgeSchema, TopK
from lyceum.student_client._divergences import Divergence, check_divergence
from lyceum.student_client.losses import (
    DistillTerm,
    FeatureMSE,
    FSPLoss,
    HintLoss,
    SoftLabelKD,
    TopKKD,
)

__all__ = [
    "LOSSES",
    "DivergenceKeys",
    "FSPTerm",
    "FeatureMSETerm",
    "HintTerm",
    "LossTerm",
    "LossTermConfig",
    "SoftLabelTerm",
    "TopKTerm",
    "loss_registry",
]


class LossTerm(BaseModel):
    """What every distillation term has: `weight * loss(student[student], knowledge[field])`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(description="Which loss: a key of LOSSES.")
    name: str = Field(description="Name of the term in logs; unique, and not 'task'.")
    field: str | tuple[str, ...] = Field(description="Field(s) of the merged knowledge.")
    student: str | tuple[str, ...] = Field(description="Key(s) of the student's outputs.")
    weight: float = Field(default=1.0, ge=0, description="Weight in the total loss.")

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not name or name == "task":
            raise ValueError(
                f"term name {name!r} is reserved or empty: 'task' is the task loss; pick "
                f"another name"
            )
        return name

    @model_serializer(mode="wrap")
    def _keep_kind(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # `kind` is the union's tag: a dump without it (exclude_defaults) would not load back.
        return {"kind": self.kind, **handler(self)}

    @property
    def fields(self) -> tuple[str, ...]:
        """The knowledge fields the term reads, in order."""
        return (self.field,) if isinstance(self.field, str) else self.field

    def build(self, fields: Mapping[str, FieldSpec]) -> nn.Module:
        """The loss module, given the specs of the knowledge fields (every one of `fields`)."""
        raise NotImplementedError(f"{type(self).__name__} does not build a loss")

    def distill_term(self, schema: KnowledgeSchema) -> DistillTerm:
        """This term of the objective, checked against the merged knowledge's schema."""
        specs = {f.name: f for f in schema.fields}
        where = f"losses.terms '{self.name}'"
        missing = [f for f in self.fields if f not in specs]
        if missing:
            what = f"field {missing[0]!r} is" if len(missing) == 1 else f"fields {missing} are"
            raise ValueError(
                f"{where}: {what} not in the merged knowledge; the teachers send {sorted(specs)}"
            )
        try:
            loss = self.build(specs)
        except ValueError as exc:
            raise ValueError(f"{where} (kind {self.kind}): {exc}") from None
        return DistillTerm(
            name=self.name, weight=self.weight, loss=loss, student=self.student, teacher=self.field
        )


def _dense(spec: FieldSpec, instead: str) -> FieldSpec:
    if isinstance(spec.encoding, TopK):
        raise ValueError(
            f"field {spec.name!r} is top-k ({spec.encoding.k} of {spec.shape[-1]}): {instead}"
        )
    return spec


def _map_channels(spec: FieldSpec) -> int:
    """C of a field of `[C, H, W]` feature maps per sample."""
    channels = spec.shape[0] if len(spec.shape) == 3 else None
    if channels is None:
        raise ValueError(
            f"field {spec.name!r} is {spec.shape_str} per sample, not [C, H, W] feature maps; "
            f"have the teacher send a convolutional layer's output (--output NAME=LAYER)"
        )
    return channels


class DivergenceKeys(BaseModel):
    """The YAML keys of a logit loss that pick its divergence (`_divergences`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    divergence: Divergence = Field(
        default="forward_kl",
        description="forward_kl (Hinton), reverse_kl (mode-seeking), jsd (generalised "
        "Jensen-Shannon, see beta), skew_kl / skew_reverse_kl (see alpha) or tv (total "
        "variation).",
    )
    beta: float = Field(
        default=0.5, description="jsd: the teacher's weight in the mixture, 0 < beta < 1."
    )
    alpha: float = Field(
        default=0.1,
        description="skew_kl, skew_reverse_kl: the weight of the skewed side in the mixture, "
        "0 <= alpha < 1 (0: the plain KL).",
    )

    @model_validator(mode="after")
    def _check_parameters(self) -> DivergenceKeys:
        check_divergence(self.divergence, self.beta, self.alpha)
        return self


class SoftLabelTerm(LossTerm, DivergenceKeys):
    """Hinton soft-label KL (or another divergence) on a dense logits field (`SoftLabelKD`)."""

    kind: Literal["soft_label"] = Field(
        default="soft_label", description="Soft-label KL on dense logits (SoftLabelKD)."
    )
    field: str = Field(description="A dense field of logits, log_probs or probs.")
    student: str = Field(default="logits", description="The student's logits.")
    temperature: float = Field(default=1.0, gt=0, description="Distillation temperature T.")

    def build(self, fields: Mapping[str, FieldSpec]) -> nn.Module:
        spec = _dense(fields[self.field], "use kind: topk")
        return SoftLabelKD.for_field(
            spec, self.temperature, divergence=self.divergence, beta=self.beta, alpha=self.alpha
        )


class TopKTerm(LossTerm, DivergenceKeys):
    """A divergence on a top-k field, the teacher's k largest values per row (`TopKKD`)."""

    kind: Literal["topk"] = Field(default="topk", description="KL on a top-k field (TopKKD).")
    field: str = Field(description="A top-k field (the teacher's --topk).")
    student: str = Field(default="logits", description="The student's full logits.")
    temperature: float = Field(default=1.0, gt=0, description="Distillation temperature T.")
    missing: Literal["zero", "uniform", "tail"] = Field(
        default="zero",
        description="The probability of the ids the teacher dropped: zero (the kept ones "
        "renormalised), tail (the mass it did not keep as one bucket against the student's "
        "mass on those ids; nothing trains how the student spreads it among them) or uniform "
        "(that mass spread evenly over them); tail and uniform need a teacher sending "
        "log_probs or probs.",
    )

    def build(self, fields: Mapping[str, FieldSpec]) -> nn.Module:
        spec = fields[self.field]
        if not isinstance(spec.encoding, TopK):
            raise ValueError(f"field {spec.name!r} is dense: use kind: soft_label")
        return TopKKD.for_field(
            spec,
            self.temperature,
            self.missing,
            divergence=self.divergence,
            beta=self.beta,
            alpha=self.alpha,
        )


class FeatureMSETerm(LossTerm):
    """L2 between student and teacher features (`FeatureMSE`), through a learned adapter
    when `student_channels` is given."""

    kind: Literal["mse"] = Field(default="mse", description="L2 between features (FeatureMSE).")
    field: str = Field(description="A dense feature field.")
    student: str = Field(default="logits", description="The student's features.")
    student_channels: int | None = Field(
        default=None,
        gt=0,
        description="Channels of the student's features: learn an adapter from them to the "
        "teacher's channels (a 1x1 convolution when spatial, else a linear layer). None: "
        "compare the features as they are.",
    )
    spatial: bool = Field(
        default=False,
        description="The features are [C, H, W] maps (channels on dim 1 of the batch), not "
        "vectors with channels last.",
    )

    def build(self, fields: Mapping[str, FieldSpec]) -> nn.Module:
        spec = _dense(fields[self.field], "feature losses need dense features")
        if self.student_channels is None:
            return FeatureMSE(spatial=self.spatial)
        if self.spatial:
            return FeatureMSE(self.student_channels, _map_channels(spec), spatial=True)
        channels = spec.shape[-1] if spec.shape else None
        if channels is None:
            raise ValueError(
                f"field {spec.name!r} is {spec.shape_str} per sample: it has no fixed last "
                f"dimension for an adapter to map to; leave out student_channels"
            )
        return FeatureMSE(self.student_channels, channels)


class HintTerm(LossTerm):
    """FitNets hint: a learned k x k regressor from a student map to a teacher map (`HintLoss`)."""

    kind: Literal["hint"] = Field(
        default="hint", description="FitNets hint with a learned regressor (HintLoss)."
    )
    field: str = Field(description="The teacher's guided layer: a [C, H, W] feature field.")
    student: str = Field(description="The student's hint layer: [B, C, H, W] maps.")
    student_channels: int = Field(gt=0, description="Channels of the student's hint maps.")
    kernel_size: int = Field(default=3, description="Regressor kernel size; odd.")

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, size: int) -> int:
        if size < 1 or size % 2 == 0:
            raise ValueError(
                "kernel_size must be odd and >= 1, so 'same' padding keeps the map size"
            )
        return size

    def build(self, fields: Mapping[str, FieldSpec]) -> nn.Module:
        spec = _dense(fields[self.field], "feature losses need dense features")
        return HintLoss(self.student_channels, _map_channels(spec), self.kernel_size)


class FSPTerm(LossTerm):
    """Flow of solution procedure: FSP matrices of pairs of maps, student vs teacher (`FSPLoss`)."""

    kind: Literal["fsp"] = Field(
        default="fsp", description="FSP matrices of pairs of maps (FSPLoss)."
    )
    field: tuple[str, ...] = Field(
        min_length=2, description="The teacher's [C, H, W] feature fields, in order."
    )
    student: tuple[str, ...] = Field(
        min_length=2, description="The student's maps, one per field, in the same order."
    )
    pairs: tuple[tuple[int, int], ...] | None = Field(
        default=None,
        description="Pairs (i, j) of positions in those lists whose FSP matrix is compared; "
        "map i and map j need the same H and W. None: each map with the next one.",
    )

    @field_validator("student")
    @classmethod
    def _one_per_field(cls, student: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        fields = info.data.get("field")
        if fields is not None and len(student) != len(fields):
            raise ValueError(
                f"fsp needs one student map per teacher field: got {len(fields)} fields "
                f"{list(fields)} and {len(student)} student maps"
            )
        return student

    @field_validator("pairs")
    @classmethod
    def _within(
        cls, pairs: tuple[tuple[int, int], ...] | None, info: ValidationInfo
    ) -> tuple[tuple[int, int], ...] | None:
        if pairs == ():
            raise ValueError("pairs is empty: give at least one [i, j], or leave it out")
        n = len(info.data.get("field") or ())
        bad = [list(p) for p in pairs or () if not all(0 <= i < n for i in p)]
        if n and bad:
            raise ValueError(f"pairs {bad} point outside the {n} maps (positions 0 to {n - 1})")
        return pairs

    def map_pairs(self) -> tuple[tuple[int, int], ...]:
        """The pairs compared: as given, or each map with the next."""
        return self.pairs or tuple((i, i + 1) for i in range(len(self.field) - 1))

    def build(self, fields: Mapping[str, FieldSpec]) -> nn.Module:
        specs = [_dense(fields[f], "feature losses need dense features") for f in self.field]
        for spec in specs:
            _map_channels(spec)
        for i, j in self.map_pairs():
            if specs[i].shape[1:] != specs[j].shape[1:]:
                raise ValueError(
                    f"pair ({i}, {j}): fields {specs[i].name!r} {specs[i].shape_str} and "
                    f"{specs[j].name!r} {specs[j].shape_str} differ in H and W; pair maps of "
                    f"the same resolution"
                )
        return FSPLoss(self.map_pairs())


def loss_registry(*terms: type[LossTerm]) -> dict[str, type[LossTerm]]:
    """Term classes by their `kind`; a kind given twice is refused."""
    registry: dict[str, type[LossTerm]] = {}
    for term in terms:
        kind = term.model_fields["kind"].default
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"{term.__name__}: give its 'kind' a default, e.g. Literal['mine']")
        if kind in registry:
            raise ValueError(
                f"loss kind {kind!r} is taken by {registry[kind].__name__}, so "
                f"{term.__name__} cannot have it too; give each loss its own kind"
            )
        registry[kind] = term
    return registry


LOSSES: Mapping[str, type[LossTerm]] = loss_registry(
    SoftLabelTerm, TopKTerm, FeatureMSETerm, HintTerm, FSPTerm
)
"""Every loss a trainer config can name, by `kind`."""

# pydantic validates a term as the union of the registry's classes, picked by `kind`; a union
# built at run time is no static type, so type checkers see the classes' base.
if TYPE_CHECKING:
    LossTermConfig: TypeAlias = LossTerm
else:
    LossTermConfig = Annotated[Union[tuple(LOSSES.values())], Field(discriminator="kind")]  # noqa: UP007
