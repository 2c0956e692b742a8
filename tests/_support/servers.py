"""Teacher-server processes for integration tests, and raw clients that send any bytes.

`ServerProcess` is `lyceum.deploy.launcher.start_teacher` (the real CLI in a subprocess)
held open across a test or a module, with what tests observe of a server beyond its
endpoints: Prometheus metrics, resident memory, its exit code after SIGTERM.
"""

from __future__ import annotations

import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import zmq

from lyceum.deploy.launcher import TeacherProcess, start_teacher

from .teachers import ENV

__all__ = ["RawGrpc", "RawZmq", "ServerProcess", "make_certs"]


class ServerProcess:
    """`lyceum teacher serve ARGS` in a subprocess, ready (its ports bound) once constructed.

    `args` are the CLI's own flags and must name `--model`; the transports are those whose
    port flag (`--grpc-port`, `--zmq-port`) appears. The log and ready files go to `workdir`.
    `exit_after_s` is a safety net: the server stops by itself even if the test dies first.
    """

    def __init__(self, args: list[str], workdir: Path, exit_after_s: float = 150.0) -> None:
        if "--model" not in args:
            raise ValueError(f"ServerProcess: args {args} name no --model")
        self._stack = ExitStack()
        self.teacher: TeacherProcess = self._stack.enter_context(
            start_teacher(
                args[args.index("--model") + 1],
                grpc="--grpc-port" in args,
                zmq="--zmq-port" in args,
                extra_args=args,  # later flags win: the test's own --grpc-port, --max-batch, ...
                exit_after_s=exit_after_s,
                ready_timeout_s=90,
                workdir=workdir,
                env=ENV,
            )
        )

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.teacher.proc

    @property
    def info(self) -> dict[str, Any]:
        return self.teacher.info

    @property
    def pid(self) -> int:
        return self.teacher.pid

    def endpoint(self, scheme: str) -> str:
        return self.teacher.endpoint(scheme)

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
        return self.teacher.log()

    def terminate(self) -> int:
        """SIGTERM (a graceful drain), then the exit code; SIGKILL after 30 s."""
        self.teacher.kill(signal.SIGTERM)
        self._stack.close()
        code = self.proc.returncode
        assert code is not None
        return code

    def kill(self) -> None:
        self._stack.close()


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
        replies: list[list[bytes]] = []
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
