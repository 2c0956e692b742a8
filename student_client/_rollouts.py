"""Rollouts of a causal-LM student: prompts and their continuations, as one batch of rows.

A `Rollout` is what on-policy distillation sends to the teacher and learns from: the prompts
left-padded (decoder-only generation appends on the right), each followed by its response
and then padding, with the attention mask marking the real tokens (one contiguous run per
row, as the teacher's query inputs need) and `response` the tokens that are learnt.

`sample_rollout` makes the responses by sampling the student. A model with a `generate`
method (a Hugging Face causal LM) samples with it; any other model that `CausalLMTask` runs
(a forward taking `input_ids`, and the mask and positions if it wants them) samples by a
plain loop over its logits at the last position, one full forward per new token (no KV
cache: meant for small students). Both draw from the student's own distribution,
softmax(logits) at temperature 1 with no top-k or top-p cut: the on-policy estimators need
samples of q itself (other processors a model's `generation_config` may set, such as a
repetition penalty, change q too: clear them). A response ends at its first `eos_token_id`
(kept: ending is learnt too) or after `max_new_tokens`. Samples come from torch's global
generator (`torch.manual_seed` makes them reproducible).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lyceum.student_client._lm_collate import LMCollate
from lyceum.student_client._lm_task import CausalLMTask

__all__ = ["Rollout", "prompt_and_reference", "sample_rollout"]


@dataclass(frozen=True)
class Rollout:
    """Prompts and responses as `[B, L]` rows (see the module docstring).

    `sequences`: token ids (padding is `pad_token_id`); `attention_mask`: 1 = a real token,
    prompt or response; `response`: True = a response token, learnt."""

    sequences: Tensor
    attention_mask: Tensor
    response: Tensor

    @classmethod
    def of(
        cls, prompts: Sequence[Tensor], responses: Sequence[Tensor], pad_token_id: int = 0
    ) -> Rollout:
        """The rows of `prompts[i]` followed by `responses[i]` (1-d token ids each)."""
        if len(prompts) != len(responses) or not prompts:
            raise ValueError(
                f"a rollout needs one response per prompt and at least one prompt; got "
                f"{len(prompts)} prompts and {len(responses)} responses"
            )
        empty = [i for i, p in enumerate(prompts) if p.numel() == 0]
        if empty:
            raise ValueError(
                f"prompts {empty[:5]} are empty: a prompt needs at least one token, the "
                f"position that predicts the first response token"
            )
        width = max(p.numel() for p in prompts)
        length = width + max(r.numel() for r in responses)
        shape = (len(prompts), length)
        sequences = torch.full(shape, pad_token_id, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        response = torch.zeros(shape, dtype=torch.bool)
        for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            start, end = width - p.numel(), width + r.numel()
            sequences[row, start:width] = p
            sequences[row, width:end] = r
            mask[row, start:end] = 1
            response[row, width:end] = True
        return cls(sequences, mask, response)

    @property
    def tokens(self) -> int:
        """Response tokens: the positions learnt."""
        return int(self.response.sum())

    @property
    def lengths(self) -> Tensor:
        """`[B]` real tokens of each row: the positions of its token-level knowledge."""
        return self.attention_mask.sum(-1)

    def position_ids(self) -> Tensor:
        """`[B, L]` positions counted from each row's first real token."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def next_tokens(self) -> Tensor:
        """`[B, L]` the token after each position (0 after the last: a valid id to score,
        never learnt)."""
        return torch.cat([self.sequences[:, 1:], torch.zeros_like(self.sequences[:, :1])], 1)

    def predicts_response(self) -> Tensor:
        """`[B, L]` bool: the token after this position is a response token, i.e. the
        position's next-token distribution is learnt (prompt and padding: False)."""
        after = torch.zeros_like(self.response[:, :1])
        return torch.cat([self.response[:, 1:], after], dim=1)

    def real(self, grid: Tensor) -> Tensor:
        """`[N, ...]` the entries of a `[B, L, ...]` grid at real positions, row by row: the
        order of the student's `CausalLMTask.logits` and of the teacher's knowledge."""
        return grid[self.attention_mask.bool()]

    def to(self, device: torch.device) -> Rollout:
        return Rollout(
            self.sequences.to(device), self.attention_mask.to(device), self.response.to(device)
        )


def prompt_and_reference(item: Any, index: int) -> tuple[Tensor, Tensor | None]:
    """A prompt item's prompt tokens and its reference response (None if it has none).

    An item is a 1-d tensor of token ids (a prompt) or a mapping read as `LMCollate` reads
    one (`input_ids`, its padding cut by `attention_mask`; `labels` are not read); a
    `loss_mask` marks a reference response: its 1s, after the prompt's 0s, are the response
    (GKD's off-policy data)."""
    if isinstance(item, Tensor):
        item = {"input_ids": item}
    if not isinstance(item, Mapping):
        raise ValueError(
            f"prompt item {index}: expected 1-d token ids or a mapping with 'input_ids', got "
            f"{type(item).__name__}"
        )
    # Labels are not read: the teacher, not the data, says what a response should be.
    parsed = LMCollate().item({k: v for k, v in item.items() if k != "labels"}, index)
    if "loss_mask" not in item:
        return parsed.ids, None
    counted = torch.nonzero(parsed.counts).flatten()
    if counted.numel() == 0:
        return parsed.ids, None
    start = int(counted[0])
    if not bool(parsed.counts[start:].all()):
        raise ValueError(
            f"prompt item {index}: its loss_mask must be 0s (the prompt) then 1s (the "
            f"reference response), got {parsed.counts.long().tolist()}"
        )
    return parsed.ids[:start], parsed.ids[start:]


def _cut_at_eos(sampled: Tensor, eos_token_id: int | None) -> list[Tensor]:
    """Each row's response: up to and including its first eos, else all of it."""
    rows = []
    for row in sampled:
        if eos_token_id is not None:
            ends = torch.nonzero(row == eos_token_id).flatten()
            if ends.numel():
                row = row[: int(ends[0]) + 1]
        rows.append(row)
    return rows


@torch.no_grad()
def sample_rollout(
    model: nn.Module,
    task: CausalLMTask,
    prompts: Sequence[Tensor],
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
) -> Rollout:
    """The student's own continuations of `prompts` (see the module docstring), sampled in
    eval mode (the model's mode is restored)."""
    empty = [torch.zeros(0, dtype=torch.long) for _ in prompts]
    start = Rollout.of(prompts, empty, pad_token_id)
    device = next(model.parameters()).device
    ids, mask = start.sequences.to(device), start.attention_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        generate = getattr(model, "generate", None)
        if callable(generate):
            out = generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            )
            sampled = out[:, ids.shape[1] :]
        else:
            sampled = _sampling_loop(model, task, ids, mask, max_new_tokens, eos_token_id)
    finally:
        model.train(was_training)
    responses = _cut_at_eos(sampled.cpu(), eos_token_id)
    return Rollout.of(prompts, responses, pad_token_id)


def _sampling_loop(
    model: nn.Module,
    task: CausalLMTask,
    ids: Tensor,
    mask: Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
) -> Tensor:
    """`[B, n]` tokens sampled one at a time from the logits at the last position; stops
    early once every row has sampled its eos."""
    width = ids.shape[1]
    ended = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = task.row_logits(model, {"input_ids": ids, "attention_mask": mask}, False)
        probs = torch.softmax(logits[:, -1].float(), dim=-1)
        token = torch.multinomial(probs, 1)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        if eos_token_id is not None:
            ended |= token[:, 0] == eos_token_id
            if bool(ended.all()):
                break
    return ids[:, width:]
