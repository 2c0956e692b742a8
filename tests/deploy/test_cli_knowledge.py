"""`lyceum teacher dump` and `lyceum knowledge info|verify` as a user runs them."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lyceum.deploy.cli import main
from lyceum.deploy.examples import teacher_cnn
from lyceum.proto.manifest import Manifest
from lyceum.student_client.offline import OfflineKnowledge

LYCEUM = [sys.executable, "-m", "lyceum.deploy.cli"]


def _dump_args(out: Path, checkpoint: Path) -> list[str]:
    return [
        "teacher",
        "dump",
        "--model",
        'lyceum.deploy.examples:teacher_cnn{"width": 8}',
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        "lyceum.deploy.examples:digits",
        "--dataset-kwargs",
        '{"split": "test"}',
        "--out",
        str(out),
        "--shard-rows",
        "150",
        "--workers",
        "0",
        "--quiet",
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "cnn.pt"
    torch.save(teacher_cnn(width=8).state_dict(), path)
    return path


@pytest.fixture
def dump_dir(tmp_path: Path, checkpoint: Path) -> Path:
    out = tmp_path / "dump"
    assert main(_dump_args(out, checkpoint)) == 0
    return out


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        h.update(p.name.encode() + p.read_bytes() + str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def test_dump_records_checkpoint_hash(dump_dir: Path, checkpoint: Path) -> None:
    m = Manifest.read(dump_dir)
    assert m.model.checkpoint_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert m.complete and [s.rows for s in m.shards] == [150, 150, 60]


@pytest.mark.integration
def test_verify_flipped_byte_exit_1_names_shard(dump_dir: Path) -> None:
    ok = subprocess.run(
        [*LYCEUM, "knowledge", "verify", str(dump_dir)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "ok"
    shard = dump_dir / "shard-00001.arrow"
    raw = bytearray(shard.read_bytes())
    raw[200] ^= 0xFF
    shard.write_bytes(bytes(raw))
    bad = subprocess.run(
        [*LYCEUM, "knowledge", "verify", str(dump_dir)], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert "shard-00001.arrow" in bad.stdout and "shard-00000.arrow" not in bad.stdout


def test_info_prints_schema_rows_and_stats(
    dump_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["knowledge", "info", str(dump_dir)]) == 0
    out = capsys.readouterr().out
    with OfflineKnowledge(dump_dir) as knowledge:
        stats = knowledge.stats()["logits"]
    assert "samples:    360 of 360 (complete)" in out
    assert "logits: float32 [10] dense logits" in out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("logits "))
    assert [float(v) for v in row[1:4]] == pytest.approx(
        [stats.min, stats.mean, stats.max], rel=1e-4
    )
    assert int(row[4]) == 3600


def test_resume_with_another_model_is_refused(
    dump_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save(teacher_cnn(width=8).state_dict(), other)
    before = _digest(dump_dir)
    assert main(_dump_args(dump_dir, other)) == 2
    err = capsys.readouterr().err
    assert "cannot continue (model checkpoint_sha256" in err and "another --out" in err
    assert _digest(dump_dir) == before
