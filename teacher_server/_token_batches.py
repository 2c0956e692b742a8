"""Token-budget batching: batches bounded by padded tokens, of sequences of similar length.

A batch of sequences costs its padded size, `samples x longest`, in compute and memory,
whatever its real tokens. Counting samples (`--batch-size 8`) let one long sequence pad
seven short ones: 440 positions computed for 276 real ones. Here a window of consecutive ids
is sorted by length and cut into batches whose padded size stays within `max_tokens`
(padding counted), so each batch holds sequences of similar length and a budget sized for
memory is filled. Results come back in batch order; `in_id_order` restores the id order a
shard is written in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lyceum.teacher_server._writer import Columns


@dataclass(frozen=True)
class Plan:
    """Batches of ids for one window (a run of consecutive ids), and their padded tokens."""

    batches: list[list[int]]
    real_tokens: int
    padded_tokens: int


def plan_window(
    ids: Sequence[int],
    lengths: Sequence[int],
    max_tokens: int,
    max_samples: int,
    max_waste: float = 0.1,
) -> Plan:
    """Batches of `ids` (with their `lengths`) by length, each within `max_tokens` padded
    tokens and `max_samples` samples, and starting a new batch rather than padding more than
    `max_waste` of one; a sequence longer than the budget is a batch alone."""
    order = sorted(range(len(ids)), key=lambda j: (lengths[j], j))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = padded = real = 0
    for j in order:
        n = lengths[j]
        # Sorted ascending: this sequence is the batch's longest if it joins.
        size = (len(current) + 1) * n
        full = size > max_tokens or len(current) == max_samples
        if current and (full or 1 - (real + n) / size > max_waste):
            batches.append(current)
            padded += len(current) * longest
            current, real = [], 0
        current.append(ids[j])
        longest, real = n, real + n
    if current:
        batches.append(current)
        padded += len(current) * longest
    return Plan(batches=batches, real_tokens=sum(lengths), padded_tokens=padded)


def padded_size(lengths: Sequence[int]) -> int:
    """Positions a batch of these sequences computes: samples x the longest."""
    return len(lengths) * max(lengths, default=0)


def in_id_order(parts: Sequence[tuple[torch.Tensor, Columns]]) -> tuple[torch.Tensor, Columns]:
    """The rows of several batches' knowledge, sorted by sample id (one window's batches)."""
    ids = torch.cat([p[0] for p in parts])
    order = torch.argsort(ids)
    columns: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    for name in parts[0][1]:
        pieces = [p[1][name] for p in parts]
        if isinstance(pieces[0], torch.Tensor):
            columns[name] = torch.cat(pieces)[order]  # type: ignore[arg-type]
        else:
            rows = [row for piece in pieces for row in piece]
            columns[name] = [rows[i] for i in order.tolist()]
    return ids[order], columns


def token_shard_starts(lengths: Sequence[int], max_tokens: int, max_rows: int) -> tuple[int, ...]:
    """The first id of each shard when shards are sized in tokens: consecutive ids while
    their `lengths` sum to at most `max_tokens` and they are at most `max_rows`; a sample
    longer than `max_tokens` is a shard alone."""
    starts = [0]
    tokens = rows = 0
    for i, n in enumerate(lengths):
        if rows and (tokens + n > max_tokens or rows >= max_rows):
            starts.append(i)
            tokens = rows = 0
        tokens, rows = tokens + n, rows + 1
    return tuple(starts)
