"""The merger: joins several teachers' knowledge batches by sample id and combines each field.

Teachers answer in their own row order (replicas, batching, retries), so rows are joined by
`sample_id`, never by arrival: `merge(ids, batches)` returns every field in the order of
`ids`, the student's order. How a field shared by several teachers is combined is its
strategy (`mean`, `sum`, `Weighted`, `max`, `first`, `stack`, `logsumexp`, a callable, or a
`module:attribute` spec naming the user's own);
`check(schemas)` validates the teachers against the strategies once, at start, so a bad
combination fails before training with a message naming the teachers.

Which fields come out:
- a field named in `strategies` must be sent by every teacher (after `renames`) and is merged;
- a field sent by exactly one teacher and not named in `strategies` passes through as it is;
- a field sent by several teachers but not named in `strategies` is refused (say how to merge).

Float fields are merged and returned as float32. Sequence fields (jagged `[B, j, ...]`) must
have the same lengths in every teacher for each sample (same tokenisation); they are merged
position by position and returned jagged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from lyceum.proto.codec import TORCH_DTYPES, KnowledgeBatch, schema_difference
from lyceum.proto.schema import FieldSpec, KnowledgeSchema
from lyceum.student_client._positions import jagged_offsets
from lyceum.student_client._strategies import (
    FLOAT_DTYPES,
    STRATEGIES,
    CallableStrategy,
    First,
    LogSumExp,
    Max,
    Mean,
    MergeStrategy,
    Stack,
    StrategyLike,
    Sum,
    Weighted,
    merged_dtype,
    register_strategy,
    resolve_strategy,
    with_updates,
)

__all__ = [
    "STRATEGIES",
    "CallableStrategy",
    "First",
    "LogSumExp",
    "Max",
    "Mean",
    "MergeStrategy",
    "MergedField",
    "MergedSchema",
    "Merger",
    "Stack",
    "Sum",
    "Weighted",
    "register_strategy",
]

PASSTHROUGH = "only"
"""Strategy name recorded for a field that a single teacher sends (it passes through)."""


class MergedField(BaseModel):
    """One field of the merged knowledge: its spec as returned, and where it came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: FieldSpec = Field(description="The field as `merge` returns it (name, dtype, shape).")
    teachers: tuple[str, ...] = Field(description="Teachers merged, in registration order.")
    sources: tuple[str, ...] = Field(description="Each teacher's own name for the field.")
    strategy: str = Field(description=f"Strategy name; {PASSTHROUGH!r} for a single teacher.")


class MergedSchema(BaseModel):
    """What `Merger.check` accepted: the merged fields and the teachers in registration order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teachers: tuple[str, ...] = Field(description="Teacher names in registration order.")
    fields: tuple[MergedField, ...] = Field(description="Merged fields in output order.")

    @property
    def knowledge_schema(self) -> KnowledgeSchema:
        """The merged knowledge as a `KnowledgeSchema` (keys of `merge`'s result: `columns`)."""
        return KnowledgeSchema(fields=tuple(f.spec for f in self.fields))

    def describe(self) -> str:
        """One line per field, e.g. `logits: float32 [10] dense logits <- mean(a.logits, b.out)`."""
        lines = []
        for f in self.fields:
            inputs = ", ".join(f"{t}.{s}" for t, s in zip(f.teachers, f.sources, strict=True))
            lines.append(f"{f.spec.describe()} <- {f.strategy}({inputs})")
        return "\n".join(lines)


def _renamed_fields(
    teacher: str, schema: KnowledgeSchema, renames: Mapping[str, str]
) -> dict[str, tuple[FieldSpec, str]]:
    """Our field name -> (the spec under our name, the teacher's own name)."""
    unknown = [f for f in renames if f not in schema.names]
    if unknown:
        raise ValueError(
            f"renames for teacher {teacher!r} name fields {unknown} it does not send; "
            f"its fields are {list(schema.names)}"
        )
    out: dict[str, tuple[FieldSpec, str]] = {}
    for spec in schema.fields:
        ours = renames.get(spec.name, spec.name)
        if ours in out:
            raise ValueError(
                f"teacher {teacher!r}: fields {out[ours][1]!r} and {spec.name!r} would both be "
                f"called {ours!r} after renames; rename one of them apart"
            )
        out[ours] = (with_updates(spec, name=ours) if ours != spec.name else spec, spec.name)
    return out


def _kind(dtype: str) -> str:
    return "float" if dtype in FLOAT_DTYPES else dtype


def _check_compatible(field: str, specs: Mapping[str, FieldSpec]) -> None:
    """Refuse teachers whose specs of `field` cannot be merged, naming both teachers."""
    (first, ref), *others = specs.items()
    for teacher, spec in others:
        problems = []
        if spec.encoding != ref.encoding:
            problems.append("encoding (dense vs top-k, or k)")
        if spec.shape != ref.shape:
            problems.append("shape")
        if _kind(spec.dtype) != _kind(ref.dtype):
            # fp16/bf16/fp32 mix fine (merged in float32); float vs int or int32 vs int64 do not.
            problems.append("dtype")
        if spec.meaning != ref.meaning:
            problems.append("meaning")
        if spec.temperature != ref.temperature and spec.meaning != "features":
            problems.append("temperature")
        if problems:
            raise ValueError(
                f"field {field!r}: teachers {first!r} and {teacher!r} disagree on "
                f"{', '.join(problems)}: {first!r} sends {ref.describe()} T={ref.temperature}, "
                f"{teacher!r} sends {spec.describe()} T={spec.temperature}. Make the teachers "
                f"produce the same knowledge, or rename the field apart so each passes through"
            )


def _row_index(teacher: str, have: Tensor, want: Tensor) -> Tensor:
    """Positions in `have` of each id in `want` (sort + binary search, no Python loop)."""
    sorted_ids, order = torch.sort(have)
    if sorted_ids.numel() == 0:
        found = torch.zeros_like(want, dtype=torch.bool)
        pos = torch.zeros_like(want)
    else:
        pos = torch.searchsorted(sorted_ids, want).clamp(max=sorted_ids.numel() - 1)
        found = sorted_ids[pos] == want
    if not bool(found.all()):
        missing = want[~found]
        raise ValueError(
            f"teacher {teacher!r} sent no knowledge for {missing.numel()} of the {want.numel()} "
            f"requested sample ids, e.g. {missing[:10].tolist()}; re-request them from the "
            f"teacher (or a replica) before merging"
        )
    return order[pos]


def _take_jagged(t: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rows `rows` of jagged `t` as (values, offsets), gathered without a per-sample loop."""
    offsets = jagged_offsets(t)
    lengths = offsets.diff().index_select(0, rows)
    new_offsets = torch.zeros(rows.numel() + 1, dtype=offsets.dtype, device=offsets.device)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    starts = offsets[:-1].index_select(0, rows)
    # Position p of output sample i reads input position starts[i] + p: shift each output
    # offset to its input start and add the running output position.
    total = int(new_offsets[-1])
    shift = torch.repeat_interleave(starts - new_offsets[:-1], lengths, output_size=total)
    flat = shift + torch.arange(total, dtype=offsets.dtype, device=offsets.device)
    return t.values().index_select(0, flat), new_offsets


def _as_merged_dtype(t: Tensor, spec: FieldSpec, column: str) -> Tensor:
    if column.endswith(".indices") or spec.dtype not in FLOAT_DTYPES:
        return t
    return t.to(torch.float32)


def _check_result(
    field: MergedField, column: str, result: Tensor, rows: int, strategy: MergeStrategy | None
) -> None:
    """Hold a strategy (user callables especially) to the field it declared in `check`."""
    shape = (rows, *field.spec.row_shape)
    dtype = torch.int32 if column.endswith(".indices") else TORCH_DTYPES[field.spec.dtype]
    if tuple(result.shape) != shape or result.dtype != dtype:
        name = PASSTHROUGH if strategy is None else strategy.name
        raise ValueError(
            f"field {field.spec.name!r}: strategy {name!r} returned {result.dtype} "
            f"{list(result.shape)}, expected {dtype} {list(shape)} (rows first, then "
            f"{field.spec.describe()}); a callable must keep the teachers' shape and float32"
        )


class Merger:
    """Join teachers by sample id and combine each field with its strategy.

    `strategies`: our field name -> strategy: a name from `registry`, a `module:attribute`
    spec of the user's own strategy (a `MergeStrategy` class or instance, or a function),
    a `MergeStrategy` such as `Weighted(weights={...})`, or a callable
    `(list[Tensor]) -> Tensor`.
    `renames`: teacher name -> {their field name: our field name}, applied before merging
    (e.g. two teachers calling their logits `out` and `logits`).
    `registry`: the strategies known by name; `STRATEGIES`, or a copy with strategies of
    the user's own added by `register_strategy(registry, strategy)`.
    """

    def __init__(
        self,
        strategies: Mapping[str, StrategyLike],
        renames: Mapping[str, Mapping[str, str]] | None = None,
        *,
        registry: Mapping[str, MergeStrategy] = STRATEGIES,
    ) -> None:
        self.strategies: dict[str, MergeStrategy] = {
            name: resolve_strategy(name, s, registry) for name, s in strategies.items()
        }
        self.renames = {t: dict(r) for t, r in (renames or {}).items()}
        self._merged: MergedSchema | None = None
        self._schemas: dict[str, KnowledgeSchema] = {}
        self._plan: list[tuple[MergedField, MergeStrategy | None]] = []

    @property
    def merged(self) -> MergedSchema:
        """The merged schema accepted by `check`."""
        if self._merged is None:
            raise ValueError("Merger: call check(schemas) with the teachers' schemas first")
        return self._merged

    def check(self, schemas: Mapping[str, KnowledgeSchema]) -> MergedSchema:
        """Validate the teachers (name -> schema, in registration order) and plan the merge."""
        if not schemas:
            raise ValueError("Merger.check: no teachers given")
        unknown = [t for t in self.renames if t not in schemas]
        if unknown:
            raise ValueError(
                f"renames name teachers {unknown} that are not registered; teachers are "
                f"{list(schemas)}"
            )
        teachers = list(schemas)
        fields = {t: _renamed_fields(t, s, self.renames.get(t, {})) for t, s in schemas.items()}
        order: list[str] = []  # fields in order of first appearance, teachers in order
        for per_teacher in fields.values():
            order.extend(f for f in per_teacher if f not in order)
        absent = [f for f in self.strategies if f not in order]
        if absent:
            raise ValueError(
                f"strategies name fields {absent} that no teacher sends; the teachers send "
                f"{order} (after renames)"
            )
        plan: list[tuple[MergedField, MergeStrategy | None]] = []
        for name in order:
            senders = [t for t in teachers if name in fields[t]]
            specs = {t: fields[t][name][0] for t in senders}
            sources = tuple(fields[t][name][1] for t in senders)
            strategy = self.strategies.get(name)
            if strategy is None:
                if len(senders) > 1:
                    raise ValueError(
                        f"field {name!r} is sent by teachers {senders} but has no merge strategy; "
                        f"add one (e.g. strategies={{{name!r}: 'mean'}}) or rename it apart with "
                        f"renames={{{senders[1]!r}: {{{sources[1]!r}: 'another_name'}}}}"
                    )
                spec = specs[senders[0]]
                out = with_updates(spec, dtype=merged_dtype(spec))
                passthrough = MergedField(
                    spec=out, teachers=tuple(senders), sources=sources, strategy=PASSTHROUGH
                )
                plan.append((passthrough, None))
                continue
            lacking = [t for t in teachers if t not in senders]
            if lacking:
                raise ValueError(
                    f"field {name!r} has merge strategy {strategy.name!r} but teachers {lacking} "
                    f"do not send it (they send { ({t: list(fields[t]) for t in lacking}) }); map one "
                    f"of their fields onto it with renames, or leave {name!r} out of strategies "
                    f"if only one teacher sends it"
                )
            _check_compatible(name, specs)
            out = strategy.merged_spec(name, list(specs.values()), senders)
            combined = MergedField(
                spec=out, teachers=tuple(senders), sources=sources, strategy=strategy.name
            )
            plan.append((combined, strategy))
        merged = MergedSchema(teachers=tuple(teachers), fields=tuple(f for f, _ in plan))
        self._merged, self._plan, self._schemas = merged, plan, dict(schemas)
        return merged

    def merge(self, ids: Tensor, batches: Mapping[str, KnowledgeBatch]) -> dict[str, Tensor]:
        """Merged knowledge for `ids` (int64 `[B]`, the student's order), keyed by column."""
        merged = self.merged
        if ids.dim() != 1:
            raise ValueError(
                f"ids: expected a 1-d tensor of sample ids, got shape {list(ids.shape)}"
            )
        missing = [t for t in merged.teachers if t not in batches]
        extra = [t for t in batches if t not in merged.teachers]
        if missing or extra:
            raise ValueError(
                f"merge: expected batches from teachers {list(merged.teachers)}, missing "
                f"{missing}, unexpected {extra}"
            )
        want = ids.to(torch.int64)
        rows: dict[str, Tensor] = {}
        for teacher in merged.teachers:
            batch = batches[teacher]
            if batch.schema != self._schemas[teacher]:
                raise ValueError(
                    f"teacher {teacher!r} changed its knowledge schema since check(): "
                    f"{schema_difference(self._schemas[teacher], batch.schema)}"
                )
            # Each batch is joined on its own device (the CPU, where the codec decodes).
            have = batch.sample_ids
            rows[teacher] = _row_index(teacher, have, want.to(have.device))
        out: dict[str, Tensor] = {}
        for field, strategy in self._plan:
            out.update(self._merge_field(field, strategy, batches, rows, want))
        return out

    def _merge_field(
        self,
        field: MergedField,
        strategy: MergeStrategy | None,
        batches: Mapping[str, KnowledgeBatch],
        rows: Mapping[str, Tensor],
        ids: Tensor,
    ) -> dict[str, Tensor]:
        teacher_specs = [
            self._schemas[t].field(s) for t, s in zip(field.teachers, field.sources, strict=True)
        ]
        out: dict[str, Tensor] = {}
        for our_column, their_columns in zip(
            field.spec.columns,
            zip(*(spec.columns for spec in teacher_specs), strict=True),
            strict=True,
        ):
            aligned: list[Tensor] = []
            offsets: Tensor | None = None
            for teacher, spec, column in zip(
                field.teachers, teacher_specs, their_columns, strict=True
            ):
                t = batches[teacher].tensors[column]
                if spec.variable:
                    values, these = _take_jagged(t, rows[teacher])
                    if offsets is None:
                        offsets = these
                    elif not torch.equal(these, offsets):
                        differ = these.diff() != offsets.diff()
                        bad = ids.to(differ.device)[differ][:10].tolist()
                        raise ValueError(
                            f"field {field.spec.name!r}: teachers {field.teachers[0]!r} and "
                            f"{teacher!r} sent sequences of different lengths for sample ids "
                            f"{bad}; sequence knowledge must come from the same tokenisation"
                        )
                    aligned.append(_as_merged_dtype(values, spec, column))
                else:
                    aligned.append(_as_merged_dtype(t.index_select(0, rows[teacher]), spec, column))
            result = aligned[0] if strategy is None else strategy(aligned, list(field.teachers))
            _check_result(field, our_column, result, aligned[0].shape[0], strategy)
            if offsets is not None:
                result = torch.nested.nested_tensor_from_jagged(result, offsets=offsets)
            out[our_column] = result
        return out
