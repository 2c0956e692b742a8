"""`--store-inputs`: a dump that keeps its inputs, so a student needs nothing else.

The stored inputs are fields of the dump's knowledge schema after the teacher's own, and the
manifest names them (`Manifest.stored_inputs`), so readers keep them apart from the
knowledge (`OfflineKnowledge.inputs`). They are what the teacher saw of each sample:

- a token sequence (`[T]` integers): field `input`, the sample's tokens;
- named tensors: a field per input the sample gives, under its own name (`input_ids`,
  `position_ids`, ...), except `attention_mask` (every stored position is real) and
  `score_ids` (what was scored is the knowledge's business);
- a fixed-shape tensor: field `input`, as it is.

Per-token inputs keep the sample's real positions only (mask 1), one row per row of the
knowledge, so a left- or right-padded sample's stored ids are its tokens without the padding
and a packed sample's position ids still mark where each document starts. Lengths are the
sequence field's own (its list offsets).
"""

from __future__ import annotations

import torch

from lyceum.proto.items import SCORE_KEY
from lyceum.proto.schema import FieldSpec, KnowledgeSchema
from lyceum.teacher_server._inputs import INPUT_FIELD, MASK_KEY, InputBatch

_NOT_STORED = frozenset({MASK_KEY, SCORE_KEY})


def stored_input_fields(
    input_schema: KnowledgeSchema, knowledge: KnowledgeSchema
) -> tuple[FieldSpec, ...]:
    """The fields the stored inputs take in a dump of `knowledge`; raises naming a clash."""
    fields = tuple(f for f in input_schema.fields if f.name not in _NOT_STORED)
    clash = [f.name for f in fields if f.name in knowledge.names]
    if clash:
        raise ValueError(
            f"--store-inputs: the inputs {clash} have the names of knowledge fields; rename "
            f"those --output fields (e.g. --output teacher_{clash[0]}=...)"
        )
    return fields


def with_stored_inputs(
    knowledge: KnowledgeSchema, fields: tuple[FieldSpec, ...]
) -> KnowledgeSchema:
    """The dump's schema: the knowledge fields, then the stored inputs'."""
    return knowledge.model_copy(update={"fields": (*knowledge.fields, *fields)})


def input_columns(
    batch: InputBatch, fields: tuple[FieldSpec, ...]
) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The stored-input columns of a collated batch, one entry per sample (its real
    positions for per-token inputs)."""
    inputs = batch.model_inputs
    columns: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    for f in fields:
        if isinstance(inputs, torch.Tensor):
            if f.name != INPUT_FIELD:  # the input schema of a tensor sample names only it
                raise ValueError(f"no input {f.name!r} in a batch of plain tensors")
            t = inputs
        else:
            # Only inputs the samples give are stored: position ids derived from a mask
            # never are (the input schema does not name them).
            t = inputs[f.name]
        t = t.cpu()
        if f.variable and batch.spans is not None:
            columns[f.name] = [t[i, a:b] for i, (a, b) in enumerate(batch.spans)]
        else:
            columns[f.name] = t
    return columns
