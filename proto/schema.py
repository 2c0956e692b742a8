"""The knowledge schema: what a teacher's knowledge batch holds, field by field.

A schema is an ordered tuple of fields. Each field has a name, a dtype, a per-sample shape
(fixed, or with one variable leading dimension for sequences, written `None`), an encoding
(`dense`, or `topk(k)`: the k largest values and their int32 indices along the last dim)
and what the values mean (logits, log-probabilities, probabilities or plain features, with
the temperature they were produced at). It round-trips through JSON (the `Describe` reply,
the offline manifest) and through Arrow schema metadata (every knowledge message and shard).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT_VERSION = "1.0"
"""Major.minor of the knowledge format. Readers refuse other majors."""

SAMPLE_ID = "sample_id"
METADATA_SCHEMA_KEY = b"lyceum.schema"
METADATA_VERSION_KEY = b"lyceum.format_version"

DType = Literal["float32", "float16", "bfloat16", "int32", "int64", "bool"]
Meaning = Literal["logits", "log_probs", "probs", "features"]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Arrow storage type of each dtype. bfloat16 has no Arrow type: it travels as its 16-bit
# pattern (uint16). bool travels as one byte per value (uint8) rather than Arrow's
# bit-packed boolean, so it can be viewed as a torch.bool tensor without a copy.
ARROW_VALUE_TYPES: dict[str, pa.DataType] = {
    "float32": pa.float32(),
    "float16": pa.float16(),
    "bfloat16": pa.uint16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "bool": pa.uint8(),
}
TOPK_INDEX_TYPE = pa.int32()


class Dense(BaseModel):
    """Every value of the field is stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["dense"] = "dense"


class TopK(BaseModel):
    """Only the k largest values along the last dimension are stored, with int32 indices."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["topk"] = "topk"
    k: int = Field(gt=0, description="How many values are kept per row of the last dimension.")


Encoding = Annotated[Dense | TopK, Field(discriminator="kind")]


class FieldSpec(BaseModel):
    """One knowledge field: its name, dtype, per-sample shape, encoding and meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Field name; letters, digits and underscores.")
    dtype: DType = Field(description="Element type of the values as stored.")
    shape: tuple[int | None, ...] = Field(
        description="Per-sample shape of the dense values; a leading None is a variable "
        "dimension (e.g. sequence length). For top-k fields this is the shape before top-k."
    )
    encoding: Encoding = Field(default_factory=Dense, description="dense or topk(k).")
    meaning: Meaning = Field(
        default="features", description="What the values are: logits, log_probs, probs, features."
    )
    temperature: float = Field(
        default=1.0, gt=0, description="Temperature the values were produced at (softmax T)."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME_RE.match(name) or name == SAMPLE_ID:
            raise ValueError(
                f"field name {name!r} is not allowed: use letters, digits and underscores, "
                f"not starting with a digit, and not {SAMPLE_ID!r}"
            )
        return name

    @model_validator(mode="after")
    def _check_shape(self) -> FieldSpec:
        for i, d in enumerate(self.shape):
            if d is None and i != 0:
                raise ValueError(
                    f"field {self.name!r}: shape {self.shape_str} has a variable dimension at "
                    f"position {i}; only the leading dimension may be variable"
                )
            if d is not None and d <= 0:
                raise ValueError(f"field {self.name!r}: shape {self.shape_str} has size {d} <= 0")
        if isinstance(self.encoding, TopK):
            if not self.shape or self.shape[-1] is None:
                raise ValueError(
                    f"field {self.name!r}: topk needs a fixed last dimension, got {self.shape_str}"
                )
            if self.encoding.k > self.shape[-1]:
                raise ValueError(
                    f"field {self.name!r}: topk k={self.encoding.k} exceeds the last dimension "
                    f"{self.shape[-1]}"
                )
            if self.dtype in ("bool",):
                raise ValueError(
                    f"field {self.name!r}: topk of a {self.dtype} field makes no sense"
                )
        return self

    @property
    def shape_str(self) -> str:
        return "[" + ", ".join("*" if d is None else str(d) for d in self.shape) + "]"

    @property
    def variable(self) -> bool:
        """True if the leading dimension varies from sample to sample."""
        return bool(self.shape) and self.shape[0] is None

    @property
    def stored_shape(self) -> tuple[int | None, ...]:
        """Per-sample shape of what is stored: the last dim is k for top-k fields."""
        if isinstance(self.encoding, TopK):
            return (*self.shape[:-1], self.encoding.k)
        return self.shape

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Stored shape without the variable leading dimension (the unit of a list entry)."""
        shape = self.stored_shape[1:] if self.variable else self.stored_shape
        return tuple(d for d in shape if d is not None)

    @property
    def row_size(self) -> int:
        return math.prod(self.row_shape)

    @property
    def columns(self) -> tuple[str, ...]:
        """Arrow column names (and keys of the decoded tensor dict) of this field."""
        if isinstance(self.encoding, TopK):
            return (f"{self.name}.values", f"{self.name}.indices")
        return (self.name,)

    def describe(self) -> str:
        enc = f"topk({self.encoding.k})" if isinstance(self.encoding, TopK) else "dense"
        return f"{self.name}: {self.dtype} {self.shape_str} {enc} {self.meaning}"


def _list_type(value_type: pa.DataType, spec: FieldSpec) -> pa.DataType:
    inner = pa.list_(value_type, spec.row_size)
    return pa.large_list(inner) if spec.variable else inner


class KnowledgeSchema(BaseModel):
    """The ordered fields of a knowledge batch (also used for query-mode input batches)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fields: tuple[FieldSpec, ...] = Field(description="Knowledge fields in column order.")
    format_version: str = Field(default=FORMAT_VERSION, description="Knowledge format version.")

    @model_validator(mode="after")
    def _check_fields(self) -> KnowledgeSchema:
        if not self.fields:
            raise ValueError("a knowledge schema needs at least one field")
        names = [f.name for f in self.fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate field names in knowledge schema: {dup}")
        check_format_version(self.format_version, where="knowledge schema")
        return self

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field {name!r} in schema; fields are {[f.name for f in self.fields]}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c for f in self.fields for c in f.columns)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> KnowledgeSchema:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"knowledge schema is not valid JSON: {exc}") from exc
        if isinstance(raw, dict):
            check_format_version(str(raw.get("format_version", "")), where="knowledge schema")
        return cls.model_validate(raw)

    def to_arrow(self) -> pa.Schema:
        """The Arrow schema of a knowledge batch, with this schema as JSON metadata."""
        arrow_fields = [pa.field(SAMPLE_ID, pa.uint64(), nullable=False)]
        for f in self.fields:
            value_type = ARROW_VALUE_TYPES[f.dtype]
            meta = {b"lyceum.dtype": f.dtype.encode()}
            if isinstance(f.encoding, TopK):
                arrow_fields.append(
                    pa.field(f.columns[0], _list_type(value_type, f), False, metadata=meta)
                )
                arrow_fields.append(pa.field(f.columns[1], _list_type(TOPK_INDEX_TYPE, f), False))
            else:
                arrow_fields.append(
                    pa.field(f.name, _list_type(value_type, f), False, metadata=meta)
                )
        return pa.schema(
            arrow_fields,
            metadata={
                METADATA_SCHEMA_KEY: self.to_json().encode(),
                METADATA_VERSION_KEY: self.format_version.encode(),
            },
        )

    @classmethod
    def from_arrow(cls, schema: pa.Schema) -> KnowledgeSchema:
        """Recover the schema from Arrow metadata; refuses unknown major format versions."""
        meta = schema.metadata or {}
        if METADATA_VERSION_KEY not in meta or METADATA_SCHEMA_KEY not in meta:
            raise ValueError(
                "Arrow schema has no Lyceum metadata (lyceum.format_version, lyceum.schema): "
                "this is not a Lyceum knowledge message or file"
            )
        check_format_version(meta[METADATA_VERSION_KEY].decode(errors="replace"), "Arrow metadata")
        return cls.from_json(meta[METADATA_SCHEMA_KEY])


def check_format_version(version: str, where: str) -> None:
    """Raise unless `version` has the major version this code reads."""
    major = FORMAT_VERSION.split(".")[0]
    if version.split(".")[0] != major:
        raise ValueError(
            f"{where}: unknown knowledge format version {version!r}; this Lyceum reads "
            f"{major}.x (format {FORMAT_VERSION}). Upgrade Lyceum or re-create the knowledge."
        )


def dense(
    name: str,
    dtype: DType,
    shape: tuple[int | None, ...],
    meaning: Meaning = "features",
    temperature: float = 1.0,
) -> FieldSpec:
    """Shorthand for a dense field."""
    return FieldSpec(name=name, dtype=dtype, shape=shape, meaning=meaning, temperature=temperature)


def topk(
    name: str,
    dtype: DType,
    shape: tuple[int | None, ...],
    k: int,
    meaning: Meaning = "logits",
    temperature: float = 1.0,
) -> FieldSpec:
    """Shorthand for a top-k field (shape is the dense shape; the last dim is the vocabulary)."""
    return FieldSpec(
        name=name,
        dtype=dtype,
        shape=shape,
        encoding=TopK(k=k),
        meaning=meaning,
        temperature=temperature,
    )
