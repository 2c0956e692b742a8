"""Replicas of one teacher behind one student: how the replica tests and
`bench/replica_balance.py` start them, drive an epoch through them and count each one's share."""

from __future__ import annotations

import contextlib
import re
import socket
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from lyceum.deploy.examples import teacher_cnn
from lyceum.deploy.launcher import TeacherProcess, start_teacher
from lyceum.student_client import OnlineTeacher

__all__ = [
    "DATASET",
    "LENGTH",
    "MODEL",
    "epoch",
    "free_port",
    "replica",
    "save_replica_checkpoint",
    "served",
]

MODEL = 'lyceum.deploy.examples:teacher_cnn{"width": 8}'
DATASET = 'lyceum.deploy.examples:digits{"split": "train"}'
LENGTH = 1257
"""The digits' training split: the ids an epoch sends."""
_SAMPLES = re.compile(r'^lyceum_teacher_samples_total\{[^}]*transport="grpc"[^}]*\} (\S+)$', re.M)


def save_replica_checkpoint(path: Path) -> Path:
    """One teacher's weights (seed 0), so that every replica is the same teacher."""
    torch.manual_seed(0)
    torch.save(teacher_cnn(width=8).state_dict(), path)
    return path


def replica(
    checkpoint: Path, host: str, port: int, extra: Sequence[str] = (), exit_after_s: float = 600
) -> contextlib.AbstractContextManager[TeacherProcess]:
    """`lyceum teacher serve` of `MODEL` on `host:port` (gRPC) with a Prometheus endpoint on
    a free port, killed when the block ends."""
    return start_teacher(
        MODEL,
        dataset=DATASET,
        checkpoint=checkpoint,
        grpc_port=port,
        extra_args=["--host", host, "--metrics-port", "0", *extra],
        exit_after_s=exit_after_s,
    )


def served(teacher: TeacherProcess, host: str = "127.0.0.1") -> int:
    """Samples a replica answered, from its Prometheus endpoint."""
    url = f"http://{host}:{teacher.port('metrics')}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    match = _SAMPLES.search(text)
    return int(float(match.group(1))) if match else 0


def epoch(teacher: OnlineTeacher, seed: int, length: int = LENGTH, window: int = 8) -> None:
    """One shuffled pass over every id in batches of 32, `window` requests in flight."""
    ids = np.random.default_rng(seed).permutation(length)
    batches = [torch.as_tensor(ids[i : i + 32]) for i in range(0, length, 32)]
    pending: set[int] = set()
    while batches or pending:
        while batches and len(pending) < window:
            rid = len(batches)
            teacher.submit(rid, batches.pop())
            pending.add(rid)
        for rid, _ in teacher.poll(1.0):
            pending.discard(rid)


def free_port(hosts: Sequence[str]) -> int:
    """A port free on every one of `hosts` (the replicas of one name share a port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        with contextlib.suppress(OSError), ExitStack() as binds:
            for host in hosts[1:]:
                binds.enter_context(socket.socket()).bind((host, port))
            return port
    raise RuntimeError(f"no port free on all of {hosts}")
