"""Endpoint URLs: which transport each scheme means, and a connection for one endpoint.

grpc://host:port     gRPC over TCP            grpcs://host:port   the same with TLS
unix:///path         gRPC over a unix socket  dns:///name:port    gRPC, every address
                                                                  behind the name
zmq://host:port      ZeroMQ over TCP          ipc:///path         ZeroMQ over a unix socket
"""

from __future__ import annotations

from lyceum.student_client._connections import Connection, Credentials
from lyceum.student_client._grpc_connection import GrpcConnection
from lyceum.student_client._zmq_connection import ZmqConnection

__all__ = ["GRPC_SCHEMES", "SCHEMES", "ZMQ_SCHEMES", "connect"]

ZMQ_SCHEMES = ("zmq://", "ipc://")
GRPC_SCHEMES = ("grpc://", "grpcs://", "unix://", "dns:///")
SCHEMES = (
    "grpc://host:port, grpcs://host:port, unix:///path, dns:///name:port, zmq://host:port or "
    "ipc:///path"
)
_DNS_MIN_RESOLVE_MS = 1000


def _check_port(endpoint: str, address: str) -> None:
    """Refuse a `host:port` whose port is not a number in 1..65535, before a transport reads
    it (gRPC reported a resolver error, ZeroMQ raised from its C core)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"endpoint {endpoint!r}: expected host:port with a port in 1..65535 after the "
            f"scheme, e.g. {endpoint.partition('://')[0]}://127.0.0.1:50051"
        )


def connect(endpoint: str, credentials: Credentials, tls: bool = False) -> Connection:
    """A transport connection for an endpoint URL; errors list the supported schemes.

    `dns:///name:port` resolves every address behind the name and sends each request to the
    next of them (a `Distill` call per request under gRPC's `round_robin` policy; a
    Kubernetes headless Service of replicas); `tls` makes its channel TLS (other gRPC
    endpoints say so by their scheme, `grpcs://`).
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise ValueError(f"endpoint {endpoint!r}: expected {SCHEMES}")
    if scheme in ("grpc", "grpcs", "zmq", "dns"):
        _check_port(endpoint, rest.lstrip("/"))
    if scheme in ("grpc", "grpcs"):
        return GrpcConnection(rest, credentials, tls=scheme == "grpcs")
    if scheme == "dns":
        return GrpcConnection(
            endpoint,
            credentials,
            tls=tls,
            extra_options=[
                ("grpc.lb_policy_name", "round_robin"),
                # gRPC re-resolves when a server closes a connection at its max age, but by
                # default at most every 30 s; a replica added behind the name should take
                # calls within the servers' max connection age.
                ("grpc.dns_min_time_between_resolutions_ms", _DNS_MIN_RESOLVE_MS),
            ],
            per_call=True,
        )
    if scheme == "unix":
        return GrpcConnection(endpoint, credentials, tls=False)
    if scheme == "zmq":
        return ZmqConnection(f"tcp://{rest}", credentials)
    if scheme == "ipc":
        return ZmqConnection(endpoint, credentials)
    raise ValueError(f"endpoint {endpoint!r}: unknown scheme {scheme!r}; expected {SCHEMES}")
