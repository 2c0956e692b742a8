"""Row addressing of a shard: the byte offsets `shard_rows` computes for a memory-mapped Arrow
file hold exactly the rows the codec reads from its record batches (fixed and sequence
fields, bfloat16 and top-k indices), and stored values out of range are refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lyceum.proto.codec import from_record_batch, to_record_batch
from lyceum.proto.schema import KnowledgeSchema, dense, topk
from lyceum.proto.shard_rows import (
    OFFSET_BYTES,
    MappedShard,
    byte_rows,
    list_offset_rows,
    value_rows,
)

SCHEMA = KnowledgeSchema(
    fields=(dense("feat", "bfloat16", (2, 3)), topk("tokens", "float32", (None, 50), k=4))
)


def _batch(start: int, lengths: list[int], seed: int) -> pa.RecordBatch:
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    return to_record_batch(
        SCHEMA,
        np.arange(start, start + n, dtype=np.uint64),
        {
            "feat": torch.randn(n, 2, 3, generator=g).to(torch.bfloat16),
            "tokens.values": [torch.randn(t, 4, generator=g) for t in lengths],
            "tokens.indices": [torch.randint(0, 50, (t, 4), generator=g, dtype=torch.int32) for t in lengths],
        },
    )  # fmt: skip


@pytest.fixture
def shard(tmp_path: Path) -> Iterator[tuple[list[MappedShard], list[pa.RecordBatch]]]:
    """Two shard files of two record batches each, memory-mapped."""
    written = [
        [_batch(0, [3, 1, 4], 1), _batch(3, [1, 5], 2)],
        [_batch(5, [2], 3), _batch(6, [6, 2, 1], 4)],
    ]
    shards, maps = [], []
    for k, batches in enumerate(written):
        path = tmp_path / f"shard-{k}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batches[0].schema) as w:
            for b in batches:
                w.write_batch(b)
        mapped = pa.memory_map(str(path))
        maps.append(mapped)
        reader = pa.ipc.open_file(mapped)
        whole = mapped.read_buffer(path.stat().st_size)
        shards.append(MappedShard(path.name, whole, [reader.get_batch(i) for i in range(2)]))
    yield shards, [b for s in shards for b in s.batches]
    for mapped in maps:
        mapped.close()


def test_fixed_rows_are_where_the_codec_reads_them(shard) -> None:
    shards, batches = shard
    feat = value_rows(SCHEMA.field("feat"), "feat", shards)
    assert feat.row_bytes == 2 * 3 * 2 and feat.dtype == "bfloat16"
    for b, batch in enumerate(batches):
        want = from_record_batch(batch).tensors["feat"]
        shard_of = 0 if b < 2 else 1
        view = byte_rows(shards[shard_of].whole, feat.row_bytes)
        rows = np.arange(batch.num_rows)
        raw = view[feat.at(np.full(rows.size, b), rows)]
        got = feat.tensor(raw, batch.num_rows, "dump")
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_sequence_rows_are_addressed_by_their_list_offsets(shard) -> None:
    shards, batches = shard
    spec = SCHEMA.field("tokens")
    offsets = list_offset_rows(spec, shards)
    assert offsets.row_bytes == OFFSET_BYTES
    columns = [value_rows(spec, c, shards) for c in spec.columns]
    for b, batch in enumerate(batches):
        want = from_record_batch(batch)
        whole = shards[0 if b < 2 else 1].whole
        for r in range(batch.num_rows):
            at = offsets.at(np.array([b]), np.array([r, r + 1]))
            lo, hi = byte_rows(whole, OFFSET_BYTES)[at].view(np.int64).tolist()
            for col in columns:
                pos = col.at(np.full(hi - lo, b), np.arange(lo, hi))
                got = col.tensor(byte_rows(whole, col.row_bytes)[pos], hi - lo, "dump")
                assert torch.equal(got, want.tensors[col.name].unbind()[r]), (b, r, col.name)


def test_stored_indices_out_of_range_are_refused(shard) -> None:
    shards, _ = shard
    spec = SCHEMA.field("tokens")
    indices = value_rows(spec, "tokens.indices", shards)
    bad = np.array([[1, 2, 3, 50]], dtype=np.uint8).view(np.dtype((np.void, indices.row_bytes)))
    with pytest.raises(ValueError) as err:
        indices.tensor(bad.reshape(-1), 1, "dump 'd'")
    message = str(err.value)
    assert message.startswith(
        "dump 'd': field 'tokens': top-k indices must be in [0, 50), got [1, 50]"
    )
    assert "run `lyceum knowledge verify`" in message
