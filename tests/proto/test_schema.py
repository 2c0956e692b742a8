"""The knowledge schema: validation, JSON and Arrow round trips."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lyceum.proto import FieldSpec, KnowledgeSchema, TopK, dense, topk
from lyceum.proto.schema import FORMAT_VERSION, METADATA_VERSION_KEY


def test_json_and_arrow_round_trip():
    schema = KnowledgeSchema(
        fields=(
            dense("logits", "float16", (10,), "logits", temperature=4.0),
            topk("tokens", "bfloat16", (None, 32000), 50, "log_probs"),
            dense("mask", "bool", ()),
        )
    )
    assert KnowledgeSchema.from_json(schema.to_json()) == schema
    assert KnowledgeSchema.from_arrow(schema.to_arrow()) == schema
    assert schema.columns == ("logits", "tokens.values", "tokens.indices", "mask")
    assert schema.field("tokens").stored_shape == (None, 50)
    assert schema.field("tokens").row_shape == (50,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "sample_id", "dtype": "float32", "shape": (1,)}, "not allowed"),
        ({"name": "a.b", "dtype": "float32", "shape": (1,)}, "not allowed"),
        ({"name": "x", "dtype": "float64", "shape": (1,)}, "dtype"),
        ({"name": "x", "dtype": "float32", "shape": (3, None)}, "only the leading dimension"),
        ({"name": "x", "dtype": "float32", "shape": (0,)}, "size 0"),
        ({"name": "x", "dtype": "float32", "shape": (5,), "encoding": TopK(k=6)}, "exceeds"),
        ({"name": "x", "dtype": "float32", "shape": (), "encoding": TopK(k=1)}, "fixed last"),
    ],
)
def test_bad_fields_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        FieldSpec(**kwargs)


def test_duplicate_field_names_refused():
    with pytest.raises(ValidationError, match=r"duplicate field names.*'x'"):
        KnowledgeSchema(fields=(dense("x", "float32", (1,)), dense("x", "float16", (1,))))


def test_unknown_major_version_refused_with_advice():
    schema = KnowledgeSchema(fields=(dense("x", "float32", (1,)),))
    arrow = schema.to_arrow()
    meta = dict(arrow.metadata)
    meta[METADATA_VERSION_KEY] = b"7.1"
    with pytest.raises(ValueError, match=r"'7.1'.*reads 1.x"):
        KnowledgeSchema.from_arrow(arrow.with_metadata(meta))
    with pytest.raises(ValueError, match=r"'3.0'"):
        KnowledgeSchema.from_json(schema.to_json().replace(f'"{FORMAT_VERSION}"', '"3.0"'))


def test_minor_version_is_accepted():
    schema = KnowledgeSchema(fields=(dense("x", "float32", (1,)),), format_version="1.7")
    assert KnowledgeSchema.from_json(schema.to_json()).format_version == "1.7"
