"""What a dataset item holds: the teacher's inputs, and what only the student uses.

Two item forms are read everywhere (dump, index mode, fingerprints):

- `(input, label, ...)`: a tuple whose first element is the input (a tensor, or a mapping
  of named tensors);
- a mapping of named tensors, Hugging Face style (`{"input_ids", "attention_mask",
  "labels"}`): every key but the student's targets (`LABEL_KEYS`) is an input, passed to
  the model's forward by name.

An item with `position_ids` is packed: each restart at 0 begins a document, and the teacher
and the student both run it with `packed_mask`, so no token attends across documents.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["LABEL_KEYS", "SCORE_KEY", "item_inputs", "packed_mask"]

LABEL_KEYS = frozenset({"labels", "label", "loss_mask"})
"""Keys of a mapping item that are the student's targets, not the teacher's inputs."""

SCORE_KEY = "score_ids"
"""Input key of the token ids to score per position (`log p_teacher(token)`), which the
teacher engine consumes instead of passing to the model."""


def item_inputs(item: Any) -> torch.Tensor | dict[str, Any]:
    """The teacher's input of a dataset item: `item[0]` of a tuple, the mapping without
    `LABEL_KEYS` of a mapping item; a bare tensor is its own input."""
    # Tuples first, and a tensor inside one at once: this runs per sample of every index-mode
    # request, and `isinstance(x, Mapping)` is an ABC check, several times the cost.
    if isinstance(item, tuple | list):
        first = item[0]
        if isinstance(first, torch.Tensor):
            return first
        if isinstance(first, Mapping):
            return {str(k): v for k, v in first.items()}
        return first
    if isinstance(item, Mapping):
        return {str(k): v for k, v in item.items() if k not in LABEL_KEYS}
    return item


def packed_mask(
    positions: torch.Tensor, key_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """An additive `[B, 1, T, T]` mask (0 attend, dtype's min elsewhere): causal, within each
    document (a restart of `positions` at 0 begins one), never to padded keys."""
    documents = (positions == 0).long().cumsum(-1)
    same = documents[:, :, None] == documents[:, None, :]
    width = positions.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=positions.device).tril()
    allowed = same & causal
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, :]
    # A padded query row with nothing allowed attends to itself: its output is dropped, and
    # a row of only -inf would be NaN in some attention kernels.
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=positions.device)
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=positions.device)
    return torch.where(allowed, zero, low)[:, None]
