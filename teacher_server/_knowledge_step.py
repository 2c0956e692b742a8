"""The knowledge step of token-level fields: log-softmax, top-k and scored tokens, by chunks.

A language model's logits are `[B, T, V]`; a float32 log-softmax of all of them is another
`4 * B * T * V` bytes (at V = 128k, 4,096 tokens: 2 GiB), made only to keep `k` values of
each row. Here the real positions (padding is never computed on) are processed `chunk_rows`
at a time: each chunk is gathered, widened, normalised and reduced, so the extra memory is
one chunk's `[chunk_rows, V]` float32, whatever the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lyceum.proto.schema import FieldSpec, TopK


@dataclass(frozen=True)
class TokenStep:
    """How one per-token field is computed from the model's output at real positions."""

    spec: FieldSpec
    out_dtype: torch.dtype
    log_probs: bool
    index_dtype: torch.dtype = torch.int32


def real_rows(spans: Sequence[tuple[int, int]], width: int, device: torch.device) -> torch.Tensor:
    """Row numbers of the real positions in a `[B * width, ...]` view, sample after sample."""
    pieces = [torch.arange(i * width + a, i * width + b) for i, (a, b) in enumerate(spans)]
    return torch.cat(pieces).to(device)


def chunk_rows_for(vocab: int, chunk_bytes: int) -> int:
    """Rows per chunk so that one chunk's float32 `[rows, vocab]` fits `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * vocab))


def token_columns(
    step: TokenStep,
    output: torch.Tensor,
    rows: torch.Tensor,
    chunk_rows: int,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """Flat `[N, ...]` CPU columns of a per-token field over the `rows` of `output`."""
    flat = output.reshape(-1, *output.shape[2:])
    spec = step.spec
    if not isinstance(spec.encoding, TopK) and not step.log_probs:
        return {spec.name: flat.index_select(0, rows).to(step.out_dtype).cpu()}
    values, indices = [], []
    for lo in range(0, rows.numel(), chunk_rows):
        x = flat.index_select(0, rows[lo : lo + chunk_rows])
        if step.log_probs:
            x = torch.log_softmax(x.float() / temperature, dim=-1)
        if isinstance(spec.encoding, TopK):
            v, i = torch.topk(x, spec.encoding.k, dim=-1)
            values.append(v.to(step.out_dtype).cpu())
            indices.append(i.to(step.index_dtype).cpu())
        else:
            values.append(x.to(step.out_dtype).cpu())
    if isinstance(spec.encoding, TopK):
        return {spec.columns[0]: torch.cat(values), spec.columns[1]: torch.cat(indices)}
    return {spec.name: torch.cat(values)}


def score_column(
    output: torch.Tensor,
    rows: torch.Tensor,
    score_ids: torch.Tensor,
    chunk_rows: int,
    temperature: float,
) -> torch.Tensor:
    """`log_softmax(logits / T)` at the given token ids, `[N, S]` float32 on the CPU.

    `score_ids` is `[B, T, S]`; ids outside the vocabulary are refused (ValueError)."""
    vocab = output.shape[-1]
    flat = output.reshape(-1, vocab)
    ids = score_ids.reshape(-1, score_ids.shape[-1]).index_select(0, rows.to(score_ids.device))
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"score_ids must be token ids in [0, {vocab}), got [{int(ids.min())}, "
            f"{int(ids.max())}]; pad positions with any valid id and mask them on the student"
        )
    ids = ids.to(flat.device, torch.int64)
    out = []
    for lo in range(0, rows.numel(), chunk_rows):
        x = flat.index_select(0, rows[lo : lo + chunk_rows]).float()
        lp = torch.log_softmax(x / temperature, dim=-1)
        out.append(lp.gather(-1, ids[lo : lo + chunk_rows]).cpu())
    return torch.cat(out)


def split_rows(flat: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Per-sample views of a flat `[N, ...]` column."""
    return list(torch.split(flat, list(lengths)))
