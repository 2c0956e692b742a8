"""The knowledge codec: round trips of every dtype and encoding, zero-copy, bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lyceum.proto import KnowledgeSchema, decode, dense, encode, to_record_batch, topk
from lyceum.proto._schema_cache import CAPACITY, SCHEMAS, SchemaCache
from lyceum.proto.codec import TORCH_DTYPES, KnowledgeBatch, concat_batches, read_ipc, to_ipc
from lyceum.proto.schema import METADATA_SCHEMA_KEY, METADATA_VERSION_KEY, DType

DTYPES = list(TORCH_DTYPES)


def _random_tensor(dtype: DType, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == "bool":
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype in ("int32", "int64"):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=g).to(TORCH_DTYPES[dtype])
    return (torch.randn(shape, generator=g) * 100).to(TORCH_DTYPES[dtype])


def _topk_parts(shape: tuple[int, ...], k: int, dtype: DType, seed: int):
    dense_values = _random_tensor(dtype, shape, seed)
    values, indices = torch.topk(dense_values.float(), k, dim=-1)
    return values.to(TORCH_DTYPES[dtype]), indices.to(torch.int32)


@st.composite
def knowledge_cases(draw):
    """A schema with one field of any dtype/encoding/shape, plus matching tensors."""
    dtype = draw(st.sampled_from(DTYPES))
    variable = draw(st.booleans())
    rest = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    use_topk = draw(st.booleans()) and dtype != "bool" and (variable or rest)
    if use_topk and not rest:
        rest = (draw(st.integers(1, 6)),)
    shape: tuple[int | None, ...] = ((None, *rest) if variable else rest) or ()
    k = draw(st.integers(1, rest[-1])) if use_topk else 0
    spec = topk("f", dtype, shape, k) if use_topk else dense("f", dtype, shape)
    n = draw(st.integers(0, 5))
    ids = draw(st.lists(st.integers(0, 2**63 - 1), min_size=n, max_size=n, unique=True))
    seed = draw(st.integers(0, 10_000))
    lengths = [draw(st.integers(0, 4)) for _ in range(n)]
    tensors: dict[str, object] = {}
    if use_topk:
        if variable:
            parts = [_topk_parts((L, *rest), k, dtype, seed + i) for i, L in enumerate(lengths)]
            tensors["f.values"] = [p[0] for p in parts]
            tensors["f.indices"] = [p[1] for p in parts]
        else:
            tensors["f.values"], tensors["f.indices"] = _topk_parts((n, *rest), k, dtype, seed)
    elif variable:
        tensors["f"] = [_random_tensor(dtype, (L, *rest), seed + i) for i, L in enumerate(lengths)]
    else:
        tensors["f"] = _random_tensor(dtype, (n, *rest), seed)
    return KnowledgeSchema(fields=(spec,)), ids, tensors


@given(knowledge_cases())
def test_round_trip_every_dtype_and_encoding(case):
    schema, ids, tensors = case
    batch = decode(encode(schema, ids, tensors), schema)
    assert batch.sample_ids.tolist() == ids
    assert batch.schema == schema
    assert set(batch.tensors) == set(tensors)
    for column, want in tensors.items():
        got = batch.tensors[column]
        if isinstance(want, list):
            assert got.is_nested and got.size(0) == len(want)
            pieces = got.unbind() if len(want) else []
            for g, w in zip(pieces, want, strict=True):
                assert g.dtype == w.dtype and torch.equal(g, w)
        else:
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want)


def _schema() -> KnowledgeSchema:
    return KnowledgeSchema(
        fields=(dense("logits", "float32", (10,), "logits"), dense("feat", "float16", (2, 3)))
    )


def _tensors(n: int = 4) -> dict[str, torch.Tensor]:
    return {"logits": torch.randn(n, 10), "feat": torch.randn(n, 2, 3).half()}


def _buffer_range(batch: pa.RecordBatch) -> list[tuple[int, int]]:
    return [(b.address, b.address + b.size) for col in batch.columns for b in _all_buffers(col)]


def _all_buffers(arr: pa.Array):
    for b in arr.buffers():
        if b is not None:
            yield b


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int32", "int64", "bool"])
def test_decode_is_zero_copy(dtype):
    schema = KnowledgeSchema(fields=(dense("x", dtype, (3, 5)),))
    data = encode(schema, range(7), {"x": _random_tensor(dtype, (7, 3, 5), 1)})
    record = read_ipc(data)
    values = record.column("x").flatten()
    start = values.buffers()[1].address + values.offset * values.type.byte_width
    batch = decode(data, schema)
    assert batch.tensors["x"].data_ptr() == start
    # The view lies inside the message buffer itself: nothing was copied out of it.
    assert data.address <= batch.tensors["x"].data_ptr() < data.address + data.size


def test_variable_fields_share_offsets_and_are_views():
    schema = KnowledgeSchema(fields=(topk("tok", "float32", (None, 20), 4),))
    lengths = [3, 1, 5]
    parts = [_topk_parts((n, 20), 4, "float32", i) for i, n in enumerate(lengths)]
    data = encode(
        schema,
        [7, 8, 9],
        {"tok.values": [p[0] for p in parts], "tok.indices": [p[1] for p in parts]},
    )
    batch = decode(data, schema)
    values, indices = batch.tensors["tok.values"], batch.tensors["tok.indices"]
    assert values.is_nested and indices.is_nested  # a sequence field decodes to jagged tensors
    # Jagged nested tensors, which torch's stubs type as plain Tensors.
    assert values.offsets().tolist() == [0, 3, 4, 9]  # type: ignore[attr-defined]
    assert values.offsets() is indices.offsets()  # type: ignore[attr-defined]
    assert data.address <= values.values().data_ptr() < data.address + data.size
    # The same ragged dimension lets values and indices be combined directly.
    assert (values + indices.to(torch.float32)).size(0) == 3


def test_sliced_record_batch_decodes_its_own_rows():
    schema = KnowledgeSchema(fields=(dense("seq", "int64", (None, 2)),))
    seqs = [torch.full((n, 2), i) for i, n in enumerate([2, 3, 1, 4])]
    record = to_record_batch(schema, [10, 11, 12, 13], {"seq": seqs}).slice(1, 2)
    batch = decode(to_ipc(record), schema)
    assert batch.sample_ids.tolist() == [11, 12]
    assert [t.tolist() for t in batch.tensors["seq"].unbind()] == [
        seqs[1].tolist(),
        seqs[2].tolist(),
    ]


# --- bad input -------------------------------------------------------------------------


def test_encode_wrong_dtype_names_field_and_both_types():
    tensors = _tensors()
    tensors["logits"] = tensors["logits"].half()
    with pytest.raises(
        ValueError, match=r"field 'logits'.*expected float32 \[10\].*got float16 \[10\]"
    ):
        encode(_schema(), range(4), tensors)


def test_encode_wrong_shape():
    tensors = _tensors()
    tensors["feat"] = torch.randn(4, 3, 2).half()
    with pytest.raises(
        ValueError, match=r"field 'feat'.*expected float16 \[2, 3\].*got float16 \[3, 2\]"
    ):
        encode(_schema(), range(4), tensors)


def test_encode_missing_and_extra_columns():
    tensors = _tensors()
    del tensors["feat"]
    tensors["bogus"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"missing \['feat'\], unexpected \['bogus'\]"):
        encode(_schema(), range(4), tensors)


def test_encode_duplicate_ids():
    with pytest.raises(ValueError, match=r"duplicate ids \[3\]"):
        encode(_schema(), [1, 3, 3, 4], _tensors())


def test_encode_row_count_mismatch():
    with pytest.raises(ValueError, match="for 3 samples"):
        encode(_schema(), [1, 2, 3], _tensors(4))


def test_decode_against_other_schema_names_the_field():
    data = encode(_schema(), range(4), _tensors())
    other = KnowledgeSchema(
        fields=(dense("logits", "float16", (10,), "logits"), dense("feat", "float16", (2, 3)))
    )
    with pytest.raises(
        ValueError, match=r"field 'logits': expected logits: float16 \[10\].*got logits: float32"
    ):
        decode(data, other)


def test_decode_missing_field():
    data = encode(_schema(), range(4), _tensors())
    more = KnowledgeSchema(fields=(*_schema().fields, dense("extra", "float32", (1,))))
    with pytest.raises(ValueError, match=r"missing \['extra'\]"):
        decode(data, more)


def _forge(schema: KnowledgeSchema, arrays: list[pa.Array], names: list[str]) -> bytes:
    """A message whose metadata claims `schema` but whose columns are whatever we say."""
    meta = {METADATA_SCHEMA_KEY: schema.to_json().encode(), METADATA_VERSION_KEY: b"1.0"}
    batch = pa.RecordBatch.from_arrays(arrays, names=names).replace_schema_metadata(meta)
    return to_ipc(batch).to_pybytes()


def test_decode_forged_column_type_is_refused():
    schema = KnowledgeSchema(fields=(dense("x", "float32", (4,)),))
    bad = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6, np.float32)), 3)
    data = _forge(schema, [pa.array([1, 2], pa.uint64()), bad], ["sample_id", "x"])
    with pytest.raises(ValueError, match=r"column 'x': expected Arrow type"):
        decode(data)


def test_decode_forged_extra_column_is_refused():
    schema = KnowledgeSchema(fields=(dense("x", "float32", (1,)),))
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2, np.float32)), 1)
    data = _forge(schema, [pa.array([1, 2], pa.uint64()), x, x], ["sample_id", "x", "y"])
    with pytest.raises(ValueError, match=r"unexpected \['y'\]"):
        decode(data)


def test_decode_duplicate_ids_refused():
    schema = KnowledgeSchema(fields=(dense("x", "float32", (1,)),))
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2, np.float32)), 1)
    data = _forge(schema, [pa.array([5, 5], pa.uint64()), x], ["sample_id", "x"])
    with pytest.raises(ValueError, match=r"duplicate ids \[5\]"):
        decode(data)


def test_decode_topk_index_out_of_range_refused():
    schema = KnowledgeSchema(fields=(topk("z", "float32", (5,), 2),))
    values = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2, np.float32)), 2)
    indices = pa.FixedSizeListArray.from_arrays(pa.array(np.array([0, 9], np.uint8)), 2)
    data = _forge(
        schema,
        [pa.array([1], pa.uint64()), values, indices],
        ["sample_id", "z.values", "z.indices"],
    )
    with pytest.raises(ValueError, match=r"top-k indices must be in \[0, 5\), got \[0, 9\]"):
        decode(data)


def test_decode_nulls_refused():
    schema = KnowledgeSchema(fields=(dense("x", "float32", (1,)),))
    x = pa.FixedSizeListArray.from_arrays(pa.array([1.0, None], pa.float32()), 1)
    data = _forge(schema, [pa.array([1, 2], pa.uint64()), x], ["sample_id", "x"])
    with pytest.raises(ValueError, match="null"):
        decode(data)


# -9: the last 8 bytes are the optional end-of-stream marker, so cut one byte more.
@pytest.mark.parametrize("cut", [0, 1, 8, 100, -9, -100])
def test_decode_truncated_bytes(cut):
    data = encode(_schema(), range(4), _tensors()).to_pybytes()
    truncated = data[:cut]
    with pytest.raises(ValueError, match=r"not a valid Arrow IPC stream|exactly 1 record batch"):
        decode(truncated, _schema())


@given(st.binary(max_size=512))
def test_decode_garbage_bytes(blob):
    with pytest.raises(ValueError):
        decode(blob, _schema())


def test_decode_unknown_format_version():
    schema = _schema()
    batch = to_record_batch(schema, range(4), _tensors())
    meta = dict(batch.schema.metadata)
    meta[METADATA_VERSION_KEY] = b"2.0"
    data = to_ipc(batch.replace_schema_metadata(meta))
    with pytest.raises(ValueError, match=r"unknown knowledge format version '2.0'"):
        decode(data, schema)


def test_decode_plain_arrow_without_metadata():
    batch = pa.RecordBatch.from_arrays([pa.array([1, 2], pa.uint64())], names=["sample_id"])
    with pytest.raises(ValueError, match="no Lyceum metadata"):
        decode(to_ipc(batch))


def test_variable_field_refuses_dense_tensor():
    schema = KnowledgeSchema(fields=(dense("seq", "float32", (None, 4)),))
    with pytest.raises(ValueError, match="variable leading dimension"):
        encode(schema, [0, 1], {"seq": torch.zeros(2, 3, 4)})


def test_encode_accepts_nested_jagged_input():
    schema = KnowledgeSchema(fields=(dense("seq", "float32", (None, 2)),))
    pieces = [torch.randn(2, 2), torch.randn(5, 2)]
    njt = torch.nested.nested_tensor(pieces, layout=torch.jagged)
    batch = decode(encode(schema, [0, 1], {"seq": njt}), schema)
    for got, want in zip(batch.tensors["seq"].unbind(), pieces, strict=True):
        assert torch.equal(got, want)


def test_decode_forged_sequence_offsets_refused():
    schema = KnowledgeSchema(fields=(dense("seq", "float32", (None, 2)),))
    data = encode(schema, [1, 2], {"seq": [torch.zeros(3, 2), torch.zeros(1, 2)]}).to_pybytes()
    valid = np.array([0, 3, 4], np.int64).tobytes()
    assert data.count(valid) == 1
    # Arrow's reader does not check offsets against the values: the codec must.
    forged = data.replace(valid, np.array([0, 3, 1_000_000], np.int64).tobytes())
    with pytest.raises(ValueError, match="sequence offsets"):
        decode(forged)


def test_to_ipc_is_pyarrows_own_stream_at_both_sizes():
    schema = KnowledgeSchema(fields=(dense("logits", "float32", (1000,)),))
    for rows in (16, 300):  # 64 KB joins the cached pieces; 1.2 MB is written in one pass
        batch = to_record_batch(schema, range(rows), {"logits": torch.randn(rows, 1000)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        assert to_ipc(batch).to_pybytes() == sink.getvalue().to_pybytes()


def test_decode_after_the_schema_is_known_still_refuses_bad_streams():
    # The second message with a seen schema takes the cached path: it must refuse exactly
    # what the full reader refuses, with the same messages.
    schema = KnowledgeSchema(fields=(dense("logits", "float32", (5,)),))
    first = to_record_batch(schema, [1, 2], {"logits": torch.randn(2, 5)})
    decode(to_ipc(first), schema)
    second = to_record_batch(schema, [3, 4], {"logits": torch.randn(2, 5)})
    good = to_ipc(second).to_pybytes()
    back = decode(good, schema)
    assert back.sample_ids.tolist() == [3, 4]
    assert torch.equal(back.tensors["logits"], torch.from_numpy(
        second.column(1).flatten().to_numpy().reshape(2, 5)))  # fmt: skip
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, second.schema) as writer:
        writer.write_batch(second)
        writer.write_batch(first)
    with pytest.raises(ValueError, match="exactly 1 record batch, got 2"):
        decode(sink.getvalue(), schema)
    with pytest.raises(ValueError, match="truncated or garbage"):
        decode(good[: len(good) - 40], schema)
    with pytest.raises(ValueError):
        decode(good[:-8] + b"garbage!", schema)
    other = KnowledgeSchema(fields=(dense("logits", "float32", (6,)),))
    with pytest.raises(ValueError, match="schema mismatch"):
        decode(good, other)


def test_concat_batches_dense_and_jagged() -> None:
    schema = KnowledgeSchema(fields=(dense("f", "float32", (2,)), dense("s", "float32", (None, 1))))

    def batch(ids: list[int], rows: list[list[float]], seqs: list[list[float]]) -> KnowledgeBatch:
        jag = torch.nested.nested_tensor(
            [torch.tensor(s).reshape(-1, 1) for s in seqs], layout=torch.jagged
        )
        return KnowledgeBatch(torch.tensor(ids), {"f": torch.tensor(rows), "s": jag}, schema)

    a = batch([3, 1], [[1.0, 2.0], [3.0, 4.0]], [[1.0], [2.0, 3.0]])
    b = batch([9], [[5.0, 6.0]], [[4.0, 5.0, 6.0]])
    c = concat_batches([a, b])
    assert c.sample_ids.tolist() == [3, 1, 9]
    assert c.tensors["f"].tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert c.tensors["s"].offsets().tolist() == [0, 1, 3, 6]  # type: ignore[attr-defined]
    assert c.tensors["s"].values().flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def _schemas(n: int) -> list[KnowledgeSchema]:
    return [KnowledgeSchema(fields=(dense("logits", "float32", (k + 1,)),)) for k in range(n)]


def test_the_schema_cache_keeps_the_most_recently_used_schemas() -> None:
    one, two, three = _schemas(3)
    cache = SchemaCache(capacity=2)
    first = cache.arrow(one)
    assert cache.arrow(one) is first  # built once
    second = cache.arrow(two)
    assert cache.arrow(one) is first  # used again: now the most recent
    cache.arrow(three)  # the cache is full: `two`, the least recently used, goes
    assert cache.arrow(one) is first and cache.arrow(two) is not second
    assert cache.arrow(two).equals(second, check_metadata=True)
    # Found by its Arrow schema, too, with its schema message serialised once.
    assert cache.message(first) is cache.message(one.to_arrow())
    assert cache.message(first) == first.serialize().to_pybytes()


def test_the_schema_cache_remembers_received_messages_and_passed_validations() -> None:
    one, two = _schemas(2)
    cache = SchemaCache(capacity=4)
    arrow = one.to_arrow()
    message = arrow.serialize().to_pybytes()
    assert cache.received(message) is None
    entry = cache.remember(message, arrow)
    assert cache.received(message) is entry and entry.arrow.equals(arrow, check_metadata=True)
    calls = []

    def validate() -> KnowledgeSchema:
        calls.append(1)
        return one

    assert cache.validated(arrow, one, "here", validate) is one
    assert cache.validated(arrow, one, "here", validate) is one and len(calls) == 1
    cache.validated(arrow, one, "elsewhere", validate)  # another place: validated again
    assert len(calls) == 2

    def refuse() -> KnowledgeSchema:
        calls.append(1)
        raise ValueError("mismatch")

    for _ in range(2):  # a validation that failed is not remembered: it fails again
        with pytest.raises(ValueError, match="mismatch"):
            cache.validated(arrow, two, "here", refuse)
    assert len(calls) == 4


def test_a_peer_sending_new_schemas_cannot_grow_the_cache() -> None:
    for schema in _schemas(CAPACITY + 20):
        decode(encode(schema, [0], {"logits": torch.zeros(1, schema.fields[0].shape[0] or 1)}))
    assert len(SCHEMAS) <= CAPACITY
