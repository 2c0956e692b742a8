"""`OnlineTeacher` with one endpoint against a teacher started from Python (`create_server`),
on every endpoint kind: describe, index and query requests, many requests in flight, requests
larger than the teacher's limit, refusals that end one request only, endpoint parsing."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

from lyceum.deploy.examples import digits, teacher_cnn
from lyceum.proto.codec import KnowledgeBatch
from lyceum.proto.errors import INVALID_ARGUMENT, UNAUTHENTICATED
from lyceum.proto.schema import FORMAT_VERSION
from lyceum.student_client import CredentialOptions, OnlineTeacher, TeacherError, TeacherTimeouts
from lyceum.teacher_server.config import SecurityConfig, ServerConfig
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine
from lyceum.teacher_server.server import TeacherServer, create_server

pytestmark = pytest.mark.integration

TOKEN = "client-test-token"
TIMEOUTS = TeacherTimeouts(timeout_s=20)


def _client(
    endpoint: str, token: str = TOKEN, mode: Literal["query", "index"] = "query"
) -> OnlineTeacher:
    credentials = CredentialOptions(token=token)
    return OnlineTeacher(endpoint, mode=mode, credentials=credentials, timeouts=TIMEOUTS)


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


def _endpoints(server: TeacherServer) -> list[str]:
    eps = server.endpoints
    assert [e.split("://")[0] for e in eps] == ["grpc", "unix", "zmq", "ipc"]
    return eps


def test_every_endpoint_serves_both_modes(teacher):
    server, engine, data = teacher
    ids = [9, 2, 300]
    x = torch.stack([data[i][0] for i in ids])
    want = engine.infer(x)["logits"]
    for endpoint in _endpoints(server):
        with _client(endpoint) as client:
            info = client.describe()
            assert info.schema == engine.schema and info.max_request_samples == 16
            assert info.format_version == FORMAT_VERSION and info.accepts_index
            index = client.request(ids)
            query = client.request(torch.tensor(ids), inputs=x)
        for batch in (index, query):
            assert batch.sample_ids.tolist() == ids
            assert torch.equal(batch.tensors["logits"], want), endpoint


def test_many_requests_in_flight_come_back_tagged(teacher):
    server, engine, data = teacher
    everything = engine.infer(torch.stack([data[i][0] for i in range(64)]))["logits"]
    for endpoint in (server.endpoints[0], server.endpoints[2]):
        with _client(endpoint, mode="index") as client:
            sent = {k: [k, k + 32] for k in range(32)}
            for rid, ids in sent.items():
                client.submit(rid, torch.tensor(ids))
            got: dict[int, KnowledgeBatch] = {}
            while len(got) < len(sent):
                got.update(client.poll(10))
            assert client.outstanding() == {}
        assert sorted(got) == sorted(sent)
        for rid, batch in got.items():
            assert batch.sample_ids.tolist() == sent[rid]
            assert torch.allclose(batch.tensors["logits"], everything[sent[rid]], atol=1e-5)


def test_a_request_over_the_teachers_limit_is_split(teacher):
    server, engine, data = teacher
    ids = list(range(40, 3, -1))  # 37 ids: three requests of at most 16 on the wire
    want = engine.infer(torch.stack([data[i][0] for i in ids]))["logits"]
    for endpoint in (server.endpoints[0], server.endpoints[2]):
        with _client(endpoint) as client:
            got = client.request(ids)
        assert got.sample_ids.tolist() == ids, endpoint
        assert torch.allclose(got.tensors["logits"], want, atol=1e-5)


def test_refusals_carry_codes_and_end_only_their_request(teacher):
    server, _engine, _data = teacher
    for endpoint in (server.endpoints[0], server.endpoints[2]):
        with _client(endpoint, mode="index") as client:
            with pytest.raises(TeacherError) as err:
                client.request([4, 4])
            assert err.value.code == INVALID_ARGUMENT
            assert err.value.code_name == "INVALID_ARGUMENT"
            assert f"teacher at {endpoint} refused: request repeats sample ids" in err.value.message
            # Beside a request that is refused, another is answered, and nothing is left owed.
            client.submit(1, torch.tensor([7, 8]))
            client.submit(2, torch.tensor([3, 5000]))
            got: dict[int, KnowledgeBatch] = {}
            with pytest.raises(TeacherError) as err:
                for _ in range(10):  # a hang guard: each poll waits 10 s at most
                    got.update(client.poll(10))
            assert err.value.code == INVALID_ARGUMENT
            assert "sample ids [5000] are out of range" in err.value.message
            for _ in range(10):
                if 1 in got:
                    break
                got.update(client.poll(10))
            assert sorted(got) == [1] and got[1].sample_ids.tolist() == [7, 8]
            assert client.outstanding() == {}
            assert client.request([4]).sample_ids.tolist() == [4]
        with _client(endpoint, token="wrong") as client:
            with pytest.raises(TeacherError) as err:
                client.describe()
            assert err.value.code == UNAUTHENTICATED and err.value.code_name == "UNAUTHENTICATED"
            assert "invalid bearer token" in err.value.message


@pytest.mark.parametrize(
    ("endpoint", "phrase"),
    [
        ("localhost:5000", "expected grpc://"),
        ("http://x:1", "unknown scheme 'http'"),
        ("zmq://", "expected"),
        # Caught before a transport reads them (ZeroMQ raised from its C core).
        ("zmq://127.0.0.1:abc", "expected host:port with a port in 1..65535"),
        ("grpc://127.0.0.1:0", "expected host:port with a port in 1..65535"),
        ("grpc://:50051", "e.g. grpc://127.0.0.1:50051"),
    ],
)
def test_bad_endpoints_say_what_is_supported(endpoint, phrase):
    with pytest.raises(ValueError, match=phrase):
        OnlineTeacher(endpoint)
