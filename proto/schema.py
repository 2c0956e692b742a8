"""The knowledge schema: what a teacher's knowledge batch holds, field by field.

A schema is an ordered tuple of fields. Each field has a name, a dtype, a per-sample shape
(fixed, or with one variable leading dimension for sequences, written `None`), an encoding
(`dense`, or `topk(k)`: the k largest values and their indices along the last dim, the
indices in the fewest bits the last dim allows or Elias-Fano coded, `_topk_indices`, the
values in the field's dtype or in 8 bits, `_topk_values`) and what the values mean (logits, log-probabilities, probabilities or plain features, with
the temperature they were produced at). It round-trips through JSON (the `Describe` reply,
the offline manifest) and through Arrow schema metadata (every knowledge message and shard).
"""

from __future__ import annotations

import json
import math
import re
from typing import Literal

import pyarrow as pa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from lyceum.proto._encodings import Dense, Encoding, TopK
from lyceum.proto._topk_indices import (
    INT32_BITS,
    ef_stored_count,
    narrowest_bits,
    stored_arrow_type,
    stored_count,
)
from lyceum.proto._topk_values import VALUE_BITS, stored_value_count
from lyceum.proto.vocab import Vocabulary

FORMAT_VERSION = "1.2"
"""Major.minor of the knowledge format. Readers refuse other majors. 1.1: top-k indices are
stored in `TopK.index_bits` bits (1.0 stored int32, and its schemas are read as such). 1.2:
top-k values may be 8-bit codes (`TopK.value_bits`) and indices Elias-Fano coded
(`TopK.index_code`); a schema using neither has the JSON of 1.1."""
_INT32_INDICES_VERSION = "1.0"

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

    @model_validator(mode="before")
    @classmethod
    def _fill_index_bits(cls, data: object) -> object:
        # A top-k field made without an index width gets the narrowest its vocabulary allows,
        # so every schema says how its indices are stored (and equal fields compare equal).
        if not isinstance(data, dict):
            return data
        encoding, shape = data.get("encoding"), data.get("shape")
        if not shape or not isinstance(shape[-1], int):
            return data
        if isinstance(encoding, TopK) and encoding.index_bits is None:
            encoding = encoding.model_copy(update={"index_bits": narrowest_bits(shape[-1])})
        elif (
            isinstance(encoding, dict)
            and encoding.get("kind") == "topk"
            and encoding.get("index_bits") is None
        ):
            encoding = {**encoding, "index_bits": narrowest_bits(shape[-1])}
        else:
            return data
        return {**data, "encoding": encoding}

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
            bits = self.index_bits
            if bits < INT32_BITS and self.shape[-1] > 1 << bits:
                raise ValueError(
                    f"field {self.name!r}: {bits}-bit top-k indices cannot hold the "
                    f"{self.shape[-1]} ids of the last dimension; leave index_bits unset for "
                    f"the narrowest width that does ({narrowest_bits(self.shape[-1])})"
                )
            if self.dtype in ("bool",):
                raise ValueError(
                    f"field {self.name!r}: topk of a {self.dtype} field makes no sense"
                )
            if self.encoding.value_bits is not None and not self.dtype.startswith(
                ("float", "bfloat")
            ):
                raise ValueError(
                    f"field {self.name!r}: 8-bit top-k values code floats, not {self.dtype}; "
                    f"leave value_bits unset"
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
    def index_bits(self) -> int:
        """Bits per stored top-k index (32 for a dense field, which has none)."""
        if isinstance(self.encoding, TopK) and self.encoding.index_bits is not None:
            return self.encoding.index_bits
        return INT32_BITS

    @property
    def index_code(self) -> str:
        """How top-k indices are stored: 'fixed' (also for a dense field) or 'elias_fano'."""
        return self.encoding.index_code if isinstance(self.encoding, TopK) else "fixed"

    @property
    def value_bits(self) -> int | None:
        """8 for 8-bit coded top-k values, None for values stored in `dtype`."""
        return self.encoding.value_bits if isinstance(self.encoding, TopK) else None

    def stored_row_size(self, column: str) -> int:
        """Stored items per row of `column`: `row_size`, or the bytes of coded indices or
        values."""
        if column.endswith(".indices"):
            if self.index_code == "elias_fano":
                assert self.shape[-1] is not None  # a top-k field has a fixed last dim
                return ef_stored_count(self.row_size, self.shape[-1])
            return stored_count(self.row_size, self.index_bits)
        if self.value_bits == VALUE_BITS:
            return stored_value_count(self.row_size)
        return self.row_size

    def stored_row_bytes(self, column: str) -> int:
        """Bytes of one stored row of `column`."""
        return self.stored_row_size(column) * self.stored_arrow_type(column).byte_width

    def stored_arrow_type(self, column: str) -> pa.DataType:
        """The Arrow type of `column`'s stored items (bytes for coded indices or values)."""
        if column.endswith(".indices"):
            if self.index_code == "elias_fano":
                return pa.uint8()
            return stored_arrow_type(self.index_bits)
        return pa.uint8() if self.value_bits is not None else ARROW_VALUE_TYPES[self.dtype]

    @property
    def columns(self) -> tuple[str, ...]:
        """Arrow column names (and keys of the decoded tensor dict) of this field."""
        if isinstance(self.encoding, TopK):
            return (f"{self.name}.values", f"{self.name}.indices")
        return (self.name,)

    def describe(self) -> str:
        enc = "dense"
        if isinstance(self.encoding, TopK):
            options = [f"{self.index_bits}-bit indices"]
            if self.index_code == "elias_fano":
                options = ["Elias-Fano indices"]
            if self.value_bits is not None:
                options.append(f"{self.value_bits}-bit values")
            enc = f"topk({self.encoding.k}, {', '.join(options)})"
        return f"{self.name}: {self.dtype} {self.shape_str} {enc} {self.meaning}"


def _list_type(spec: FieldSpec, column: str) -> pa.DataType:
    inner = pa.list_(spec.stored_arrow_type(column), spec.stored_row_size(column))
    return pa.large_list(inner) if spec.variable else inner


class KnowledgeSchema(BaseModel):
    """The ordered fields of a knowledge batch (also used for query-mode input batches)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fields: tuple[FieldSpec, ...] = Field(description="Knowledge fields in column order.")
    format_version: str = Field(default=FORMAT_VERSION, description="Knowledge format version.")
    vocab: Vocabulary | None = Field(
        default=None,
        description="The vocabulary token-level fields are indexed by (language-model "
        "teachers); None for other knowledge, and then left out of the JSON.",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_indices(cls, data: object) -> object:
        # Format 1.0 stored every top-k index as int32 and did not say so.
        if not isinstance(data, dict) or data.get("format_version") != _INT32_INDICES_VERSION:
            return data
        fields = []
        for f in data.get("fields") or ():
            encoding = f.get("encoding") if isinstance(f, dict) else None
            if isinstance(encoding, dict) and encoding.get("kind") == "topk":
                f = {**f, "encoding": {"index_bits": INT32_BITS, **encoding}}
            fields.append(f)
        return {**data, "fields": fields}

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

    def uses_codes(self) -> bool:
        """True if a field stores 8-bit values or Elias-Fano indices (format 1.2's codes)."""
        return any(f.value_bits is not None or f.index_code != "fixed" for f in self.fields)

    def as_version(self, version: str) -> KnowledgeSchema:
        """This schema written as format `version` when that stores it the same way (1.1 and
        up without codes), so a dump begun by an earlier Lyceum resumes; else itself."""
        if (
            version == self.format_version
            or self.uses_codes()
            or version in ("", _INT32_INDICES_VERSION)
        ):
            return self
        check_format_version(version, "knowledge schema")
        return self.model_copy(update={"format_version": version})

    def to_json(self) -> str:
        # Without a vocabulary the JSON is what it was before the field existed: readers of
        # those schemas (and their cached Arrow schemas) see the same bytes.
        return self.model_dump_json(exclude={"vocab"} if self.vocab is None else None)

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
            meta = {b"lyceum.dtype": f.dtype.encode()}
            if isinstance(f.encoding, TopK):
                values, indices = f.columns
                arrow_fields.append(pa.field(values, _list_type(f, values), False, metadata=meta))
                arrow_fields.append(pa.field(indices, _list_type(f, indices), False))
            else:
                arrow_fields.append(pa.field(f.name, _list_type(f, f.name), False, metadata=meta))
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
