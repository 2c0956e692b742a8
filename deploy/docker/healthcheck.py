#!/usr/bin/env python3
"""The teacher image's HEALTHCHECK: asks gRPC's standard health service of the local server.

Exit 0 when the server answers SERVING, 1 otherwise (not up yet, draining after SIGTERM, no
answer within the timeout), as Docker expects. Kubernetes needs no script: its `grpc` probes
ask the same service. The health service needs no bearer token, so a server started with
`--token-file` is probed as it is.

Environment: LYCEUM_HEALTH_PORT (default 50051), LYCEUM_HEALTH_HOST (default 127.0.0.1),
LYCEUM_HEALTH_SERVICE (default "": the whole server), LYCEUM_HEALTH_TIMEOUT_S (default 3);
for a server that serves TLS, LYCEUM_HEALTH_TLS_CA (the CA that signed its certificate) and
LYCEUM_HEALTH_TLS_SERVER_NAME (the name in the certificate, if not the host).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(target: str) -> grpc.Channel:
    ca = os.environ.get("LYCEUM_HEALTH_TLS_CA")
    if not ca:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
    name = os.environ.get("LYCEUM_HEALTH_TLS_SERVER_NAME")
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, credentials, options=options)


def main() -> int:
    host = os.environ.get("LYCEUM_HEALTH_HOST", "127.0.0.1")
    target = f"{host}:{os.environ.get('LYCEUM_HEALTH_PORT', '50051')}"
    service = os.environ.get("LYCEUM_HEALTH_SERVICE", "")
    timeout_s = float(os.environ.get("LYCEUM_HEALTH_TIMEOUT_S", "3"))
    with _channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            print(f"lyceum-healthcheck: {target}: {exc.code().name}: {exc.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"lyceum-healthcheck: {target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
