"""The offline dump: shard layout, manifest, resume after kill -9, refusals that change nothing."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lyceum.deploy.examples import digits, resnet_cnn, teacher_cnn, tiny_lm, token_sequences
from lyceum.proto.manifest import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    DatasetFingerprint,
    Manifest,
    fingerprint_indices,
    model_identity,
)
from lyceum.proto.schema import KnowledgeSchema, dense
from lyceum.student_client.offline import OfflineKnowledge
from lyceum.teacher_server.dump import DumpConfig, KnowledgeWriter, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine
from tests._support.teachers import DIGITS, ENV

QUIET = DumpConfig(shard_rows=100, batch_size=32, workers=0, progress=False)


def _tensor(column: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A dense column (a list is a sequence field's, one tensor per sample)."""
    assert isinstance(column, torch.Tensor)
    return column


def _tree_digest(directory: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (sha256, inode, mtime_ns) of every file: detects any change at all."""
    out = {}
    for p in sorted(directory.iterdir()):
        st = p.stat()
        out[p.name] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def cnn_engine() -> TeacherEngine:
    torch.manual_seed(0)
    model = teacher_cnn(width=8)
    return TeacherEngine(model, EngineConfig(), digits("test")[0][0])


def test_dump_layout_and_manifest(tmp_path: Path, cnn_engine: TeacherEngine) -> None:
    data = digits("test")  # 360 samples -> shards of 100, 100, 100, 60
    identity = model_identity("cnn", cnn_engine.model)
    manifest = dump_knowledge(cnn_engine, data, tmp_path, QUIET, identity)
    assert manifest.complete and manifest.rows == 360
    assert [(s.start, s.stop) for s in manifest.shards] == [
        (0, 100),
        (100, 200),
        (200, 300),
        (300, 360),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        MANIFEST_NAME,
        "shard-00000.arrow",
        "shard-00001.arrow",
        "shard-00002.arrow",
        "shard-00003.arrow",
    ]
    on_disk = Manifest.read(tmp_path)
    assert on_disk == manifest
    for s in manifest.shards:
        data_bytes = (tmp_path / s.file).read_bytes()
        assert len(data_bytes) == s.bytes
        assert hashlib.sha256(data_bytes).hexdigest() == s.sha256
    # The knowledge is the engine's output for each sample id, batched as the dump batches
    # (32 stacked samples, never across a shard boundary): conv kernels' results depend on
    # batch size and alignment in the last bit.
    with OfflineKnowledge(tmp_path, dataset=data) as knowledge:
        batch = knowledge.get(list(range(360)))
    bounds = [(a, min(a + 32, s.stop)) for s in manifest.shards for a in range(s.start, s.stop, 32)]
    expected = torch.cat(
        [
            _tensor(cnn_engine.infer(torch.stack([data[i][0] for i in range(a, b)]))["logits"])
            for a, b in bounds
        ]
    )
    assert torch.equal(batch.tensors["logits"], expected)
    # Rerunning a complete dump rewrites nothing.
    before = _tree_digest(tmp_path)
    assert dump_knowledge(cnn_engine, data, tmp_path, QUIET, identity) == manifest
    assert _tree_digest(tmp_path) == before


def test_record_batches_are_accumulated(tmp_path: Path) -> None:
    schema = KnowledgeSchema(fields=(dense("logits", "float32", (1000,)),))
    manifest = Manifest(
        knowledge_schema=schema,
        model=model_identity("synthetic", torch.nn.Linear(1, 1)),
        dataset=DatasetFingerprint(length=1000, samples=64, sha256="0" * 64),
        shard_rows=1000,
    )
    with KnowledgeWriter(tmp_path, manifest, record_batch_bytes=1 << 20) as writer:
        for lo in range(0, 1000, 50):  # 50 rows of 4000 bytes: 200 kB per write
            ids = np.arange(lo, lo + 50)
            values = torch.arange(lo * 1000, (lo + 50) * 1000, dtype=torch.float32)
            writer.write(ids, {"logits": values.reshape(50, 1000)})
        final = writer.close()
    reader = pa.ipc.open_file(pa.memory_map(str(tmp_path / final.shards[0].file)))
    rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
    # 1 MiB / 200 kB -> six writes (300 rows) per record batch, the rest in the last one.
    assert rows == [300, 300, 300, 100]
    with OfflineKnowledge(tmp_path) as knowledge:
        got = knowledge.get([999, 0, 301])
    assert got.tensors["logits"][:, 0].tolist() == [999000.0, 0.0, 301000.0]


def test_writer_rejects_gaps(tmp_path: Path) -> None:
    schema = KnowledgeSchema(fields=(dense("x", "float32", (2,)),))
    manifest = Manifest(
        knowledge_schema=schema,
        model=model_identity("synthetic", torch.nn.Linear(1, 1)),
        dataset=DatasetFingerprint(length=10, samples=10, sha256="0" * 64),
        shard_rows=5,
    )
    with KnowledgeWriter(tmp_path, manifest) as writer:
        writer.write([0, 1], {"x": torch.zeros(2, 2)})
        with pytest.raises(ValueError, match=r"expects ids 2\.\.2 next"):
            writer.write([3], {"x": torch.zeros(1, 2)})
        with pytest.raises(ValueError, match="shard 0 is incomplete"):
            writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]


def test_refuses_another_model_schema_dataset_or_shard_size(
    tmp_path: Path, cnn_engine: TeacherEngine
) -> None:
    data = digits("test")
    identity = model_identity("cnn", cnn_engine.model)
    dump_knowledge(cnn_engine, data, tmp_path, QUIET, identity)
    before = _tree_digest(tmp_path)

    torch.manual_seed(1)
    other_model = teacher_cnn(width=8)
    other = TeacherEngine(other_model, EngineConfig(), data[0][0])
    with pytest.raises(ValueError, match="model weights_sha256"):
        dump_knowledge(other, data, tmp_path, QUIET, model_identity("cnn", other_model))
    fp16 = TeacherEngine(cnn_engine.model, EngineConfig(precision="fp16"), data[0][0])
    with pytest.raises(ValueError, match=r"knowledge schema.*float16"):
        dump_knowledge(fp16, data, tmp_path, QUIET, identity)
    with pytest.raises(ValueError, match="dataset: the directory has 360 samples"):
        dump_knowledge(cnn_engine, digits("val"), tmp_path, QUIET, identity)
    bigger = QUIET.model_copy(update={"shard_rows": 200})
    with pytest.raises(ValueError, match="shard rows: the directory has 100, this run has 200"):
        dump_knowledge(cnn_engine, data, tmp_path, bigger, identity)
    assert _tree_digest(tmp_path) == before


def test_refuses_a_foreign_directory(tmp_path: Path, cnn_engine: TeacherEngine) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not empty and has no manifest.json"):
        dump_knowledge(
            cnn_engine, digits("test"), tmp_path, QUIET, model_identity("cnn", cnn_engine.model)
        )
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_resume_removes_debris_and_skips_complete_shards(
    tmp_path: Path, cnn_engine: TeacherEngine
) -> None:
    data = digits("test")
    identity = model_identity("cnn", cnn_engine.model)
    full = dump_knowledge(cnn_engine, data, tmp_path / "full", QUIET, identity)
    # Simulate a run killed while writing shard 2: shards 0-1 listed, 2 half-written,
    # 3 renamed but not yet listed.
    part = tmp_path / "part"
    dump_knowledge(cnn_engine, data, part, QUIET, identity)
    kept = Manifest.read(part).model_copy(update={"shards": full.shards[:2]})
    kept.write(part)
    (part / "shard-00002.arrow").rename(part / "shard-00002.arrow.tmp")
    (part / "shard-00002.arrow.tmp").write_bytes(b"half a shard")
    before = _tree_digest(part)
    resumed = dump_knowledge(cnn_engine, data, part, QUIET, identity)
    after = _tree_digest(part)
    # Equal but for the creation time, which a resume keeps from the first run.
    assert resumed.model_copy(update={"created_at": full.created_at}) == full
    assert not [p for p in part.iterdir() if p.name.endswith(".tmp")]
    for name in ("shard-00000.arrow", "shard-00001.arrow"):
        assert after[name] == before[name]  # same bytes, inode and mtime: not rewritten
    assert after["shard-00003.arrow"][1:] != before["shard-00003.arrow"][1:]  # redone


def test_token_level_topk_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = token_sequences(n=90)
    model = tiny_lm()
    engine = TeacherEngine(model, EngineConfig(topk=4, precision="fp16"), data[0][0])
    config = DumpConfig(shard_rows=40, batch_size=16, workers=0, progress=False)
    dump_knowledge(engine, data, tmp_path, config, model_identity("lm", model))
    ids = [89, 5, 41, 40, 0, 39]
    with OfflineKnowledge(tmp_path, dataset=data) as knowledge:
        batch = knowledge.get(ids)
    assert batch.sample_ids.tolist() == ids
    values, indices = batch.tensors["logits.values"], batch.tensors["logits.indices"]
    assert values.is_nested and values.dtype == torch.float16 and indices.dtype == torch.int32
    for j, i in enumerate(ids):
        tokens = data[i][0]
        expected = engine.infer(tokens.unsqueeze(0), [len(tokens)])
        assert values[j].shape == (len(tokens), 4)
        assert torch.equal(values[j], expected["logits.values"][0])
        assert torch.equal(indices[j], expected["logits.indices"][0])


def _dump_command(
    out: Path, checkpoint: Path, killing: dict[str, object] | None = None
) -> list[str]:
    """The dump of digits (all splits); `killing` (its kwargs) makes it `killed_once`."""
    dataset = "tests._support.dump_datasets:killed_once" if killing else DIGITS
    return [
        sys.executable,
        "-m",
        "lyceum.deploy.cli",
        "teacher",
        "dump",
        "--model",
        'lyceum.deploy.examples:resnet_cnn{"width": 48}',
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        dataset,
        "--dataset-kwargs",
        json.dumps({"split": "all", **(killing or {})}),
        "--out",
        str(out),
        "--shard-rows",
        "128",
        "--batch-size",
        "32",
        "--workers",
        "1",
        "--quiet",
    ]


@pytest.mark.integration
@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet.pt"
    torch.save(resnet_cnn(width=48).state_dict(), checkpoint)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **ENV}
    killed = tmp_path / "killed"
    # The dataset SIGKILLs the dump reading sample 600 (shard 4 of 15), once the manifest lists
    # a finished shard: cut after some shards and before the end, with no race to lose.
    kill = {"kill_at": 600, "marker": str(tmp_path / "marker"), "listed": 1, "out": str(killed)}
    command = _dump_command(killed, checkpoint, kill)
    done_once = subprocess.run(command, env=env, timeout=300)
    assert done_once.returncode == -signal.SIGKILL
    interrupted = Manifest.read(killed)
    assert 1 <= len(interrupted.shards) < interrupted.num_shards, "the dump was not cut mid-way"
    done = {s.file: (killed / s.file).stat() for s in interrupted.shards}

    subprocess.run(command, env=env, check=True, timeout=300)  # the marker exists: no kill
    subprocess.run(_dump_command(tmp_path / "whole", checkpoint), env=env, check=True, timeout=300)

    resumed, whole = Manifest.read(killed), Manifest.read(tmp_path / "whole")
    assert resumed.complete and resumed.shards == whole.shards  # same bytes, shard by shard
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]
    for name, st in done.items():
        now = (killed / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    ids = np.random.default_rng(0).permutation(whole.dataset.length)
    with OfflineKnowledge(killed) as a, OfflineKnowledge(tmp_path / "whole") as b:
        assert torch.equal(a.get(ids).tensors["logits"], b.get(ids).tensors["logits"])


class _OneSampleChanged(torch.utils.data.Dataset):
    """`base` with the input of one sample changed (a pixel brightened)."""

    def __init__(self, base: torch.utils.data.Dataset, index: int) -> None:
        self.base, self.index = base, index

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[i]
        return (x + 1.0 if i == self.index else x), y


def test_full_fingerprint_refuses_what_sampled_accepts(
    tmp_path: Path, cnn_engine: TeacherEngine
) -> None:
    data = digits("test")
    changed = _OneSampleChanged(data, 1)
    assert 1 not in fingerprint_indices(len(data))  # between two of the 64 sampled items
    identity = model_identity("cnn", cnn_engine.model)
    sampled = dump_knowledge(cnn_engine, data, tmp_path / "sampled", QUIET, identity)
    full_config = QUIET.model_copy(update={"fingerprint": "full"})
    full = dump_knowledge(cnn_engine, data, tmp_path / "full", full_config, identity)
    assert (sampled.dataset.samples, sampled.dataset.coverage) == (64, "sampled")
    assert (full.dataset.samples, full.dataset.coverage) == (360, "full")
    with OfflineKnowledge(tmp_path / "sampled", dataset=changed):
        pass  # the trade-off of sampling: accepted
    with pytest.raises(ValueError, match=r"different dataset .*every sample hashed"):
        OfflineKnowledge(tmp_path / "full", dataset=changed)
    with OfflineKnowledge(tmp_path / "full", dataset=data):
        pass
    # Resuming with the other coverage is refused by name, changing nothing.
    before = _tree_digest(tmp_path / "full")
    with pytest.raises(ValueError, match=r"hashed 360 of 360 samples \(--fingerprint full\)"):
        dump_knowledge(cnn_engine, data, tmp_path / "full", QUIET, identity)
    assert _tree_digest(tmp_path / "full") == before


def test_manifest_records_creation_and_resume_keeps_it(
    tmp_path: Path, cnn_engine: TeacherEngine
) -> None:
    data = digits("test")
    identity = model_identity("cnn", cnn_engine.model)
    started = datetime.now(UTC).replace(microsecond=0)
    first = dump_knowledge(cnn_engine, data, tmp_path, QUIET, identity)
    assert first.format_version == MANIFEST_VERSION
    assert first.created_at is not None
    assert started <= first.created_at <= datetime.now(UTC)
    assert first.lyceum_version == importlib.metadata.version("lyceum-kd")
    # A dump started long ago and interrupted: the resume is not refused for its age.
    old = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    first.model_copy(update={"created_at": old, "shards": first.shards[:2]}).write(tmp_path)
    (tmp_path / "shard-00003.arrow").unlink()
    resumed = dump_knowledge(cnn_engine, data, tmp_path, QUIET, identity)
    assert resumed.complete and resumed.created_at == old
    assert resumed.shards == first.shards


def test_a_1_0_manifest_reads_and_resumes_as_1_0(tmp_path: Path, cnn_engine: TeacherEngine) -> None:
    data = digits("test")
    identity = model_identity("cnn", cnn_engine.model)
    whole = dump_knowledge(cnn_engine, data, tmp_path, QUIET, identity)
    raw = json.loads((tmp_path / MANIFEST_NAME).read_bytes())
    del raw["created_at"], raw["lyceum_version"]
    raw["format_version"] = "1.0"
    raw["shards"] = raw["shards"][:3]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    old = Manifest.read(tmp_path)
    assert old.created_at is None and old.lyceum_version is None
    resumed = dump_knowledge(cnn_engine, data, tmp_path, QUIET, identity)
    assert resumed.complete and resumed.shards == whole.shards
    written = json.loads((tmp_path / MANIFEST_NAME).read_bytes())
    assert written["format_version"] == "1.0"
    assert "created_at" not in written and "lyceum_version" not in written


def test_a_newer_minor_manifest_asks_for_an_upgrade(
    tmp_path: Path, cnn_engine: TeacherEngine
) -> None:
    dump_knowledge(
        cnn_engine, digits("test"), tmp_path, QUIET, model_identity("c", cnn_engine.model)
    )
    raw = json.loads((tmp_path / MANIFEST_NAME).read_bytes())
    raw["format_version"] = "1.7"
    raw["encryption"] = "aes"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"written by a newer Lyceum \(manifest 1\.7.*upgrade"):
        Manifest.read(tmp_path)


def test_an_empty_dataset_is_refused_as_empty(tmp_path: Path, cnn_engine: TeacherEngine) -> None:
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"the dataset is empty \(0 samples\): nothing to dump"):
        dump_knowledge(cnn_engine, empty, out, QUIET, model_identity("cnn", cnn_engine.model))
    assert not out.exists()


def test_progress_is_logged_when_stderr_is_not_a_terminal(
    tmp_path: Path, cnn_engine: TeacherEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lyceum.teacher_server.dump")
    config = QUIET.model_copy(update={"progress": True})
    dump_knowledge(
        cnn_engine, digits("test"), tmp_path, config, model_identity("c", cnn_engine.model)
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "lyceum.teacher_server.dump"]
    assert lines and lines[-1].startswith(f"dump {tmp_path}: 360/360 samples (100%)"), lines
