"""Top-k values in 8 bits: one byte per value, with a per-row offset and scale.

At k = 128 a language model's fp16 top-k values are 256 bytes a position; in 8 bits, 132.
Each row (the k values of one position) is coded on its own, so a row of log-probs that
spans [-3, 0] keeps the resolution of that span, not of the whole vocabulary's:

- `offset`: the row's largest finite value, rounded up to float16; `scale`: (offset - the
  row's smallest finite value) / 254, rounded up to float16 (0 for a row of equal values);
- each finite value v is stored as the code q = round((offset - v) / scale), 0..254, and
  read back as offset - q * scale; code 255 is -inf (a masked logit, log p = 0).

A stored row is `[offset: float16 LE][scale: float16 LE][k codes]`, k + 4 bytes.

The error bound, for every finite value v of a row: |decoded - v| <= scale / 2 (plus
float32 rounding), where scale <= (max - min + ulp16(max)) / 254 * (1 + 2**-10) + 2**-24
(`error_bound`); so about (max - min) / 508, in float32 before
the decoded value is cast to the field's dtype (which adds that dtype's own rounding). NaN,
+inf and finite values beyond float16's range are refused: no code holds them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["VALUE_BITS", "decode_values", "encode_values", "error_bound", "stored_value_count"]

VALUE_BITS = 8
_NEG_INF = 255
_STEPS = _NEG_INF - 1
_HEADER = 4  # offset and scale, float16 each


def stored_value_count(k: int) -> int:
    """Bytes of one stored row of k values."""
    return k + _HEADER


def _round_up_f16(x: np.ndarray) -> np.ndarray:
    """The smallest float16 >= each float32 of `x` (x finite and within float16's range)."""
    h = x.astype(np.float16)
    low = h.astype(np.float32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _row_range(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(finite mask, per-row max, per-row min) of the finite values (0, 0 for a row of -inf)."""
    finite = np.isfinite(values)
    any_finite = finite.any(axis=1)
    hi = np.where(finite, values, -np.inf).max(axis=1, initial=-np.inf)
    lo = np.where(finite, values, np.inf).min(axis=1, initial=np.inf)
    return finite, np.where(any_finite, hi, 0.0), np.where(any_finite, lo, 0.0)


def encode_values(values: np.ndarray, where: str) -> np.ndarray:
    """Float values `[rows, k]` -> stored bytes `[rows, k + 4]`; raises naming `where` for
    NaN, +inf or finite values float16 cannot hold."""
    values = values.astype(np.float32, copy=False)
    rows = values.shape[0]
    if np.isnan(values).any() or np.isposinf(values).any():
        raise ValueError(
            f"{where}: 8-bit top-k values must be finite or -inf, got NaN or +inf; store the "
            f"values in the field's float dtype (--topk-values float)"
        )
    finite, hi, lo = _row_range(values)
    limit = float(np.finfo(np.float16).max)
    if rows and (np.abs(hi).max() > limit or np.abs(lo).max() > limit):
        raise ValueError(
            f"{where}: 8-bit top-k values must be within float16's range (+-{limit:g}), got "
            f"[{float(lo.min()):g}, {float(hi.max()):g}]; store them as floats "
            f"(--topk-values float)"
        )
    offset = _round_up_f16(hi)
    span = (offset.astype(np.float32) - lo) / _STEPS
    scale = _round_up_f16(span.astype(np.float32))
    step = scale.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.rint((offset.astype(np.float32)[:, None] - values) / step), 0)
    codes = np.where(finite, np.clip(q, 0, _STEPS), _NEG_INF).astype(np.uint8)
    header = np.stack([offset, scale], axis=1).astype("<f2").view(np.uint8)
    return np.concatenate([header.reshape(rows, _HEADER), codes], axis=1)


def decode_values(stored: np.ndarray, k: int) -> np.ndarray:
    """Stored bytes `[rows, k + 4]` -> float32 values `[rows, k]`."""
    rows = stored.shape[0]
    header = np.ascontiguousarray(stored[:, :_HEADER]).view("<f2").astype(np.float32)
    offset, scale = header[:, :1], header[:, 1:2]
    codes = stored[:, _HEADER : _HEADER + k]
    values = offset - codes.astype(np.float32) * scale
    values[codes == _NEG_INF] = -np.inf
    return values.reshape(rows, k)


def error_bound(values: np.ndarray) -> np.ndarray:
    """Per row of float values `[rows, k]`, the most any finite value can be off after a
    round trip through `encode_values` (before the cast to the field's dtype)."""
    _, hi, lo = _row_range(values.astype(np.float32, copy=False))
    ulp = np.spacing(np.abs(hi).astype(np.float16)).astype(np.float32)
    # float16 rounds the scale up by at most 2**-10 of it, or 2**-24 where it is subnormal;
    # float32 arithmetic in decoding adds at most 2**-23 of the offset.
    scale = (hi - lo + ulp) / _STEPS * (1 + 2**-10) + 2**-24
    return scale / 2 + (np.abs(hi) + ulp) * 2**-23
