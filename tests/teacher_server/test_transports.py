"""The transports behind one contract: built from the server's table for what the config
enables, and drained through `Transport.begin_drain` (gRPC's health service turns
NOT_SERVING while requests in flight still finish)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from lyceum.student_client import OnlineTeacher
from lyceum.teacher_server.config import ServerConfig
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine
from lyceum.teacher_server.server import TRANSPORTS, TeacherServer, create_server

pytestmark = pytest.mark.integration


class Gate(nn.Module):
    """A linear teacher whose forward waits for `gate` once it is closed: a request in
    flight for as long as the test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        if not self.gate.wait(60):  # a hang guard
            raise TimeoutError("the test never opened the gate")
        return self.linear(x)


def _engine(model: nn.Module | None = None) -> TeacherEngine:
    return TeacherEngine(model or nn.Linear(4, 3), EngineConfig(), torch.zeros(4))


@pytest.fixture
def servers() -> Iterator[list[TeacherServer]]:
    """Servers a test created (started by it); stopped afterwards."""
    made: list[TeacherServer] = []
    yield made
    for server in made:
        server.stop(grace_s=1)


@pytest.mark.parametrize(
    ("enabled", "names"),
    [
        ({"grpc_port": 0}, ["grpc"]),
        ({"zmq_port": 0}, ["zmq"]),
        ({"grpc_unix": "g.sock", "zmq_ipc": "z.ipc"}, ["grpc", "zmq"]),
        ({"grpc_port": 0, "zmq_port": 0}, ["grpc", "zmq"]),
    ],
)
def test_the_config_enables_transports_from_the_table(
    tmp_path: Path, servers: list[TeacherServer], enabled: dict[str, object], names: list[str]
) -> None:
    assert list(TRANSPORTS) == ["grpc", "zmq"]
    options = {k: tmp_path / v if isinstance(v, str) else v for k, v in enabled.items()}
    server, _ports = create_server(ServerConfig(**options), [_engine()])  # type: ignore[arg-type]
    servers.append(server)
    server.start()
    assert [t.name for t in server.transports] == names
    for endpoint in server.endpoints:  # every transport serves the student's client
        with OnlineTeacher(endpoint) as teacher:
            got = teacher.request([4, 1], inputs=torch.ones(2, 4))
        assert got.sample_ids.tolist() == [4, 1] and got.tensors["logits"].shape == (2, 3)


def _health(endpoint: str) -> int:
    with grpc.insecure_channel(endpoint.removeprefix("grpc://")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="lyceum.v1.Teacher")
        return int(stub.Check(request, timeout=10).status)


def test_draining_turns_health_not_serving_while_requests_in_flight_finish(
    servers: list[TeacherServer],
) -> None:
    model = Gate()
    server, _ports = create_server(ServerConfig(grpc_port=0, zmq_port=0), [_engine(model)])
    servers.append(server)
    server.start()
    grpc_endpoint, zmq_endpoint = server.endpoints
    assert _health(grpc_endpoint) == health_pb2.HealthCheckResponse.SERVING
    with OnlineTeacher(zmq_endpoint) as student:
        student.describe()
        model.gate.clear()
        model.entered.clear()
        student.submit(1, torch.tensor([7]), torch.ones(1, 4))
        assert model.entered.wait(30), "the request never reached the engine"
        stopping = threading.Thread(target=server.stop, kwargs={"grace_s": 30})
        stopping.start()
        try:
            # begin_drain came before the drain's wait: health says so while the batch runs.
            while _health(grpc_endpoint) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert stopping.is_alive(), "the server stopped without announcing its drain"
        finally:
            model.gate.set()
        done = dict(student.poll(30))
        stopping.join(60)
    assert not stopping.is_alive()
    assert done[1].sample_ids.tolist() == [7]  # the request in flight was answered
