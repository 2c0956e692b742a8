"""The record of shards already verified, kept across runs so that a dump is hashed once.

A shard whose sha256 matched its manifest is recorded under its absolute path with its size,
mtime (ns) and that sha256. A later open of the same dump trusts a shard whose four values
all still match, without reading it: rewriting or replacing a file changes its size or mtime,
and a re-dump changes the manifest's hash. What the record cannot see is a file changed in
place without a new mtime (media errors, a tool that restores mtimes); `lyceum knowledge
verify` always re-hashes everything.

Where: `$LYCEUM_CACHE_DIR/verified-shards.json`, else in `$XDG_CACHE_HOME/lyceum/`, else
in `~/.cache/lyceum/` (see `cache_dir`). The record is an optimisation, never a requirement: a file that is
missing, unreadable or not valid JSON counts as empty, and a directory that cannot be
written (a read-only home) costs a warning and a re-hash next time, never the run. Writers
(several processes: DDP ranks, parallel jobs) take an exclusive flock on a lock file beside
it, re-read, merge their entries and replace the file atomically (temp file, rename), so
concurrent writers neither lose each other's entries nor leave a half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = "LYCEUM_CACHE_DIR"
CACHE_FILE = "verified-shards.json"
MAX_ENTRIES = 20_000
"""Most recently verified shards kept; older entries are dropped (a re-hash at worst)."""

_FORMAT = 1


def cache_dir() -> Path:
    """`$LYCEUM_CACHE_DIR`, else `$XDG_CACHE_HOME/lyceum`, else `~/.cache/lyceum` (else, for
    a user without a home directory, e.g. a container's arbitrary uid, the temp directory)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "lyceum"
    try:
        return Path.home() / ".cache" / "lyceum"
    except RuntimeError:  # no $HOME and no passwd entry
        return Path(tempfile.gettempdir()) / f"lyceum-cache-{os.getuid()}"


@dataclass(frozen=True)
class ShardKey:
    """What must all be unchanged for a recorded verification to hold."""

    path: str
    size: int
    mtime_ns: int
    sha256: str

    @classmethod
    def of(cls, path: Path, stat: os.stat_result, sha256: str) -> ShardKey:
        return cls(str(path.resolve()), stat.st_size, stat.st_mtime_ns, sha256)


class VerifiedShards:
    """The cross-run record (see the module docstring); safe to share between threads."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else cache_dir() / CACHE_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._seen: tuple[int, int, int] | None = None
        self._warned = False

    def contains(self, key: ShardKey) -> bool:
        """True if `key` was recorded, by this process or another, since the file last changed."""
        with self._lock:
            self._reload_if_changed()
            entry = self._entries.get(key.path)
        return entry is not None and (
            entry.get("size"),
            entry.get("mtime_ns"),
            entry.get("sha256"),
        ) == (key.size, key.mtime_ns, key.sha256)

    def add(self, key: ShardKey) -> None:
        """Record a verified shard; a cache that cannot be written is warned about once."""
        entry = {
            "size": key.size,
            "mtime_ns": key.mtime_ns,
            "sha256": key.sha256,
            "verified_at": time.time(),
        }
        with self._lock:
            try:
                self._write_merged(key.path, entry)
            except OSError as exc:
                self._entries[key.path] = entry  # still trusted for the rest of this run
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "could not record verified shards in %s (%s): the next run hashes "
                        "them again. Set %s to a writable directory to keep the record.",
                        self.path,
                        exc.strerror or exc,
                        CACHE_ENV,
                    )

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _reload_if_changed(self) -> None:
        stamp = self._stamp()
        if stamp != self._seen:
            self._entries = self._read() if stamp is not None else {}
            self._seen = stamp

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            log.debug("ignoring the verified-shard record %s: %s", self.path, exc)
            return {}
        shards = raw.get("shards") if isinstance(raw, dict) else None
        if (
            not isinstance(raw, dict)
            or raw.get("format") != _FORMAT
            or not isinstance(shards, dict)
        ):
            return {}
        return {k: v for k, v in shards.items() if isinstance(v, dict)}

    def _write_merged(self, path: str, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            entries = self._read()  # what other processes wrote since we last looked
            entries[path] = entry
            if len(entries) > MAX_ENTRIES:
                newest = sorted(entries.items(), key=lambda kv: kv[1].get("verified_at", 0))
                entries = dict(newest[-MAX_ENTRIES:])
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                # No fsync: losing the record in a crash only costs a re-hash.
                tmp.write_text(json.dumps({"format": _FORMAT, "shards": entries}))
                os.replace(tmp, self.path)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            self._entries = entries
            self._seen = self._stamp()
