"""Replicas behind one student: an even split over an epoch, listed or behind a `dns:///` name,
and a replica added behind the name found through the servers' max connection age.

Real `lyceum teacher serve` processes on loopback addresses. The `dns://` test's name is
answered by a DNS server in the test's own process (`dns_responder.py`), named as the target's
authority, so nothing outside the test changes.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from lyceum.student_client import OnlineTeacher, TeacherTimeouts
from tests._support.dns_responder import dns_responder
from tests._support.replicas import (
    LENGTH,
    epoch,
    free_port,
    replica,
    save_replica_checkpoint,
    served,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One teacher's weights, so that every replica is the same teacher."""
    return save_replica_checkpoint(tmp_path_factory.mktemp("teacher") / "cnn.pt")


@pytest.mark.integration
def test_four_replicas_share_an_epoch_evenly(checkpoint: Path) -> None:
    with ExitStack() as stack:
        replicas = [stack.enter_context(replica(checkpoint, "127.0.0.1", 0, [])) for _ in range(4)]
        student = OnlineTeacher([r.endpoint("grpc") for r in replicas], mode="index")
        stack.callback(student.close)
        # One request at a time: every replica is idle when the next is sent, so the split
        # shows the rotation alone. With more in flight the student sends to the replica
        # owing the fewest samples, and shares follow the replicas' speeds (the CPU they get
        # on a shared machine); bench/replica_balance.py measures that.
        for seed in range(2):
            epoch(student, seed, window=1)
        counts = [served(r) for r in replicas]
    assert sum(counts) == 2 * LENGTH
    shares = [c / sum(counts) for c in counts]
    assert all(abs(s - 0.25) <= 0.025 for s in shares), shares  # within +-10% of 1/4


@pytest.mark.integration
def test_a_replica_added_behind_a_dns_name_takes_load(checkpoint: Path) -> None:
    hosts = [f"127.0.0.{i}" for i in range(2, 6)]
    port = free_port(hosts)
    # A long grace: calls in flight when a connection ages out finish on it (new calls go to a
    # new connection at once), so none is cut and asked again on a loaded machine.
    age = ["--max-connection-age-s", "1", "--max-connection-age-grace-s", "10"]
    with ExitStack() as stack:
        dns = stack.enter_context(dns_responder("lyceum-teachers.test", hosts[:3]))
        first = [stack.enter_context(replica(checkpoint, h, port, age)) for h in hosts[:3]]
        # The name's authority is the test's own DNS server: gRPC's c-ares resolver asks it.
        target = f"dns://127.0.0.1:{dns.port}/lyceum-teachers.test:{port}"
        student = OnlineTeacher(target, mode="index", timeouts=TeacherTimeouts(timeout_s=120))
        stack.callback(student.close)
        for seed in range(2):
            epoch(student, seed=seed)
        assert dns.a_queries >= 1  # gRPC resolved the name through the test's DNS server
        # A Distill call per request, balanced by round_robin: an even split (a stream per
        # name would have sent whole epochs to one replica).
        counts = [served(r, h) for r, h in zip(first, hosts[:3], strict=True)]
        # More if a call was cut at a connection's max age under load and asked again.
        assert sum(counts) >= 2 * LENGTH
        shares = [c / sum(counts) for c in counts]
        assert all(abs(s - 1 / 3) <= 0.1 / 3 for s in shares), shares  # within +-10% of 1/3
        # A fourth replica comes up and the name starts resolving to it too.
        added = stack.enter_context(replica(checkpoint, hosts[3], port, age))
        dns.set_addresses(hosts)
        asked = dns.a_queries
        deadline = time.monotonic() + 180  # a hang guard (the student re-resolves within 1 s)
        seed = 2
        while served(added, hosts[3]) == 0:
            assert time.monotonic() < deadline, (
                f"the added replica never got a request; the name was asked "
                f"{dns.a_queries - asked} more times"
            )
            epoch(student, seed=seed)
            seed += 1
        assert dns.a_queries > asked
