"""Batches of a causal language-model student: padded or packed rows of token documents.

A dataset item is a mapping (Hugging Face style) with `input_ids` `[T]` and optionally:

- `attention_mask` `[T]`: 1 = a real token; the item's own padding (0s at the start or the
  end, as `generate` leaves it) is dropped, as the teacher drops it from its knowledge;
- `position_ids` `[T]`: the item is packed already, each restart at 0 begins a document;
- `labels` `[T]`: the targets, -100 where nothing is learnt. `labels: hf` (the default)
  reads them the Hugging Face way, aligned with `input_ids` (position t predicts
  `labels[t + 1]`); `labels: next_token` reads them as already shifted (position t
  predicts `labels[t]`). Without labels the targets are the next input ids;
- `loss_mask` `[T]`: 1 = the position's loss counts (the response), 0 = it does not (the
  prompt); applied to the task loss and to every distillation term alike.

Shifting never crosses a document: the last position of each document has no target.
`LMCollate` pads each item to its own row (`pack_tokens` None) or packs consecutive items
into rows of at most `pack_tokens` positions (an item longer than that gets a row of its
own), position ids restarting at 0 for each document, so the model can be run with
`proto.items.packed_mask` and no token attends across documents. Items are never split or
reordered: the real positions of the rows, read row by row, are the items' positions in
batch order, the order of the teachers' token-level knowledge.

Everything here is picklable and model-free: DataLoader workers collate with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "LMBatch", "LMCollate", "LabelStyle"]

IGNORE_INDEX = -100
"""A target that no loss reads (the Hugging Face and PyTorch convention)."""

LabelStyle = Literal["hf", "next_token"]
_KEYS = frozenset({"input_ids", "attention_mask", "position_ids", "labels", "loss_mask"})


@dataclass(frozen=True)
class _Item:
    ids: Tensor  # [T] the real tokens
    positions: Tensor  # [T] restarting at 0 for each document
    targets: Tensor  # [T] the token position t predicts, or IGNORE_INDEX
    counts: Tensor  # [T] bool, the loss mask


LMBatch = tuple[dict[str, Tensor], dict[str, Tensor]]
"""`(inputs, targets)` of one batch (see `LMCollate.__call__`)."""


def _tensor(item: Mapping[str, Any], key: str, index: int, length: int | None) -> Tensor | None:
    if key not in item:
        return None
    value = torch.as_tensor(item[key])
    if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex:
        raise ValueError(
            f"dataset item {index}: {key!r} must be a 1-d integer (or bool) tensor, one entry "
            f"per token; got {value.dtype} {list(value.shape)}"
        )
    if length is not None and value.numel() != length:
        raise ValueError(
            f"dataset item {index}: {key!r} has {value.numel()} entries, 'input_ids' {length}; "
            f"every per-token key needs one entry per token"
        )
    return value


def _real_span(mask: Tensor, index: int) -> slice:
    real = torch.nonzero(mask).flatten()
    if real.numel() == 0:
        raise ValueError(f"dataset item {index}: its attention_mask has no real token (all 0)")
    start, stop = int(real[0]), int(real[-1]) + 1
    if stop - start != real.numel():
        raise ValueError(
            f"dataset item {index}: its attention_mask has zeros between real tokens; padding "
            f"must be at the start or the end (pack documents with position_ids)"
        )
    return slice(start, stop)


def _shifted(source: Tensor, positions: Tensor) -> Tensor:
    """source[t + 1] where t + 1 is in t's document, else IGNORE_INDEX."""
    targets = torch.full_like(source, IGNORE_INDEX)
    if source.numel() > 1:
        same_document = positions[1:] != 0
        targets[:-1] = torch.where(
            same_document, source[1:], torch.full_like(source[1:], IGNORE_INDEX)
        )
    return targets


def _refuse_shifted_labels(ids: Tensor, labels: Tensor, index: int) -> None:
    """Labels read as Hugging Face's (`labels: hf`) that are the next input ids already would
    be shifted again: the student would learn the token two ahead, silently."""
    ahead, now = labels[:-1], ids[1:]
    learnt = ahead != IGNORE_INDEX
    if int(learnt.sum()) < 2 or torch.equal(ahead[learnt], ids[:-1][learnt]):
        return  # too few to tell, or Hugging Face's own labels (a copy of the input ids)
    if torch.equal(ahead[learnt], now[learnt]):
        raise ValueError(
            f"dataset item {index}: its labels are its input ids shifted by one already "
            f"(labels[t] == input_ids[t + 1]), but lm.labels is 'hf', which shifts them "
            f"again; set lm: {{labels: next_token}} for such labels"
        )


@dataclass(frozen=True)
class LMCollate:
    """`collate_fn` of a causal-LM student (see the module docstring).

    `labels`: how items' `labels` are read (`hf` or `next_token`). `pack_tokens`: None to pad
    each item to its own row, or the longest row of packed items.
    """

    labels: LabelStyle = "hf"
    pack_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.pack_tokens is not None and self.pack_tokens <= 0:
            raise ValueError(f"pack_tokens must be > 0 or None, got {self.pack_tokens}")

    def item(self, item: Any, index: int) -> _Item:
        """One dataset item as tokens, positions, targets and loss mask (its padding cut)."""
        if not isinstance(item, Mapping) or "input_ids" not in item:
            got = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise ValueError(
                f"dataset item {index}: task causal_lm needs mapping items with 'input_ids' "
                f"(and optionally {sorted(_KEYS - {'input_ids'})}), got {got}"
            )
        ids = _tensor(item, "input_ids", index, None)
        assert ids is not None
        if ids.numel() == 0:
            raise ValueError(f"dataset item {index}: 'input_ids' is empty")
        n = ids.numel()
        mask = _tensor(item, "attention_mask", index, n)
        span = _real_span(mask, index) if mask is not None else slice(0, n)
        given = _tensor(item, "position_ids", index, n)
        positions = given[span] if given is not None else torch.arange(span.stop - span.start)
        if positions.numel() and int(positions[0]) != 0:
            positions = positions - positions[0]  # cut left padding: the first document starts
        labels = _tensor(item, "labels", index, n)
        loss_mask = _tensor(item, "loss_mask", index, n)
        ids = ids[span].long()
        if labels is None:
            targets = _shifted(ids, positions)
        elif self.labels == "hf":
            _refuse_shifted_labels(ids, labels[span].long(), index)
            targets = _shifted(labels[span].long(), positions)
        else:
            targets = labels[span].long()
        counts = (
            loss_mask[span].bool()
            if loss_mask is not None
            else torch.ones(ids.numel(), dtype=torch.bool)
        )
        return _Item(ids, positions.long(), targets, counts)

    def rows(self, items: Sequence[_Item]) -> list[list[_Item]]:
        """Which items share a row: one each, or consecutive items up to `pack_tokens`."""
        if self.pack_tokens is None:
            return [[it] for it in items]
        rows: list[list[_Item]] = []
        used = 0
        for it in items:
            n = it.ids.numel()
            if rows and used + n <= self.pack_tokens:
                rows[-1].append(it)
                used += n
            else:
                rows.append([it])
                used = n
        return rows

    def __call__(self, batch: Sequence[Any]) -> LMBatch:
        """`(inputs, targets)`: inputs `input_ids`, `attention_mask` (1 = real) and, for
        packed rows, `position_ids`, all `[R, L]`; targets `labels` `[R, L]` (IGNORE_INDEX on padding), `loss_mask` `[R, L]`
        bool, `lengths` `[B]` (each item's real tokens, the length its knowledge must have)
        and `packed` (a 0-d bool: rows hold documents that must not see each other)."""
        items = [self.item(it, i) for i, it in enumerate(batch)]
        rows = self.rows(items)
        width = max(sum(it.ids.numel() for it in row) for row in rows)
        shape = (len(rows), width)
        ids = torch.zeros(shape, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        counts = torch.zeros(shape, dtype=torch.bool)
        real = torch.zeros(shape, dtype=torch.long)
        for r, row in enumerate(rows):
            n = sum(it.ids.numel() for it in row)
            ids[r, :n] = torch.cat([it.ids for it in row])
            positions[r, :n] = torch.cat([it.positions for it in row])
            targets[r, :n] = torch.cat([it.targets for it in row])
            counts[r, :n] = torch.cat([it.counts for it in row])
            real[r, :n] = 1
        documents = any(bool((it.positions[1:] == 0).any()) for it in items)
        packed = documents or any(len(row) > 1 for row in rows)
        inputs = {"input_ids": ids, "attention_mask": real}
        if packed:
            # Only then: a query-mode teacher is sent these inputs, and its input schema
            # (learnt from the dataset's items) has position ids only for packed items.
            inputs["position_ids"] = positions
        return inputs, {
            "labels": targets,
            "loss_mask": counts,
            "lengths": torch.tensor([it.ids.numel() for it in items], dtype=torch.long),
            "packed": torch.tensor(packed),
        }
