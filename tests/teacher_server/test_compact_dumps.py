"""Compact knowledge in dumps: a zstd dump (by the CLI) verifies and reads back equal to an
uncompressed one, with 16-bit indices and smaller shards; a format 1.0 dump (int32 indices,
written before compact indices) still reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch

from lyceum.deploy.examples import token_documents
from lyceum.proto.manifest import MANIFEST_NAME, Manifest, dataset_fingerprint, model_identity
from lyceum.proto.schema import KnowledgeSchema, topk
from lyceum.student_client import OfflineKnowledge
from lyceum.teacher_server.dump import KnowledgeWriter
from tests._support.llm_reference import VOCAB

pytestmark = pytest.mark.integration

_DATA: dict[str, Any] = {"n": 24, "vocab": VOCAB, "padding": "left", "seed": 2}


def _dump(out: Path, *extra: str) -> None:
    command = [
        sys.executable,
        "-m",
        "lyceum.deploy.cli",
        "teacher",
        "dump",
        "--model",
        'lyceum.deploy.examples:tiny_llama{"layers": 2, "hidden": 32}',
        "--dataset",
        "lyceum.deploy.examples:token_documents",
        "--dataset-kwargs",
        json.dumps(_DATA),
        "--output",
        "logits=@output.logits",
        "--topk",
        "16",
        "--values",
        "log_probs",
        "--precision",
        "fp16",
        "--out",
        str(out),
        "--shard-rows",
        "10",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--quiet",
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_zstd_dump_verifies_and_reads_back_equal(tmp_path: Path) -> None:
    _dump(tmp_path / "plain")
    _dump(tmp_path / "zstd", "--compression", "zstd")
    plain, packed = OfflineKnowledge(tmp_path / "plain"), OfflineKnowledge(tmp_path / "zstd")
    assert packed.manifest.compression == "zstd" and plain.manifest.compression is None
    assert packed.verify() == [] and plain.verify() == []
    field = packed.schema.field("logits")
    assert field.index_bits == 16 and packed.schema == plain.schema
    first = tmp_path / "zstd" / packed.manifest.shards[0].file
    reader = pa.ipc.open_file(pa.memory_map(str(first)))
    assert reader.schema.field("logits.indices").type.value_type.value_type == pa.uint16()
    assert packed.manifest.bytes < plain.manifest.bytes
    ids = torch.randperm(len(plain))
    want, got = plain.get(ids), packed.get(ids)
    assert got.sample_ids.tolist() == want.sample_ids.tolist()
    for column in ("logits.values", "logits.indices"):
        for a, b in zip(want.tensors[column].unbind(), got.tensors[column].unbind(), strict=True):
            assert torch.equal(a, b)
    data = token_documents(**_DATA)  # left-padded: the knowledge keeps the real positions
    lengths = [int(data[i]["attention_mask"].sum()) for i in ids.tolist()]
    assert [t.shape[0] for t in got.tensors["logits.indices"].unbind()] == lengths


def test_a_format_1_0_dump_reads_its_int32_indices(tmp_path: Path) -> None:
    new = KnowledgeSchema(fields=(topk("t", "float16", (None, 300), 4, "log_probs"),))
    raw = json.loads(new.to_json())
    raw["format_version"] = "1.0"
    del raw["fields"][0]["encoding"]["index_bits"]
    old = KnowledgeSchema.from_json(json.dumps(raw))
    assert old.fields[0].index_bits == 32
    data = token_documents(**_DATA)
    manifest = Manifest(
        format_version="1.1",
        knowledge_schema=old,
        model=model_identity("old", torch.nn.Linear(2, 2)),
        dataset=dataset_fingerprint(data),
        shard_rows=24,
    )
    g = torch.Generator().manual_seed(0)
    indices = [torch.randint(0, 300, (n, 4), generator=g, dtype=torch.int32) for n in (3, 1)]
    values = [torch.randn(n, 4, generator=g).half() for n in (3, 1)]
    with KnowledgeWriter(tmp_path / "old", manifest) as w:
        rows = len(data)
        every = [indices[i % 2] for i in range(rows)]
        w.write(range(rows), {"t.values": [values[i % 2] for i in range(rows)], "t.indices": every})
        w.close()
    written = json.loads((tmp_path / "old" / MANIFEST_NAME).read_bytes())
    assert written["knowledge_schema"]["format_version"] == "1.0"
    shard = tmp_path / "old" / "shard-00000.arrow"
    arrow = pa.ipc.open_file(pa.memory_map(str(shard))).schema
    assert arrow.field("t.indices").type == pa.large_list(pa.list_(pa.int32(), 4))
    got = OfflineKnowledge(tmp_path / "old").get([5, 2])
    assert torch.equal(got.tensors["t.indices"].unbind()[0], indices[1])
    assert torch.equal(got.tensors["t.indices"].unbind()[1], indices[0])
