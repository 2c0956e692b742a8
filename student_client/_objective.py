"""The distillation objective: task loss plus weighted distillation terms.

Import it from `lyceum.student_client.losses`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

__all__ = ["DistillObjective", "DistillOutput", "DistillTerm", "labeled_cross_entropy"]

TermInput = Tensor | tuple[Tensor, ...]


def labeled_cross_entropy(
    logits: Tensor, labels: Tensor, ids: Tensor, labeled: int | None
) -> Tensor:
    """The task loss: cross-entropy over the batch's labelled samples, those with a sample id
    below `labeled` (all of them where `labeled` is None); the rest learn from teachers alone.
    In float32, whatever the logits' dtype (bf16 under autocast)."""
    logits = logits.float()
    if labeled is None:
        return nn.functional.cross_entropy(logits, labels)
    keep = ids.to(logits.device) < labeled
    if not bool(keep.any()):
        return logits.sum() * 0.0  # no label in this batch: a zero that keeps the graph
    return nn.functional.cross_entropy(logits[keep], labels[keep])


class DistillTerm(BaseModel):
    """One distillation term: `weight * loss(student[student_key], knowledge[teacher_key])`.

    A key is a name or a tuple of names (then the loss gets a tuple of tensors, e.g. the
    maps of `FSPLoss`). A teacher key naming a top-k field (`"logits"` when the knowledge
    holds `logits.values` and `logits.indices`) resolves to the `(values, indices)` pair
    that `TopKKD` takes, so terms name fields, not columns.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str = Field(description="Name of the term in the logged values; unique per objective.")
    weight: float = Field(ge=0, description="Multiplier of this term in the total loss.")
    loss: nn.Module = Field(
        description="The loss module, called as loss(student, teacher[, mask])."
    )
    student: str | tuple[str, ...] = Field(description="Key(s) of the student's outputs.")
    teacher: str | tuple[str, ...] = Field(description="Field name(s) in the merged knowledge.")
    masked: bool = Field(
        default=False, description="Pass the objective's position mask to the loss as mask=."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not name or name == "task":
            raise ValueError(f"term name {name!r} is reserved or empty; 'task' is the task loss")
        return name


@dataclass(frozen=True)
class DistillOutput:
    """`total` to backpropagate; `terms`: detached unweighted values ('task' and each term)."""

    total: Tensor
    terms: dict[str, Tensor]


def _resolve(values: Mapping[str, Tensor], key: str, side: str) -> TermInput:
    if key in values:
        return values[key]
    pair = (f"{key}.values", f"{key}.indices")
    if all(k in values for k in pair):
        return (values[pair[0]], values[pair[1]])
    raise ValueError(f"{side} has no {key!r}; it has {sorted(values)}")


def _inputs(values: Mapping[str, Tensor], keys: str | tuple[str, ...], side: str) -> TermInput:
    if isinstance(keys, str):
        return _resolve(values, keys, side)
    resolved = [_resolve(values, k, side) for k in keys]
    if any(isinstance(r, tuple) for r in resolved):
        raise ValueError(f"{side} keys {keys}: a tuple of keys cannot include a top-k field")
    return tuple(r for r in resolved if isinstance(r, Tensor))


class DistillObjective(nn.Module):
    """total = task_weight * task_loss + sum_i weight_i * term_i.

    The terms' loss modules are submodules (so learned adapters and regressors appear in
    `parameters()`, to be optimised with the student). `forward` returns the total and the
    unweighted, detached value of each term for logging.
    """

    def __init__(self, terms: Sequence[DistillTerm], task_weight: float = 1.0) -> None:
        super().__init__()
        if task_weight < 0:
            raise ValueError(f"task_weight must be >= 0, got {task_weight}")
        names = [t.name for t in terms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"duplicate distillation term names {dup}; give each term its own name"
            )
        if not terms:
            raise ValueError("DistillObjective needs at least one term; use the task loss alone")
        self.task_weight = task_weight
        self.terms = tuple(terms)
        self.losses = nn.ModuleDict({t.name: t.loss for t in terms})

    def forward(
        self,
        student: Mapping[str, Tensor],
        knowledge: Mapping[str, Tensor],
        task_loss: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> DistillOutput:
        logged: dict[str, Tensor] = {}
        parts: list[Tensor] = []
        if task_loss is not None:
            logged["task"] = task_loss.detach()
            parts.append(self.task_weight * task_loss)
        for term in self.terms:
            s = _inputs(student, term.student, "student outputs")
            t = _inputs(knowledge, term.teacher, "knowledge")
            loss_fn = self.losses[term.name]
            value = loss_fn(s, t, mask=mask) if term.masked else loss_fn(s, t)
            logged[term.name] = value.detach()
            parts.append(term.weight * value)
        # sum(), not torch.stack: terms may differ in dtype (e.g. a bf16 task loss).
        return DistillOutput(total=sum(parts[1:], start=parts[0]), terms=logged)
