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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lyceum.student_client.trainer import TrainResult
    from lyceum.student_client.trainer_config import TrainConfig

__all__ = [
    "TeacherProcess",
    "demo_student_config",
    "start_ensemble",
    "start_teacher",
    "train_ensemble_student",
]


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


def demo_student_config(
    teachers: Mapping[str, Mapping[str, Any]],
    *,
    labeled: int = 100,
    epochs: int = 30,
    batch_size: int = 64,
    temperature: float = 4.0,
    kd_weight: float = 1.0,
    lr: float = 1e-2,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> TrainConfig:
    """The demo's distilled student as a `lyceum student train` config: `student_mlp` on
    digits, every training input in the transfer set (the teachers' soft labels), only ids
    < `labeled` contributing their labels, teachers' logits merged with `mean`.

    `teachers` maps a name to a teacher entry of the config (`{"endpoints": [...], "mode":
    "index"}` or `{"dir": ...}`).
    """
    from lyceum.student_client.trainer_config import validate_config

    digits = "lyceum.deploy.examples:digits"
    return validate_config(
        {
            "model": "lyceum.deploy.examples:student_mlp",
            "model_kwargs": {"hidden": 32},
            "dataset": {
                "train": digits,
                "train_kwargs": {"split": "train"},
                "validation": digits,
                "validation_kwargs": {"split": "val"},
                "labeled": labeled,
            },
            "teachers": {name: dict(entry) for name, entry in teachers.items()},
            "merge": {"logits": "mean"},
            "losses": {
                "terms": [
                    {
                        "name": "kd",
                        "kind": "soft_label",
                        "field": "logits",
                        "weight": kd_weight,
                        "temperature": temperature,
                    }
                ]
            },
            "optimizer": {"name": "adam", "lr": lr},
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
            "progress": progress,
        },
        "demo_student_config",
    )


@contextmanager
def start_ensemble(
    checkpoints: Sequence[str | Path],
    knowledge_dir: str | Path,
    teacher_model: str = "lyceum.deploy.examples:teacher_cnn",
) -> Iterator[dict[str, dict[str, Any]]]:
    """Serve two teacher checkpoints on loopback, the first over gRPC, the second over
    ZeroMQ (index mode: the servers read the digits themselves); yields the three teacher
    entries (`grpc`, `zmq`, `offline` = `knowledge_dir`) of a student config. The servers
    are always stopped when the block ends."""
    if len(checkpoints) != 2:
        raise ValueError(
            f"start_ensemble: expected 2 teacher checkpoints (one gRPC server, one ZeroMQ "
            f"server), got {len(checkpoints)}"
        )
    digits = "lyceum.deploy.examples:digits"
    with (
        start_teacher(teacher_model, dataset=digits, checkpoint=checkpoints[0]) as over_grpc,
        start_teacher(
            teacher_model, dataset=digits, checkpoint=checkpoints[1], grpc=False, zmq=True
        ) as over_zmq,
    ):
        yield {
            "grpc": {"endpoints": [over_grpc.endpoint("grpc")], "mode": "index"},
            "zmq": {"endpoints": [over_zmq.endpoint("zmq")], "mode": "index"},
            "offline": {"dir": str(knowledge_dir)},
        }


def train_ensemble_student(
    checkpoints: Sequence[str | Path],
    knowledge_dir: str | Path,
    *,
    teacher_model: str = "lyceum.deploy.examples:teacher_cnn",
    **settings: Any,
) -> TrainResult:
    """Train the demo student (`demo_student_config(**settings)`) from an ensemble of three
    teachers: two served by `start_ensemble`, one offline dump."""
    from lyceum.student_client.trainer import train

    with start_ensemble(checkpoints, knowledge_dir, teacher_model) as teachers:
        return train(demo_student_config(teachers, **settings))
