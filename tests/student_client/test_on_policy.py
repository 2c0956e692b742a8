"""On-policy distillation of a tiny HF Llama student (vocabulary 64) from a served teacher that
is clearly different from it (a tiny Llama with a sharpened head): the loss on a fixed
rollout equals the reverse KL computed by hand from both models run in-process, unpadded;
prompt and padding positions get exactly zero gradient; the sampled estimator's gradient is
unbiased (checked by enumerating every token); a short on-policy run lowers the reverse KL to
the teacher on held-out prompts, measured over the whole vocabulary in-process; rollouts,
the plain sampling loop, off-policy steps and the teacher checks by hand."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import cast

import pytest
import torch
from torch import Tensor, nn

from lyceum.deploy.examples import tiny_llama, token_documents
from lyceum.proto.items import item_inputs
from lyceum.student_client import (
    OnlineTeacher,
    OnPolicyConfig,
    OnPolicyDistiller,
    Rollout,
    TeacherTimeouts,
)
from lyceum.student_client._lm_config import LMConfig
from lyceum.student_client._lm_task import CausalLMTask
from lyceum.student_client._rollouts import prompt_and_reference, sample_rollout
from lyceum.student_client.on_policy import _sampled_reverse_kl
from lyceum.teacher_server.config import ServerConfig
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine
from lyceum.teacher_server.server import TeacherServer, create_server

VOCAB = 64
K = 8
TIMEOUTS = TeacherTimeouts(timeout_s=60)
TOPK = OnPolicyConfig(estimator="topk", field="logits", max_new_tokens=8)
SAMPLED = OnPolicyConfig(estimator="sampled", field="token_lp", max_new_tokens=8)


def _teacher_model() -> nn.Module:
    """A tiny Llama whose head is scaled up 40 times: peaked next-token distributions, far
    from a freshly initialised student's near-uniform ones."""
    model = tiny_llama(vocab=VOCAB, layers=2, hidden=32, heads=4, seed=1)
    with torch.no_grad():
        cast(nn.Linear, model.get_submodule("lm_head")).weight.mul_(40)
    return model


def _student() -> nn.Module:
    return tiny_llama(vocab=VOCAB, layers=2, hidden=16, heads=2, seed=0).train()


def _serve(model: nn.Module, score: bool) -> TeacherServer:
    example: dict[str, Tensor] = {
        "input_ids": torch.arange(1, 6),
        "attention_mask": torch.ones(5, dtype=torch.long),
    }
    if score:
        example["score_ids"] = torch.arange(5)
    config = EngineConfig(
        outputs=(OutputSpec.parse("logits=@output.logits"),),
        topk=K,
        values="log_probs",
        score="token_lp" if score else None,
    )
    engine = TeacherEngine(model, config, example)
    server, _ports = create_server(ServerConfig(grpc_port=0, zmq_port=0, max_delay_ms=1), [engine])
    server.start()
    return server


@pytest.fixture(scope="module")
def teacher_model() -> nn.Module:
    return _teacher_model()


@pytest.fixture(scope="module")
def server(teacher_model: nn.Module) -> Iterator[TeacherServer]:
    """Top-8 log-probs and scored tokens of the teacher, in query mode."""
    server = _serve(teacher_model, score=True)
    yield server
    assert server.stop(grace_s=5)


def _endpoint(server: TeacherServer, scheme: str = "grpc") -> str:
    return next(e for e in server.endpoints if e.startswith(f"{scheme}://"))


@pytest.fixture
def client(server: TeacherServer) -> Iterator[OnlineTeacher]:
    with OnlineTeacher(_endpoint(server), mode="query", timeouts=TIMEOUTS) as teacher:
        yield teacher


def _distiller(
    teacher: OnlineTeacher, config: OnPolicyConfig, student: nn.Module | None = None
) -> OnPolicyDistiller:
    student = student if student is not None else _student()
    return OnPolicyDistiller(student, teacher, torch.optim.Adam(student.parameters(), 3e-2), config)


def _fixed_rollout() -> Rollout:
    """Three prompts of different lengths (so two are left-padded), responses of different
    lengths (so two are right-padded)."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (3, 5, 1)]
    responses = [torch.randint(1, VOCAB, (n,), generator=g) for n in (4, 2, 6)]
    return Rollout.of(prompts, responses)


def _unpadded(rollout: Rollout, row: int) -> tuple[Tensor, Tensor]:
    """A row's real tokens and, for each, whether the token after it is a response token."""
    real = rollout.attention_mask[row].bool()
    tokens, response = rollout.sequences[row][real], rollout.response[row][real]
    return tokens, torch.cat([response[1:], torch.tensor([False])])


def _log_probs(model: nn.Module, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(tokens[None]).logits[0].float(), dim=-1)


def _hand_topk_reverse_kl(lq: Tensor, lp: Tensor) -> float:
    """KL(q || p) over the teacher's top-k ids and one bucket of the other ids, one position."""
    ids = torch.topk(lp, K).indices
    p, q = lp[ids].exp(), lq[ids].exp()
    p_rest, q_rest = 1 - float(p.sum()), 1 - float(q.sum())
    kept = float((q * (q.log() - p.log())).sum())
    return kept + q_rest * math.log(q_rest / p_rest)


@pytest.mark.integration
@pytest.mark.parametrize("estimator", ["topk", "sampled"])
def test_loss_equals_the_reverse_kl_by_hand_on_a_fixed_rollout(
    client: OnlineTeacher, teacher_model: nn.Module, estimator: str
) -> None:
    config = TOPK if estimator == "topk" else SAMPLED
    distiller = _distiller(client, config)
    rollout = _fixed_rollout()
    got = distiller.loss(rollout)
    per_token = []
    for row in range(rollout.sequences.shape[0]):
        tokens, learnt = _unpadded(rollout, row)
        lq, lp = _log_probs(distiller.student, tokens), _log_probs(teacher_model, tokens)
        for t in torch.nonzero(learnt).flatten().tolist():
            if estimator == "topk":
                per_token.append(_hand_topk_reverse_kl(lq[t], lp[t]))
            else:
                y = int(tokens[t + 1])
                per_token.append(float(lq[t, y] - lp[t, y]))
    assert got.tokens == len(per_token) == 4 + 2 + 6
    want = sum(per_token) / len(per_token)
    assert got.reverse_kl == pytest.approx(want, abs=1e-4)
    assert float(got.loss.detach()) == pytest.approx(want, abs=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("estimator", ["topk", "sampled"])
def test_prompt_and_padding_positions_get_zero_gradient(
    client: OnlineTeacher, estimator: str
) -> None:
    distiller = _distiller(client, TOPK if estimator == "topk" else SAMPLED)
    kept: list[Tensor] = []

    def keep_logits(_module: nn.Module, _args: object, out: object) -> None:
        logits = out.logits  # type: ignore[attr-defined]
        logits.retain_grad()
        kept.append(logits)

    hook = distiller.student.register_forward_hook(keep_logits)
    rollout = _fixed_rollout()
    try:
        distiller.loss(rollout).loss.backward()
    finally:
        hook.remove()
    grad = kept[-1].grad
    assert grad is not None
    learnt = rollout.predicts_response()
    assert learnt.sum() == 12
    assert torch.count_nonzero(grad[~learnt]) == 0
    assert bool((grad[learnt].abs().sum(-1) > 0).all())


def test_sampled_gradient_is_unbiased_by_enumerating_every_token() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    lp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64) * 3, dim=-1)
    lq = torch.log_softmax(logits, dim=-1)
    (exact,) = torch.autograd.grad((lq.exp() * (lq - lp)).sum(), logits)
    expected = torch.zeros_like(logits)
    for y in range(6):
        lq = torch.log_softmax(logits, dim=-1)
        loss, _ = _sampled_reverse_kl(lq[y : y + 1], lp[y : y + 1])
        assert float(loss.detach()) == pytest.approx((lq[y] - lp[y]).item())  # the value: r_y
        (grad,) = torch.autograd.grad(loss, logits)
        expected += lq[y].exp().item() * grad
    assert torch.allclose(expected, exact, atol=1e-12, rtol=0)


def test_the_baseline_leaves_the_value_and_drops_the_mean_ratio() -> None:
    student_lp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    teacher_lp = torch.tensor([-2.0, -2.0, -1.0])
    loss, ratio = _sampled_reverse_kl(student_lp, teacher_lp)
    assert ratio.tolist() == [1.0, 0.0, -2.0]
    assert float(loss.detach()) == pytest.approx(-1 / 3)
    (grad,) = torch.autograd.grad(loss, student_lp)
    # (r_i - mean of the others) / 3: (1 - (-1)) / 3, (0 - (-0.5)) / 3, (-2 - 0.5) / 3
    assert torch.allclose(grad, torch.tensor([2 / 3, 0.5 / 3, -2.5 / 3]))


def _full_reverse_kl(student: nn.Module, teacher: nn.Module, rollout: Rollout) -> float:
    """The token-level KL(q || p) over all 64 ids at the response positions, both models run
    in-process on each row unpadded: the independent measure of the run's progress."""
    total, count = 0.0, 0
    for row in range(rollout.sequences.shape[0]):
        tokens, learnt = _unpadded(rollout, row)
        lq, lp = _log_probs(student, tokens), _log_probs(teacher, tokens)
        total += float((lq.exp() * (lq - lp)).sum(-1)[learnt].sum())
        count += int(learnt.sum())
    return total / count


@pytest.mark.integration
@pytest.mark.slow
def test_a_short_on_policy_run_lowers_the_reverse_kl_on_held_out_prompts(
    server: TeacherServer, teacher_model: nn.Module
) -> None:
    docs = token_documents(n=40, vocab=VOCAB, min_len=4, max_len=8)
    prompts = [{"input_ids": docs[i]["input_ids"][:4]} for i in range(len(docs))]
    train, held_out = prompts[:32], [p["input_ids"] for p in prompts[32:]]
    with OnlineTeacher(_endpoint(server, "zmq"), mode="query", timeouts=TIMEOUTS) as teacher:
        distiller = _distiller(teacher, TOPK)
        torch.manual_seed(0)
        before = _full_reverse_kl(distiller.student, teacher_model, distiller.sample(held_out))
        steps = distiller.train(train, steps=15, batch_size=8)
        torch.manual_seed(0)
        after = _full_reverse_kl(distiller.student, teacher_model, distiller.sample(held_out))
        torch.manual_seed(0)  # the same samples again: evaluate's one batch of 8
        estimate = distiller.evaluate(held_out, batch_size=8)
    # The top-k estimate merges the ids outside the teacher's top 8: a lower bound.
    assert 0 < estimate <= after
    assert [s.on_policy for s in steps] == [True] * 15
    assert all((s.prompts, s.tokens) == (8, 64) for s in steps)  # no eos: 8 tokens each
    # About 7 nats before; about a third of that after 15 steps (measured: 6.97 -> 2.49).
    assert before > 5
    assert after < 0.5 * before


class _Counter(nn.Module):
    """Not a Hugging Face model (no generate): its next token is always the last one + 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(100.0))
        self.calls = 0

    def forward(self, input_ids: Tensor) -> Tensor:
        self.calls += 1
        return self.scale * nn.functional.one_hot((input_ids + 1) % VOCAB, VOCAB).float()


def test_the_plain_sampling_loop_stops_each_response_at_its_eos() -> None:
    model = _Counter()
    task = CausalLMTask(LMConfig(), model)
    prompts = [torch.tensor([7, 9]), torch.tensor([4])]
    got = sample_rollout(model, task, prompts, max_new_tokens=5, eos_token_id=5, pad_token_id=0)
    # Row 0 never samples 5; row 1 samples 5 first, and what it samples after is cut.
    assert got.sequences.tolist() == [[7, 9, 10, 11, 12, 13, 14], [0, 4, 5, 0, 0, 0, 0]]
    assert got.attention_mask.tolist() == [[1] * 7, [0, 1, 1, 0, 0, 0, 0]]
    assert got.response.long().tolist() == [[0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0, 0]]
    assert (model.calls, model.training) == (5, True)  # its mode is restored
    model.calls = 0
    prompts = [torch.tensor([4]), torch.tensor([3])]
    got = sample_rollout(model, task, prompts, max_new_tokens=50, eos_token_id=5, pad_token_id=0)
    assert got.sequences.tolist() == [[4, 5, 0], [3, 4, 5]]
    assert model.calls == 2  # every row had ended: no 48 more forwards


def test_generate_samples_are_cut_at_their_first_eos() -> None:
    student = _student()
    task = CausalLMTask(LMConfig(), student)
    prompts = [torch.arange(1, 1 + n) for n in (3, 5, 2, 4)]
    kwargs = {"max_new_tokens": 8, "pad_token_id": 0}
    torch.manual_seed(1)
    free = sample_rollout(student, task, prompts, eos_token_id=None, **kwargs)
    responses = [free.sequences[r][free.response[r]] for r in range(4)]
    assert [r.numel() for r in responses] == [8] * 4
    eos = int(responses[0][2])
    torch.manual_seed(1)  # the same draws up to each row's eos
    cut = sample_rollout(student, task, prompts, eos_token_id=eos, **kwargs)
    for row, free_response in enumerate(responses):
        ends = torch.nonzero(free_response == eos).flatten()
        want = free_response[: int(ends[0]) + 1] if ends.numel() else free_response
        assert cut.sequences[row][cut.response[row]].tolist() == want.tolist()
        assert int(cut.attention_mask[row].sum()) == prompts[row].numel() + want.numel()
    assert int(cut.response[0].sum()) <= 3  # row 0 samples eos at its third token at the latest


def test_rollout_rows_masks_and_flat_targets_by_hand() -> None:
    rollout = Rollout.of(
        [torch.tensor([9, 8]), torch.tensor([7])], [torch.tensor([1]), torch.tensor([2, 3])]
    )
    assert rollout.sequences.tolist() == [[9, 8, 1, 0], [0, 7, 2, 3]]
    assert rollout.attention_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert rollout.position_ids().tolist() == [[0, 1, 2, 2], [0, 0, 1, 2]]
    assert rollout.lengths.tolist() == [3, 3]
    learnt = rollout.real(rollout.predicts_response())
    targets = rollout.real(rollout.next_tokens())
    # Real positions row by row: 9 8 1 | 7 2 3; learnt: 8 -> 1, 7 -> 2, 2 -> 3.
    assert learnt.tolist() == [False, True, False, True, True, False]
    assert targets[learnt].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"prompts \[0\] are empty"):
        Rollout.of([torch.tensor([], dtype=torch.long)], [torch.tensor([1])])


def test_token_documents_can_carry_the_ids_a_scoring_teacher_learns_from() -> None:
    item = token_documents(n=2, vocab=VOCAB, max_len=9, padding="left", score_ids=True)[1]
    ids = item["input_ids"]
    assert item["score_ids"].tolist() == [*ids[1:].tolist(), 0]
    assert sorted(item_inputs(item)) == ["attention_mask", "input_ids", "score_ids"]
    assert "score_ids" not in token_documents(n=2, vocab=VOCAB)[1]


def test_prompt_items_and_their_reference_responses() -> None:
    assert prompt_and_reference(torch.tensor([3, 4]), 0)[1] is None
    item = {
        "input_ids": torch.tensor([0, 5, 6, 7, 8]),
        "attention_mask": torch.tensor([0, 1, 1, 1, 1]),
        "loss_mask": torch.tensor([0, 0, 0, 1, 1]),
        "labels": torch.tensor([5, 6, 7, 8, -100]),  # not read
    }
    prompt, reference = prompt_and_reference(item, 0)
    assert prompt.tolist() == [5, 6]
    assert reference is not None and reference.tolist() == [7, 8]
    bad = {"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0, 1, 0])}
    with pytest.raises(ValueError, match="prompt item 3: its loss_mask must be 0s"):
        prompt_and_reference(bad, 3)


@pytest.mark.integration
def test_off_policy_steps_learn_on_the_reference_responses(client: OnlineTeacher) -> None:
    config = TOPK.model_copy(update={"on_policy_fraction": 0.0})
    distiller = _distiller(client, config)
    item = {"input_ids": torch.tensor([5, 6, 7, 8]), "loss_mask": torch.tensor([0, 0, 1, 1])}
    rollout, on_policy = distiller.rollout([item])
    assert not on_policy
    assert rollout.sequences.tolist() == [[5, 6, 7, 8]]
    assert rollout.response.tolist() == [[False, False, True, True]]
    step = distiller.step([item])
    assert (step.on_policy, step.tokens, step.prompts) == (False, 2, 1)
    with pytest.raises(ValueError, match=r"prompt items \[0\] have none: give each item"):
        distiller.step([{"input_ids": torch.tensor([5, 6])}])


def test_the_sampled_estimator_is_on_policy_only() -> None:
    with pytest.raises(ValueError, match="valid on the student's own samples only"):
        OnPolicyConfig(estimator="sampled", field="token_lp", on_policy_fraction=0.5)


@pytest.mark.integration
def test_teachers_that_cannot_serve_the_estimator_are_refused(server: TeacherServer) -> None:
    student = _student()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    endpoint = _endpoint(server)
    with (
        OnlineTeacher(endpoint, mode="index", timeouts=TIMEOUTS) as index,
        pytest.raises(ValueError, match="must be in query mode"),
    ):
        OnPolicyDistiller(student, index, optimizer, TOPK)
    with OnlineTeacher(endpoint, mode="query", timeouts=TIMEOUTS) as query:
        with pytest.raises(ValueError, match=r"serves no such field; it has \['logits', 'token"):
            OnPolicyDistiller(student, query, optimizer, TOPK.model_copy(update={"field": "x"}))
        wrong = TOPK.model_copy(update={"field": "token_lp"})
        with pytest.raises(ValueError, match="it needs top-k log-probs"):
            OnPolicyDistiller(student, query, optimizer, wrong)
        wrong = SAMPLED.model_copy(update={"field": "logits"})
        with pytest.raises(ValueError, match="one log-prob per position of the sampled tokens"):
            OnPolicyDistiller(student, query, optimizer, wrong)
        padded = tiny_llama(vocab=VOCAB + 8, layers=1, hidden=16, heads=2)
        with pytest.raises(ValueError, match=r"the student has 72 token ids, teacher .* 64"):
            OnPolicyDistiller(padded, query, optimizer, TOPK)
