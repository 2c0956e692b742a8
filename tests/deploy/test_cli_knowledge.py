"""`lyceum teacher dump` and `lyceum knowledge info|verify|export` as a user runs them."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lyceum.deploy.cli import build_parser, main
from lyceum.deploy.examples import teacher_cnn
from lyceum.proto.display import format_bytes
from lyceum.proto.manifest import MANIFEST_VERSION, Manifest, fingerprint_indices
from lyceum.student_client.offline import OfflineKnowledge
from tests._support.teachers import ENV

LYCEUM = [sys.executable, "-m", "lyceum.deploy.cli"]


def _dump_args(
    out: Path,
    checkpoint: Path,
    *,
    dataset: str = "lyceum.deploy.examples:digits",
    dataset_kwargs: dict[str, object] | None = None,
    shard_rows: int = 150,
    extra: tuple[str, ...] = ("--quiet",),
) -> list[str]:
    return [
        "teacher",
        "dump",
        "--model",
        'lyceum.deploy.examples:teacher_cnn{"width": 8}',
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        dataset,
        "--dataset-kwargs",
        json.dumps({"split": "test"} if dataset_kwargs is None else dataset_kwargs),
        "--out",
        str(out),
        "--shard-rows",
        str(shard_rows),
        "--workers",
        "0",
        *extra,
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


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LYCEUM, *args], capture_output=True, text=True, timeout=240, env=env or dict(os.environ)
    )


def _with_test_datasets() -> dict[str, str]:
    """The environment for a subprocess that resolves `tests._support.dump_datasets:...` specs."""
    return {**os.environ, **ENV}


def test_dump_records_checkpoint_hash(dump_dir: Path, checkpoint: Path) -> None:
    m = Manifest.read(dump_dir)
    assert m.model.checkpoint_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert m.complete and [s.rows for s in m.shards] == [150, 150, 60]


@pytest.mark.integration
def test_dump_summary_and_progress_log_lines(tmp_path: Path, checkpoint: Path) -> None:
    """stderr is a pipe here, not a terminal: progress comes as log lines, not a bar."""
    out = tmp_path / "dump"
    proc = _run(*_dump_args(out, checkpoint, shard_rows=400, extra=()))
    assert proc.returncode == 0, proc.stderr
    m = Manifest.read(out)
    assert proc.stdout.strip() == f"{out}: 360 samples in 1 shard, {format_bytes(m.bytes)}"
    assert re.search(rf"dump {re.escape(str(out))}: 360/360 samples \(100%\)", proc.stderr)
    assert "\r" not in proc.stderr


@pytest.mark.integration
def test_verify_flipped_byte_exit_1_names_shard(dump_dir: Path) -> None:
    ok = _run("knowledge", "verify", str(dump_dir))
    m = Manifest.read(dump_dir)
    assert ok.returncode == 0
    assert ok.stdout.strip() == (
        f"ok: 360 samples in 3 shards ({format_bytes(m.bytes)}), every checksum matches"
    )
    shard = dump_dir / "shard-00001.arrow"
    raw = bytearray(shard.read_bytes())
    raw[200] ^= 0xFF
    shard.write_bytes(bytes(raw))
    bad = _run("knowledge", "verify", str(dump_dir))
    assert bad.returncode == 1
    assert "shard-00001.arrow: sha256" in bad.stdout and "shard-00000.arrow" not in bad.stdout
    assert f"delete {str(shard)!r} and rerun the same `lyceum teacher dump` command" in bad.stdout


@pytest.mark.integration
def test_verify_fails_an_interrupted_dump_with_the_missing_ids(
    tmp_path: Path, checkpoint: Path
) -> None:
    kill_at = 210  # a sample of shard 4 (of 8 shards of 50) that the fingerprint does not read
    assert kill_at not in fingerprint_indices(360)
    out, marker = tmp_path / "dump", tmp_path / "killed"
    command = _dump_args(
        out,
        checkpoint,
        dataset="tests._support.dump_datasets:killed_once",
        dataset_kwargs={"split": "test", "kill_at": kill_at, "marker": str(marker)},
        shard_rows=50,
    )
    killed = _run(*command, env=_with_test_datasets())
    assert killed.returncode == -signal.SIGKILL and marker.exists()
    listed = Manifest.read(out)
    done = len(listed.shards)  # the writer thread may not have listed all of 0-3 in time
    assert done <= 4 and [s.index for s in listed.shards] == list(range(done))

    bad = _run("knowledge", "verify", str(out))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert (
        f"the dump is incomplete ({50 * done} of 360 samples; missing ids {50 * done}-359 "
        f"(shards {done}-7)): rerun the same `lyceum teacher dump` command to finish it"
    ) in bad.stdout
    info = _run("knowledge", "info", str(out))
    assert info.returncode == 0
    assert f"INCOMPLETE, missing ids {50 * done}-359 (shards {done}-7)" in info.stdout

    # The fix the message gives: the same command again finishes the dump.
    assert _run(*command, env=_with_test_datasets()).returncode == 0
    again = _run("knowledge", "verify", str(out))
    assert again.returncode == 0 and again.stdout.startswith("ok: 360 samples in 8 shards")


@pytest.mark.integration
def test_dump_of_an_empty_dataset_says_empty(tmp_path: Path, checkpoint: Path) -> None:
    out = tmp_path / "dump"
    proc = _run(
        *_dump_args(
            out, checkpoint, dataset="tests._support.dump_datasets:empty", dataset_kwargs={}
        ),
        env=_with_test_datasets(),
    )
    assert proc.returncode == 2
    assert (
        "dataset 'tests._support.dump_datasets:empty' is empty (0 samples): nothing to dump"
        in proc.stderr
    )
    assert "fingerprint" not in proc.stderr and not out.exists()


def test_info_prints_manifest_schema_rows_and_stats(
    dump_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["knowledge", "info", str(dump_dir)]) == 0
    out = capsys.readouterr().out
    m = Manifest.read(dump_dir)
    with OfflineKnowledge(dump_dir) as knowledge:
        stats = knowledge.stats()["logits"]
    assert m.created_at is not None
    assert f"format:     {MANIFEST_VERSION}" in out
    assert f"created:    {m.created_at:%Y-%m-%d %H:%M:%S} UTC, by Lyceum {m.lyceum_version}" in out
    assert "samples:    360 of 360 (complete)" in out
    assert "shards:     3 of 3, 150 samples each" in out
    assert f"size:       {format_bytes(m.bytes)} (" in out
    assert f"dataset:    360 samples, fingerprint sha256 {m.dataset.sha256}" in out
    assert "over 64 of 360 samples, evenly spaced (--fingerprint sampled" in out
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


def _subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize(
    ("path", "options"),
    [
        (
            ("teacher", "dump"),
            [
                "--out",
                "--batch-size",
                "--workers",
                "--shard-rows",
                "--device",
                "--quiet",
                "--fingerprint",
            ],
        ),
        (("knowledge", "info"), ["dir"]),
        (("knowledge", "verify"), ["dir"]),
        (("knowledge", "export"), ["dir", "--to", "--dtype", "--out", "--quiet"]),
    ],
)
def test_help_gives_every_option_a_sentence_and_its_default(
    path: tuple[str, ...], options: list[str]
) -> None:
    parser = _subparser(*path)
    by_name = {a.dest if not a.option_strings else a.option_strings[0]: a for a in parser._actions}
    text = " ".join(parser.format_help().split())
    for option in options:
        action = by_name[option]
        assert action.help and len(action.help.split()) >= 4, (option, action.help)
        if option == "dir":
            assert "A directory written by `lyceum teacher dump`" in text
        elif action.required:
            assert "(required)" in action.help, option
        else:
            assert "default" in action.help, (option, action.help)
    if path == ("teacher", "dump"):
        assert "(default: 256)" in text and "(default: 65536)" in text
        assert "(default: sampled)" in text and "(default: cpu)" in text


def _reference(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    with OfflineKnowledge(directory) as knowledge:
        batch = knowledge.get(np.arange(len(knowledge)))
    return batch.sample_ids.numpy(), batch.tensors["logits"].float().numpy()


@pytest.mark.integration
def test_export_parquet_and_csv_round_trip(tmp_path: Path, checkpoint: Path) -> None:
    out = tmp_path / "knowledge"
    assert main(_dump_args(out, checkpoint, extra=("--quiet", "--precision", "bf16"))) == 0
    ids, logits = _reference(out)
    parquet = _run("knowledge", "export", str(out), "--quiet")
    assert parquet.returncode == 0, parquet.stderr
    path = tmp_path / "knowledge.parquet"  # the default: beside the directory
    assert parquet.stdout.strip().startswith(f"{path}: 360 samples, 2 columns, ")
    table = pq.read_table(path)
    assert table.schema.field("logits").type == pa.list_(pa.float32(), 10)
    assert np.array_equal(table["sample_id"].to_numpy(), ids)
    got = np.stack(table["logits"].to_numpy(zero_copy_only=False))
    assert np.array_equal(got, logits)

    csv = tmp_path / "k.csv"
    done = _run("knowledge", "export", str(out), "--to", "csv", "--out", str(csv), "--quiet")
    assert done.returncode == 0, done.stderr
    lines = csv.read_text().splitlines()
    header = [h.strip('"') for h in lines[0].split(",")]
    assert header == ["sample_id", *[f"logits[{i}]" for i in range(10)]]
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    assert np.array_equal(rows[:, 0], ids)
    assert np.array_equal(rows[:, 1:].astype(np.float32), logits)


@pytest.mark.integration
def test_export_of_sequences_to_csv_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "lm"
    dumped = _run(
        "teacher",
        "dump",
        "--model",
        "lyceum.deploy.examples:tiny_lm",
        "--dataset",
        "lyceum.deploy.examples:token_sequences",
        "--dataset-kwargs",
        '{"n": 12}',
        "--topk",
        "4",
        "--out",
        str(out),
        "--workers",
        "0",
        "--quiet",
    )
    assert dumped.returncode == 0, dumped.stderr
    refused = _run("knowledge", "export", str(out), "--to", "csv")
    assert refused.returncode == 2
    assert "sequence fields (logits: float32 [*, " in refused.stderr
    assert "Export to Parquet instead (--to parquet)" in refused.stderr
    assert not (tmp_path / "lm.csv").exists() and not (tmp_path / "lm.csv.tmp").exists()
    assert _run("knowledge", "export", str(out), "--quiet").returncode == 0
    assert pq.read_table(tmp_path / "lm.parquet").num_rows == 12
