"""Configuration of an online teacher server: endpoints, batching, limits, security, lifecycle."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lyceum.proto.codec import Compression

LOOPBACK = "127.0.0.1"


class SecurityConfig(BaseModel):
    """Who may talk to the teacher. Everything off by default: loopback-only is the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_file: Path | None = Field(
        default=None,
        description="File holding a bearer token every request must carry (both transports).",
    )
    tls_cert: Path | None = Field(default=None, description="gRPC server certificate (PEM).")
    tls_key: Path | None = Field(default=None, description="gRPC server private key (PEM).")
    tls_client_ca: Path | None = Field(
        default=None,
        description="CA bundle (PEM) for mutual TLS: gRPC clients must present a cert it signed.",
    )
    zmq_curve_secret_key: Path | None = Field(
        default=None,
        description="The ZeroMQ server's CURVE secret key: a z85 key file or a zmq secret "
        "certificate (zmq.auth.create_certificates).",
    )
    zmq_curve_clients: Path | None = Field(
        default=None,
        description="Allowed CURVE client public keys: a file of z85 keys (one per line) or a "
        "directory of zmq public certificates. Without it any CURVE client is accepted "
        "(encryption only).",
    )

    @model_validator(mode="after")
    def _check(self) -> SecurityConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.zmq_curve_clients is not None and self.zmq_curve_secret_key is None:
            raise ValueError("--zmq-curve-clients needs --zmq-curve-secret-key")
        for name in ("token_file", "tls_cert", "tls_key", "tls_client_ca", "zmq_curve_secret_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name.replace('_', '-')} {str(path)!r}: no such file")
        if self.zmq_curve_clients is not None and not Path(self.zmq_curve_clients).exists():
            raise ValueError(
                f"zmq-curve-clients {str(self.zmq_curve_clients)!r}: no such file or directory"
            )
        return self


class ServerConfig(BaseModel):
    """Endpoints, dynamic batching, limits and lifecycle of one teacher server process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        default=LOOPBACK,
        description="Address TCP endpoints bind; loopback unless a wider host is chosen explicitly.",
    )
    insecure: bool = Field(
        default=False,
        description="Serve TCP endpoints on a non-loopback host without credentials (no token, "
        "TLS or CURVE): refused unless this is set, since anyone who reaches the port runs "
        "the model on what they send and reads its knowledge.",
    )
    grpc_port: int | None = Field(
        default=None, ge=0, le=65535, description="gRPC TCP port; 0 = any free."
    )
    zmq_port: int | None = Field(
        default=None, ge=0, le=65535, description="ZeroMQ TCP port; 0 = any free."
    )
    grpc_unix: Path | None = Field(
        default=None, description="gRPC unix socket path (same-host students)."
    )
    zmq_ipc: Path | None = Field(
        default=None, description="ZeroMQ ipc socket path (same-host students)."
    )
    max_batch: int = Field(default=64, gt=0, description="Most samples in one device batch.")
    max_batch_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Most padded tokens (samples x longest sequence) in one device batch of "
        "sequence inputs; requests that would overflow it wait for a later batch, so "
        "similar lengths gather. None: batches are bounded by samples only.",
    )
    max_delay_ms: float = Field(
        default=2.0, ge=0, description="Longest a request waits for others to fill a device batch."
    )
    max_queue_samples: int | None = Field(
        default=None,
        gt=0,
        description="Samples that may wait for a device; beyond it requests get RESOURCE_EXHAUSTED. "
        "Default 8 x max_batch x devices.",
    )
    max_message_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Largest message accepted or sent; default: sized for a full batch of "
        "inputs or knowledge (at least 64 MiB).",
    )
    compression: Compression = Field(
        default="none",
        description="Arrow IPC body compression of knowledge replies: none, or zstd (less "
        "network for more CPU on both sides; worth it on slow links, not on one host).",
    )
    grpc_max_calls: int = Field(
        default=1024,
        gt=0,
        description="gRPC calls open at once (each student's Distill stream is one); calls "
        "beyond it get RESOURCE_EXHAUSTED. Open calls cost no threads, only memory.",
    )
    max_connection_age_s: float | None = Field(
        default=None,
        gt=0,
        description="Close every gRPC connection after about this long (gRPC's "
        "max_connection_age, jittered by +-10%), so that students of a dns:/// name "
        "resolve it again and find replicas added since. None: connections live on.",
    )
    max_connection_age_grace_s: float = Field(
        default=5.0,
        ge=0,
        description="How long a connection past its age keeps its calls before it is closed "
        "(gRPC's max_connection_age_grace); students re-ask what was cut off.",
    )
    zmq_send_timeout_ms: int = Field(
        default=5000,
        gt=0,
        description="Drop a ZeroMQ reply to a student that stops reading after this.",
    )
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Prometheus metrics HTTP port (on `host`)."
    )
    grace_s: float = Field(
        default=10.0, ge=0, description="SIGTERM drain time for requests in flight."
    )
    exit_after_s: float | None = Field(
        default=None,
        gt=0,
        description="Drain and exit after this many seconds (tests, batch jobs).",
    )
    ready_file: Path | None = Field(
        default=None, description="Write the bound endpoints here as JSON once serving."
    )
    teacher_id: str = Field(default="", description="Free-form identity reported by Describe.")

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if all(e is None for e in (self.grpc_port, self.zmq_port, self.grpc_unix, self.zmq_ipc)):
            raise ValueError(
                "no endpoint to serve on: give --grpc-port and/or --zmq-port (0 picks a free "
                "port), or --grpc-unix / --zmq-ipc"
            )
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ValueError(
                    f"host {self.host!r}: expected an IP address (127.0.0.1, ::1, or 0.0.0.0 to "
                    f"listen on every interface)"
                ) from None
        self._check_exposure()
        if self.security.tls_cert is not None and self.grpc_port is None and self.grpc_unix is None:
            raise ValueError("--tls-cert is for gRPC: also give --grpc-port or --grpc-unix")
        if (
            self.security.zmq_curve_secret_key is not None
            and self.zmq_port is None
            and self.zmq_ipc is None
        ):
            raise ValueError(
                "--zmq-curve-secret-key is for ZeroMQ: also give --zmq-port or --zmq-ipc"
            )
        return self

    @property
    def loopback(self) -> bool:
        """True if TCP endpoints bind a loopback address (reachable from this machine only)."""
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback

    def _check_exposure(self) -> None:
        """Refuse TCP endpoints on a wider host that no credential protects (see `insecure`).

        Per transport: TLS protects only gRPC and CURVE only ZeroMQ; a bearer token protects
        both (though without TLS/CURVE it travels in clear). Unix and ipc sockets are local.
        """
        if self.loopback or self.insecure:
            return
        sec = self.security
        token = sec.token_file is not None
        open_ports = [
            name
            for name, port, protected in (
                ("gRPC", self.grpc_port, token or sec.tls_cert is not None),
                ("ZeroMQ", self.zmq_port, token or sec.zmq_curve_secret_key is not None),
            )
            if port is not None and not protected
        ]
        if open_ports:
            many = len(open_ports) > 1
            raise ValueError(
                f"--host {self.host} is not a loopback address, and nothing protects the "
                f"{' and '.join(open_ports)} port{'s' if many else ''}: anyone who reaches "
                f"{'them' if many else 'it'} could run the model on what they send and read "
                f"its knowledge. "
                f"Give --token-file (a bearer token for both transports; without TLS or CURVE "
                f"it travels in clear), --tls-cert/--tls-key (gRPC over TLS) or "
                f"--zmq-curve-secret-key (ZeroMQ over CURVE); or pass --insecure to serve "
                f"without credentials on a network you trust"
            )

    def queue_samples(self, devices: int) -> int:
        return self.max_queue_samples or 8 * self.max_batch * devices
