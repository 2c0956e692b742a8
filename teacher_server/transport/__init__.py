"""Transports of the online teacher: the shared contract and request path (`base`), gRPC and
ZeroMQ. Internal: the public API is `lyceum.teacher_server.create_server` / `serve`; the
modules are listed for the server and its tests."""

__all__ = [
    "base",
    "grpc",
    "zmq",
]
