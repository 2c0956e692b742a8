"""Coded top-k dumps by the CLI (`--topk-values uint8 --topk-indices elias_fano`): the
shards are smaller, every position holds the same ids as the fp16 dump's (sorted), each
value is within the 8-bit bound of the fp16 value of its id, and the student's top-k loss on
them equals the fp16 dump's to within that error; `knowledge info` says how each dump is
stored (compression, index width or code, value dtype); a dump of the format before the
codes still reads, and one it began resumes in its format."""

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
from lyceum.proto._topk_values import error_bound
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import (
    MANIFEST_NAME,
    Manifest,
    coverage_samples,
    dataset_fingerprint,
    model_identity,
)
from lyceum.proto.schema import KnowledgeSchema, topk
from lyceum.student_client import OfflineKnowledge
from lyceum.student_client.losses import TopKKD
from lyceum.teacher_server.dump import DumpConfig, KnowledgeWriter, dump_knowledge
from tests._support.llm_reference import MODEL_SPEC, VOCAB, llm_engine

pytestmark = pytest.mark.integration

_DATA: dict[str, Any] = {"n": 12, "vocab": VOCAB, "padding": "right", "seed": 4}
_K = 32


def _lyceum(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lyceum.deploy.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _dump(out: Path, *extra: str) -> None:
    _lyceum(
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
        str(_K),
        "--values",
        "log_probs",
        "--precision",
        "fp16",
        "--out",
        str(out),
        "--shard-rows",
        "5",
        "--workers",
        "0",
        "--quiet",
        *extra,
    )


def test_coded_dump_reads_back_within_the_bound(tmp_path: Path) -> None:
    _dump(tmp_path / "fp16")
    _dump(tmp_path / "coded", "--topk-values", "uint8", "--topk-indices", "elias_fano")
    plain, coded = OfflineKnowledge(tmp_path / "fp16"), OfflineKnowledge(tmp_path / "coded")
    field = coded.schema.field("logits")
    assert field.value_bits == 8 and field.index_code == "elias_fano"
    assert coded.schema.format_version == "1.2" and coded.verify() == []
    shard = tmp_path / "coded" / coded.manifest.shards[0].file
    arrow = pa.ipc.open_file(pa.memory_map(str(shard))).schema
    # 32 values + offset and scale; 32 ids of 1,024 in 5 low bits each + 64 high bits.
    assert arrow.field("logits.values").type.value_type == pa.list_(pa.uint8(), 36)
    assert arrow.field("logits.indices").type.value_type == pa.list_(pa.uint8(), 28)
    assert coded.manifest.bytes < plain.manifest.bytes  # headers dominate 12 short samples
    ids = torch.randperm(len(plain))
    want, got = plain.get(ids), coded.get(ids)
    loss = TopKKD.for_field(field)
    g = torch.Generator().manual_seed(0)
    pairs = zip(
        want.tensors["logits.values"].unbind(),
        want.tensors["logits.indices"].unbind(),
        got.tensors["logits.values"].unbind(),
        got.tensors["logits.indices"].unbind(),
        strict=True,
    )
    for want_v, want_i, v, i in pairs:
        assert v.dtype == torch.float16 and i.dtype == torch.int32
        ordered, order = torch.sort(want_i, dim=-1)
        assert torch.equal(i, ordered)
        exact = want_v.gather(-1, order).float()
        bound = torch.from_numpy(error_bound(exact.numpy()))[:, None]
        assert torch.all((v.float() - exact).abs() <= bound + 2**-11 * exact.abs() + 1e-7)
        student = torch.randn(v.shape[0], VOCAB, generator=g)
        a, b = loss(student, (want_v, want_i)), loss(student, (v, i))
        assert abs(float(a) - float(b)) <= 1e-3 * float(a)
    info = _lyceum("knowledge", "info", str(tmp_path / "coded")).stdout
    assert "compression: none (shards memory-mapped, zero-copy)" in info
    assert "schema:     format 1.2" in info
    assert "logits: float16 [*, 1024] topk(32, Elias-Fano indices, 8-bit values)" in info
    assert (
        "indices Elias-Fano coded (sorted ascending), 28 B a row; values 8-bit codes (read "
        "as float16), 36 B a row"
    ) in info
    info = _lyceum("knowledge", "info", str(tmp_path / "fp16")).stdout
    assert "logits: float16 [*, 1024] topk(32, 16-bit indices)" in info
    assert "indices 16-bit (1,024 ids), 64 B a row; values float16, 64 B a row" in info


def test_a_dump_of_the_format_before_codes_reads(tmp_path: Path) -> None:
    # What the previous Lyceum wrote: manifest 1.2, knowledge format 1.1 (no codes, no
    # stored inputs, shards of shard_rows samples).
    data = token_documents(n=6, vocab=VOCAB, seed=3)
    raw = json.loads(
        KnowledgeSchema(fields=(topk("t", "float16", (None, VOCAB), 4, "log_probs"),)).to_json()
    )
    raw["format_version"] = "1.1"
    old = KnowledgeSchema.from_json(json.dumps(raw))
    manifest = Manifest(
        format_version="1.2",
        knowledge_schema=old,
        model=model_identity("old", torch.nn.Linear(2, 2)),
        dataset=dataset_fingerprint(data),
        shard_rows=4,
    )
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(n, 4, generator=g).half() for n in range(1, 7)]
    indices = [torch.randint(0, VOCAB, (n, 4), generator=g, dtype=torch.int32) for n in range(1, 7)]
    with KnowledgeWriter(tmp_path / "old", manifest) as w:
        w.write(range(6), {"t.values": values, "t.indices": indices})
        w.close()
    written = json.loads((tmp_path / "old" / MANIFEST_NAME).read_bytes())
    assert written["format_version"] == "1.2" and "stored_inputs" not in written
    assert "shard_starts" not in written
    with OfflineKnowledge(tmp_path / "old") as knowledge:
        assert knowledge.manifest.num_shards == 2 and knowledge.input_fields == ()
        got = knowledge.get([5, 0])
        assert torch.equal(got.tensors["t.indices"].unbind()[0], indices[5])
        assert torch.equal(got.tensors["t.values"].unbind()[1], values[0])


def test_a_dump_begun_by_the_format_before_codes_resumes(tmp_path: Path) -> None:
    data = token_documents(n=8, vocab=VOCAB, padding="left", seed=7)
    engine = llm_engine(item_inputs(data[0]))
    identity = model_identity(MODEL_SPEC, engine.model)
    config = DumpConfig(workers=0, progress=False, batch_size=4, shard_rows=4)
    try:
        begun = Manifest(
            format_version="1.2",
            knowledge_schema=engine.schema.model_copy(update={"format_version": "1.1"}),
            model=identity,
            dataset=dataset_fingerprint(data, coverage_samples("sampled", len(data))),
            shard_rows=4,
        )
        # The earlier Lyceum finished shard 0 only (ids 0-3), then stopped.
        with KnowledgeWriter(tmp_path / "old", begun) as w:
            w.write(
                range(4),
                engine.infer(engine.collate_batch([item_inputs(data[i]) for i in range(4)])),
            )
        assert not Manifest.read(tmp_path / "old").complete
        resumed = dump_knowledge(engine, data, tmp_path / "old", config, identity)
        fresh = dump_knowledge(engine, data, tmp_path / "new", config, identity)
    finally:
        engine.close()
    assert resumed.complete and resumed.knowledge_schema.format_version == "1.1"
    assert fresh.knowledge_schema.format_version == "1.2"
    with OfflineKnowledge(tmp_path / "old") as old, OfflineKnowledge(tmp_path / "new") as new:
        assert old.verify() == []
        ids = list(range(8))
        want, got = new.get(ids), old.get(ids)
        for column, t in want.tensors.items():
            for a, b in zip(t.unbind(), got.tensors[column].unbind(), strict=True):
                assert torch.equal(a, b)
