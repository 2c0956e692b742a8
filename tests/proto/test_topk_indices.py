"""Top-k indices in the fewest bits: every width round-trips losslessly through the packer,
the codec and the Arrow layout; widths are chosen from the vocabulary; format 1.0 schemas
(int32 indices) still read as such."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lyceum.proto._topk_indices import (
    narrowest_bits,
    pack_indices,
    stored_count,
    unpack_indices,
)
from lyceum.proto.codec import decode, encode
from lyceum.proto.schema import FORMAT_VERSION, KnowledgeSchema, topk


@st.composite
def _indices(draw: st.DrawFn) -> tuple[int, np.ndarray]:
    bits = draw(st.integers(1, 32))
    rows = draw(st.integers(0, 5))
    count = draw(st.integers(1, 40))
    top = (1 << bits) - 1 if bits < 32 else 2**31 - 1
    values = draw(
        st.lists(st.integers(0, top), min_size=rows * count, max_size=rows * count)
        | st.just([top] * (rows * count))  # every bit set: the edges of each packed index
    )
    return bits, np.asarray(values, dtype=np.int64).astype(np.int32).reshape(rows, count)


@settings(max_examples=300, deadline=None)
@given(_indices())
def test_every_width_round_trips(case: tuple[int, np.ndarray]) -> None:
    bits, indices = case
    stored = pack_indices(indices, bits, "test")
    assert stored.shape == (indices.shape[0], stored_count(indices.shape[1], bits))
    assert stored.nbytes == indices.shape[0] * -(-indices.shape[1] * bits // 8)
    back = unpack_indices(stored, bits, indices.shape[1])
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, indices)


@pytest.mark.parametrize("bits", range(1, 33))
def test_every_width_through_the_codec(bits: int) -> None:
    vocab = min(1 << bits, 2**31 - 1)
    k = min(7, vocab)
    field = topk("tokens", "float16", (None, vocab), k, "log_probs")
    field = field.model_copy(
        update={"encoding": field.encoding.model_copy(update={"index_bits": bits})}
    )
    schema = KnowledgeSchema(fields=(field,))
    gen = torch.Generator().manual_seed(bits)
    lengths = [3, 0, 5]
    indices = [torch.randint(0, vocab, (n, k), generator=gen, dtype=torch.int32) for n in lengths]
    indices[0][0] = vocab - 1  # the largest id, every bit of the width set for powers of two
    values = [torch.randn(n, k, generator=gen).half() for n in lengths]
    data = encode(schema, [4, 5, 6], {"tokens.values": values, "tokens.indices": indices})
    batch = decode(data, schema)
    got = batch.tensors["tokens.indices"]
    assert got.dtype == torch.int32
    for want, row in zip(indices, got.unbind(), strict=True):
        assert torch.equal(row, want)
    index_column = pa.ipc.open_stream(data).read_all().schema.field("tokens.indices")
    assert index_column.type.value_type.list_size == stored_count(k, bits)


def test_widths_follow_the_vocabulary() -> None:
    assert [narrowest_bits(v) for v in (2, 256, 257, 1024, 65536, 65537, 128256, 2**20)] == [
        8,
        8,
        16,
        16,
        16,
        17,
        17,
        20,
    ]
    assert topk("t", "float16", (None, 128256), 128).index_bits == 17
    assert topk("t", "float16", (1000,), 5).index_bits == 16


def test_packed_bytes_per_position_at_128k() -> None:
    # 128 indices of 17 bits: 272 bytes a position, against 512 as int32.
    schema = KnowledgeSchema(fields=(topk("t", "bfloat16", (None, 128256), 128),))
    indices = [torch.randint(0, 128256, (10, 128), dtype=torch.int32)]
    values = [torch.zeros(10, 128, dtype=torch.bfloat16)]
    data = encode(schema, [0], {"t.values": values, "t.indices": indices})
    column = pa.ipc.open_stream(data).read_all().column("t.indices")
    assert column.chunk(0).values.values.nbytes == 10 * 272
    assert torch.equal(decode(data, schema).tensors["t.indices"].unbind()[0], indices[0])


def test_an_index_too_wide_for_its_bits_is_refused_when_encoding() -> None:
    schema = KnowledgeSchema(fields=(topk("t", "float32", (300,), 2),))  # 16 bits
    indices = torch.tensor([[0, 70000]]).int()  # packing it would keep 70000 % 65536
    with pytest.raises(
        ValueError,
        match=r"field 't' column 't.indices': top-k indices must be "
        r"in \[0, 65536\) to be stored in 16 bits, got \[0, 70000\]",
    ):
        encode(schema, [0], {"t.values": torch.zeros(1, 2), "t.indices": indices})


def test_bits_that_cannot_hold_the_vocabulary_are_refused() -> None:
    with pytest.raises(ValueError, match=r"16-bit top-k indices cannot hold the 70000 ids"):
        KnowledgeSchema.from_json(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "fields": [
                        {
                            "name": "t",
                            "dtype": "float16",
                            "shape": [None, 70000],
                            "encoding": {"kind": "topk", "k": 4, "index_bits": 16},
                        }
                    ],
                }
            )
        )


def test_format_1_0_schemas_read_their_indices_as_int32() -> None:
    new = KnowledgeSchema(fields=(topk("t", "float16", (None, 1024), 4, "log_probs"),))
    assert new.format_version == FORMAT_VERSION != "1.0"
    assert new.fields[0].index_bits == 16
    raw = json.loads(new.to_json())
    raw["format_version"] = "1.0"
    del raw["fields"][0]["encoding"]["index_bits"]
    old = KnowledgeSchema.from_json(json.dumps(raw))
    assert old.fields[0].index_bits == 32
    assert old.to_arrow().field("t.indices").type == pa.large_list(pa.list_(pa.int32(), 4))
    indices = [torch.tensor([[1, 2, 3, 1023]], dtype=torch.int32)]
    data = encode(old, [0], {"t.values": [torch.zeros(1, 4).half()], "t.indices": indices})
    assert torch.equal(decode(data, old).tensors["t.indices"].unbind()[0], indices[0])
