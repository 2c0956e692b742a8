"""Shard checksums on the student's side: a flipped byte is refused by name when read, a
verified dump is not hashed again, and the record of verified shards never breaks a run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from lyceum.deploy.examples import digits, teacher_cnn
from lyceum.proto.manifest import Manifest, model_identity
from lyceum.student_client._shard_cache import CACHE_FILE, ShardKey, VerifiedShards, cache_dir
from lyceum.student_client.offline import OfflineKnowledge, verify_knowledge
from lyceum.student_client.sources import OfflineTeacher
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine
from tests._support.teachers import make_dump

# 360 samples in shards of 100, 100, 100, 60.
CONFIG = DumpConfig(shard_rows=100, batch_size=50, workers=0, progress=False)
BAD = "shard-00002.arrow"


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = teacher_cnn(width=8)
    engine = TeacherEngine(model, EngineConfig(), digits("test")[0][0])
    out = tmp_path_factory.mktemp("dump")
    dump_knowledge(engine, digits("test"), out, CONFIG, model_identity("cnn", model))
    return out


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cold record of verified shards for this test alone."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("LYCEUM_CACHE_DIR", str(directory))
    return directory / CACHE_FILE


@pytest.fixture
def copy(dump_dir: Path, tmp_path: Path, cache: Path) -> Path:
    return Path(shutil.copytree(dump_dir, tmp_path / "dump"))


def _flip_middle_byte(path: Path) -> None:
    """One bit of one byte in the middle of the file; size unchanged, mtime moved on (a
    write in the same clock tick as the copy could otherwise keep it)."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    before = path.stat().st_mtime_ns
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(before + 10**9, before + 10**9))


def _recorded(cache: Path) -> set[str]:
    """Names of the shard files in the record (none if it was never written)."""
    if not cache.exists():
        return set()
    return {Path(p).name for p in json.loads(cache.read_bytes())["shards"]}


@pytest.mark.parametrize("verify", ["background", "first_touch"])
def test_flipped_byte_is_refused_by_name_when_read(copy: Path, verify: str) -> None:
    _flip_middle_byte(copy / BAD)
    # The flip is in the knowledge values: sizes, schema and ids still pass on open.
    with OfflineKnowledge(copy, verify=verify) as knowledge:  # type: ignore[arg-type]
        if verify == "first_touch":
            good = knowledge.get([0, 150, 359])  # shards 0, 1, 3: not the bad one
            assert good.sample_ids.tolist() == [0, 150, 359]
        with pytest.raises(ValueError) as err:
            knowledge.get([5, 250])
        message = str(err.value)
        assert f"shard {BAD}: sha256" in message and "does not match the manifest" in message
        assert str(copy) in message
        assert f"delete {str(copy / BAD)!r} and rerun the same `lyceum teacher dump`" in message
        assert "re-dumps missing shards" in message and "lyceum knowledge verify" in message
        # Fail fast: once a bad shard is known, reads of good shards fail too.
        with pytest.raises(ValueError, match=BAD):
            knowledge.get([0])
    assert BAD not in _recorded(copy.parent / "cache" / CACHE_FILE)


def test_background_check_finds_a_shard_nobody_read(copy: Path) -> None:
    _flip_middle_byte(copy / BAD)
    with OfflineKnowledge(copy) as knowledge:
        with pytest.raises(ValueError, match=rf"shard {BAD}: sha256"):
            knowledge.wait_verified()
        with pytest.raises(ValueError, match=BAD):
            knowledge.get([0, 1])  # shard 0 is good; the dump is not


def test_verify_off_reads_without_hashing(copy: Path, cache: Path) -> None:
    _flip_middle_byte(copy / BAD)
    with OfflineKnowledge(copy, verify="off") as knowledge:
        assert knowledge.get([250]).sample_ids.tolist() == [250]
        assert knowledge.hashed_shards == []
    assert not cache.exists()


def test_offline_teacher_refuses_the_bad_shard(copy: Path) -> None:
    _flip_middle_byte(copy / BAD)
    teacher = OfflineTeacher(copy, verify="first_touch")
    try:
        teacher.submit(1, torch.tensor([0, 1]))
        assert [rid for rid, _ in teacher.poll(0)] == [1]
        with pytest.raises(ValueError, match=rf"shard {BAD}: sha256 .* does not match"):
            teacher.submit(2, torch.tensor([201, 3]))
    finally:
        teacher.close()


def test_a_verified_dump_is_not_hashed_again(copy: Path, cache: Path) -> None:
    with OfflineKnowledge(copy) as knowledge:
        knowledge.wait_verified()
        assert sorted(knowledge.hashed_shards) == [f"shard-0000{k}.arrow" for k in range(4)]
    entries = json.loads(cache.read_bytes())["shards"]
    manifest = Manifest.read(copy)
    for s in manifest.shards:
        entry = entries[str((copy / s.file).resolve())]
        st = (copy / s.file).stat()
        assert (entry["size"], entry["mtime_ns"], entry["sha256"]) == (
            st.st_size,
            st.st_mtime_ns,
            s.sha256,
        )
    with OfflineKnowledge(copy) as again:
        again.wait_verified()
        assert again.hashed_shards == []
        assert again.get([250]).sample_ids.tolist() == [250]
    # Changed since it was recorded: hashed again, and refused.
    _flip_middle_byte(copy / BAD)
    with OfflineKnowledge(copy, verify="first_touch") as third:
        with pytest.raises(ValueError, match=BAD):
            third.get([250])
        assert third.hashed_shards == [BAD]


def test_verify_records_what_it_hashed(copy: Path, cache: Path) -> None:
    assert verify_knowledge(copy) == []
    assert _recorded(cache) == {f"shard-0000{k}.arrow" for k in range(4)}
    with OfflineKnowledge(copy, verify="first_touch") as knowledge:
        knowledge.wait_verified()
        assert knowledge.hashed_shards == []


@contextlib.contextmanager
def _read_only(directory: Path) -> Iterator[None]:
    """`directory` read-only even for root: a read-only tmpfs mount (chmod does not bind
    root), else chmod 0555 for other users."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)], check=True
    )
    try:
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_read_only_cache_dir_costs_a_warning_not_the_run(
    copy: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with _read_only(cache.parent), OfflineKnowledge(copy) as knowledge:
        knowledge.wait_verified()
        assert knowledge.get([0, 359]).sample_ids.tolist() == [0, 359]
        assert len(knowledge.hashed_shards) == 4
        assert not cache.exists()
    warnings = [r.getMessage() for r in caplog.records if "could not record" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, not once per shard
    reason = "read-only file system" if os.geteuid() == 0 else "permission denied"
    assert reason in warnings[0].lower() and "LYCEUM_CACHE_DIR" in warnings[0]


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"format": 99, "shards": {}}', b"[1]"])
def test_a_damaged_record_counts_as_empty(copy: Path, cache: Path, content: bytes) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content)
    with OfflineKnowledge(copy) as knowledge:
        knowledge.wait_verified()
        assert len(knowledge.hashed_shards) == 4
    assert len(_recorded(cache)) == 4  # rewritten as a valid record


_WRITER = """
import sys
from lyceum.student_client._shard_cache import ShardKey, VerifiedShards
record = VerifiedShards()
for i in range(int(sys.argv[2])):
    record.add(ShardKey(f"/{sys.argv[1]}/shard-{i:05d}.arrow", i, i, "0" * 64))
"""


@pytest.mark.integration
def test_two_processes_writing_the_record_lose_nothing(cache: Path) -> None:
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, name, str(n)]) for name in ("a", "b")]
    try:
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    entries = json.loads(cache.read_bytes())["shards"]
    assert len(entries) == 2 * n
    record = VerifiedShards(cache)
    assert record.contains(ShardKey("/a/shard-00007.arrow", 7, 7, "0" * 64))
    assert not record.contains(ShardKey("/a/shard-00007.arrow", 7, 8, "0" * 64))  # mtime
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.integration
def test_student_train_refuses_a_corrupt_dump(tmp_path: Path, cache: Path) -> None:
    dump = make_dump(tmp_path / "dump", seed=0, dataset=digits("train"))
    bad = sorted(dump.glob("shard-*.arrow"))[2]
    _flip_middle_byte(bad)
    config = {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": {"train": "lyceum.deploy.examples:digits", "train_kwargs": {"split": "train"}},
        "teachers": {"dump": {"dir": str(dump)}},
        "losses": {
            "terms": [{"name": "kd", "kind": "soft_label", "field": "logits", "temperature": 4.0}]
        },
        "epochs": 1,
        "batch_size": 64,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "progress": False,
    }
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "lyceum.deploy.cli", "student", "train", str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert f"shard {bad.name}: sha256" in proc.stderr, proc.stderr
    assert "rerun the same `lyceum teacher dump` command" in proc.stderr
    assert bad.name not in _recorded(cache)


def test_where_the_record_lives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LYCEUM_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("LYCEUM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lyceum"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "lyceum"
