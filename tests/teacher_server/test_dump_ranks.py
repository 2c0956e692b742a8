"""A dump split between devices and ranks: each rank its own shards, the last one completes the
manifest, a killed rank resumes its part, and the result is a one-process dump, byte for byte."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lyceum.deploy.examples import digits, teacher_cnn
from lyceum.proto.manifest import MANIFEST_NAME, Manifest, model_identity
from lyceum.teacher_server import merge_knowledge
from lyceum.teacher_server._dump_dir import DumpDirectory, rank_dir_name
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine
from tests._support.teachers import ENV
from tests._support.waiting import wait_until

# 360 samples in shards of 50: 8 shards, the last of 10. Rank 0 of 2 owns 0, 2, 4, 6; rank 1
# owns 1, 3, 5, 7.
CONFIG = DumpConfig(shard_rows=50, batch_size=16, workers=0, progress=False)


def _files(directory: Path) -> dict[str, str]:
    """name -> sha256 of every entry (a directory is named, with no digest)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(directory.iterdir())
    }


def _same_dump(a: Path, b: Path) -> None:
    """The two directories hold the same dump: the same files, shard by shard the same bytes,
    the same manifest but for its creation time."""
    left, right = Manifest.read(a), Manifest.read(b)
    assert left.complete and right.complete
    assert left.model_copy(update={"created_at": None}) == right.model_copy(
        update={"created_at": None}
    )
    shards_a = {k: v for k, v in _files(a).items() if k != MANIFEST_NAME}
    shards_b = {k: v for k, v in _files(b).items() if k != MANIFEST_NAME}
    assert shards_a == shards_b
    assert sorted(_files(a)) == sorted(_files(b))  # no ranks/ left, nothing else


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return teacher_cnn(width=8)


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, model: torch.nn.Module) -> Path:
    """A one-process, one-device dump to compare with."""
    out = tmp_path_factory.mktemp("whole")
    engine = TeacherEngine(model, EngineConfig(), digits("test")[0][0])
    dump_knowledge(engine, digits("test"), out, CONFIG, model_identity("cnn", model))
    return out


def _rank(config: DumpConfig, rank: int, world: int) -> DumpConfig:
    return config.model_copy(update={"rank": rank, "world_size": world})


def test_ranks_dump_their_own_shards_and_the_last_completes(
    tmp_path: Path, model: torch.nn.Module, whole: Path
) -> None:
    data = digits("test")
    engine = TeacherEngine(model, EngineConfig(), data[0][0])
    identity = model_identity("cnn", model)
    first = dump_knowledge(engine, data, tmp_path, _rank(CONFIG, 1, 2), identity)
    # Rank 1 alone: its shards listed, the manifest not complete, its record kept.
    assert [s.index for s in first.shards] == [1, 3, 5, 7] and not first.complete
    assert [s.index for s in Manifest.read(tmp_path).shards] == [1, 3, 5, 7]
    record = Manifest.read(tmp_path / "ranks" / "rank-00001-of-00002")
    assert [s.index for s in record.shards] == [1, 3, 5, 7]
    assert "ids 0-49 (shard 0), ids 100-149 (shard 2)" in first.describe_missing()
    last = dump_knowledge(engine, data, tmp_path, _rank(CONFIG, 0, 2), identity)
    assert last.complete and last == Manifest.read(tmp_path)
    assert not (tmp_path / "ranks").exists()
    _same_dump(tmp_path, whole)
    # A finished dump resumed by a rank, or by one process, has nothing left to do.
    before = _files(tmp_path)
    assert dump_knowledge(engine, data, tmp_path, _rank(CONFIG, 1, 2), identity) == last
    assert dump_knowledge(engine, data, tmp_path, CONFIG, identity) == last
    assert _files(tmp_path) == before


def test_engines_in_one_process_split_its_shards(
    tmp_path: Path, model: torch.nn.Module, whole: Path
) -> None:
    data = digits("test")
    engines = [TeacherEngine(model, EngineConfig(), data[0][0]) for _ in range(2)]
    manifest = dump_knowledge(engines, data, tmp_path, CONFIG, model_identity("cnn", model))
    assert manifest.complete and len(manifest.shards) == 8
    _same_dump(tmp_path, whole)
    # Two engines in rank 1 of 2: four shards between them, the rest left to rank 0.
    part = tmp_path / "part"
    mine = dump_knowledge(engines, data, part, _rank(CONFIG, 1, 2), model_identity("cnn", model))
    assert [s.index for s in mine.shards] == [1, 3, 5, 7]


def test_one_process_finishes_what_ranks_left(
    tmp_path: Path, model: torch.nn.Module, whole: Path
) -> None:
    data = digits("test")
    engine = TeacherEngine(model, EngineConfig(), data[0][0])
    identity = model_identity("cnn", model)
    dump_knowledge(engine, data, tmp_path, _rank(CONFIG, 0, 4), identity)  # shards 0, 4
    dump_knowledge(engine, data, tmp_path, _rank(CONFIG, 2, 4), identity)  # shards 2, 6
    done = {name: (tmp_path / name).stat().st_ino for name in _files(tmp_path) if "shard" in name}
    assert sorted(done) == [f"shard-0000{k}.arrow" for k in (0, 2, 4, 6)]
    final = dump_knowledge(engine, data, tmp_path, CONFIG, identity)
    assert final.complete and not (tmp_path / "ranks").exists()
    _same_dump(tmp_path, whole)
    for name, inode in done.items():
        assert (tmp_path / name).stat().st_ino == inode  # kept, not dumped again


def test_merge_completes_ranks_that_dumped_apart(
    tmp_path: Path, model: torch.nn.Module, whole: Path
) -> None:
    # Two machines without shared storage: each rank dumps into its own local directory,
    # then both are copied into one and merged.
    data = digits("test")
    engine = TeacherEngine(model, EngineConfig(), data[0][0])
    identity = model_identity("cnn", model)
    for rank in (0, 1):
        dump_knowledge(engine, data, tmp_path / f"node{rank}", _rank(CONFIG, rank, 2), identity)
    joined = tmp_path / "joined"
    shutil.copytree(tmp_path / "node0", joined)
    shutil.copytree(tmp_path / "node1", joined, dirs_exist_ok=True)
    assert not Manifest.read(joined).complete  # node1's manifest.json lists only its shards
    merged = merge_knowledge(joined)
    assert merged.complete and merged == Manifest.read(joined)
    assert not (joined / "ranks").exists()
    _same_dump(joined, whole)


def test_refusals_while_ranks_run_change_nothing(tmp_path: Path, model: torch.nn.Module) -> None:
    data = digits("test")
    engine = TeacherEngine(model, EngineConfig(), data[0][0])
    identity = model_identity("cnn", model)
    dump_knowledge(engine, data, tmp_path, _rank(CONFIG, 0, 2), identity)
    header = Manifest.read(tmp_path)
    running = DumpDirectory(tmp_path, header, 1, 2)  # rank 1 of 2, as a live process holds it
    try:
        before = _files(tmp_path)
        with pytest.raises(ValueError, match=r"rank 1 of 2 is already dumping into"):
            dump_knowledge(engine, data, tmp_path, _rank(CONFIG, 1, 2), identity)
        with pytest.raises(ValueError, match=r"ranks of world size 2 .* world size is 3"):
            dump_knowledge(engine, data, tmp_path, _rank(CONFIG, 2, 3), identity)
        with pytest.raises(ValueError, match=r"is locked by another dump"):
            dump_knowledge(engine, data, tmp_path, CONFIG, identity)
        with pytest.raises(ValueError, match=r"is still being dumped into"):
            merge_knowledge(tmp_path)
        torch.manual_seed(1)
        other = teacher_cnn(width=8)
        other_engine = TeacherEngine(other, EngineConfig(), data[0][0])
        with pytest.raises(ValueError, match=r"cannot continue \(model weights_sha256"):
            dump_knowledge(
                other_engine, data, tmp_path, _rank(CONFIG, 0, 2), model_identity("cnn", other)
            )
        assert _files(tmp_path) == before
    finally:
        running.close()


def test_a_rank_refuses_a_foreign_directory_and_leaves_it_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a dump")
    header = Manifest.read(_started_dump(tmp_path / "header"))
    with pytest.raises(ValueError, match=r"is not empty and has no manifest\.json"):
        DumpDirectory(tmp_path, header, 1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["header", "notes.txt"]


def _started_dump(directory: Path) -> Path:
    """A directory holding a fresh dump's header only, to open ranks with."""
    data = digits("test")
    torch.manual_seed(0)
    cnn = teacher_cnn(width=8)
    engine = TeacherEngine(cnn, EngineConfig(), data[0][0])
    dump_knowledge(engine, data, directory, _rank(CONFIG, 0, 2), model_identity("cnn", cnn))
    return directory


def _waiting_for_lock(path: Path) -> bool:
    """Some process is blocked in flock on `path` (its inode has a waiter in /proc/locks)."""
    st = os.stat(path)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    return any(
        "->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines()
    )


def test_a_rank_starting_while_another_writes_the_first_manifest_joins_it(tmp_path: Path) -> None:
    """Rank 0 holds ranks/ and has written only the manifest's temp file: rank 1, starting now,
    waits for the manifest instead of refusing a directory that is not empty (CI saw that)."""
    header = Manifest.read(_started_dump(tmp_path / "header")).model_copy(update={"shards": ()})
    out = tmp_path / "out"
    (out / "ranks").mkdir(parents=True)
    fd = os.open(out / "ranks", os.O_RDONLY)
    opened: list[DumpDirectory | BaseException] = []

    def _open() -> None:
        try:
            opened.append(DumpDirectory(out, header, 1, 2))
        except BaseException as exc:  # handed to the test's thread
            opened.append(exc)

    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        (out / (MANIFEST_NAME + ".tmp")).write_text("{")  # rank 0, midway through its write
        thread = threading.Thread(target=_open, daemon=True)
        thread.start()
        wait_until(
            lambda: opened or _waiting_for_lock(out / "ranks"),
            "rank 1 to refuse the directory or wait for the lock on ranks/",
        )
        header.write(out)  # rank 0's write completes
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    thread.join(timeout=60)
    assert len(opened) == 1
    rank = opened[0]
    assert isinstance(rank, DumpDirectory), rank
    try:
        assert rank.todo() == [1, 3, 5, 7]
    finally:
        rank.close()


def test_a_rank_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rank 2 is not below world size 2: ranks are 0\.\.1"):
        DumpConfig(rank=2, world_size=2)


def _dump_cli(out: Path, dataset: str, extra: list[str]) -> list[str]:
    return [
        "-m",
        "lyceum.deploy.cli",
        "teacher",
        "dump",
        "--model",
        "lyceum.deploy.examples:teacher_cnn",
        "--model-kwargs",
        '{"width": 8}',
        "--checkpoint",
        str(out.parent / "cnn.pt"),
        "--dataset",
        dataset,
        "--out",
        str(out),
        "--shard-rows",
        "50",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--quiet",
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **ENV, **extra}


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=_env(**env), capture_output=True, text=True, timeout=300
    )


@pytest.mark.integration
def test_a_killed_rank_resumes_its_own_part(tmp_path: Path, model: torch.nn.Module) -> None:
    torch.save(model.state_dict(), tmp_path / "cnn.pt")
    out = tmp_path / "dump"
    every = 'lyceum.deploy.examples:digits{"split": "all"}'  # 1797 samples: 36 shards of 50
    # Rank 1 (odd shards) is SIGKILLed reading sample 1790, in its last shard (35). Its writer
    # runs at most 9 batches (144 samples) behind its reads: most of its shards are written.
    killing = json.dumps(
        {"split": "all", "kill_at": 1790, "marker": str(tmp_path / "killed")}, sort_keys=True
    )
    rank0 = subprocess.Popen(
        [sys.executable, *_dump_cli(out, every, [])],
        env=_env(RANK="0", WORLD_SIZE="2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        killed = _run(
            _dump_cli(out, f"tests._support.dump_datasets:killed_once{killing}", []),
            RANK="1",
            WORLD_SIZE="2",
        )
        output, errors = rank0.communicate(timeout=300)
    finally:
        if rank0.poll() is None:
            rank0.kill()
            rank0.wait()
    assert killed.returncode == -signal.SIGKILL
    assert rank0.returncode == 0, errors
    assert "rank 0 of 2 done; the other ranks still owe" in output
    # Rank 1 may be killed between recording a shard in its own record and folding it into
    # manifest.json: merge reads both, and so does this test.
    folded = Manifest.read(out)
    record = Manifest.read(out / "ranks" / rank_dir_name(1, 2))
    known = {s.index: s for s in (*folded.shards, *record.shards)}
    partial = folded.model_copy(update={"shards": tuple(known[k] for k in sorted(known))})
    by_rank1 = [s.index for s in partial.shards if s.index % 2]
    assert len(by_rank1) >= 10 and by_rank1 == list(range(1, 2 * len(by_rank1), 2))
    assert 35 not in by_rank1
    assert [s.index for s in partial.shards if s.index % 2 == 0] == list(range(0, 36, 2))
    kept = {s.file: (out / s.file).stat().st_ino for s in partial.shards}
    owed = [k for k in range(1, 36, 2) if k not in by_rank1]

    merge = _run(["-m", "lyceum.deploy.cli", "knowledge", "merge", str(out)])
    assert merge.returncode == 1, merge.stderr
    summary = f"incomplete: {partial.rows:,} samples in {len(partial.shards)} shards of 1,797"
    assert summary in merge.stdout
    owes = ", ".join(map(str, owed[:8])) + (", ..." if len(owed) > 8 else "")
    assert f"rank 1 of 2 owes {len(owed)} shards ({owes}): rerun its dump command with RANK=1" in (
        merge.stdout
    )

    resumed = _run(
        _dump_cli(out, f"tests._support.dump_datasets:killed_once{killing}", []),
        RANK="1",
        WORLD_SIZE="2",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "rank 1 of 2 done; complete: 1,797 samples in 36 shards" in resumed.stdout
    for name, inode in kept.items():
        assert (out / name).stat().st_ino == inode  # what either rank finished stays as it is

    single = _run(_dump_cli(tmp_path / "single", every, []))
    assert single.returncode == 0, single.stderr
    _same_dump(out, tmp_path / "single")


@pytest.mark.integration
def test_torchrun_ranks_write_a_one_process_dump(tmp_path: Path, model: torch.nn.Module) -> None:
    torch.save(model.state_dict(), tmp_path / "cnn.pt")
    test_split = 'lyceum.deploy.examples:digits{"split": "test"}'
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *_dump_cli(tmp_path / "ranks", test_split, []),
    ]
    # A new session: on a timeout the whole group (torchrun and its ranks) is killed.
    proc = subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-4000:]
    assert "complete: 360 samples in 8 shards" in output
    single = _run(_dump_cli(tmp_path / "single", test_split, []))
    assert single.returncode == 0, single.stderr
    _same_dump(tmp_path / "ranks", tmp_path / "single")
