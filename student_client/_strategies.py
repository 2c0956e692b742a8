"""Merge strategies: how several teachers' values of one knowledge field become one tensor.

Import them from `lyceum.student_client.merger`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor

from lyceum.proto.schema import FieldSpec, TopK
from lyceum.proto.specs import parse_spec

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@runtime_checkable
class MergeStrategy(Protocol):
    """How the teachers' values of one field are combined into the student's knowledge.

    Why an extension point: the right combination depends on what the field means and on the
    experiment (average logits, mix probabilities, weight a stronger teacher, keep every
    teacher for a per-teacher loss), and users bring their own. The `Merger` does the
    join by sample id, the dtype promotion and the schema checks common to all strategies;
    a strategy only says which fields it accepts and does the arithmetic.

    - `merged_spec(field, specs, teachers)`: the output field, given the (already mutually
      compatible) specs of the teachers that send `field`, in registration order; raise
      `ValueError` naming the field and the fix if this strategy cannot merge them.
    - `__call__(tensors, teachers)`: one tensor per teacher, all `[N, ...]` of the same shape,
      rows already aligned (N = samples, or sequence positions of a jagged field), float
      fields in float32; returns the merged `[N, ...]` matching `merged_spec`.
    """

    name: str

    def merged_spec(
        self, field: str, specs: Sequence[FieldSpec], teachers: Sequence[str]
    ) -> FieldSpec: ...

    def __call__(self, tensors: Sequence[Tensor], teachers: Sequence[str]) -> Tensor: ...


def merged_dtype(spec: FieldSpec) -> str:
    """Float knowledge is merged and returned in float32 (teachers may send fp16/bf16)."""
    return "float32" if spec.dtype in FLOAT_DTYPES else spec.dtype


def with_updates(spec: FieldSpec, **update: object) -> FieldSpec:
    # model_copy(update=...) would skip validation; rebuild so the result is a valid spec.
    return FieldSpec.model_validate({**spec.model_dump(), **update})


def _require_numeric(name: str, field: str, spec: FieldSpec) -> None:
    if isinstance(spec.encoding, TopK):
        raise ValueError(
            f"field {field!r} is top-k: strategy {name!r} cannot merge it, because each "
            f"teacher's top-k indices point at different vocabulary entries per row, so "
            f"element-wise arithmetic on the values would mix unrelated classes. Use 'first' "
            f"or 'stack', or have the teachers send the field dense"
        )
    if spec.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"field {field!r} is {spec.dtype}: strategy {name!r} needs a float field; "
            f"use 'first' or 'stack' for integer or bool knowledge"
        )


def _numeric_spec(name: str, field: str, spec: FieldSpec) -> FieldSpec:
    _require_numeric(name, field, spec)
    return with_updates(spec, dtype="float32")


class _Elementwise:
    """A strategy that combines the teachers' dense float values element by element."""

    name: str

    def merged_spec(
        self, field: str, specs: Sequence[FieldSpec], teachers: Sequence[str]
    ) -> FieldSpec:
        return _numeric_spec(self.name, field, specs[0])


class Mean(_Elementwise):
    """(1/n) sum_t x_t."""

    name = "mean"

    def __call__(self, tensors: Sequence[Tensor], teachers: Sequence[str]) -> Tensor:
        return torch.stack(list(tensors)).mean(0)


class Sum(_Elementwise):
    """sum_t x_t."""

    name = "sum"

    def __call__(self, tensors: Sequence[Tensor], teachers: Sequence[str]) -> Tensor:
        return torch.stack(list(tensors)).sum(0)


class Max(_Elementwise):
    """max_t x_t, element-wise."""

    name = "max"

    def __call__(self, tensors: Sequence[Tensor], teachers: Sequence[str]) -> Tensor:
        return torch.stack(list(tensors)).amax(0)


class LogSumExp:
    """Mixture of log-probabilities: log((1/n) sum_t exp(x_t)) = logsumexp_t(x_t) - log n.

    The teachers' averaged *distribution*, in log space. Only meaningful for `log_probs`: on
    logits it would mix unnormalised scores, weighting a teacher by its logits' scale.
    """

    name = "logsumexp"

    def merged_spec(
        self, field: str, specs: Sequence[FieldSpec], teachers: Sequence[str]
    ) -> FieldSpec:
        if specs[0].meaning != "log_probs":
            raise ValueError(
                f"field {field!r}: 'logsumexp' mixes log-probabilities, but teachers "
                f"{list(teachers)} send {specs[0].meaning}; have them send log_probs, or use "
                f"'mean' (averages logits, or probabilities for probs)"
            )
        return _numeric_spec(self.name, field, specs[0])

    def __call__(self, tensors: Sequence[Tensor], teachers: Sequence[str]) -> Tensor:
        return torch.logsumexp(torch.stack(list(tensors)), dim=0) - math.log(len(tensors))


class Weighted(BaseModel):
    """Weighted mean: sum_t w_t x_t / sum_t w_t, with one weight per teacher by name.

    Normalised so that equal weights give the plain mean; scale the distillation term's
    weight in the objective to change the overall size.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["weighted"] = "weighted"
    weights: dict[str, float] = Field(description="Weight of each teacher, by teacher name; >= 0.")

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        if any(not w >= 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise ValueError(f"weights {weights} must be >= 0 with a positive sum")
        return weights

    def merged_spec(
        self, field: str, specs: Sequence[FieldSpec], teachers: Sequence[str]
    ) -> FieldSpec:
        missing = [t for t in teachers if t not in self.weights]
        extra = [t for t in self.weights if t not in teachers]
        if missing or extra:
            raise ValueError(
                f"field {field!r}: weighted strategy has weights for {sorted(self.weights)} but "
                f"the teachers sending it are {list(teachers)} (no weight for {missing}, "
                f"unknown {extra}); give exactly one weight per teacher"
            )
        return _numeric_spec(self.name, field, specs[0])

    def __call__(self, tensors: Sequence[Tensor], teachers: Sequence[str]) -> Tensor:
        w = torch.tensor([self.weights[t] for t in teachers], dtype=torch.float32)
        w = (w / w.sum()).to(tensors[0].device)
        stacked = torch.stack(list(tensors))
        return torch.tensordot(w, stacked, dims=1)


class First:
    """The first teacher's values (registration order); the others are only checked."""

    name = "first"

    def merged_spec(
        self, field: str, specs: Sequence[FieldSpec], teachers: Sequence[str]
    ) -> FieldSpec:
        return with_updates(specs[0], dtype=merged_dtype(specs[0]))

    def __call__(self, tensors: Sequence[Tensor], teachers: Sequence[str]) -> Tensor:
        return tensors[0]


class Stack:
    """Every teacher's values, stacked along a new teacher dimension at dim 1.

    Fixed fields give `[B, n_teachers, ...]`. Sequence fields give jagged
    `[B, j, n_teachers, ...]`: the teacher dim goes after the ragged dim, since torch.jagged
    needs the ragged dim at dim 1.
    """

    name = "stack"

    def merged_spec(
        self, field: str, specs: Sequence[FieldSpec], teachers: Sequence[str]
    ) -> FieldSpec:
        spec, n = specs[0], len(specs)
        shape = (None, n, *spec.shape[1:]) if spec.variable else (n, *spec.shape)
        return with_updates(spec, dtype=merged_dtype(spec), shape=shape)

    def __call__(self, tensors: Sequence[Tensor], teachers: Sequence[str]) -> Tensor:
        return torch.stack(list(tensors), dim=1)


class CallableStrategy:
    """A user function `(list[Tensor]) -> Tensor` over the aligned teachers' values.

    It must return the teachers' shape (float32 for float fields); `Merger.merge` checks.
    Top-k fields are refused: the function would see values and indices apart.
    """

    def __init__(self, fn: Callable[[list[Tensor]], Tensor], name: str | None = None) -> None:
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", type(fn).__name__))

    def merged_spec(
        self, field: str, specs: Sequence[FieldSpec], teachers: Sequence[str]
    ) -> FieldSpec:
        if isinstance(specs[0].encoding, TopK):
            raise ValueError(
                f"field {field!r} is top-k: a callable strategy would get values and indices "
                f"separately; use 'first' or 'stack', or have the teachers send it dense"
            )
        return with_updates(specs[0], dtype=merged_dtype(specs[0]))

    def __call__(self, tensors: Sequence[Tensor], teachers: Sequence[str]) -> Tensor:
        return self.fn(list(tensors))


def register_strategy(
    registry: dict[str, MergeStrategy], strategy: MergeStrategy
) -> dict[str, MergeStrategy]:
    """Add `strategy` under its name (to pass `registry` to `Merger`); refuses a name that
    is already taken, or that holds a colon (which marks a `module:attribute` spec)."""
    if ":" in strategy.name:
        raise ValueError(
            f"merge strategy name {strategy.name!r}: a name cannot hold ':', which marks a "
            f"'module:attribute' spec; pick a plain name"
        )
    if strategy.name in registry:
        raise ValueError(
            f"merge strategy {strategy.name!r} is already registered ({registry[strategy.name]!r}); "
            f"pick another name"
        )
    registry[strategy.name] = strategy
    return registry


def _builtin_registry() -> dict[str, MergeStrategy]:
    registry: dict[str, MergeStrategy] = {}
    for strategy in (Mean(), Sum(), Max(), First(), Stack(), LogSumExp()):
        register_strategy(registry, strategy)
    return registry


STRATEGIES: Mapping[str, MergeStrategy] = _builtin_registry()
"""Strategies that take no parameters, by name (`Weighted` needs its weights: build it)."""

StrategyLike = MergeStrategy | str | Callable[[list[Tensor]], Tensor]


def is_strategy_spec(text: str) -> bool:
    """True if `text` names code (`module:attribute`, maybe with `{json kwargs}`), not a
    registry name (which never holds a colon)."""
    return ":" in text.partition("{")[0]


def strategy_from_spec(field: str, text: str) -> MergeStrategy:
    """The strategy a `module:attribute{json kwargs}` spec names, so a YAML config can use
    code of the user's own (YAML stays data: the spec is imported, never evaluated).

    The attribute may be a `MergeStrategy` class (built with the kwargs), a `MergeStrategy`
    instance, or a function `(list[Tensor], **kwargs) -> Tensor` (called with the kwargs).
    """
    try:
        spec = parse_spec(text)
        target = spec.resolve()
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"field {field!r}: merge strategy {message}") from None
    except ValueError as exc:
        raise ValueError(f"field {field!r}: merge strategy {exc}") from None
    if isinstance(target, type):
        try:
            built = target(**spec.kwargs)
        except TypeError as exc:
            raise ValueError(
                f"field {field!r}: merge strategy {spec}: building it failed: {exc}"
            ) from None
        if not isinstance(built, MergeStrategy):
            raise ValueError(
                f"field {field!r}: merge strategy {spec}: {target.__name__} is not a "
                f"MergeStrategy (it needs `name`, `merged_spec` and `__call__`); name a "
                f"MergeStrategy class or a function (list[Tensor]) -> Tensor"
            )
        return built
    if isinstance(target, MergeStrategy):
        if spec.kwargs:
            raise ValueError(
                f"field {field!r}: merge strategy {spec} names an instance, which takes no "
                f"keyword arguments; drop them or name its class"
            )
        return target
    fn = functools.partial(target, **spec.kwargs) if spec.kwargs else target
    return CallableStrategy(fn, name=str(spec))


def resolve_strategy(
    field: str, strategy: StrategyLike, registry: Mapping[str, MergeStrategy] = STRATEGIES
) -> MergeStrategy:
    """A strategy object from a name in `registry`, a `module:attribute` spec, a strategy,
    or a plain callable."""
    if isinstance(strategy, str):
        if strategy in registry:
            return registry[strategy]
        if is_strategy_spec(strategy):
            return strategy_from_spec(field, strategy)
        if strategy == "weighted":
            raise ValueError(
                f"field {field!r}: 'weighted' needs its weights; pass "
                f"Weighted(weights={{'teacher_a': 0.7, 'teacher_b': 0.3}}) instead of the name"
            )
        raise ValueError(
            f"field {field!r}: unknown merge strategy {strategy!r}; known: {sorted(registry)}, "
            f"a 'module:attribute' spec of your own strategy, Weighted(weights=...), or any "
            f"callable (list[Tensor]) -> Tensor"
        )
    if isinstance(strategy, MergeStrategy):
        return strategy
    if callable(strategy):
        return CallableStrategy(strategy)
    raise ValueError(f"field {field!r}: merge strategy {strategy!r} is neither a name nor callable")
