"""Credentials of the online server: bearer token, TLS / mutual TLS for gRPC, CURVE for ZeroMQ.

Why each exists: a teacher port runs the model on whatever arrives, so by default it binds
loopback only; once it listens wider, TLS (gRPC) or CURVE (ZeroMQ) keep knowledge and inputs
private and authenticate the server, mutual TLS or a CURVE allow-list authenticate students,
and a bearer token is the simple shared secret that works on both transports.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from lyceum.proto.curve_keys import Z85_KEY_LEN, read_curve_key
from lyceum.proto.secret_files import read_token_file, warn_if_exposed
from lyceum.teacher_server.config import SecurityConfig
from lyceum.teacher_server.metrics import EventLimiter

_ZAP_DOMAIN = "lyceum"


def read_token(path: Path) -> bytes:
    """The bearer token of `--token-file` (checks in `lyceum.proto.secret_files`)."""
    return read_token_file(path, "--token-file")


def grpc_server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials, or None for plaintext; with a client CA, clients must present a cert."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    root = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca is not None else None
    key = Path(config.tls_key).read_bytes()
    warn_if_exposed(config.tls_key, "--tls-key")
    return grpc.ssl_server_credentials(
        [(key, Path(config.tls_cert).read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


def read_allowed_keys(path: Path) -> frozenset[bytes]:
    """Allowed client public keys: a directory of zmq certificates or a file of z85 keys."""
    path = Path(path)
    if path.is_dir():
        keys = frozenset(zmq.auth.load_certificates(str(path)).keys())
    else:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        keys = frozenset(ln.encode() for ln in lines if ln and not ln.startswith("#"))
        bad = [k for k in keys if len(k) != Z85_KEY_LEN]
        if bad:
            raise ValueError(
                f"CURVE client key file {str(path)!r}: {len(bad)} lines are not 40-character z85 "
                f"public keys (one key per line, '#' comments allowed)"
            )
    if not keys:
        raise ValueError(
            f"CURVE client keys {str(path)!r}: no keys found, so no student could connect"
        )
    return keys


class _AllowList:
    """ZAP credentials provider: accepts exactly the listed client public keys."""

    def __init__(self, keys: frozenset[bytes], events: EventLimiter) -> None:
        self.keys = keys
        self.events = events

    def callback(self, domain: str, key: bytes) -> bool:
        # pyzmq's authenticator passes the client's key z85-encoded.
        allowed = key in self.keys
        if not allowed:
            self.events.log(
                "auth_refused",
                key.decode(errors="replace"),
                transport="zmq",
                reason="CURVE client key not allowed",
                client_key=key.decode(errors="replace"),
            )
        return allowed


class CurveServerKeys:
    """The server's CURVE secret key and who may connect (any client, or an allow-list)."""

    def __init__(self, secret_key: bytes, allowed: frozenset[bytes] | None) -> None:
        self.secret_key = secret_key
        self.public_key = zmq.curve_public(secret_key)
        self.allowed = allowed

    @classmethod
    def from_config(cls, config: SecurityConfig) -> CurveServerKeys | None:
        if config.zmq_curve_secret_key is None:
            return None
        secret = read_curve_key(config.zmq_curve_secret_key, "--zmq-curve-secret-key", secret=True)
        warn_if_exposed(config.zmq_curve_secret_key, "--zmq-curve-secret-key")
        allowed = read_allowed_keys(config.zmq_curve_clients) if config.zmq_curve_clients else None
        return cls(secret, allowed)

    def start_authenticator(
        self,
        ctx: zmq.Context,  # type: ignore[type-arg]
        events: EventLimiter,
    ) -> ThreadAuthenticator:
        """ZAP handler on `ctx`: checks each client's public key during the handshake;
        refusals are logged through `events`."""
        auth = ThreadAuthenticator(ctx)
        auth.start()
        if self.allowed is None:
            auth.configure_curve(domain=_ZAP_DOMAIN, location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            auth.configure_curve_callback(
                domain=_ZAP_DOMAIN, credentials_provider=_AllowList(self.allowed, events)
            )
        return auth

    def apply(self, sock: zmq.Socket) -> None:  # type: ignore[type-arg]
        sock.curve_server = True
        sock.curve_secretkey = self.secret_key
        sock.zap_domain = _ZAP_DOMAIN.encode()
