"""A knowledge field's encodings: every value stored (`Dense`), or the k largest along the last
dimension with their indices (`TopK`). `lyceum.proto.schema` holds the fields that use them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from lyceum.proto._topk_indices import INT32_BITS

__all__ = ["Dense", "Encoding", "TopK"]


class Dense(BaseModel):
    """Every value of the field is stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["dense"] = "dense"


class TopK(BaseModel):
    """Only the k largest values along the last dimension are stored, with their indices."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["topk"] = "topk"
    k: int = Field(gt=0, description="How many values are kept per row of the last dimension.")
    index_bits: int | None = Field(
        default=None,
        ge=1,
        le=INT32_BITS,
        description="Bits per stored index: 8 or 16 (uint8/uint16), 32 (int32), any other "
        "width bit-packed. None: the narrowest the last dimension allows (`narrowest_bits`), "
        "filled in when the field is made.",
    )
    index_code: Literal["fixed", "elias_fano"] = Field(
        default="fixed",
        description="How a row's indices are stored: 'fixed', each in index_bits bits, in "
        "the order of their values (largest first); 'elias_fano', sorted ascending and "
        "Elias-Fano coded (fewer bits, e.g. 80 bytes for 128 ids of 1,024 instead of 256), "
        "the values stored in the same order.",
    )
    value_bits: Literal[8] | None = Field(
        default=None,
        description="None: values stored in the field's dtype; 8: one byte per value with a "
        "float16 offset and scale per row, error at most about (row max - row min) / 508 "
        "(`_topk_values`), decoded to the field's dtype.",
    )

    @model_serializer(mode="wrap")
    def _leave_out_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The 1.2 options are written only when used, so a schema without them has 1.1's
        # JSON (and 1.1 readers, which forbid unknown keys, still read it).
        data: dict[str, Any] = handler(self)
        if data.get("index_code") == "fixed":
            del data["index_code"]
        if data.get("value_bits") is None:
            data.pop("value_bits", None)
        return data


Encoding = Annotated[Dense | TopK, Field(discriminator="kind")]
