"""Channel importance: which channels of a coupling group go first ('l1', 'l2', 'fpgm').

Scores come from Torch-Pruning's group importances over every layer coupled to a channel
(the producer's filters, the consumers' input slices, batch norms), without normalisation so
that scores of different groups' roots can be averaged into one unit (an attention head, the
same position of every conv group).
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp

from lyceum.compression.pruning.config import Criterion

__all__ = ["group_scores"]


def _scorer(criterion: Criterion) -> tp.importance.Importance:
    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if criterion == "fpgm":
        return tp.importance.FPGMImportance(p=2, normalizer=None)
    raise ValueError(f"unknown criterion {criterion!r}; use 'l1', 'l2' or 'fpgm'")


def group_scores(group: Any, channels: int, criterion: Criterion, name: str) -> torch.Tensor:
    """One score per root channel of Torch-Pruning `group` (higher = more important)."""
    with torch.no_grad():
        scores = _scorer(criterion)(group)
    if scores is None or len(scores) != channels:
        raise ValueError(f"group {name!r}: importance {criterion!r} gave no scores")
    return scores.detach().float()
