"""The failover policy of an online teacher: which replica gets each chunk, what each reply
means, and when a replica is set aside or tried again.

Each chunk goes to the healthy replica with the fewest outstanding samples (ties in turn). A
replica that fails (its stream breaks, it refuses with a retryable code, or it leaves a chunk
unanswered for `request_timeout_s`) is set aside with exponential backoff and its connection
closed; the chunks it owed go back to the front of the queue, for another replica or for it
once it is back. While a healthy replica exists, one that failed gets only a copy of one
chunk at a time (a probe: whoever answers first wins), so a replica that went silent holds up
nothing while it is tried again. A busy replica (RESOURCE_EXHAUSTED) is not broken: only the
refused chunk is asked again, after a short pause; nor is one whose server closed the
connection at its max age (`--max-connection-age-s`): its chunks are asked again at once, on
a new stream. A late answer to a chunk that was answered
elsewhere is dropped. A refusal no replica would answer differently (bad input, credentials)
ends its request.

`OnlineTeacher` owns the requests, describes and checks replicas and decodes what they send;
this module decides where chunks go (`Failover`), with the per-replica state of
`_replica_state`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from lyceum.proto.errors import BUSY, UNAVAILABLE, is_retryable
from lyceum.student_client._connections import Connection, TeacherError, wait_any
from lyceum.student_client._replica_state import Chunk, Replica

__all__ = ["Answer", "Failover", "Refusal", "Round"]

_WAIT_S = 0.05  # longest wait for replies before request timeouts are looked at again
_PROBE_CONNECT_S = 0.2  # a replica never described, tried while others work
# What gRPC says when a server ends a stream at its max connection age (after the grace).
_MAX_AGE = "max connection age"


@dataclass(frozen=True)
class Answer:
    """Knowledge a replica sent for a chunk (not decoded yet)."""

    replica: Replica
    chunk: Chunk
    knowledge: memoryview


@dataclass(frozen=True)
class Refusal:
    """A reply no other replica would answer differently: its request is over."""

    replica: Replica
    request_id: int
    code: int
    message: str


@dataclass
class Round:
    """What one `Failover.collect` found: the chunks answered, and the first refusal."""

    answers: list[Answer] = field(default_factory=list)
    refusal: Refusal | None = None


class Failover:
    """The replicas of one teacher and the queue of chunks waiting for one of them.

    `connect(endpoint)` makes a connection; `join(replica, timeout_s)` describes a replica not
    described yet (and checks it is the teacher the others are), returning False if it is
    down (it was set aside). `teacher` names the teacher in log lines.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        connect: Callable[[str], Connection],
        join: Callable[[Replica, float | None], bool],
        teacher: str,
        request_timeout_s: float,
    ) -> None:
        self.replicas = [Replica(e) for e in endpoints]
        self.queue: list[Chunk] = []
        self._connect = connect
        self._join = join
        self._teacher = teacher
        self._request_timeout_s = request_timeout_s
        self._wire_ids = itertools.count(1)
        self._rotation = itertools.count()
        self.last_progress = time.monotonic()  # when a chunk was last answered
        self.duplicates_dropped = 0
        self.failovers = 0
        self.busy_refusals = 0  # chunks a replica refused with RESOURCE_EXHAUSTED, asked again
        self.reconnects = 0  # chunks cut off by a server's max connection age, asked again

    def add(self, chunks: Sequence[Chunk]) -> None:
        """Queue chunks and send what can be sent."""
        if not self.queue and not any(r.owed for r in self.replicas):
            self.last_progress = time.monotonic()  # the timeout counts from the first wait
        self.queue.extend(chunks)
        self.dispatch()

    def _available(self, now: float) -> list[Replica]:
        return [r for r in self.replicas if r.down_until <= now]

    def dispatch(self) -> None:
        """Send queued chunks, each to the healthy replica owing the fewest samples, and a
        copy of one to a suspect replica as its probe (see the module docstring)."""
        while self.queue:
            now = time.monotonic()
            candidates = [r for r in self._available(now) if r.info is not None]
            for r in self._available(now):
                # A replica never described yet (down at start): a short try while others
                # work, so a silent one does not stall them for the connect timeout.
                if r.info is None and self._join(r, _PROBE_CONNECT_S if candidates else None):
                    candidates.append(r)
            if not candidates:
                return  # everyone is backing off; collect() retries when the first pause ends
            healthy = [r for r in candidates if r.failures == 0]
            pool = healthy or candidates
            turn = next(self._rotation)
            replica = min(
                (pool[(turn + k) % len(pool)] for k in range(len(pool))),
                key=lambda r: r.owed_samples,
            )
            chunk = self.queue.pop(0)
            self._send(replica, chunk)
            if healthy and replica in healthy:
                for suspect in candidates:
                    # _send reopens the connection that set_aside closed.
                    if suspect.failures and suspect.probe_at is None:
                        self._send(suspect, chunk, probe=True)
                        break

    def _send(self, replica: Replica, chunk: Chunk, probe: bool = False) -> None:
        wire = next(self._wire_ids)
        try:
            if replica.conn is None:
                replica.conn = self._connect(replica.endpoint)
            if chunk.inputs is None:
                replica.conn.submit(wire, ids=chunk.ids)
            else:
                replica.conn.submit(wire, inputs=chunk.inputs)
        except (TeacherError, grpc.RpcError, OSError) as exc:
            self.queue.insert(0, chunk)
            self.set_aside(replica, f"send failed: {exc}")
            return
        replica.sent(wire, chunk, probe)

    def set_aside(self, replica: Replica, reason: str) -> None:
        """Set a replica aside with backoff; its unanswered chunks go back to the front of
        the queue, in their original order."""
        requeue = replica.set_aside(reason, self._teacher)
        self.failovers += len(requeue)
        self.queue[:0] = requeue

    def forget(self, request_id: int) -> None:
        """Stop asking for a request's chunks (it was refused)."""
        self.queue = [c for c in self.queue if c.request_id != request_id]
        for replica in self.replicas:
            replica.drop_request(request_id)

    def collect(self, deadline: float) -> Round:
        """One round: retry backed-off replicas, read replies, time out silent chunks; waits
        on replies until `deadline` at most."""
        now = time.monotonic()
        if self.queue:
            self.dispatch()
        found = Round()
        busy = [
            r for r in self.replicas if (r.owed or r.probe_at is not None) and r.conn is not None
        ]
        if busy:
            # One wait on every busy replica at once, until a reply, the deadline, or the
            # moment a backed-off replica may take the queued chunks.
            wake = deadline
            if self.queue:
                wake = min(wake, min(r.down_until for r in self.replicas))
            wait_any(
                [r.conn for r in busy if r.conn is not None],
                min(max(0.0, wake - time.monotonic()), _WAIT_S),
            )
        for replica in busy:
            if replica.conn is not None:  # else it failed earlier in this round
                self._read(replica, replica.conn, now, found)
        if not busy and self.queue:
            # Every replica is backing off: sleep until the first may be tried again.
            wake = min(min(r.down_until for r in self.replicas), deadline)
            time.sleep(max(0.0, min(wake - time.monotonic(), 0.05)))
        return found

    def _read(self, replica: Replica, conn: Connection, now: float, found: Round) -> None:
        """Take the replies `replica` has sent; set it aside if it failed or went silent."""
        failure = ""
        for reply in conn.poll(0.0):
            if reply.knowledge is not None:
                replica.answered(self._teacher)
            chunk = replica.owed.get(reply.request_id)
            if chunk is None:
                self.duplicates_dropped += 1  # a late answer to a chunk re-asked elsewhere
                continue
            if (
                reply.knowledge is None
                and reply.error_code == UNAVAILABLE
                and reply.error_message == _MAX_AGE
            ):
                again = replica.connection_aged(reply.request_id)
                self.reconnects += 1
                if again is not None:
                    self.queue.insert(0, again)
                continue
            if reply.knowledge is None and reply.error_code == BUSY:
                again = replica.refused_busy(reply.request_id, reply.error_message)
                self.busy_refusals += 1
                if again is not None:
                    self.queue.insert(0, again)
                continue
            if reply.knowledge is None:
                if not is_retryable(reply.error_code):
                    if found.refusal is None:
                        found.refusal = Refusal(
                            replica, chunk.request_id, reply.error_code, reply.error_message
                        )
                    self.forget(chunk.request_id)
                    continue
                # Left in `owed`: set_aside below re-queues it with the rest.
                failure = str(TeacherError(reply.error_code, reply.error_message))
                continue
            self.last_progress = time.monotonic()
            # The chunk may also be in flight elsewhere (re-asked): forget it everywhere, so
            # a late copy is dropped as a duplicate when it arrives.
            for other in self.replicas:
                other.drop_answered(chunk)
            chunk.wire.clear()
            found.answers.append(Answer(replica, chunk, reply.knowledge))
        if failure:
            self.set_aside(replica, failure)
            return
        oldest = min([*replica.sent_at.values(), replica.probe_at or now])
        if now - oldest > self._request_timeout_s:
            self.set_aside(replica, f"no answer to a request within {self._request_timeout_s:g}s")

    def close(self) -> None:
        for replica in self.replicas:
            if replica.conn is not None:
                replica.conn.close()
                replica.conn = None
