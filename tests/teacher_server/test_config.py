"""Server configuration: a non-loopback host needs credentials for every TCP port, or
--insecure; loopback and local sockets need none."""

from __future__ import annotations

from pathlib import Path

import pytest

from lyceum.teacher_server.config import SecurityConfig, ServerConfig


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("token", "cert.pem", "key.pem", "curve.key"):
        out[name] = tmp_path / name
        out[name].write_text("x")
        out[name].chmod(0o600)
    return out


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_need_no_credentials(host: str) -> None:
    assert ServerConfig(host=host, grpc_port=0, zmq_port=0).loopback


def test_a_wider_host_without_credentials_is_refused_naming_the_options() -> None:
    with pytest.raises(ValueError) as err:
        ServerConfig(host="0.0.0.0", grpc_port=0, zmq_port=0)
    message = str(err.value)
    assert "--host 0.0.0.0 is not a loopback address" in message
    assert "nothing protects the gRPC and ZeroMQ ports" in message
    for option in ("--token-file", "--tls-cert/--tls-key", "--zmq-curve-secret-key", "--insecure"):
        assert option in message
    assert "travels in clear" in message


def test_each_tcp_transport_needs_its_own_protection(files: dict[str, Path]) -> None:
    tls = SecurityConfig(tls_cert=files["cert.pem"], tls_key=files["key.pem"])
    with pytest.raises(ValueError, match="nothing protects the ZeroMQ port: anyone"):
        ServerConfig(host="10.1.2.3", grpc_port=0, zmq_port=0, security=tls)
    curve = SecurityConfig(zmq_curve_secret_key=files["curve.key"])
    with pytest.raises(ValueError, match="nothing protects the gRPC port: anyone"):
        ServerConfig(host="10.1.2.3", grpc_port=0, zmq_port=0, security=curve)
    ServerConfig(host="10.1.2.3", grpc_port=0, security=tls)
    ServerConfig(host="10.1.2.3", zmq_port=0, security=curve)
    # A token protects both (in clear without TLS/CURVE, as --token-file's help says).
    ServerConfig(
        host="0.0.0.0", grpc_port=0, zmq_port=0, security=SecurityConfig(token_file=files["token"])
    )


def test_insecure_and_local_sockets_are_accepted(tmp_path: Path) -> None:
    assert not ServerConfig(host="0.0.0.0", grpc_port=0, zmq_port=0, insecure=True).loopback
    # Unix and ipc sockets are reachable from this machine only, whatever --host says.
    ServerConfig(host="0.0.0.0", grpc_unix=tmp_path / "g.sock", zmq_ipc=tmp_path / "z.ipc")
