"""`lyceum student train` as a subprocess, for the tests that stop, kill and resume it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests._support.teachers import ENV
from tests._support.waiting import wait_until

__all__ = ["TRAINER_HANG_GUARD_S", "TrainerProcess", "run_trainer", "torchrun", "write_config"]

TRAINER_HANG_GUARD_S = 180.0
"""Far past a two-epoch run on a loaded two-core machine; only a hung trainer reaches it."""


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    """`raw` as the YAML file `path`; returns `path`."""
    path.write_text(yaml.safe_dump(raw))
    return path


class TrainerProcess:
    """`lyceum student train CONFIG [flags]` in a subprocess, stdout and stderr to files
    beside the config (`NAME.out`, `NAME.err`); as a context manager, killed and waited on
    if it is still running at the end."""

    def __init__(self, config: Path, *flags: str, name: str) -> None:
        self.out_path = config.parent / f"{name}.out"
        self.err_path = config.parent / f"{name}.err"
        env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "lyceum.deploy.cli", "student", "train", str(config)]
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen([*cmd, *flags], stdout=out, stderr=err, env=env)

    def wait_for(self, path: Path) -> None:
        """Until `path` exists (the trainer reached a point), failing if the trainer ends."""

        def exited() -> str | None:
            if self.proc.poll() is None:
                return None
            return f"the trainer exited with {self.proc.returncode}:\n{self.stderr()[-4000:]}"

        wait_until(path.exists, f"{path} to appear", gave_up=exited)

    def wait(self) -> int:
        return self.proc.wait(TRAINER_HANG_GUARD_S)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def __enter__(self) -> TrainerProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def run_trainer(config: Path, *flags: str, name: str) -> TrainerProcess:
    """A run to its end; it must exit 0 (else its stderr's tail is the failure)."""
    with TrainerProcess(config, *flags, name=name) as run:
        assert run.wait() == 0, run.stderr()[-4000:]
    return run


def torchrun(script: Path, *args: str, ranks: int = 2) -> tuple[int, str]:
    """`script args` on `ranks` ranks under torchrun (one thread each): its exit status and
    its output, stdout and stderr together. A run past `TRAINER_HANG_GUARD_S` is killed with
    its ranks."""
    # torchrun as a module of this interpreter: a console script's shebang may name another.
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(ranks), str(script), *args,
    ]  # fmt: skip
    # A new session: on a timeout the whole group (torchrun and its ranks) is killed.
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TRAINER_HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output
