"""Bring student outputs and teacher knowledge to the same rows of positions.

Token-level knowledge arrives from the codec as `torch.nested` jagged tensors `[B, j, ...]`
(values `[sum_j, ...]` plus offsets), while a student usually produces padded `[B, T, ...]`
outputs (or jagged ones, if it runs on jagged inputs). Distillation losses only care about
the positions that exist, so every logit and feature loss first flattens all its inputs to
`[N, ...]`, N being the positions that count, in the same row-major (sample, position) order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _describe(t: Tensor) -> str:
    if t.is_nested:
        return f"jagged {list(t.shape[:1])} + [j, {', '.join(str(d) for d in t.shape[2:])}]"
    return f"{list(t.shape)}"


def jagged_offsets(t: Tensor) -> Tensor:
    """Offsets `[B + 1]` of a `torch.jagged` nested tensor."""
    # The jagged NestedTensor subclass has offsets(); torch's Tensor stubs do not list it.
    return t.offsets()  # type: ignore[attr-defined,no-any-return]


def _padded_keep(t: Tensor, lengths: Tensor, what: str) -> Tensor:
    """Bool [B, T] marking the positions of padded `t` that exist in the jagged reference."""
    if t.dim() < 2 or t.shape[0] != lengths.numel():
        raise ValueError(
            f"{what}: expected a padded [B={lengths.numel()}, T, ...] tensor to match the jagged "
            f"knowledge, got {_describe(t)}"
        )
    longest = int(lengths.max()) if lengths.numel() else 0
    if t.shape[1] < longest:
        raise ValueError(
            f"{what}: padded length {t.shape[1]} is shorter than the longest sequence {longest} "
            f"in the knowledge; the student must cover every position the teacher saw"
        )
    steps = torch.arange(t.shape[1], device=lengths.device)
    return steps.unsqueeze(0) < lengths.unsqueeze(1)


def flatten_positions(
    student: Tensor, teachers: Sequence[Tensor], mask: Tensor | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Flatten `student` and `teachers` to `[N, last_dim]` rows over the positions that count.

    - All dense: every dim but the last is a position dim; the leading dims must agree
      (the last dims may differ, e.g. vocabulary vs top-k). `mask` (bool, True = keep) has
      the leading shape, e.g. `[B]` or `[B, T]`.
    - Any jagged `[B, j, ...]`: the sequence lengths come from the jagged tensors (which must
      share them); dense tensors are read as padded `[B, T >= j, ...]` and their padding is
      dropped. `mask` may be jagged `[B, j]` or padded `[B, T]`.
    Extra dims between the positions and the last dim (e.g. `[B, j, H, C]`) become rows too.
    """
    tensors = [student, *teachers]
    jagged = [t for t in tensors if t.is_nested]
    if not jagged:
        lead = student.shape[:-1]
        for t in teachers:
            if t.shape[:-1] != lead:
                raise ValueError(
                    f"student {_describe(student)} and teacher {_describe(t)} disagree on the "
                    f"leading (batch/position) dims; only the last dim may differ"
                )
        keep_rows = None
        if mask is not None:
            if mask.shape != lead:
                raise ValueError(
                    f"mask {list(mask.shape)} must have the leading shape {list(lead)} of the "
                    f"student {_describe(student)}"
                )
            keep_rows = mask.reshape(-1).to(torch.bool)
        rows = [t.reshape(-1, t.shape[-1]) for t in tensors]
        if keep_rows is not None:
            rows = [r[keep_rows] for r in rows]
        return rows[0], rows[1:]

    offsets = jagged_offsets(jagged[0])
    for t in jagged[1:]:
        if not torch.equal(jagged_offsets(t), offsets):
            raise ValueError(
                "student and teacher jagged tensors have different sequence lengths "
                f"({jagged_offsets(jagged[0]).diff().tolist()} vs {jagged_offsets(t).diff().tolist()}); "
                "the knowledge must come from the same tokenisation as the student's inputs"
            )
    lengths = offsets.diff()
    names = ["student", *(f"teacher[{i}]" for i in range(len(teachers)))]
    positions: list[Tensor] = []
    for name, t in zip(names, tensors, strict=True):
        if t.is_nested:
            positions.append(t.values())
        else:
            positions.append(t[_padded_keep(t, lengths, name)])
    if mask is not None:
        if mask.is_nested:
            if not torch.equal(jagged_offsets(mask), offsets):
                raise ValueError(
                    "mask: jagged mask has different sequence lengths than the knowledge"
                )
            keep = mask.values()
        else:
            keep = mask[_padded_keep(mask, lengths, "mask")]
        keep = keep.to(torch.bool)
        positions = [p[keep] for p in positions]
    for name, p in zip(names[1:], positions[1:], strict=True):
        if p.shape[1:-1] != positions[0].shape[1:-1]:
            raise ValueError(
                f"{name} has per-position shape {list(p.shape[1:])}, the student "
                f"{list(positions[0].shape[1:])}; only the last dim may differ"
            )
    rows = [p.reshape(-1, p.shape[-1]) for p in positions]
    return rows[0], rows[1:]
