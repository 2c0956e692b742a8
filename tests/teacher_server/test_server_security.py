"""Credentials on both transports: bearer token, mutual TLS (gRPC), CURVE allow-list (ZeroMQ).

Every refused student must get UNAUTHENTICATED (or fail its handshake) and the server must
not have decoded or run anything it sent: the request counter only counts accepted requests.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import zmq

from lyceum.proto.errors import UNAUTHENTICATED, UNAVAILABLE
from lyceum.student_client import CredentialOptions, OnlineTeacher, TeacherError, TeacherTimeouts
from tests._support.servers import ServerProcess, make_certs
from tests._support.teachers import DIGITS, MODEL

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    work = tmp_path_factory.mktemp("secure")
    certs = make_certs(work)
    (work / "token").write_text(TOKEN + "\n")
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    (work / "server.key_z85").write_bytes(server_secret)
    (work / "clients.txt").write_bytes(b"# the one student allowed in\n" + client_public + b"\n")
    proc = ServerProcess(
        [
            "--model", MODEL, "--dataset", DIGITS, "--grpc-port", "0", "--zmq-port", "0",
            "--metrics-port", "0", "--token-file", str(work / "token"),
            "--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
            "--tls-client-ca", str(certs["ca.pem"]),
            "--zmq-curve-secret-key", str(work / "server.key_z85"),
            "--zmq-curve-clients", str(work / "clients.txt"),
        ],
        work,
    )  # fmt: skip
    yield {
        "proc": proc,
        "certs": certs,
        "curve": {"curve_server_key": server_public, "curve_public_key": client_public,
                  "curve_secret_key": client_secret},
    }  # fmt: skip
    assert proc.terminate() == 0, proc.log()


def _teacher(endpoint: str, timeout_s: float = 30, **options: Any) -> OnlineTeacher:
    """The student's client, in query mode (index requests are `request` without inputs)."""
    timeouts = TeacherTimeouts(timeout_s=timeout_s, connect_timeout_s=min(timeout_s, 5))
    return OnlineTeacher(endpoint, credentials=CredentialOptions(**options), timeouts=timeouts)


def _refused(
    endpoint: str,
    expected_code: int | tuple[int, ...],
    query: bool = False,
    timeout_s: float = 5,
    **options: Any,
) -> str:
    """Make one request that must fail with `expected_code` (or one of them); returns the
    error message."""
    inputs = torch.rand(2, 1, 8, 8) if query else None
    with _teacher(endpoint, timeout_s, **options) as teacher, pytest.raises(TeacherError) as err:
        teacher.request([1, 2], inputs=inputs)
    expected = expected_code if isinstance(expected_code, tuple) else (expected_code,)
    assert err.value.code in expected, f"{err.value}"
    return err.value.message


def test_grpc_requires_token_and_client_certificate(secure):
    proc, certs = secure["proc"], secure["certs"]
    endpoint = proc.endpoint("grpcs")
    mtls = {
        "tls_ca": certs["ca.pem"],
        "tls_cert": certs["client.pem"],
        "tls_key": certs["client.key"],
    }
    before = proc.metrics()
    assert "token" in _refused(endpoint, UNAUTHENTICATED, **mtls)
    assert "invalid bearer token" in _refused(endpoint, UNAUTHENTICATED, token="wrong", **mtls)
    # Right token but no client certificate: the TLS handshake itself fails.
    _refused(endpoint, UNAVAILABLE, token=TOKEN, tls_ca=certs["ca.pem"])
    # Plaintext to a TLS port: no connection.
    _refused(endpoint.replace("grpcs://", "grpc://"), UNAVAILABLE, token=TOKEN)
    after = proc.metrics()
    assert _requests(after) == _requests(before)  # nothing refused was decoded or run
    assert after['lyceum_teacher_errors_total{code="UNAUTHENTICATED",transport="grpc"}'] >= 2
    with _teacher(endpoint, token=TOKEN, **mtls) as teacher:
        assert teacher.describe().accepts_index
        assert teacher.request([1, 2]).sample_ids.tolist() == [1, 2]
    assert _requests(proc.metrics()) == _requests(before) + 1


def test_zmq_requires_token_and_allowed_curve_key(secure):
    proc, curve = secure["proc"], secure["curve"]
    endpoint = proc.endpoint("zmq")
    before = proc.metrics()
    assert "token" in _refused(endpoint, UNAUTHENTICATED, query=True, **curve)
    assert "invalid bearer token" in _refused(
        endpoint, UNAUTHENTICATED, token="nope", query=True, **curve
    )
    stranger_public, stranger_secret = zmq.curve_keypair()
    message = _refused(
        endpoint, UNAUTHENTICATED, token=TOKEN, curve_server_key=curve["curve_server_key"],
        curve_public_key=stranger_public, curve_secret_key=stranger_secret,
    )  # fmt: skip
    assert "CURVE" in message
    # No CURVE at all: the handshake fails on the mechanism, which the client reports. libzmq
    # tells some connections only "handshake failed, no detail" (the teacher hung up first):
    # then it is a retryable UNAVAILABLE that names the same fix.
    message = _refused(endpoint, (UNAUTHENTICATED, UNAVAILABLE), token=TOKEN, timeout_s=30)
    assert "requires CURVE" in message and "curve_server_key" in message
    after = proc.metrics()
    assert _requests(after) == _requests(before)
    assert after['lyceum_teacher_errors_total{code="UNAUTHENTICATED",transport="zmq"}'] >= 2
    with _teacher(endpoint, token=TOKEN, **curve) as teacher:
        x = torch.rand(3, 1, 8, 8)
        assert teacher.request([4, 5, 6], inputs=x).tensors["logits"].shape == (3, 10)
    assert _requests(proc.metrics()) == _requests(before) + 1


def _requests(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("lyceum_teacher_requests_total"))


def test_dns_name_with_tls_reaches_the_teacher_and_checks_its_certificate(secure):
    """`dns:///localhost:PORT` (gRPC resolves the name, round_robin) with TLS: the channel
    verifies the server certificate (issued for localhost) and presents the client's."""
    from lyceum.student_client import TeacherUnavailableError

    proc, certs = secure["proc"], secure["certs"]
    port = proc.endpoint("grpcs").rsplit(":", 1)[1]
    mtls = {"tls_cert": certs["client.pem"], "tls_key": certs["client.key"], "token": TOKEN}
    trusted = CredentialOptions(tls=True, tls_ca=certs["ca.pem"], **mtls)
    with OnlineTeacher(f"dns:///localhost:{port}", mode="index", credentials=trusted) as teacher:
        assert teacher.request([3, 1]).sample_ids.tolist() == [3, 1]
    # Without the CA the teacher's certificate cannot be verified: no connection.
    with (
        OnlineTeacher(
            f"dns:///localhost:{port}",
            mode="index",
            credentials=CredentialOptions(tls=True, **mtls),
            timeouts=TeacherTimeouts(timeout_s=3, connect_timeout_s=1),
        ) as untrusted,
        pytest.raises(TeacherUnavailableError),
    ):
        untrusted.request([3])
