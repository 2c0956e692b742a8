"""The bookkeeping behind `OnlineTeacher`: requests split into chunks, and each replica's state.

A request is split into chunks the teacher accepts; a chunk is answered once, whichever
replica answers. A replica holds its connection, the chunks it owes, and its health: set
aside with exponential backoff when it fails (logged once, however many retries follow),
paused briefly when it is busy, healthy again (logged once) when it answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lyceum.proto.codec import KnowledgeBatch, concat_batches
from lyceum.student_client._connections import Connection
from lyceum.student_client._teacher_checks import TeacherInfo

__all__ = ["Chunk", "Replica", "Request", "split_request"]

log = logging.getLogger("lyceum.student_client.online")

_BACKOFF_S = (0.05, 5.0)  # first and largest pause before a failed replica is tried again
# A replica that is busy (RESOURCE_EXHAUSTED) is not broken: only the refused chunk is asked
# again, after a pause that doubles while refusals go on.
_BUSY_PAUSE_S = (0.005, 1.0)


@dataclass(eq=False)  # identity: a chunk is one piece of work, hashed as such
class Chunk:
    """Part of a request small enough for the teacher; answered once, whoever answers."""

    request_id: int
    ids: np.ndarray  # uint64
    inputs: object | None  # query mode: the chunk's inputs as Arrow IPC bytes, encoded once
    batch: KnowledgeBatch | None = None
    wire: set[int] = field(default_factory=set)  # wire request ids in flight for it


@dataclass
class Request:
    ids: torch.Tensor
    chunks: list[Chunk]

    @property
    def done(self) -> bool:
        return all(c.batch is not None for c in self.chunks)

    def batch(self) -> KnowledgeBatch:
        """The request's knowledge, its chunks' rows in order (once `done`)."""
        return concat_batches([c.batch for c in self.chunks if c.batch is not None])


def split_request(
    request_id: int,
    ids: np.ndarray,
    step: int,
    encode: Callable[[slice], object] | None,
    costs: np.ndarray | None = None,
    budget: int = 0,
) -> list[Chunk]:
    """Chunks of at most `step` samples (the teacher's `max_request_samples`) and, given each
    sample's reply bytes `costs`, at most `budget` reply bytes (a sample over it alone: the
    teacher refuses it, naming the sizes); in query mode `encode` gives the inputs of the
    samples `ids[part]` as Arrow IPC bytes."""
    step = max(step, 1)
    if costs is None:
        parts = [slice(lo, lo + step) for lo in range(0, len(ids), step)]
    else:
        parts = _byte_parts(costs, step, budget)
    return [Chunk(request_id, ids[p], encode(p) if encode is not None else None) for p in parts]


def _byte_parts(costs: np.ndarray, step: int, budget: int) -> list[slice]:
    parts: list[slice] = []
    lo, used = 0, 0
    for i, cost in enumerate(costs.tolist()):
        if i > lo and (i - lo >= step or used + cost > budget):
            parts.append(slice(lo, i))
            lo, used = i, 0
        used += cost
    if lo < len(costs):
        parts.append(slice(lo, len(costs)))
    return parts


@dataclass
class Replica:
    """One endpoint of a teacher: its connection, the chunks it owes and its health."""

    endpoint: str
    conn: Connection | None = None
    info: TeacherInfo | None = None
    owed: dict[int, Chunk] = field(default_factory=dict)  # wire request id -> chunk
    sent_at: dict[int, float] = field(default_factory=dict)
    failures: int = 0  # since its last answer; > 0: suspect, only probed (Failover.dispatch)
    probe_at: float | None = None  # when the probe now in flight was sent
    down_until: float = 0.0
    down_since: float = 0.0  # when it was set aside, for the line that says it is back
    busy_streak: int = 0  # RESOURCE_EXHAUSTED refusals since its last answer
    last_error: str = "not tried"

    @property
    def owed_samples(self) -> int:
        return sum(len(c.ids) for c in self.owed.values())

    def sent(self, wire: int, chunk: Chunk, probe: bool) -> None:
        self.owed[wire] = chunk
        if probe:
            self.probe_at = time.monotonic()
        else:
            self.sent_at[wire] = time.monotonic()
        chunk.wire.add(wire)

    def drop_answered(self, chunk: Chunk) -> None:
        """Stop waiting for `chunk`, answered by another replica: a late copy from this one is
        then dropped as a duplicate. A probe stays in flight (see `Failover.dispatch`)
        until this replica answers or times out."""
        for wire in chunk.wire & self.owed.keys():
            del self.owed[wire]
            self.sent_at.pop(wire, None)

    def drop_request(self, request_id: int) -> None:
        """Stop waiting for the chunks of a request that was refused: late answers to them
        are dropped as duplicates."""
        for wire in [w for w, c in self.owed.items() if c.request_id == request_id]:
            chunk = self.owed.pop(wire)
            self.sent_at.pop(wire, None)
            chunk.wire.discard(wire)
        if self.probe_at is not None and not self.owed:
            self.probe_at = None

    def set_aside(self, reason: str, teacher: str) -> list[Chunk]:
        """Back off after a failure and close the connection; returns the chunks it owed
        that are in flight nowhere else, in their order, to ask again. Only the first
        failure since it last answered is logged (`teacher` names it in the line)."""
        now = time.monotonic()
        if self.failures == 0:
            log.warning(
                "%s: replica %s set aside (%s); its requests go to the other replicas, or to "
                "it again once it answers",
                teacher,
                self.endpoint,
                reason,
            )
            self.down_since = now
        self.failures += 1
        self.last_error = reason
        self.probe_at = None
        # A replica never reached is retried less often: trying it costs a describe.
        cap = _BACKOFF_S[1] if self.info is not None else 6 * _BACKOFF_S[1]
        self.down_until = now + min(_BACKOFF_S[0] * 2 ** (self.failures - 1), cap)
        lost = [c for c in self.owed.values() if c.batch is None]
        for wire, chunk in self.owed.items():
            chunk.wire.discard(wire)
        self.owed.clear()
        self.sent_at.clear()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        return [c for c in dict.fromkeys(lost) if not c.wire]

    def _take_back(self, wire: int) -> Chunk:
        """Stop waiting for request `wire` here, without counting a failure."""
        chunk = self.owed.pop(wire)
        self.sent_at.pop(wire, None)
        chunk.wire.discard(wire)
        if self.probe_at is not None and not self.owed:
            self.probe_at = None
        return chunk

    def connection_aged(self, wire: int) -> Chunk | None:
        """The server closed the connection at its max age with request `wire` on it: not a
        failure (the next request opens a new stream at once); returns the chunk to ask
        again, unless it is in flight elsewhere."""
        chunk = self._take_back(wire)
        # Named if the teacher times out: every try cut off means a grace shorter than a request.
        self.last_error = (
            "the server closed the connection at its max age before answering; a request "
            "takes longer than --max-connection-age-grace-s allows"
        )
        return None if chunk.wire else chunk

    def refused_busy(self, wire: int, message: str) -> Chunk | None:
        """A busy refusal of request `wire`: pause this replica briefly; returns the chunk to
        ask again later, unless it is in flight elsewhere."""
        chunk = self._take_back(wire)
        self.busy_streak += 1
        self.last_error = f"busy: {message}"
        pause = min(_BUSY_PAUSE_S[0] * 2 ** (self.busy_streak - 1), _BUSY_PAUSE_S[1])
        self.down_until = max(self.down_until, time.monotonic() + pause)
        return None if chunk.wire else chunk

    def answered(self, teacher: str) -> None:
        """It answered with knowledge: healthy again (logged once if it had been set aside)."""
        if self.failures:
            log.info(
                "%s: replica %s answers again, after %d failed tries in %.1fs",
                teacher,
                self.endpoint,
                self.failures,
                time.monotonic() - self.down_since,
            )
        self.failures, self.probe_at, self.busy_streak = 0, None, 0
