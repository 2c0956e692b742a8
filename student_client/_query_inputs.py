"""A query's inputs as the teacher's input schema wants them, per chunk of samples.

A student passes what it has: one tensor (`[B, ...]`, or `[B, T]` padded token ids), a
list of per-sample tensors, or named tensors for a teacher that takes them
(`{"input_ids": [B, T], "attention_mask": [B, T]}`, e.g. straight from a padding collate or
`generate`; a teacher that takes `score_ids` gets the ids to score the same way). A
sequence field given as a dense `[B, T]` tensor travels as B rows of T positions: the
padding is the attention mask's to mark, and the teacher keeps its knowledge to the real
positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from lyceum.proto.schema import FieldSpec, KnowledgeSchema

QueryInputs = (
    torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor | Sequence[torch.Tensor]]
)


def _rows(value: torch.Tensor | Sequence[torch.Tensor], spec: FieldSpec) -> object:
    if isinstance(value, torch.Tensor) and spec.variable and not value.is_nested:
        return list(value.unbind())
    return value


def query_lengths(schema: KnowledgeSchema, inputs: QueryInputs) -> list[int] | None:
    """Each sample's sequence length (of the first sequence input; padded `[B, T]` inputs
    count T), or None if the teacher takes no sequences: the length of its token-level
    knowledge, which sizes the reply."""
    spec = next((f for f in schema.fields if f.variable), None)
    if spec is None:
        return None
    value = inputs.get(spec.name) if isinstance(inputs, Mapping) else inputs
    if value is None:
        return None  # query_columns names what is missing
    rows = value.unbind() if isinstance(value, torch.Tensor) else value
    return [int(r.shape[0]) for r in rows]


def query_columns(
    schema: KnowledgeSchema, inputs: QueryInputs, where: str
) -> Callable[[slice], dict[str, object]]:
    """`part -> {column: inputs of samples part}` for the codec's `encode`."""
    if isinstance(inputs, Mapping):
        names = list(schema.names)
        missing = [n for n in names if n not in inputs]
        extra = [k for k in inputs if k not in names]
        if missing or extra:
            raise ValueError(
                f"{where}: query inputs {sorted(inputs)} do not match the teacher's inputs "
                f"{names} (missing {missing}, unexpected {extra}); send exactly those"
            )
        columns = {f.name: _rows(inputs[f.name], f) for f in schema.fields}
    else:
        if len(schema.fields) != 1:
            raise ValueError(
                f"{where}: the teacher takes named inputs {list(schema.names)}: pass a dict "
                f"of tensors, not a {type(inputs).__name__}"
            )
        spec = schema.fields[0]
        columns = {spec.name: _rows(inputs, spec)}

    def part_of(part: slice) -> dict[str, object]:
        return {name: value[part] for name, value in columns.items()}  # type: ignore[index]

    return part_of
