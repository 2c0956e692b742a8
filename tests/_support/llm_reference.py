"""Reference knowledge of a tiny HF Llama teacher, computed the independent way: one unpadded
forward per document, then log-softmax and top-k by hand. Shared by the language-model
teacher tests (engine, dump, both transports)."""

from __future__ import annotations

import torch

from lyceum.deploy.examples import TokenDocuments, tiny_llama
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine

VOCAB = 1024
K = 8
MODEL_SPEC = "lyceum.deploy.examples:tiny_llama"


def llama() -> torch.nn.Module:
    return tiny_llama(vocab=VOCAB, layers=2, hidden=32, heads=4, seed=0)


def engine_config(score: str | None = None) -> EngineConfig:
    return EngineConfig(
        outputs=(OutputSpec.parse("logits=@output.logits"),),
        topk=K,
        values="log_probs",
        score=score,
    )


def llm_engine(example: object, score: str | None = None) -> TeacherEngine:
    return TeacherEngine(llama(), engine_config(score), example)


def unpadded_log_probs(model: torch.nn.Module, docs: list[torch.Tensor]) -> torch.Tensor:
    """`[sum of lengths, V]` float32 log-probs, each document run alone and unpadded."""
    with torch.inference_mode():
        return torch.cat(
            [torch.log_softmax(model(d[None]).logits[0].float(), dim=-1) for d in docs]
        )


def reference_topk(
    model: torch.nn.Module, data: TokenDocuments, i: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (values, int32 indices) of item i's documents, run unpadded one by one."""
    values, indices = torch.topk(unpadded_log_probs(model, data.documents(i)), K, dim=-1)
    return values, indices.to(torch.int32)


def assert_topk_equal(
    values: torch.Tensor, indices: torch.Tensor, want: tuple[torch.Tensor, torch.Tensor]
) -> None:
    assert values.shape == want[0].shape
    assert torch.equal(indices, want[1])
    assert torch.allclose(values, want[0], atol=1e-5, rtol=0)
