"""Coded top-k knowledge (format 1.2): 8-bit values keep their stated error bound and -inf,
Elias-Fano indices round-trip losslessly for any vocabulary and k, both travel through the
codec (the values sorted with their indices, decoded to the field's float dtype), and a
schema without them still has format 1.1's JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lyceum.proto._topk_indices import ef_decode, ef_encode, ef_stored_count
from lyceum.proto._topk_values import decode_values, encode_values, error_bound
from lyceum.proto.codec import decode, encode, ipc_size, to_record_batch
from lyceum.proto.schema import DType, FieldSpec, KnowledgeSchema, TopK, topk
from lyceum.proto.sizes import message_bytes


@st.composite
def _value_rows(draw: st.DrawFn) -> np.ndarray:
    rows = draw(st.integers(0, 6))
    k = draw(st.integers(1, 40))
    element = st.floats(-60000, 60000, width=32) | st.just(float("-inf"))
    span = draw(st.sampled_from([1e-6, 1.0, 30.0, 60000.0]))
    flat = draw(st.lists(element, min_size=rows * k, max_size=rows * k))
    values = np.asarray(flat, dtype=np.float32).reshape(rows, k)
    # Rows of log-prob-like spans as well as arbitrary ones: the bound is relative to a row.
    finite = np.isfinite(values)
    values[finite] = values[finite] % span - span
    return values


@settings(max_examples=300, deadline=None)
@given(_value_rows())
def test_8_bit_values_stay_within_the_bound(values: np.ndarray) -> None:
    stored = encode_values(values, "test")
    assert stored.dtype == np.uint8 and stored.shape == (values.shape[0], values.shape[1] + 4)
    back = decode_values(stored, values.shape[1])
    finite = np.isfinite(values)
    assert np.array_equal(np.isneginf(back), ~finite)
    error = np.abs(np.where(finite, back, 0).astype(np.float64) - np.where(finite, values, 0))
    assert np.all(error.max(axis=1, initial=0.0) <= error_bound(values))


def test_8_bit_bound_is_about_a_508th_of_the_row_span() -> None:
    g = np.random.default_rng(0)
    values = np.sort(g.uniform(-12.0, -2.0, size=(200, 128)).astype(np.float32), axis=1)
    span = values.max(axis=1) - values.min(axis=1)
    assert np.all(error_bound(values) <= span / 508 * 1.002 + 1e-5)
    back = decode_values(encode_values(values, "t"), 128)
    assert np.abs(back - values).max() <= float((span / 508).max()) * 1.002 + 1e-5
    # A row's largest value is its offset: it comes back within float16's rounding.
    assert np.abs(back[:, -1] - values[:, -1]).max() <= 2**-8


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])
def test_8_bit_values_refuse_what_no_code_holds(bad: float) -> None:
    values = np.zeros((2, 4), dtype=np.float32)
    values[1, 2] = bad
    with pytest.raises(ValueError, match=r"field 'x'.*8-bit top-k values.*--topk-values float"):
        encode_values(values, "field 'x'")


@st.composite
def _index_rows(draw: st.DrawFn) -> tuple[int, np.ndarray]:
    vocab = draw(st.integers(1, 1 << 20) | st.sampled_from([1, 2, 255, 256, 1024, 131072]))
    k = draw(st.integers(1, min(vocab, 64)))
    rows = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    g = np.random.default_rng(seed)
    picked = [g.choice(vocab, size=k, replace=False) for _ in range(rows)]
    if rows and draw(st.booleans()):
        picked[0] = np.arange(vocab - k, vocab)  # the top ids: every high bit at its end
    return vocab, np.asarray(picked, dtype=np.int32).reshape(rows, k)


@settings(max_examples=300, deadline=None)
@given(_index_rows())
def test_elias_fano_round_trips_every_vocabulary_and_k(case: tuple[int, np.ndarray]) -> None:
    vocab, indices = case
    stored = ef_encode(indices, vocab, "test")
    assert stored.dtype == np.uint8
    assert stored.shape == (indices.shape[0], ef_stored_count(indices.shape[1], vocab))
    back = ef_decode(stored, vocab, indices.shape[1])
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, np.sort(indices, axis=1))


def test_elias_fano_sizes() -> None:
    # k = 128: 80 bytes of 1,024 ids (fixed uint16: 256), 192 of 128k (fixed 17 bits: 272).
    assert ef_stored_count(128, 1024) == 80
    assert ef_stored_count(128, 131072) == 192
    assert ef_stored_count(8, 1024) == 9
    assert ef_stored_count(1, 1) == 1


def test_elias_fano_refuses_a_corrupt_row() -> None:
    stored = ef_encode(np.array([[3, 9, 700]], dtype=np.int32), 1024, "t")
    # 8 low bits each (3 bytes), then the high parts 0, 0, 2 as ones at bits 0, 1 and 4:
    # one more 1 there reads as four ids where three were written.
    assert stored[0, 3] == 0b10011
    stored[0, 3] |= 0b1000
    with pytest.raises(ValueError, match="a row does not hold 3 ids"):
        ef_decode(stored, 1024, 3)
    with pytest.raises(ValueError, match=r"must be in \[0, 1024\), got \[3, 1024\]"):
        ef_encode(np.array([[3, 1024]], dtype=np.int32), 1024, "t")


def _coded(dtype: DType, vocab: int, k: int, shape: tuple[int | None, ...]) -> FieldSpec:
    encoding = TopK(k=k, value_bits=8, index_code="elias_fano")
    return FieldSpec(
        name="lp", dtype=dtype, shape=(*shape, vocab), encoding=encoding, meaning="log_probs"
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_coded_sequences_through_the_codec(dtype: DType) -> None:
    vocab, k = 1024, 32
    schema = KnowledgeSchema(fields=(_coded(dtype, vocab, k, (None,)),))
    g = torch.Generator().manual_seed(1)
    log_probs = [torch.log_softmax(3 * torch.randn(n, vocab, generator=g), -1) for n in (5, 0, 9)]
    tops = [lp.topk(k, dim=-1) for lp in log_probs]
    torch_dtype = getattr(torch, dtype)
    batch = decode(
        encode(
            schema,
            [4, 1, 7],
            {
                "lp.values": [v.to(torch_dtype) for v, _ in tops],
                "lp.indices": [i.to(torch.int32) for _, i in tops],
            },
        ),
        schema,
    )
    values, indices = batch.tensors["lp.values"], batch.tensors["lp.indices"]
    assert values.dtype == torch_dtype and indices.dtype == torch.int32
    for lp, (want_v, want_i), v, i in zip(
        log_probs, tops, values.unbind(), indices.unbind(), strict=True
    ):
        assert v.shape == want_v.shape
        # The same ids, ascending, and each value is its own id's log-prob within the bound.
        assert torch.equal(i, torch.sort(want_i.to(torch.int32), dim=-1).values)
        if not lp.shape[0]:
            continue
        bound = error_bound(want_v.to(torch_dtype).float().numpy())
        exact = lp.gather(-1, i.long()).to(torch_dtype).float()
        cast = float(torch.finfo(torch_dtype).eps) * 8  # the field dtype's own rounding
        assert torch.all((v.float() - exact).abs() <= torch.from_numpy(bound)[:, None] + cast)


def test_coded_fixed_shape_and_sizes() -> None:
    vocab, k, rows = 131072, 128, 6
    spec = _coded("float16", vocab, k, ())
    schema = KnowledgeSchema(fields=(spec,))
    g = torch.Generator().manual_seed(2)
    v, i = torch.randn(rows, vocab, generator=g).log_softmax(-1).topk(k, dim=-1)
    tensors = {"lp.values": v.half(), "lp.indices": i.to(torch.int32)}
    batch = to_record_batch(schema, range(rows), tensors)
    assert spec.stored_row_size("lp.values") == k + 4
    assert spec.stored_row_size("lp.indices") == 192
    assert ipc_size(batch) <= message_bytes(schema, [0] * rows)
    back = decode(encode(schema, range(rows), tensors), schema)
    assert torch.equal(back.tensors["lp.indices"], torch.sort(i.to(torch.int32), -1).values)


def test_8_bit_values_need_a_float_field() -> None:
    with pytest.raises(ValueError, match="8-bit top-k values code floats, not int32"):
        FieldSpec(name="x", dtype="int32", shape=(10,), encoding=TopK(k=2, value_bits=8))


def test_a_schema_without_codes_has_the_json_of_1_1() -> None:
    plain = KnowledgeSchema(fields=(topk("t", "float16", (None, 300), 4, "log_probs"),))
    raw = json.loads(plain.to_json())
    assert raw["fields"][0]["encoding"] == {"kind": "topk", "k": 4, "index_bits": 16}
    raw["format_version"] = "1.1"
    old = KnowledgeSchema.from_json(json.dumps(raw))
    assert old.fields == plain.fields and old.fields[0].index_code == "fixed"
    coded = KnowledgeSchema(fields=(_coded("float16", 300, 4, (None,)),))
    encoding = json.loads(coded.to_json())["fields"][0]["encoding"]
    assert encoding["value_bits"] == 8 and encoding["index_code"] == "elias_fano"
    assert KnowledgeSchema.from_json(coded.to_json()) == coded
    assert "Elias-Fano indices, 8-bit values" in coded.fields[0].describe()
