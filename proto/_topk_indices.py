"""Top-k indices stored in as few bits as the vocabulary needs, losslessly.

A top-k field's indices are token ids (or class ids) below the field's last dimension, the
vocabulary size V. Stored as int32 they were two thirds of a language model's knowledge at
k=128 fp16. Each field's `TopK.index_bits` says how they are stored:

- 8, 16: one uint8 / uint16 per index (V <= 256, V <= 65,536);
- 32: one int32 per index (format 1.0's layout, which older dumps have);
- any other width b (e.g. 17 for a 128k vocabulary): bit-packed, each row's n indices in
  ceil(n * b / 8) bytes, index j in bits [j * b, (j + 1) * b) little-endian (bit 0 of a
  byte first), the last byte's spare bits zero.

Or, with `TopK.index_code == "elias_fano"`, each row's indices sorted ascending and
Elias-Fano coded (`ef_*` below): for n indices below V, l = floor(log2(V / n)) low bits of
each (bit-packed as above) then the high parts in unary, n + ((V - 1) >> l) + 1 bits, each
section padded to a byte. A row of k = 128 ids takes 80 bytes at V = 1,024 (fixed: 256)
and 192 at V = 128k (fixed, 17 bits: 272), near log2(C(V, k)), the least any lossless code
of an unordered set can take. The row's entries are then in ascending id order (the codec
sorts the values with them): the top-k losses sum over the entries and do not care.

A row is the unit of a list entry (one position of a sequence, or one sample), so packed
rows keep the codec's layout: a FixedSizeList per row, a LargeList of rows for sequences,
and row addressing by byte offset (`shard_rows`) unchanged. Decoding gives int32 indices:
a copy for every width but 32 (values stay zero-copy views).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

__all__ = [
    "INT32_BITS",
    "ef_decode",
    "ef_encode",
    "ef_stored_count",
    "narrowest_bits",
    "pack_indices",
    "stored_arrow_type",
    "stored_count",
    "stored_numpy_type",
    "unpack_indices",
]

INT32_BITS = 32
_NATIVE: dict[int, tuple[np.dtype, pa.DataType]] = {
    8: (np.dtype(np.uint8), pa.uint8()),
    16: (np.dtype(np.uint16), pa.uint16()),
    INT32_BITS: (np.dtype(np.int32), pa.int32()),
}


def narrowest_bits(vocab: int) -> int:
    """The index width of a vocabulary of `vocab` ids: 8 or 16 bits up to 256 / 65,536 ids,
    else the fewest bits that hold `vocab - 1` (17 for 128k), bit-packed."""
    if vocab <= 1 << 8:
        return 8
    if vocab <= 1 << 16:
        return 16
    return max(17, math.ceil(math.log2(vocab)))


def _packed_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def stored_count(count: int, bits: int) -> int:
    """How many stored items hold a row of `count` indices of `bits` each."""
    return count if bits in _NATIVE else _packed_bytes(count, bits)


def stored_numpy_type(bits: int) -> np.dtype:
    """The numpy type of the stored items (uint8 bytes for bit-packed widths)."""
    return _NATIVE[bits][0] if bits in _NATIVE else np.dtype(np.uint8)


def stored_arrow_type(bits: int) -> pa.DataType:
    """The Arrow type of the stored items."""
    return _NATIVE[bits][1] if bits in _NATIVE else pa.uint8()


def pack_indices(indices: np.ndarray, bits: int, where: str) -> np.ndarray:
    """int32 indices `[rows, count]` -> stored items `[rows, stored_count(count, bits)]`;
    raises if an index does not fit in `bits` (packing would lose it)."""
    if bits == INT32_BITS:
        return indices
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= 1 << bits):
        raise ValueError(
            f"{where}: top-k indices must be in [0, {1 << bits}) to be stored in {bits} bits, "
            f"got [{int(indices.min())}, {int(indices.max())}]"
        )
    if bits in _NATIVE:
        return indices.astype(_NATIVE[bits][0])
    return _bit_pack(indices, bits)


def _bit_pack(indices: np.ndarray, bits: int) -> np.ndarray:
    rows, count = indices.shape
    # Only the bytes that hold the `bits` low bits are unpacked.
    as_bytes = indices.astype("<u4").view(np.uint8).reshape(rows, count, 4)[:, :, : (bits + 7) // 8]
    index_bits = np.unpackbits(as_bytes, axis=2, bitorder="little")[:, :, :bits]
    return np.packbits(index_bits.reshape(rows, count * bits), axis=1, bitorder="little")


def unpack_indices(stored: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Stored items `[rows, stored_count(count, bits)]` -> int32 indices `[rows, count]` (the
    stored array itself for 32 bits)."""
    if bits == INT32_BITS:
        return stored
    if bits in _NATIVE:
        return stored.astype(np.int32)
    return _bit_unpack(stored, bits, count)


def _bit_unpack(stored: np.ndarray, bits: int, count: int) -> np.ndarray:
    rows = stored.shape[0]
    index_bits = np.unpackbits(stored, axis=1, count=count * bits, bitorder="little")
    index_bytes = np.packbits(index_bits.reshape(rows, count, bits), axis=2, bitorder="little")
    widened = np.zeros((rows, count, 4), dtype=np.uint8)
    widened[:, :, : index_bytes.shape[2]] = index_bytes
    return widened.view("<i4").reshape(rows, count)


def _ef_layout(count: int, vocab: int) -> tuple[int, int, int]:
    """(low bits per index, bytes of the low section, bits of the high section)."""
    low = max(0, (vocab // count).bit_length() - 1)
    return low, _packed_bytes(count, low), count + ((vocab - 1) >> low) + 1


def ef_stored_count(count: int, vocab: int) -> int:
    """Bytes of one Elias-Fano coded row of `count` ids below `vocab`."""
    _, low_bytes, high_bits = _ef_layout(count, vocab)
    return low_bytes + _packed_bytes(high_bits, 1)


def ef_encode(indices: np.ndarray, vocab: int, where: str) -> np.ndarray:
    """Each row of int indices `[rows, count]`, sorted ascending, as Elias-Fano bytes `[rows,
    ef_stored_count(count, vocab)]`; raises if an index is outside [0, vocab)."""
    rows, count = indices.shape
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(
            f"{where}: top-k indices must be in [0, {vocab}), got "
            f"[{int(indices.min())}, {int(indices.max())}]"
        )
    ordered = np.sort(indices.astype(np.int64), axis=1)
    low, _, high_bits = _ef_layout(count, vocab)
    high = np.zeros((rows, high_bits), dtype=np.uint8)
    # Index j's high part h_j is written as a 1 at bit h_j + j: the bits before the j-th 1
    # count h_j zeros, so the row decodes from the positions of its ones alone.
    ones = (ordered >> low) + np.arange(count)
    high[np.repeat(np.arange(rows), count), ones.reshape(-1)] = 1
    high_bytes = np.packbits(high, axis=1, bitorder="little")
    if not low:
        return high_bytes
    low_bytes = _bit_pack((ordered & ((1 << low) - 1)).astype(np.int32), low)
    return np.concatenate([low_bytes, high_bytes], axis=1)


def ef_decode(stored: np.ndarray, vocab: int, count: int) -> np.ndarray:
    """Elias-Fano bytes `[rows, ef_stored_count(count, vocab)]` -> int32 indices `[rows,
    count]`, ascending in each row; raises if a row does not hold `count` ids (corrupt)."""
    rows = stored.shape[0]
    low, low_bytes, high_bits = _ef_layout(count, vocab)
    high = np.unpackbits(stored[:, low_bytes:], axis=1, count=high_bits, bitorder="little")
    row_of, ones = np.nonzero(high)
    if ones.size != rows * count or np.any(np.bincount(row_of, minlength=rows) != count):
        raise ValueError(
            f"Elias-Fano coded top-k indices: a row does not hold {count} ids (corrupt or "
            f"forged data)"
        )
    indices = (ones.reshape(rows, count) - np.arange(count)).astype(np.int64) << low
    if low:
        indices |= _bit_unpack(np.ascontiguousarray(stored[:, :low_bytes]), low, count)
    return indices.astype(np.int32)
