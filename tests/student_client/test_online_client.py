"""`EndpointClient` against a teacher started from Python (`create_server`), on every endpoint
kind: describe, index and query requests, many requests in flight, errors, endpoint parsing."""

from __future__ import annotations

import pytest
import torch

from lyceum.deploy.examples import digits, teacher_cnn
from lyceum.student_client.online import EndpointClient, TeacherError
from lyceum.teacher_server.config import SecurityConfig, ServerConfig
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine
from lyceum.teacher_server.server import create_server

pytestmark = pytest.mark.integration

TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    work = tmp_path_factory.mktemp("online")
    (work / "token").write_text(TOKEN)
    torch.manual_seed(0)
    data = digits("test")
    engine = TeacherEngine(teacher_cnn(), EngineConfig(), data[0][0])
    config = ServerConfig(
        grpc_port=0,
        zmq_port=0,
        grpc_unix=work / "g.sock",
        zmq_ipc=work / "z.ipc",
        max_batch=16,
        security=SecurityConfig(token_file=work / "token"),
    )
    server, ports = create_server(config, [engine], data)
    assert set(ports) == {"grpc", "zmq"} and all(p > 0 for p in ports.values())
    server.start()
    yield server, engine, data
    assert server.stop(grace_s=5)


def _endpoints(server) -> list[str]:  # type: ignore[no-untyped-def]
    eps = server.endpoints
    assert [e.split("://")[0] for e in eps] == ["grpc", "unix", "zmq", "ipc"]
    return eps


def test_every_endpoint_serves_both_modes(teacher):
    server, engine, data = teacher
    ids = [9, 2, 300]
    x = torch.stack([data[i][0] for i in ids])
    want = engine.infer(x)["logits"]
    for endpoint in _endpoints(server):
        with EndpointClient(endpoint, token=TOKEN, timeout_s=20) as client:
            info = client.describe()
            assert info.schema == engine.schema and info.max_request_samples == 16
            assert info.format_version == "1.0" and info.accepts_index
            index = client.request(ids)
            query = client.request(torch.tensor(ids), inputs=x)
        for batch in (index, query):
            assert batch.sample_ids.tolist() == ids
            assert torch.equal(batch.tensors["logits"], want), endpoint


def test_many_requests_in_flight_come_back_tagged(teacher):
    server, engine, data = teacher
    everything = engine.infer(torch.stack([data[i][0] for i in range(64)]))["logits"]
    for endpoint in (server.endpoints[0], server.endpoints[2]):
        with EndpointClient(endpoint, token=TOKEN, timeout_s=20) as client:
            sent = {client.submit([k, k + 32]): [k, k + 32] for k in range(32)}
            got = {}
            while len(got) < len(sent):
                got.update(client.poll(10))
        assert sorted(got) == sorted(sent)
        for rid, batch in got.items():
            assert batch.sample_ids.tolist() == sent[rid]
            assert torch.allclose(batch.tensors["logits"], everything[sent[rid]], atol=1e-5)


def test_errors_carry_codes_and_the_stream_survives(teacher):
    server, _engine, _data = teacher
    for endpoint in (server.endpoints[0], server.endpoints[2]):
        with EndpointClient(endpoint, token=TOKEN, timeout_s=20) as client:
            with pytest.raises(TeacherError) as err:
                client.request(list(range(17)))
            assert err.value.code == 3 and err.value.code_name == "INVALID_ARGUMENT"
            assert "limit of 16" in err.value.message
            with pytest.raises(TeacherError, match="repeats sample ids"):
                client.request([4, 4])
            assert client.request([4]).sample_ids.tolist() == [4]
        with EndpointClient(endpoint, token="wrong", timeout_s=20) as client:
            with pytest.raises(TeacherError) as err:
                client.describe()
            assert err.value.code_name == "UNAUTHENTICATED"


@pytest.mark.parametrize(
    ("endpoint", "phrase"),
    [
        ("localhost:5000", "expected grpc://"),
        ("http://x:1", "unknown scheme 'http'"),
        ("zmq://", "expected"),
    ],
)
def test_bad_endpoints_say_what_is_supported(endpoint, phrase):
    with pytest.raises(ValueError, match=phrase):
        EndpointClient(endpoint)
