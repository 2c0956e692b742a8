"""Coded top-k knowledge on the wire: a Llama teacher serving 8-bit values and Elias-Fano
indices (and zstd replies) answers both transports with each position's top-k ids, sorted,
and values within the 8-bit bound of an unpadded forward's; Describe's schema says how."""

from __future__ import annotations

import pytest
import torch

from lyceum.deploy.examples import TokenDocuments
from lyceum.proto._topk_values import error_bound
from lyceum.proto.items import item_inputs
from lyceum.student_client import OnlineTeacher, TeacherTimeouts
from lyceum.teacher_server.config import ServerConfig
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine
from lyceum.teacher_server.server import create_server
from tests._support.llm_reference import VOCAB, engine_config, llama, reference_topk

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def documents() -> TokenDocuments:
    return TokenDocuments(n=8, vocab=VOCAB, padding="left", seed=6)


@pytest.fixture(scope="module")
def teacher(documents):
    coded = {"topk_values": "uint8", "topk_indices": "elias_fano"}
    config = EngineConfig.model_validate({**engine_config().model_dump(), **coded})
    engine = TeacherEngine(llama(), config, item_inputs(documents[0]))
    server_config = ServerConfig(grpc_port=0, zmq_port=0, max_delay_ms=1, compression="zstd")
    server, _ports = create_server(server_config, [engine], documents)
    server.start()
    yield server
    assert server.stop(grace_s=5)


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_coded_replies_on_both_transports(teacher, documents, scheme: str) -> None:
    endpoint = next(e for e in teacher.endpoints if e.startswith(f"{scheme}://"))
    ids = [5, 0, 7]
    timeouts = TeacherTimeouts(timeout_s=60)
    with OnlineTeacher(endpoint, mode="index", timeouts=timeouts) as client:
        field = client.describe().schema.field("logits")
        got = client.request(ids)
    assert field.value_bits == 8 and field.index_code == "elias_fano"
    model = llama()
    for row, i in enumerate(ids):
        want_v, want_i = reference_topk(model, documents, i)
        values, indices = got.tensors["logits.values"][row], got.tensors["logits.indices"][row]
        ordered, order = torch.sort(want_i, dim=-1)
        assert values.dtype == torch.float32 and torch.equal(indices, ordered)
        exact = want_v.gather(-1, order)
        bound = torch.from_numpy(error_bound(exact.numpy()))[:, None]
        assert torch.all((values - exact).abs() <= bound + 1e-5)


def test_codes_need_top_k() -> None:
    with pytest.raises(ValueError, match="apply to top-k fields only: add --topk K"):
        EngineConfig(topk_values="uint8")
    with pytest.raises(ValueError, match="--topk-indices elias_fano apply to top-k fields only"):
        EngineConfig(topk_indices="elias_fano")
