"""A Hugging Face Llama teacher served on gRPC and ZeroMQ: dict inputs in query mode (a
left-padded `[B, T]` batch with its attention mask, as `generate` leaves one), index mode
over a packed dataset, and scored tokens; every reply equals unpadded per-document forwards,
and Describe carries the vocabulary."""

from __future__ import annotations

import pytest
import torch

from lyceum.deploy.examples import TokenDocuments
from lyceum.proto.items import item_inputs
from lyceum.proto.vocab import Vocabulary
from lyceum.student_client import OnlineTeacher, TeacherTimeouts
from lyceum.teacher_server.config import ServerConfig
from lyceum.teacher_server.server import create_server
from tests._support.llm_reference import (
    VOCAB,
    assert_topk_equal,
    llama,
    llm_engine,
    reference_topk,
    unpadded_log_probs,
)

pytestmark = pytest.mark.integration

TIMEOUTS = TeacherTimeouts(timeout_s=60)


@pytest.fixture(scope="module")
def packed():
    return TokenDocuments(n=12, vocab=VOCAB, padding="packed", seed=1)


@pytest.fixture(scope="module")
def teacher(packed):
    """Index mode over a packed dataset, query mode on anything with the same inputs."""
    engine = llm_engine(item_inputs(packed[0]))
    config = ServerConfig(grpc_port=0, zmq_port=0, max_batch=8, max_delay_ms=1)
    server, _ports = create_server(config, [engine], packed)
    server.start()
    yield server
    assert server.stop(grace_s=5)


@pytest.fixture(scope="module")
def scorer():
    """A teacher that scores given tokens besides its top-k (query mode)."""
    example = {
        "input_ids": torch.arange(1, 6),
        "attention_mask": torch.ones(5, dtype=torch.long),
        "score_ids": torch.arange(5),
    }
    engine = llm_engine(example, score="token_lp")
    server, _ports = create_server(ServerConfig(grpc_port=0, zmq_port=0), [engine])
    server.start()
    yield server
    assert server.stop(grace_s=5)


def _endpoint(server, scheme: str) -> str:
    return next(e for e in server.endpoints if e.startswith(f"{scheme}://"))


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_index_mode_over_packed_documents(teacher, packed, scheme):
    ids = [7, 0, 11, 3]
    with OnlineTeacher(_endpoint(teacher, scheme), mode="index", timeouts=TIMEOUTS) as client:
        assert client.describe().schema.vocab == Vocabulary(size=VOCAB)
        got = client.request(ids)
    model = llama()
    for row, i in enumerate(ids):
        want = reference_topk(model, packed, i)
        assert_topk_equal(
            got.tensors["logits.values"][row], got.tensors["logits.indices"][row], want
        )


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_query_with_a_left_padded_batch_and_its_mask(teacher, scheme):
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(1, VOCAB, (n,), generator=g) for n in (6, 11, 3)]
    width = max(d.numel() for d in docs)
    input_ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for row, d in enumerate(docs):
        input_ids[row, width - d.numel() :] = d
        mask[row, width - d.numel() :] = 1
    # The teacher's inputs are those of its packed dataset: positions follow the mask.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
    with OnlineTeacher(_endpoint(teacher, scheme), mode="query", timeouts=TIMEOUTS) as client:
        got = client.request([100, 101, 102], inputs=inputs)
    model = llama()
    for row, d in enumerate(docs):
        values, indices = torch.topk(unpadded_log_probs(model, [d]), 8, dim=-1)
        want = (values, indices.to(torch.int32))
        assert_topk_equal(
            got.tensors["logits.values"][row], got.tensors["logits.indices"][row], want
        )


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_scored_tokens_over_the_wire(scorer, scheme):
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(1, VOCAB, (2, 7), generator=g)
    # On-policy: the student's own samples, each position scored at its next token.
    score = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    inputs = {
        "input_ids": tokens,
        "attention_mask": torch.ones_like(tokens),
        "score_ids": score,
    }
    with OnlineTeacher(_endpoint(scorer, scheme), mode="query", timeouts=TIMEOUTS) as client:
        got = client.request([0, 1], inputs=inputs)
    model = llama()
    for row in range(2):
        lp = unpadded_log_probs(model, [tokens[row]])
        want = lp.gather(-1, score[row][:, None])[:, 0]
        assert torch.allclose(got.tensors["token_lp"][row], want, atol=1e-5, rtol=0)
