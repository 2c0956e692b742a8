"""The dataset fingerprint: which dataset the sample ids of some knowledge index.

Its length plus a sha256 over the raw bytes of some or all of its items' inputs (scope
`inputs`, what the teacher sees: the same token inputs with other labels are the same dataset
to a teacher). Fingerprints written before scopes existed hashed inputs and labels (scope
`items`); they are recomputed that way, so older dumps still verify.
Coverage and its trade-off (64 sampled items, or every item with `--fingerprint full`) are
described in `lyceum.proto.manifest`, whose `dataset` field holds it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from lyceum.proto.display import Progress
from lyceum.proto.items import item_inputs

FINGERPRINT_SAMPLES = 64
"""Items hashed by a `sampled` dataset fingerprint (see `lyceum.proto.manifest`)."""

Coverage = Literal["sampled", "full"]
Scope = Literal["inputs", "items"]

log = logging.getLogger(__name__)


class DatasetFingerprint(BaseModel):
    """Length of a dataset plus a hash of some or all of its items (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    length: int = Field(ge=0, description="len(dataset): the sample ids are 0..length-1.")
    samples: int = Field(
        ge=0,
        description="How many items the fingerprint hashed, evenly spaced over the dataset "
        "(first and last included): `length` for a full fingerprint, else min(length, 64). "
        "A reader hashes the same items of its dataset; items not hashed are not compared.",
    )
    sha256: str = Field(description="sha256 over the raw bytes of those items (see scope).")
    scope: Scope = Field(
        default="items",
        description="What of each item was hashed: 'inputs' (the teacher's inputs, "
        "lyceum.proto.items.item_inputs), or 'items' (inputs and labels: fingerprints "
        "written before this field, the default when it is absent).",
    )

    @property
    def coverage(self) -> Coverage:
        """`full` when every item was hashed (any difference is caught), else `sampled`."""
        return "full" if self.samples >= self.length else "sampled"

    def describe_coverage(self) -> str:
        """What the fingerprint hashed, and so what a reader's check can and cannot see."""
        if self.coverage == "full":
            # 64 samples or fewer: `sampled` hashes every one too.
            flag = " (--fingerprint full)" if self.length > FINGERPRINT_SAMPLES else ""
            return f"every one of the {self.length:,} samples{flag}"
        return (
            f"{self.samples:,} of {self.length:,} samples, evenly spaced (--fingerprint "
            f"sampled: a dataset that differs only in the others is accepted)"
        )


def tensor_bytes(t: torch.Tensor) -> bytes:
    """dtype, shape and value bytes of a tensor: what a fingerprint or a weight hash covers."""
    header, values = _tensor_parts(t)
    return header + values.tobytes()


def hash_tensor(digest: Any, t: torch.Tensor) -> None:
    """`digest.update(tensor_bytes(t))` without copying the values: a teacher's weights are
    gigabytes, and the copy made hashing them ~3x slower than sha256 itself."""
    header, values = _tensor_parts(t)
    digest.update(header)
    digest.update(values)


def _tensor_parts(t: torch.Tensor) -> tuple[bytes, np.ndarray]:
    t = t.detach().cpu().contiguous().reshape(-1)
    # A byte view works for every dtype (bfloat16 included), unlike .numpy().
    return f"{t.dtype}{list(t.shape)}".encode(), t.view(torch.uint8).numpy()


def _value_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, torch.Tensor):
        return b"T" + tensor_bytes(value)
    if isinstance(value, np.ndarray):
        return b"N" + f"{value.dtype}{list(value.shape)}".encode() + value.tobytes()
    if isinstance(value, bool | int | float | np.generic):
        return b"S" + repr(value.item() if isinstance(value, np.generic) else value).encode()
    if isinstance(value, tuple | list):
        return b"L" + b"".join(_value_bytes(v, where) for v in value)
    if isinstance(value, Mapping):
        return b"D" + b"".join(
            repr(str(k)).encode() + _value_bytes(value[k], where) for k in sorted(value)
        )
    raise ValueError(
        f"{where}: cannot fingerprint a {type(value).__name__}; dataset items must be "
        f"(input, label) of tensors, numpy arrays or numbers"
    )


def fingerprint_indices(length: int, samples: int = FINGERPRINT_SAMPLES) -> list[int]:
    """`samples` evenly spaced ids in [0, length), first and last included."""
    if length <= samples:
        return list(range(length))
    return sorted({int(i) for i in np.linspace(0, length - 1, samples).round()})


def coverage_samples(coverage: Coverage, length: int) -> int:
    """How many items a fingerprint of `coverage` hashes in a dataset of `length`."""
    return length if coverage == "full" else FINGERPRINT_SAMPLES


def dataset_fingerprint(
    dataset: torch.utils.data.Dataset,
    samples: int = FINGERPRINT_SAMPLES,
    progress: bool = True,
    scope: Scope = "inputs",
) -> DatasetFingerprint:
    """Fingerprint a map-style dataset of `(input, label)` or mapping items (see the module
    docstring).

    `samples >= len(dataset)` hashes every item; a pass that long reports its progress
    (`Progress`) unless `progress=False`."""
    length = len(dataset)  # type: ignore[arg-type]  # map-style datasets define __len__
    digest = hashlib.sha256(f"lyceum.dataset length={length}".encode())
    indices = fingerprint_indices(length, samples)
    shown = progress and len(indices) > FINGERPRINT_SAMPLES
    with Progress(len(indices), "dataset fingerprint", "samples", enabled=shown, log=log) as bar:
        for i in indices:
            item = dataset[i]
            digest.update(f"item {i}".encode())
            hashed = item_inputs(item) if scope == "inputs" else tuple(item[:2])
            digest.update(_value_bytes(hashed, where=f"dataset item {i}"))
            bar.update(1)
    return DatasetFingerprint(
        length=length, samples=len(indices), sha256=digest.hexdigest(), scope=scope
    )


def verify_dataset(
    expected: DatasetFingerprint, dataset: torch.utils.data.Dataset, where: str, fix: str
) -> None:
    """Raise unless `dataset` has the fingerprint `expected` (recomputed with its coverage).

    `where` names the knowledge (a dump directory, a teacher endpoint); `fix` is the sentence
    that tells the user what to do about a mismatch.
    """
    length = len(dataset)  # type: ignore[arg-type]  # map-style datasets define __len__
    if length == 0:
        raise ValueError(
            f"{where}: the student's dataset is empty (0 samples), the knowledge covers "
            f"{expected.length}; check the dataset spec and its arguments (split, path)"
        )
    got = dataset_fingerprint(dataset, expected.samples, scope=expected.scope)
    if got != expected:
        hashed = "every sample" if expected.coverage == "full" else f"{expected.samples} samples"
        raise ValueError(
            f"{where}: the knowledge comes from a different dataset ({expected.length} samples, "
            f"fingerprint {expected.sha256[:16]}) than the student's ({got.length} samples, "
            f"fingerprint {got.sha256[:16]}, {hashed} hashed); sample ids would not match. {fix}"
        )
