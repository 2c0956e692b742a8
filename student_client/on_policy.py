"""On-policy distillation of a causal-LM student from an online teacher (GKD, MiniLLM).

    teacher = OnlineTeacher("grpc://127.0.0.1:50051", mode="query")
    distiller = OnPolicyDistiller(student, teacher, torch.optim.Adam(student.parameters()),
                                  OnPolicyConfig(max_new_tokens=32, eos_token_id=2))
    steps = distiller.train(prompts, steps=200, batch_size=8)
    held_out_kl = distiller.evaluate(held_out_prompts)

Each step the student samples continuations of a batch of prompts (`_rollouts`: HF
`generate`, or a plain sampling loop), the teacher is sent the sampled sequences in query
mode and returns its token-level knowledge of them, and the student steps on the reverse KL
KL(q || p) of its next-token distribution q to the teacher's p at the positions that predict
its own response tokens, averaged over them. The prompt and the padding are masked out:
their positions get exactly zero gradient. As in GKD, the prefixes' dependence on the weights
is not differentiated: the loss is the token-level reverse KL on the student's own prefixes.

Two estimators, by what the teacher serves (`estimator`):

- `topk` (default): the teacher's top-k log-probs at every position (`lyceum teacher serve
  --topk K --values log_probs`). The loss is the exact reverse KL between the two
  distributions coarsened to the teacher's k ids plus one bucket for all other ids (the
  teacher's mass left outside its top k against the student's mass there):
  `topk_kd(missing="tail", divergence="reverse_kl")`. It is a lower bound of the
  full-vocabulary reverse KL (merging outcomes never raises a KL), equal to it at k = V, and
  differentiated through the student's whole distribution, so it adds no sampling noise
  beyond that of the prefixes. The one to use when the wire can carry k values a token.
- `sampled`: only log p(y_t) of each sampled token (`--score NAME`: 4 bytes a token). With
  r_t = log q(y_t) - log p(y_t), r_t is a one-sample estimate of the position's reverse KL
  and r_t * grad log q(y_t) an unbiased estimate of its gradient: grad KL(q || p) =
  E_q[(log q - log p) grad log q], since E_q[grad log q] = 0 (the score-function, REINFORCE
  identity). The loss's value is the mean r_t, its gradient the mean of (r_t - b_t) grad
  log q(y_t) with r_t held constant and b_t the mean of the batch's other r (a leave-one-out
  baseline, which keeps it unbiased and lowers its variance). Each token answers for its
  own position only (no reward-to-go over later tokens): the objective of `topk`, estimated
  from the one sampled id. Far noisier than `topk`: see the README for figures.

Both need q itself, so sampling is at temperature 1 with no top-k or top-p cut.

Off-policy steps, GKD's lambda: `on_policy_fraction` of the steps (drawn with `seed`) learn
on the student's samples, the others on the prompts' reference responses (items whose
`loss_mask` marks one). Only `topk` can: the sampled estimator needs samples of q.

Why a Python loop and not a `lyceum student train` key: the trainer's `DistillLoader` asks
the teachers for a batch's knowledge ahead of its step, by sample id, with a window in
flight, and resumes by position in the epoch. On-policy inputs exist only once the current
weights have sampled them, so nothing can be fetched ahead, and a sample id names no stored
item; a config key would be a second loop inside the trainer's. This loop is four calls
(sample, query, loss, step) that compose with the caller's own optimizer, schedule,
precision and checkpoints.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from lyceum.proto.codec import KnowledgeBatch
from lyceum.proto.schema import FieldSpec, KnowledgeSchema, TopK
from lyceum.proto.vocab import align_logits
from lyceum.student_client._lm_config import LMConfig
from lyceum.student_client._lm_task import CausalLMTask, model_vocabulary
from lyceum.student_client._rollouts import Rollout, prompt_and_reference, sample_rollout
from lyceum.student_client.losses import topk_kd
from lyceum.student_client.online import OnlineTeacher

__all__ = ["Estimator", "OnPolicyConfig", "OnPolicyDistiller", "OnPolicyLoss", "OnPolicyStep"]

Estimator = Literal["topk", "sampled"]
_SENT = ("input_ids", "attention_mask", "position_ids", "score_ids")


class OnPolicyConfig(BaseModel):
    """How `OnPolicyDistiller` samples and what it learns (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    estimator: Estimator = Field(
        default="topk",
        description="topk: the exact reverse KL over the teacher's top-k log-probs and one "
        "bucket for the rest; sampled: the per-token log-ratio log q(y) - log p(y) of the "
        "sampled tokens, a REINFORCE-style estimate, for a teacher that scores tokens only.",
    )
    field: str = Field(
        default="logits",
        description="The teacher's knowledge field: its top-k log-probs (serve --topk K "
        "--values log_probs) for topk, its scored tokens (serve --score NAME) for sampled.",
    )
    max_new_tokens: int = Field(
        default=16, gt=0, description="The longest response sampled for a prompt."
    )
    eos_token_id: int | None = Field(
        default=None,
        ge=0,
        description="A response ends at this token, which is learnt too; None: every "
        "response is max_new_tokens long.",
    )
    pad_token_id: int = Field(
        default=0,
        ge=0,
        description="Fills the rows' padding (masked out everywhere; any valid id).",
    )
    on_policy_fraction: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="The fraction of steps that learn on the student's samples (GKD's "
        "lambda); the others learn on the prompt items' reference responses (their "
        "loss_mask 1s). 1: on-policy only.",
    )
    seed: int = Field(default=0, description="Seeds the draw of on- and off-policy steps.")
    logits: str = Field(
        default="logits",
        description="The student output holding the logits: a key of the mapping it "
        "returns (a Hugging Face model's logits); a model returning a tensor gives them.",
    )

    @model_validator(mode="after")
    def _check_fraction(self) -> OnPolicyConfig:
        if self.estimator == "sampled" and self.on_policy_fraction < 1:
            raise ValueError(
                f"on_policy_fraction {self.on_policy_fraction:g} with estimator 'sampled': "
                f"the sampled estimator is valid on the student's own samples only; use "
                f"estimator 'topk' to mix in reference responses, or on_policy_fraction 1"
            )
        return self


@dataclass(frozen=True)
class OnPolicyLoss:
    """One batch's loss (to backpropagate), its reverse-KL value and the tokens it learnt."""

    loss: Tensor
    reverse_kl: float
    tokens: int


@dataclass(frozen=True)
class OnPolicyStep:
    """One optimizer step: the batch's reverse KL (the estimator's value, before the step),
    its prompts and learnt tokens, and whether it learnt on the student's samples."""

    reverse_kl: float
    prompts: int
    tokens: int
    on_policy: bool


def _check_field(schema: KnowledgeSchema, config: OnPolicyConfig, where: str) -> FieldSpec:
    """The teacher's field the estimator reads, refused unless it fits the estimator."""
    spec = next((f for f in schema.fields if f.name == config.field), None)
    if spec is None:
        raise ValueError(
            f"on_policy field {config.field!r}: {where} serves no such field; it has "
            f"{list(schema.names)}"
        )
    if config.estimator == "topk":
        if not isinstance(spec.encoding, TopK) or spec.meaning not in ("log_probs", "probs"):
            raise ValueError(
                f"on_policy estimator 'topk': field {spec.name!r} of {where} is "
                f"{spec.describe()}; it needs top-k log-probs (serve --topk K --values "
                f"log_probs), or use estimator 'sampled' with a scored field (--score NAME)"
            )
    elif isinstance(spec.encoding, TopK) or spec.shape != (None,) or spec.meaning != "log_probs":
        raise ValueError(
            f"on_policy estimator 'sampled': field {spec.name!r} of {where} is "
            f"{spec.describe()}; it needs one log-prob per position of the sampled tokens "
            f"(serve --score NAME, which takes score_ids)"
        )
    elif spec.temperature != 1.0:
        raise ValueError(
            f"on_policy estimator 'sampled': field {spec.name!r} of {where} scores at "
            f"temperature {spec.temperature:g}; the reverse KL is to the teacher at 1 (serve "
            f"without --temperature)"
        )
    return spec


def _check_inputs(schema: KnowledgeSchema | None, where: str) -> None:
    """The teacher must take token rows this loop can send (a scoring one takes score_ids
    too: its scored field was checked already)."""
    names = set(schema.names) if schema is not None else set()
    if not {"input_ids", "attention_mask"} <= names or names - set(_SENT):
        raise ValueError(
            f"on-policy distillation sends input_ids and attention_mask (and position_ids, "
            f"score_ids if taken); {where} takes {sorted(names)}: serve it with dict inputs "
            f"of those keys (a dataset of such items, e.g. token_documents)"
        )


def _rows(batch: KnowledgeBatch, column: str, lengths: Tensor) -> Tensor:
    """`[N, ...]` a token-level column's rows, sample 0's positions first (the teacher may
    answer the chunks' samples in any order), each sample's length checked."""
    pieces = dict(zip(batch.sample_ids.tolist(), batch.tensors[column].unbind(), strict=True))
    out = []
    for i, n in enumerate(lengths.tolist()):
        piece = pieces[i]
        if piece.shape[0] != n:
            raise ValueError(
                f"teacher knowledge {column!r} of sample {i} has {piece.shape[0]} positions, "
                f"the rollout {n} real tokens: the teacher must keep its knowledge to the "
                f"attention mask's real positions"
            )
        out.append(piece)
    return torch.cat(out)


def _sampled_reverse_kl(student_lp: Tensor, teacher_lp: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, per-token estimates) of the sampled estimator: value mean r_t, gradient mean
    (r_t - b_t) grad log q(y_t), with r_t = log q(y_t) - log p(y_t) held constant and b_t
    the mean of the batch's other r (a leave-one-out baseline: independent of y_t, so the
    gradient stays unbiased, and tokens better than the batch's are pushed up)."""
    ratio = student_lp.detach() - teacher_lp
    n = ratio.numel()
    baseline = (ratio.sum() - ratio) / (n - 1) if n > 1 else torch.zeros_like(ratio)
    surrogate = (ratio - baseline) * (student_lp - student_lp.detach())
    return (ratio + surrogate).mean(), ratio


class OnPolicyDistiller:
    """Sample, score, learn (see the module docstring).

    `student`: a causal LM (a Hugging Face one samples with `generate`); `teacher`: an
    `OnlineTeacher` in query mode serving the field `config.field`; `optimizer`: over the
    student's parameters, stepped once per batch. The teacher is described and checked
    here: a field or inputs that do not fit the estimator are refused (`ValueError`)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: OnlineTeacher,
        optimizer: torch.optim.Optimizer,
        config: OnPolicyConfig | None = None,
    ) -> None:
        self.config = config if config is not None else OnPolicyConfig()
        if teacher.mode != "query":
            raise ValueError(
                f"{teacher!r}: on-policy distillation sends the student's samples, so the "
                f"teacher must be in query mode (mode='query')"
            )
        info = teacher.describe()
        where = f"teacher {teacher.name!r}"
        self.spec = _check_field(info.schema, self.config, where)
        _check_inputs(info.input_schema, where)
        self._sent = [n for n in _SENT if info.input_schema and n in info.input_schema.names]
        self.vocab = info.schema.vocab
        own = model_vocabulary(student)
        if own is not None and self.vocab is not None and own.size > self.vocab.size:
            raise ValueError(
                f"the student has {own.size} token ids, {where} {self.vocab.size}: sampling "
                f"would draw ids the teacher cannot read (its padding ids); give the student "
                f"the teacher's vocabulary size"
            )
        self.student, self.teacher, self.optimizer = student, teacher, optimizer
        self.task = CausalLMTask(LMConfig(logits=self.config.logits), student)
        self._draw = random.Random(self.config.seed)
        self._order = torch.Generator().manual_seed(self.config.seed)

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def sample(self, prompts: Sequence[Tensor]) -> Rollout:
        """The student's continuations of `prompts` (1-d token ids each)."""
        c = self.config
        return sample_rollout(
            self.student,
            self.task,
            prompts,
            max_new_tokens=c.max_new_tokens,
            eos_token_id=c.eos_token_id,
            pad_token_id=c.pad_token_id,
        )

    def knowledge(self, rollout: Rollout) -> dict[str, Tensor]:
        """The teacher's knowledge of the rollout's rows: its field's columns as `[N, ...]`
        rows, one per real position (prompt included), row by row."""
        given = {
            "input_ids": rollout.sequences,
            "attention_mask": rollout.attention_mask,
            "position_ids": rollout.position_ids(),
            "score_ids": rollout.next_tokens(),  # position t scores the token after it
        }
        inputs = {name: given[name] for name in self._sent}
        ids = torch.arange(rollout.sequences.shape[0])
        batch = self.teacher.request(ids, inputs=inputs)
        return {c: _rows(batch, c, rollout.lengths) for c in self.spec.columns}

    def loss(self, rollout: Rollout) -> OnPolicyLoss:
        """The reverse KL of the student to the teacher on the rollout's response tokens
        (the teacher asked now), with the student's graph."""
        knowledge = {k: v.to(self.device) for k, v in self.knowledge(rollout).items()}
        rollout = rollout.to(self.device)
        inputs = {"input_ids": rollout.sequences, "attention_mask": rollout.attention_mask}
        logits = align_logits(self.task.logits(self.student, inputs, False), self.vocab)
        learn = rollout.real(rollout.predicts_response())
        tokens = int(learn.sum())
        if tokens == 0:
            return OnPolicyLoss(logits.sum() * 0.0, 0.0, 0)
        if self.config.estimator == "topk":
            values, indices = (knowledge[c] for c in self.spec.columns)
            loss = topk_kd(
                logits,
                values,
                indices,
                meaning=self.spec.meaning,  # type: ignore[arg-type]
                missing="tail",
                teacher_temperature=self.spec.temperature,
                mask=learn,
                divergence="reverse_kl",
            )
            return OnPolicyLoss(loss, float(loss.detach()), tokens)
        targets = rollout.real(rollout.next_tokens())[learn]
        student_lp = torch.log_softmax(logits[learn].float(), dim=-1)
        chosen = student_lp.gather(-1, targets[:, None])[:, 0]
        loss, ratio = _sampled_reverse_kl(chosen, knowledge[self.spec.name][learn].float())
        return OnPolicyLoss(loss, float(ratio.mean()), tokens)

    def rollout(self, items: Sequence[Any]) -> tuple[Rollout, bool]:
        """A batch's rollout, and whether it is on-policy: the student's samples, or (a
        draw of 1 - on_policy_fraction) the items' reference responses."""
        parsed = [prompt_and_reference(item, i) for i, item in enumerate(items)]
        prompts = [p for p, _ in parsed]
        if self._draw.random() < self.config.on_policy_fraction:
            return self.sample(prompts), True
        missing = [i for i, (_, ref) in enumerate(parsed) if ref is None]
        if missing:
            raise ValueError(
                f"an off-policy step (on_policy_fraction {self.config.on_policy_fraction:g}) "
                f"learns on reference responses, but prompt items {missing[:5]} have none: "
                f"give each item a loss_mask (0 = prompt, 1 = response), or set "
                f"on_policy_fraction 1"
            )
        references = [r for _, r in parsed if r is not None]
        return Rollout.of(prompts, references, self.config.pad_token_id), False

    def step(self, items: Sequence[Any]) -> OnPolicyStep:
        """One optimizer step on a batch of prompt items (see `prompt_and_reference`)."""
        rollout, on_policy = self.rollout(items)
        self.optimizer.zero_grad(set_to_none=True)
        result = self.loss(rollout)
        result.loss.backward()
        self.optimizer.step()
        return OnPolicyStep(result.reverse_kl, len(items), result.tokens, on_policy)

    def train(
        self, prompts: torch.utils.data.Dataset | Sequence[Any], steps: int, batch_size: int
    ) -> list[OnPolicyStep]:
        """`steps` steps on batches of `prompts`, reshuffled (with `seed`) every pass."""
        n = len(prompts)  # type: ignore[arg-type]
        if steps <= 0 or batch_size <= 0 or n == 0:
            raise ValueError(
                f"train needs steps > 0, batch_size > 0 and prompts; got steps={steps}, "
                f"batch_size={batch_size}, {n} prompts"
            )
        order = itertools.chain.from_iterable(
            torch.randperm(n, generator=self._order).tolist() for _ in itertools.count()
        )
        return [
            self.step([prompts[i] for i in itertools.islice(order, batch_size)])
            for _ in range(steps)
        ]

    @torch.no_grad()
    def evaluate(
        self, prompts: torch.utils.data.Dataset | Sequence[Any], batch_size: int = 8
    ) -> float:
        """The estimator's reverse KL on the student's samples of `prompts` (held out),
        weighted by tokens, without a step."""
        n = len(prompts)  # type: ignore[arg-type]
        total, tokens = 0.0, 0
        for lo in range(0, n, batch_size):
            items = [prompts[i] for i in range(lo, min(lo + batch_size, n))]
            rollout = self.sample(
                [prompt_and_reference(it, lo + j)[0] for j, it in enumerate(items)]
            )
            result = self.loss(rollout)
            total += result.reverse_kl * result.tokens
            tokens += result.tokens
        return total / tokens if tokens else float("nan")
