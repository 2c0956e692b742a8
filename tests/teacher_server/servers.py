"""Helpers for teacher-server integration tests: server processes, raw clients, certificates.

Server processes are started as `python -m lyceum.deploy.cli teacher serve ...` (the real CLI)
with this directory on PYTHONPATH, so test-only models (`servers:slow_cnn`) resolve as specs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import torch
import zmq

from lyceum.deploy.examples import TeacherCNN, digits
from lyceum.proto.specs import load_model
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODEL = "lyceum.deploy.examples:teacher_cnn"
DATASET = "lyceum.deploy.examples:digits"


class SlowCNN(TeacherCNN):
    """The demo teacher, sleeping `delay_s` per forward: makes queueing and draining observable."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return super().forward(x)


def slow_cnn(delay_s: float = 0.1) -> SlowCNN:
    return SlowCNN(delay_s)


class ServerProcess:
    """`lyceum teacher serve` in a subprocess; knows its endpoints once it is ready."""

    def __init__(self, args: list[str], workdir: Path, exit_after_s: float = 150.0) -> None:
        self.ready_file = workdir / f"ready-{time.monotonic_ns()}.json"
        self.log_path = workdir / f"server-{time.monotonic_ns()}.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        cmd = [
            sys.executable, "-m", "lyceum.deploy.cli", "teacher", "serve",
            "--threads", "1", "--ready-file", str(self.ready_file),
            # A safety net: the server stops by itself even if a test dies before its finalizer.
            "--exit-after-s", str(exit_after_s),
            *args,
        ]  # fmt: skip
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.info = self._wait_ready(timeout_s=90)

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                return json.loads(self.ready_file.read_text())
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"teacher server exited with {self.proc.returncode}:\n{self.log()}"
                )
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"teacher server not ready after {timeout_s}s:\n{self.log()}")

    def endpoint(self, scheme: str) -> str:
        return next(e for e in self.info["endpoints"] if e.startswith(f"{scheme}://"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def metrics(self) -> dict[str, float]:
        """Prometheus samples (`name{labels}` -> value) from the server's metrics endpoint."""
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.info['metrics']}/metrics", timeout=5
        ) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class RawGrpc:
    """A Distill stream of raw bytes: sends any message, good or garbage."""

    def __init__(self, endpoint: str) -> None:
        target = endpoint.split("://", 1)[1] if endpoint.startswith("grpc://") else endpoint
        self.channel = grpc.insecure_channel(target)
        self.distill = self.channel.stream_stream("/lyceum.v1.Teacher/Distill")

    def exchange(self, messages: list[bytes], timeout_s: float = 60) -> list[bytes]:
        """Send every message on one stream, half-close, return every reply."""
        return list(self.distill(iter(messages), timeout=timeout_s))

    def close(self) -> None:
        self.channel.close()


class RawZmq:
    """A DEALER sending any frames."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint.replace("zmq://", "tcp://"))

    def exchange(self, messages: list[list[bytes]], timeout_s: float = 60) -> list[list[bytes]]:
        """Send each multipart message, then collect one reply per message."""
        for frames in messages:
            self.sock.send_multipart(frames)
        replies = []
        deadline = time.monotonic() + timeout_s
        while len(replies) < len(messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(int(remaining * 1000)):
                raise TimeoutError(f"{len(replies)} of {len(messages)} replies arrived")
            replies.append(self.sock.recv_multipart())
        return replies

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def make_certs(root: Path) -> dict[str, Path]:
    """A CA, a server cert for 127.0.0.1/localhost and a client cert, made with the openssl CLI."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=lyceum-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (root / f"{name}.ext").write_text(ext)
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip
    return {n: root / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def save_checkpoint(path: Path, seed: int = 0) -> Path:
    """Seeded teacher_cnn weights as safetensors, so a server and an in-process engine agree."""
    from safetensors.torch import save_file

    from lyceum.deploy.examples import teacher_cnn

    torch.manual_seed(seed)
    save_file(teacher_cnn().state_dict(), str(path))
    return path


def reference_engine(checkpoint: Path) -> TeacherEngine:
    """The same teacher run in-process: what every server reply must equal."""
    return TeacherEngine(load_model(MODEL, checkpoint), EngineConfig(), digits()[0][0])
