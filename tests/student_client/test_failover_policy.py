"""The failover policy on its own, with scripted connections (no processes, no clocks): where
chunks go, what each kind of reply does, probes of a replica that failed, busy refusals,
refusals that end one request, silent replicas and late duplicates."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from lyceum.proto.errors import INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE
from lyceum.proto.schema import KnowledgeSchema, dense
from lyceum.proto.wire import Reply
from lyceum.student_client._failover import Failover
from lyceum.student_client._replica_state import Chunk, Replica, split_request
from lyceum.student_client._teacher_checks import TeacherInfo
from lyceum.v1 import knowledge_pb2 as pb

INFO = TeacherInfo(
    KnowledgeSchema(fields=(dense("logits", "float32", (2,)),)), None, "t", "1.0", True, 64, 1 << 20
)


class Scripted:
    """A connection that records what is sent and returns the replies a test gives it."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, list[int]]] = []  # (wire id, sample ids)
        self.replies: list[Reply] = []
        self.closed = False

    def describe(self, timeout_s: float) -> pb.DescribeReply:
        raise AssertionError("the replicas here are described already")

    def submit(self, request_id: int, inputs: object = None, ids: np.ndarray | None = None) -> None:
        assert ids is not None and not self.closed
        self.sent.append((request_id, ids.tolist()))

    def poll(self, timeout_s: float) -> list[Reply]:
        out, self.replies = self.replies, []
        return out

    def wait_handles(self) -> list[zmq.Socket[bytes] | int]:
        return []

    def close(self) -> None:
        self.closed = True

    def wire_of(self, ids: list[int]) -> int:
        return next(w for w, sent in self.sent if sent == ids)

    def answer(self, ids: list[int]) -> None:
        self.replies.append(Reply(self.wire_of(ids), knowledge=memoryview(b"knowledge")))

    def refuse(self, ids: list[int], code: int, message: str) -> None:
        self.replies.append(Reply(self.wire_of(ids), error_code=code, error_message=message))


class Pool:
    """A `Failover` over scripted replicas, all described; each (re)connection a new script."""

    def __init__(self, *endpoints: str) -> None:
        self.connections: dict[str, list[Scripted]] = {e: [] for e in endpoints}
        self.failover = Failover(
            endpoints,
            connect=self._connect,
            join=self._join,
            teacher="online teacher",
            request_timeout_s=30.0,
        )
        for replica in self.failover.replicas:
            replica.info = INFO
            replica.conn = self._connect(replica.endpoint)

    def _connect(self, endpoint: str) -> Scripted:
        conn = Scripted()
        self.connections[endpoint].append(conn)
        return conn

    def _join(self, replica: Replica, timeout_s: float | None) -> bool:
        raise AssertionError("the replicas here are described already")

    def conn(self, endpoint: str) -> Scripted:
        return self.connections[endpoint][-1]

    def replica(self, endpoint: str) -> Replica:
        return next(r for r in self.failover.replicas if r.endpoint == endpoint)

    def holder(self, ids: list[int]) -> str:
        """The one endpoint the chunk of `ids` was sent to (on its current connection)."""
        (endpoint,) = [e for e in self.connections if ids in [s for _, s in self.conn(e).sent]]
        return endpoint

    def collect(self) -> list[list[int]]:
        found = self.failover.collect(deadline=0.0)  # never waits: every reply is scripted
        assert found.refusal is None, found.refusal
        return [a.chunk.ids.tolist() for a in found.answers]


def _chunks(request_id: int, *parts: list[int]) -> list[Chunk]:
    return [Chunk(request_id, np.array(p, dtype=np.uint64), None) for p in parts]


def test_each_chunk_goes_to_the_replica_owing_the_fewest_samples() -> None:
    pool = Pool("zmq://a:1", "zmq://b:1")
    pool.failover.add(_chunks(1, [0, 1, 2, 3], [4], [5, 6]))
    first = pool.holder([0, 1, 2, 3])
    other = next(e for e in pool.connections if e != first)
    assert [ids for _, ids in pool.conn(other).sent] == [[4], [5, 6]]
    assert pool.failover.queue == [] and pool.replica(first).owed_samples == 4


def test_split_request_makes_chunks_of_the_teachers_limit() -> None:
    ids = np.arange(7, dtype=np.uint64)
    chunks = split_request(3, ids, 3, encode=lambda part: f"inputs {part.start}-{part.stop}")
    assert [c.ids.tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [c.inputs for c in chunks] == ["inputs 0-3", "inputs 3-6", "inputs 6-9"]
    assert all(c.request_id == 3 for c in chunks)


def test_a_failed_replica_hands_its_chunks_over_and_is_probed_once_back() -> None:
    pool = Pool("zmq://a:1", "zmq://b:1")
    pool.failover.add(_chunks(1, [0, 1], [2, 3]))
    failing = pool.holder([0, 1])
    healthy = pool.holder([2, 3])
    broken = pool.conn(failing)
    broken.refuse([0, 1], UNAVAILABLE, "the teacher is shutting down")
    assert pool.collect() == []
    assert broken.closed and pool.failover.failovers == 1
    assert pool.replica(failing).last_error.startswith("UNAVAILABLE: the teacher is shutting")
    # Its chunk goes to the other replica in the next round; both are answered there.
    assert [c.ids.tolist() for c in pool.failover.queue] == [[0, 1]]
    assert pool.collect() == []
    assert [ids for _, ids in pool.conn(healthy).sent] == [[2, 3], [0, 1]]
    pool.conn(healthy).answer([2, 3])
    pool.conn(healthy).answer([0, 1])
    assert sorted(pool.collect()) == [[0, 1], [2, 3]]
    # Once its backoff is over, the failed replica gets a copy of the next chunk as a probe
    # (on a new connection); whoever answers first wins.
    pool.replica(failing).down_until = 0.0
    pool.failover.add(_chunks(2, [9]))
    assert [ids for _, ids in pool.conn(healthy).sent][-1] == [9]
    assert pool.conn(failing) is not broken and pool.conn(failing).sent[0][1] == [9]
    pool.conn(healthy).answer([9])
    assert pool.collect() == [[9]]
    assert pool.replica(failing).failures == 1 and pool.replica(failing).probe_at is not None
    # The probe's answer comes late: dropped, but it shows the replica is healthy again.
    pool.conn(failing).answer([9])
    assert pool.collect() == [] and pool.failover.duplicates_dropped == 1
    assert pool.replica(failing).failures == 0 and pool.replica(failing).probe_at is None


def test_a_busy_replica_keeps_its_connection_and_the_refused_chunk_is_asked_again() -> None:
    pool = Pool("zmq://a:1")
    pool.failover.add(_chunks(1, [0], [1]))
    conn = pool.conn("zmq://a:1")
    conn.refuse([0], RESOURCE_EXHAUSTED, "the queue is full")
    assert pool.collect() == []
    replica = pool.replica("zmq://a:1")
    assert pool.failover.busy_refusals == 1 and pool.failover.failovers == 0
    assert not conn.closed and replica.failures == 0 and replica.down_until > 0
    assert [c.ids.tolist() for c in pool.failover.queue] == [[0]]  # paused, then asked again
    assert [c.ids.tolist() for c in replica.owed.values()] == [[1]]  # still in flight
    replica.down_until = 0.0
    pool.collect()
    assert [ids for _, ids in conn.sent] == [[0], [1], [0]]
    assert pool.failover.queue == []


def test_a_stream_cut_at_the_servers_max_age_is_asked_again_at_once_without_failing() -> None:
    pool = Pool("grpc://a:1")
    pool.failover.add(_chunks(1, [0], [1]))
    conn = pool.conn("grpc://a:1")
    conn.answer([1])
    # What gRPC reports for a stream still open when the max age's grace ran out.
    conn.refuse([0], UNAVAILABLE, "max connection age")
    assert pool.collect() == [[1]]
    replica = pool.replica("grpc://a:1")
    assert pool.failover.reconnects == 1 and pool.failover.failovers == 0
    assert replica.failures == 0 and replica.down_until == 0.0 and not conn.closed
    assert "max-connection-age-grace-s" in replica.last_error
    # Asked again in the next round, with no pause; the next send opens a new stream.
    assert pool.collect() == []
    assert [ids for _, ids in conn.sent] == [[0], [1], [0]]
    conn.replies.append(Reply(conn.sent[-1][0], knowledge=memoryview(b"knowledge")))
    assert pool.collect() == [[0]]


def test_a_refusal_ends_its_request_and_leaves_the_others_running() -> None:
    pool = Pool("zmq://a:1")
    pool.failover.add(_chunks(1, [0, 1], [2]) + _chunks(2, [3]))
    conn = pool.conn("zmq://a:1")
    conn.refuse([0, 1], INVALID_ARGUMENT, "request repeats sample ids")
    found = pool.failover.collect(deadline=0.0)
    assert found.refusal is not None and found.refusal.request_id == 1
    assert (found.refusal.code, found.refusal.message) == (
        INVALID_ARGUMENT,
        "request repeats sample ids",
    )
    replica = pool.replica("zmq://a:1")
    assert [c.request_id for c in replica.owed.values()] == [2] and replica.failures == 0
    conn.answer([2])  # a late answer to the refused request's other chunk
    conn.answer([3])
    assert pool.collect() == [[3]] and pool.failover.duplicates_dropped == 1


def test_a_replica_silent_past_the_request_timeout_is_set_aside() -> None:
    pool = Pool("zmq://a:1", "zmq://b:1")
    pool.failover.add(_chunks(1, [0]))
    silent = pool.holder([0])
    replica = pool.replica(silent)
    (wire,) = replica.sent_at
    replica.sent_at[wire] -= 31.0  # sent longer ago than request_timeout_s
    assert pool.collect() == []
    assert replica.last_error == "no answer to a request within 30s" and replica.failures == 1
    assert pool.collect() == []  # the next round sends the chunk to the other replica
    other = next(e for e in pool.connections if e != silent)
    assert [ids for _, ids in pool.conn(other).sent] == [[0]]


@pytest.mark.parametrize("code", [UNAVAILABLE, RESOURCE_EXHAUSTED])
def test_retryable_replies_never_end_a_request(code: int) -> None:
    pool = Pool("zmq://a:1", "zmq://b:1")
    pool.failover.add(_chunks(1, [0]))
    pool.conn(pool.holder([0])).refuse([0], code, "later")
    found = pool.failover.collect(deadline=0.0)
    assert found.refusal is None and found.answers == []
    owed = [c for r in pool.failover.replicas for c in r.owed.values()] + pool.failover.queue
    assert [c.ids.tolist() for c in owed] == [[0]]  # asked again, or about to be
