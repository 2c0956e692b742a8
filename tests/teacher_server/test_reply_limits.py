"""Replies never exceed a teacher's message limit: the student cuts a query by the bytes its
replies will take (token-level knowledge: per position), and a reply that would still be too
large (one sequence alone over the limit) is refused at once, naming both sizes, on both
transports, instead of being retried until the timeout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lyceum.proto.errors import INVALID_ARGUMENT
from lyceum.proto.schema import KnowledgeSchema, dense, topk
from lyceum.proto.sizes import message_bytes, message_cost
from lyceum.student_client import OnlineTeacher, TeacherError, TeacherTimeouts
from lyceum.student_client._replica_state import split_request
from lyceum.teacher_server.config import ServerConfig
from lyceum.teacher_server.server import create_server
from tests._support.llm_reference import VOCAB, assert_topk_equal, llm_engine, unpadded_log_probs

pytestmark = pytest.mark.integration

LIMIT = 40_000
# The hang guard: a refusal comes back in milliseconds, a retried one would run into it.
TIMEOUTS = TeacherTimeouts(timeout_s=30)


def _example() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(1, 6), "attention_mask": torch.ones(5, dtype=torch.long)}


@pytest.fixture(scope="module")
def teacher():
    engine = llm_engine(_example())
    config = ServerConfig(grpc_port=0, zmq_port=0, max_message_bytes=LIMIT, max_delay_ms=1)
    server, _ports = create_server(config, [engine])
    server.start()
    yield server
    assert server.stop(grace_s=5)


def _endpoint(server, scheme: str) -> str:
    return next(e for e in server.endpoints if e.startswith(f"{scheme}://"))


def _requests(server, scheme: str) -> float:
    labels = {"transport": scheme, "mode": "query"}
    value = server.metrics.registry.get_sample_value("lyceum_teacher_requests_total", labels)
    return value or 0.0


def _docs(lengths: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_a_query_is_cut_by_reply_bytes_and_every_part_answers(teacher, scheme):
    docs = _docs([400, 60, 380, 420, 10, 400, 390, 420], seed=3)
    inputs = {"input_ids": docs, "attention_mask": [torch.ones_like(d) for d in docs]}
    ids = list(range(200, 208))
    before = _requests(teacher, scheme)
    with OnlineTeacher(_endpoint(teacher, scheme), mode="query", timeouts=TIMEOUTS) as client:
        info = client.describe()
        assert info.max_message_bytes == LIMIT
        # One reply for all eight would be ~3x the limit.
        assert message_bytes(info.schema, [d.numel() for d in docs]) > 2 * LIMIT
        got = client.request(ids, inputs=inputs)
    assert _requests(teacher, scheme) - before >= 3  # cut into at least three parts
    assert got.sample_ids.tolist() == ids
    model = llm_engine(_example()).model
    for row, d in enumerate(docs):
        values, indices = torch.topk(unpadded_log_probs(model, [d]), 8, dim=-1)
        assert_topk_equal(
            got.tensors["logits.values"][row],
            got.tensors["logits.indices"][row],
            (values, indices.to(torch.int32)),
        )


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_a_reply_over_the_limit_is_refused_at_once_naming_the_sizes(teacher, scheme):
    (doc,) = _docs([1200], seed=4)  # ~58 KB of knowledge alone: no cut makes it fit
    inputs = {"input_ids": [doc], "attention_mask": [torch.ones_like(doc)]}
    with OnlineTeacher(_endpoint(teacher, scheme), mode="query", timeouts=TIMEOUTS) as client:
        with pytest.raises(TeacherError) as err:
            client.request([7], inputs=inputs)
        assert err.value.code == INVALID_ARGUMENT
        message = str(err.value)
        assert "refused" in message
        assert f"over this teacher's message limit of {LIMIT} bytes" in message
        size = int(message.split("would be ")[1].split(" bytes")[0])
        assert LIMIT < size <= message_bytes(client.describe().schema, [1200])
        assert "--max-message-bytes" in message
        # The stream is still good: a small request after the refusal is answered.
        (small,) = _docs([9], seed=5)
        ok = client.request([8], inputs={"input_ids": [small], "attention_mask": [small * 0 + 1]})
        assert ok.tensors["logits.indices"][0].shape == (9, 8)


def test_byte_parts_keep_every_reply_under_the_budget() -> None:
    schema = KnowledgeSchema(fields=(topk("t", "float16", (None, 128256), 128, "log_probs"),))
    cost = message_cost(schema)
    assert cost.per_position == 128 * 2 + 272  # fp16 values and 17-bit indices
    limit = 4 << 20
    lengths = np.random.default_rng(0).integers(8, 4096, size=64)
    costs = cost.per_sample + cost.per_position * lengths
    ids = np.arange(64, dtype=np.uint64)
    chunks = split_request(1, ids, 64, None, costs, limit - cost.fixed)
    assert np.concatenate([c.ids for c in chunks]).tolist() == ids.tolist()
    bounds = [message_bytes(schema, lengths[c.ids.astype(np.int64)].tolist()) for c in chunks]
    assert max(bounds) <= limit
    assert len(chunks) <= 2 * -(-message_bytes(schema, lengths.tolist()) // limit)


def test_fixed_shape_knowledge_is_cut_by_count() -> None:
    schema = KnowledgeSchema(fields=(dense("logits", "float32", (1000,)),))
    cost = message_cost(schema)
    assert not cost.sequences and cost.per_sample == 4000 + 8
