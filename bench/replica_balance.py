"""Replica balance: each of 4 teacher replicas' share of an epoch's requests, and how long a
replica added behind a `dns://` name takes to get its first request.

Real `lyceum teacher serve` processes (teacher_cnn width 8, 1 thread each) on loopback
addresses; one student (`OnlineTeacher`, index mode) runs shuffled epochs of the 1,257-sample
digits train split in batches of 32 with 8 requests in flight; shares come from each
replica's Prometheus sample counter. Two setups:

- a list of 4 endpoints: the student sends each request to the replica owing the fewest
  samples (goal: each share within +-10% of 1/4);
- one `dns://` name for 4 replicas (answered by the DNS responder of the tests, named as the
  target's authority) with `--max-connection-age-s`: a `Distill` call per request, balanced
  by gRPC's `round_robin`. Then a 5th address is added to the name and the time until that
  replica answers is measured (goal: within max connection age).

Each epoch's samples/s is printed beside its shares (what a call per request costs against
the listed endpoints' long-lived streams).

    .venv/bin/python -m bench.replica_balance                # ~2 min on two cores
    .venv/bin/python -m bench.replica_balance --epochs 5 --age-s 2

(run from the repository root, as a module: the replicas are started, driven and counted by
the tests' own helpers, `tests._support.replicas`, and the name is answered by their DNS
responder.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from lyceum.deploy.launcher import TeacherProcess
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


def shares_per_epoch(
    student: OnlineTeacher, replicas: list[tuple[TeacherProcess, str]], epochs: int
) -> list[tuple[list[float], float]]:
    """Per epoch: each replica's share of the samples, and the epoch's samples/s."""
    rows = []
    before = [served(r, h) for r, h in replicas]
    for seed in range(epochs):
        started = time.perf_counter()
        epoch(student, seed)
        rate = LENGTH / (time.perf_counter() - started)
        after = [served(r, h) for r, h in replicas]
        counts = [a - b for a, b in zip(after, before, strict=True)]
        rows.append(([c / sum(counts) for c in counts], rate))
        before = after
    return rows


def _print(title: str, rows: list[tuple[list[float], float]]) -> None:
    print(title)
    for i, (row, rate) in enumerate(rows):
        worst = max(abs(s - 1 / len(row)) * len(row) for s in row)
        cells = " ".join(f"{s:6.1%}" for s in row)
        print(
            f"  epoch {i + 1}: {cells}   worst {worst:+.0%} of an even share, {rate:.0f} samples/s"
        )
    mean = np.mean([row for row, _ in rows], axis=0)
    rate = float(np.median([r for _, r in rows]))
    print(f"  mean   : {' '.join(f'{s:6.1%}' for s in mean)}   median {rate:.0f} samples/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--age-s", type=float, default=2.0, help="--max-connection-age-s")
    args = parser.parse_args()
    hosts = [f"127.0.0.{i}" for i in range(2, 7)]
    port = free_port(hosts)
    age = ["--max-connection-age-s", str(args.age_s), "--max-connection-age-grace-s", "0.5"]
    with tempfile.TemporaryDirectory(prefix="lyceum-balance-") as tmp, ExitStack() as stack:
        checkpoint = save_replica_checkpoint(Path(tmp) / "cnn.pt")

        def teacher(host: str) -> TeacherProcess:
            return stack.enter_context(replica(checkpoint, host, port, age, exit_after_s=900))

        replicas = [(teacher(h), h) for h in hosts[:4]]
        listed = OnlineTeacher([f"grpc://{h}:{port}" for h in hosts[:4]], mode="index")
        stack.callback(listed.close)
        _print("4 replicas listed (least owed)", shares_per_epoch(listed, replicas, args.epochs))
        listed.close()

        responder = stack.enter_context(dns_responder("teachers.test", hosts[:4]))
        target = f"dns://127.0.0.1:{responder.port}/teachers.test:{port}"
        named = OnlineTeacher(target, mode="index", timeouts=TeacherTimeouts(timeout_s=120))
        stack.callback(named.close)
        _print(
            f"4 replicas behind one dns:// name, max connection age {args.age_s} s",
            shares_per_epoch(named, replicas, args.epochs),
        )
        added = teacher(hosts[4])
        responder.set_addresses(hosts)
        started = time.monotonic()
        seed = 100
        while served(added, hosts[4]) == 0:
            if time.monotonic() - started > 300:
                raise SystemExit("the added replica got no request in 300 s")
            epoch(named, seed)
            seed += 1
        print(
            f"a 5th replica added to the name: first request after "
            f"{time.monotonic() - started:.1f} s (max connection age {args.age_s} s; "
            f"{responder.a_queries} A queries answered in all)"
        )
        print(f"load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
