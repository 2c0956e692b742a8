"""Transports of the online teacher: the shared contract and request path (`base`), gRPC and
ZeroMQ. Internal: the public API is `lyceum.teacher_server.create_server` / `serve`."""
