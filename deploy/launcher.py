"""Start teacher servers on this machine: `lyceum teacher serve` subprocesses that always stop.

    with start_teacher("lyceum.deploy.examples:teacher_cnn", dataset="lyceum.deploy.examples:digits",
                       checkpoint="teacher.safetensors", grpc=True) as teacher:
        source = OnlineTeacher(teacher.endpoint("grpc"), mode="index")

The server is the real CLI in a child process. `start_teacher` returns once the server has
written its ready file (bound ports, so port 0 works) and kills the process on exit, whatever
happened inside the block. `--exit-after-s` is a second safety net: a server whose parent died
before it could kill it still stops by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["TeacherProcess", "start_teacher"]


class TeacherProcess:
    """A running `lyceum teacher serve`: its endpoints, pid and log."""

    def __init__(self, proc: subprocess.Popen[bytes], info: dict[str, Any], log: Path) -> None:
        self.proc = proc
        self.info = info
        self.log_path = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def endpoints(self) -> list[str]:
        return list(self.info["endpoints"])

    def endpoint(self, scheme: str) -> str:
        """The first endpoint of a scheme (`grpc`, `zmq`, ...)."""
        for e in self.endpoints:
            if e.startswith(f"{scheme}://"):
                return e
        raise ValueError(f"the teacher serves {self.endpoints}, no {scheme}:// endpoint")

    def port(self, transport: str) -> int:
        return int(self.info[transport])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (default SIGKILL, as a crash would) and reap the process."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _wait_ready(
    proc: subprocess.Popen[bytes], ready: Path, log: Path, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            info: dict[str, Any] = json.loads(ready.read_text())
            return info
        if proc.poll() is not None:
            raise RuntimeError(
                f"teacher server exited with code {proc.returncode} before it was ready; "
                f"its log ({log}):\n{log.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(0.05)
    raise RuntimeError(
        f"teacher server not ready after {timeout_s:g}s; its log ({log}):\n"
        f"{log.read_text(errors='replace')[-4000:]}"
    )


@contextmanager
def start_teacher(
    model: str,
    *,
    dataset: str | None = None,
    checkpoint: str | Path | None = None,
    grpc: bool = True,
    zmq: bool = False,
    grpc_port: int = 0,
    zmq_port: int = 0,
    threads: int = 1,
    max_batch: int = 64,
    extra_args: Sequence[str] = (),
    exit_after_s: float = 3600.0,
    ready_timeout_s: float = 120.0,
    workdir: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[TeacherProcess]:
    """Run `lyceum teacher serve` for `model` (a spec) until the block ends, then kill it.

    `grpc`/`zmq` choose the transports, on `grpc_port`/`zmq_port` (0: any free port; a fixed
    port lets a restarted server come back at the same endpoint). `extra_args` are passed to
    the CLI as they are (e.g. `["--token-file", "t.txt"]`). `env` is added to the environment
    (e.g. PYTHONPATH for test-only model specs).
    """
    if not grpc and not zmq:
        raise ValueError("start_teacher: enable grpc and/or zmq, or the teacher serves nothing")
    with tempfile.TemporaryDirectory(prefix="lyceum-teacher-") as tmp:
        where = Path(workdir) if workdir is not None else Path(tmp)
        stamp = time.monotonic_ns()
        ready, log = where / f"ready-{stamp}.json", where / f"teacher-{stamp}.log"
        cmd = [sys.executable, "-m", "lyceum.deploy.cli", "teacher", "serve", "--model", model]
        if dataset is not None:
            cmd += ["--dataset", dataset]
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
        if grpc:
            cmd += ["--grpc-port", str(grpc_port)]
        if zmq:
            cmd += ["--zmq-port", str(zmq_port)]
        cmd += ["--threads", str(threads), "--max-batch", str(max_batch)]
        cmd += ["--ready-file", str(ready), "--exit-after-s", str(exit_after_s), *extra_args]
        full_env = {**os.environ, **(env or {})}
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
        teacher: TeacherProcess | None = None
        try:
            teacher = TeacherProcess(proc, _wait_ready(proc, ready, log, ready_timeout_s), log)
            yield teacher
        finally:
            if teacher is not None:
                teacher.kill()
            elif proc.poll() is None:
                proc.kill()
                proc.wait(10)
