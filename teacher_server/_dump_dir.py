"""A dump directory, written by one process or shared by the ranks of a torchrun (or any) job.

Layout while ranks write (a one-process dump has no `ranks/`):

    DIR/manifest.json                               header + every shard listed so far
    DIR/shard-NNNNN.arrow                           complete shards, whichever rank wrote them
    DIR/ranks/rank-RRRRR-of-WWWWW/manifest.json     rank R's own record: header + its shards

- Rank r of W owns the shards k with `k % W == r`: a split that needs no communication, so
  ranks coordinate through the directory alone (no torch.distributed): a killed rank stops no
  other one and resumes its own part, and a rank that finishes early does not wait.
- A rank records each shard in its own file only (never a read-modify-write of a file another
  rank writes), then folds every record into `manifest.json` under a lock on `DIR/ranks`. A
  fold only ever adds shards. The fold that finds every shard writes the complete manifest and
  removes `ranks/`: the finished directory is laid out as a one-process dump's.
- `merge_knowledge(DIR)` folds by hand: after a last rank was killed between its last shard
  and its fold, or when ranks dumped on different machines and their files were copied into
  one directory.
- A listed shard counts only while its file has the listed size; one that is missing or
  resized is dumped again by the rank that owns it.
- Locks (flock): a one-process dump and `merge_knowledge` hold DIR exclusively, ranks hold it
  shared, and each rank holds its record's directory, so two processes never dump as the same
  rank and a dump split another way (another world size) is refused while one runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from lyceum.proto.manifest import MANIFEST_NAME, Manifest, ShardInfo, shard_file_name

__all__ = [
    "RANKS_DIR",
    "TMP_SUFFIX",
    "DumpDirectory",
    "merge_knowledge",
    "owed_by_ranks",
    "owned_shards",
    "rank_dir_name",
]

log = logging.getLogger(__name__)

RANKS_DIR = "ranks"
TMP_SUFFIX = ".tmp"
_RANK_RE = re.compile(r"^rank-(\d{5})-of-(\d{5})$")
# Another process may hold a lock for a moment (a rank folding, a rank starting): wait this
# long before calling the directory busy.
_LOCK_WAIT_S = 5.0

# Locks held by this process. A forked child (a DataLoader worker) would share each flock; if
# the dump were killed, an orphaned worker would keep the directory locked and the rerun would
# be refused. The locks belong to the dump process alone.
_HELD_LOCKS: set[int] = set()


def _close_locks_in_child() -> None:
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


def owned_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards rank `rank` of `world_size` dumps: every `world_size`-th, from `rank`."""
    return list(range(rank, num_shards, world_size))


def rank_dir_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}"


def _lock(path: Path, mode: int, wait_s: float) -> int | None:
    """An flock on `path` (a directory), or None if another process held it for `wait_s`."""
    fd = os.open(path, os.O_RDONLY)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.01)
            continue
        _HELD_LOCKS.add(fd)
        return fd


def _unlock(fd: int) -> None:
    _HELD_LOCKS.discard(fd)
    os.close(fd)


@contextlib.contextmanager
def _holding(path: Path) -> Iterator[None]:
    """`path` locked exclusively for a moment, waiting as long as it takes (a fold, a start)."""
    fd = os.open(path, os.O_RDONLY)
    _HELD_LOCKS.add(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        _unlock(fd)


def _rank_records(directory: Path) -> dict[tuple[int, int], Path]:
    """The ranks' record directories by (rank, world size)."""
    ranks = directory / RANKS_DIR
    if not ranks.is_dir():
        return {}
    out = {}
    for p in sorted(ranks.iterdir()):
        m = _RANK_RE.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1)), int(m.group(2))] = p
    return out


def _collect(directory: Path, header: Manifest) -> dict[int, ShardInfo]:
    """Every complete shard that `manifest.json` and the ranks' records list, by index.

    A record of another dump is refused by name. A listed shard whose file is missing or has
    another size is left out (its owner dumps it again); a rank's record wins over the
    manifest's listing of the same shard, since a rank re-dumps only what went missing.
    """
    sources = [directory]
    sources += [p for p in _rank_records(directory).values() if (p / MANIFEST_NAME).is_file()]
    shards: dict[int, ShardInfo] = {}
    damaged: list[ShardInfo] = []
    for source in sources:
        if not (source / MANIFEST_NAME).is_file():
            continue
        record = Manifest.read(source)
        why = header.incompatibility(record)
        if why:
            raise ValueError(
                f"{str(source / MANIFEST_NAME)!r} records a dump that differs from "
                f"{str(directory / MANIFEST_NAME)!r} ({why}); delete the directory of the "
                f"records that do not belong, or dump elsewhere"
            )
        for s in record.shards:
            path = directory / s.file
            if path.is_file() and path.stat().st_size == s.bytes:
                shards[s.index] = s
            else:
                damaged.append(s)
    lost = sorted({s.file for s in damaged if s.index not in shards})
    if lost:
        log.warning("re-dumping shards missing or resized since listed: %s", lost)
    return shards


def _with_shards(header: Manifest, shards: dict[int, ShardInfo]) -> Manifest:
    return header.model_copy(update={"shards": tuple(shards[k] for k in sorted(shards))})


def _refuse_foreign(directory: Path) -> None:
    """A directory that is neither empty nor a dump (nor ranks starting one) is refused.

    A rank that was killed while writing the first manifest left its temp file: that is a dump
    starting, not a foreign directory.
    """
    starting = {RANKS_DIR, MANIFEST_NAME + TMP_SUFFIX}
    if any(p.name not in starting for p in directory.iterdir()):
        raise ValueError(
            f"{str(directory)!r} is not empty and has no {MANIFEST_NAME}: it is not a "
            f"knowledge dump; choose an empty or new --out directory"
        )


def _refuse_incompatible(directory: Path, existing: Manifest, fresh: Manifest) -> None:
    why = existing.incompatibility(fresh)
    if why:
        raise ValueError(
            f"{str(directory)!r} holds a dump that this run cannot continue ({why}). Dump into "
            f"another --out directory, or delete {str(directory)!r} to start over."
        )


def _remove_debris(directory: Path, shards: set[int], done: dict[int, ShardInfo]) -> None:
    """Temp files and unlisted shard files of `shards`: what a killed writer left."""
    for k in shards:
        if k in done:
            continue
        for name in (shard_file_name(k) + TMP_SUFFIX, shard_file_name(k)):
            path = directory / name
            if path.exists():
                log.info("removing %s left by an interrupted dump", path)
                path.unlink()


class DumpDirectory:
    """A dump directory opened by one writer: rank `rank` of `world_size` (1: the whole dump).

    `manifest` is every shard known complete; `todo()` the shards this writer still owes;
    `add(info)` records one it completed. Refusals change nothing in the directory.
    """

    def __init__(self, directory: Path, fresh: Manifest, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(
                f"rank {rank} of world size {world_size}: a rank is 0..{world_size - 1}"
            )
        self.directory = directory
        self.rank = rank
        self.world_size = world_size
        self._locks: list[int] = []
        directory.mkdir(parents=True, exist_ok=True)
        try:
            if world_size == 1:
                self._open_whole(fresh)
            else:
                self._open_rank(fresh)
        except BaseException:
            self.close()
            raise

    def _take(self, path: Path, mode: int, busy: str) -> None:
        fd = _lock(path, mode, _LOCK_WAIT_S)
        if fd is None:
            raise ValueError(busy)
        self._locks.append(fd)

    def _open_whole(self, fresh: Manifest) -> None:
        self._take(
            self.directory,
            fcntl.LOCK_EX,
            f"{str(self.directory)!r} is locked by another dump; wait for it or dump elsewhere",
        )
        if not (self.directory / MANIFEST_NAME).exists():
            _refuse_foreign(self.directory)
            fresh.write(self.directory)
            self.header, self.done = fresh, {}
            self.owned = list(range(fresh.num_shards))
            return
        existing = Manifest.read(self.directory)
        _refuse_incompatible(self.directory, existing, fresh)
        self.header = existing
        self.owned = list(range(existing.num_shards))
        self.done = _collect(self.directory, existing)
        for path in self.directory.iterdir():
            if path.name.endswith(TMP_SUFFIX) and path.is_file():
                log.info("removing %s left by an interrupted dump", path)
                path.unlink()
        _remove_debris(self.directory, set(self.owned), self.done)
        merged = _with_shards(existing, self.done)
        if merged != existing:
            merged.write(self.directory)
        # Records of ranks of an earlier run are in the manifest now; no rank runs (the lock).
        shutil.rmtree(self.directory / RANKS_DIR, ignore_errors=True)

    def _open_rank(self, fresh: Manifest) -> None:
        directory = self.directory
        self._take(
            directory,
            fcntl.LOCK_SH,
            f"{str(directory)!r} is locked by a one-process dump or a merge; wait for it or "
            f"dump elsewhere",
        )
        ranks = directory / RANKS_DIR
        made_ranks = not ranks.is_dir()
        ranks.mkdir(exist_ok=True)
        mine = ranks / rank_dir_name(self.rank, self.world_size)
        with _holding(ranks):
            if (directory / MANIFEST_NAME).exists():
                existing = Manifest.read(directory)
                _refuse_incompatible(directory, existing, fresh)
                self.header = existing
            else:
                # Checked under the lock: outside it, a rank that starts with another would see
                # the other's manifest temp file (or its first shards) and refuse the directory.
                try:
                    _refuse_foreign(directory)
                except ValueError:
                    if made_ranks:
                        with contextlib.suppress(OSError):  # another refused rank removed it
                            ranks.rmdir()
                    raise
                fresh.write(directory)
                self.header = fresh
            mine.mkdir(exist_ok=True)
            self._take(
                mine,
                fcntl.LOCK_EX,
                f"rank {self.rank} of {self.world_size} is already dumping into "
                f"{str(directory)!r} (another process holds it): give each process its own "
                f"RANK",
            )
            self._refuse_other_splits(ranks)
            if not (mine / MANIFEST_NAME).exists():
                self.header.model_copy(update={"shards": ()}).write(mine)
            self.owned = owned_shards(self.header.num_shards, self.rank, self.world_size)
            self.done = _collect(directory, self.header)
            _remove_debris(directory, set(self.owned), self.done)

    def _refuse_other_splits(self, ranks: Path) -> None:
        for (_, world), path in _rank_records(ranks.parent).items():
            if world == self.world_size:
                continue
            fd = _lock(path, fcntl.LOCK_EX, 0.0)
            if fd is None:
                raise ValueError(
                    f"{str(self.directory)!r} is being dumped by ranks of world size {world} "
                    f"({path.name} is running); this rank's world size is {self.world_size}: "
                    f"run every rank with the same WORLD_SIZE"
                )
            _unlock(fd)

    @property
    def record_dir(self) -> Path:
        """Where this writer records its shards: DIR itself, or its rank's directory."""
        if self.world_size == 1:
            return self.directory
        return self.directory / RANKS_DIR / rank_dir_name(self.rank, self.world_size)

    @property
    def manifest(self) -> Manifest:
        """The dump as this writer knows it: the header and every shard known complete."""
        return _with_shards(self.header, self.done)

    def todo(self) -> list[int]:
        """The shards this writer owns that are not complete, in order."""
        return [k for k in self.owned if k not in self.done]

    def add(self, info: ShardInfo) -> None:
        """Record a shard this writer completed; a rank then folds every record."""
        self.done[info.index] = info
        if self.world_size == 1:
            self.manifest.write(self.directory)
            return
        record = Manifest.read(self.record_dir)
        mine = {s.index: s for s in record.shards}
        mine[info.index] = info
        _with_shards(self.header, mine).write(self.record_dir)
        self._fold()

    def _fold(self) -> None:
        ranks = self.directory / RANKS_DIR
        try:
            with _holding(ranks):
                self.done.update(_collect(self.directory, self.header))
                merged = self.manifest
                merged.write(self.directory)
                if merged.complete:
                    shutil.rmtree(ranks)
        except FileNotFoundError:
            # Another rank completed the dump (its fold saw this rank's last shard) and
            # removed the records: the manifest lists everything.
            self.done.update({s.index: s for s in Manifest.read(self.directory).shards})

    def close(self) -> None:
        """Release this writer's locks."""
        while self._locks:
            _unlock(self._locks.pop())


def merge_knowledge(directory: str | Path) -> Manifest:
    """Fold the ranks' records of a dump into `DIR/manifest.json`; returns the manifest.

    What the last rank of a dump does by itself: needed when it was killed between its last
    shard and its fold, or when ranks dumped on machines without shared storage and their
    directories were copied into one. A complete result removes `DIR/ranks`; an incomplete
    one lists what the ranks did and says (`Manifest.incomplete_reason`) what is missing.
    Refused while any rank is still dumping into the directory.
    """
    directory = Path(directory)
    header = Manifest.read(directory)
    fd = _lock(directory, fcntl.LOCK_EX, _LOCK_WAIT_S)
    if fd is None:
        raise ValueError(
            f"{str(directory)!r} is still being dumped into (a rank or a dump holds it): the "
            f"last rank to finish completes the manifest by itself; merge once they stopped"
        )
    try:
        merged = _with_shards(header, _collect(directory, header))
        if merged != header:
            merged.write(directory)
        if merged.complete:
            shutil.rmtree(directory / RANKS_DIR, ignore_errors=True)
        return merged
    finally:
        _unlock(fd)


def owed_by_ranks(directory: str | Path, manifest: Manifest) -> list[tuple[int, int, list[int]]]:
    """`(rank, world size, shards)` for every rank, of each world size that has records in
    `directory`, that owes shards `manifest` lacks: whom to rerun."""
    missing = set(manifest.missing_shards())
    owed = []
    for world in sorted({w for _, w in _rank_records(Path(directory))}):
        for rank in range(world):
            shards = [k for k in owned_shards(manifest.num_shards, rank, world) if k in missing]
            if shards:
                owed.append((rank, world, shards))
    return owed
