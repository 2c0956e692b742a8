"""The offline knowledge manifest: what a dump directory holds, shared by writer and reader.

A dump directory holds Arrow IPC files `shard-NNNNN.arrow` and `manifest.json`. Shard k covers
the sample ids `[k * shard_rows, min((k + 1) * shard_rows, length))`. The manifest names the
knowledge schema, the teacher (model spec, checkpoint and weight hashes) and the dataset
(a fingerprint), and lists the complete shards only: the writer rewrites it atomically after
each shard lands, so a reader or a resumed dump never trusts a half-written file.

The dataset fingerprint is what stops the failure Pantheon had: knowledge dumped from one
dataset silently joined to another. It is the dataset's length plus a hash of the raw bytes of
~64 evenly spaced items (input and label), cheap to compute on open and sensitive to a
different split, order or preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from lyceum.proto.schema import KnowledgeSchema

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = "1.0"
"""Major.minor of the manifest format. Readers refuse other majors."""

FINGERPRINT_SAMPLES = 64


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


class ModelIdentity(BaseModel):
    """Which teacher produced the knowledge; a resumed dump must come from the same one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str = Field(description="Model spec string (`module:callable{kwargs}`) or a name.")
    checkpoint_sha256: str | None = Field(
        default=None, description="sha256 of the checkpoint file, if one was loaded."
    )
    weights_sha256: str = Field(
        description="sha256 of the model's state dict (names, dtypes, shapes, bytes): catches "
        "randomly initialised or in-process-trained weights that no checkpoint names."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Free-form descriptions given by the caller."
    )

    def difference(self, other: ModelIdentity) -> str | None:
        """How `other` differs from this identity, or None if it is the same teacher."""
        for name in ("spec", "checkpoint_sha256", "weights_sha256", "labels"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"model {name}: the directory has {mine!r}, this run has {theirs!r}"
        return None


class DatasetFingerprint(BaseModel):
    """Length of a dataset plus a hash of a deterministic sample of its items."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    length: int = Field(ge=0, description="len(dataset): the sample ids are 0..length-1.")
    samples: int = Field(ge=0, description="How many evenly spaced items were hashed.")
    sha256: str = Field(description="sha256 over the raw bytes of those items' inputs and labels.")


class ShardInfo(BaseModel):
    """One complete shard file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, description="Shard number k; covers ids [start, stop).")
    file: str = Field(description="File name inside the dump directory.")
    start: int = Field(ge=0, description="First sample id in the shard.")
    stop: int = Field(ge=0, description="One past the last sample id in the shard.")
    rows: int = Field(gt=0, description="Number of samples (stop - start).")
    bytes: int = Field(gt=0, description="File size in bytes.")
    sha256: str = Field(description="sha256 of the whole file.")

    @model_validator(mode="after")
    def _check_rows(self) -> ShardInfo:
        if self.rows != self.stop - self.start:
            raise ValueError(
                f"shard {self.file!r}: rows {self.rows} != stop - start = {self.stop - self.start}"
            )
        return self


class Manifest(BaseModel):
    """The description of a dump directory (`manifest.json`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: str = Field(default=MANIFEST_VERSION, description="Manifest format version.")
    knowledge_schema: KnowledgeSchema = Field(description="The knowledge fields in every shard.")
    model: ModelIdentity = Field(description="The teacher that produced the knowledge.")
    dataset: DatasetFingerprint = Field(description="The dataset the sample ids index.")
    shard_rows: int = Field(gt=0, description="Samples per shard (the last may hold fewer).")
    shards: tuple[ShardInfo, ...] = Field(default=(), description="Complete shards, by index.")

    @model_validator(mode="after")
    def _check_shards(self) -> Manifest:
        check_manifest_version(self.format_version)
        seen: set[int] = set()
        for s in self.shards:
            start, stop = self.shard_range(s.index)
            if s.index in seen or (s.start, s.stop) != (start, stop):
                raise ValueError(
                    f"manifest: shard {s.file!r} (index {s.index}) covers ids [{s.start}, "
                    f"{s.stop}); with shard_rows {self.shard_rows} and {self.dataset.length} "
                    f"samples it must cover [{start}, {stop}) and appear once"
                )
            seen.add(s.index)
        return self

    @property
    def num_shards(self) -> int:
        return -(-self.dataset.length // self.shard_rows)

    def shard_range(self, index: int) -> tuple[int, int]:
        """The ids `[start, stop)` shard `index` covers."""
        if not 0 <= index < self.num_shards:
            raise ValueError(
                f"shard index {index} is outside [0, {self.num_shards}) for "
                f"{self.dataset.length} samples of {self.shard_rows} per shard"
            )
        start = index * self.shard_rows
        return start, min(start + self.shard_rows, self.dataset.length)

    @property
    def rows(self) -> int:
        """Samples held by complete shards."""
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def complete(self) -> bool:
        return self.rows == self.dataset.length

    def missing_shards(self) -> list[int]:
        done = {s.index for s in self.shards}
        return [k for k in range(self.num_shards) if k not in done]

    def incompatibility(self, other: Manifest) -> str | None:
        """Why a dump described by `other` may not continue this one, or None if it may."""
        model = self.model.difference(other.model)
        if model:
            return model
        if self.knowledge_schema != other.knowledge_schema:
            return (
                f"knowledge schema: the directory has "
                f"{[f.describe() for f in self.knowledge_schema.fields]}, this run has "
                f"{[f.describe() for f in other.knowledge_schema.fields]}"
            )
        if self.dataset != other.dataset:
            return (
                f"dataset: the directory has {self.dataset.length} samples with fingerprint "
                f"{self.dataset.sha256[:16]}, this run has {other.dataset.length} samples with "
                f"fingerprint {other.dataset.sha256[:16]}"
            )
        if self.shard_rows != other.shard_rows:
            return (
                f"shard rows: the directory has {self.shard_rows}, this run has {other.shard_rows}"
            )
        return None

    def write(self, directory: str | Path) -> None:
        """Write `manifest.json` atomically: temp file, fsync, rename, fsync the directory."""
        directory = Path(directory)
        tmp = directory / (MANIFEST_NAME + ".tmp")
        data = self.model_dump_json(indent=1).encode()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST_NAME)
        fsync_directory(directory)

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """Read and validate `DIR/manifest.json`; refuses unknown major format versions."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ValueError(
                f"{str(directory)!r} has no {MANIFEST_NAME}: it is not a Lyceum knowledge "
                f"directory (write one with `lyceum teacher dump`)"
            )
        try:
            raw = json.loads(path.read_bytes())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from exc
        if isinstance(raw, dict):
            check_manifest_version(str(raw.get("format_version", "")))
        return cls.model_validate(raw)


def check_manifest_version(version: str) -> None:
    major = MANIFEST_VERSION.split(".")[0]
    if version.split(".")[0] != major:
        raise ValueError(
            f"knowledge manifest: unknown format version {version!r}; this Lyceum reads "
            f"{major}.x (manifest {MANIFEST_VERSION}). Upgrade Lyceum or re-dump the knowledge."
        )


def fsync_directory(directory: str | Path) -> None:
    """Make renames inside `directory` durable (a rename is a directory-entry write)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    # A byte view works for every dtype (bfloat16 included), unlike .numpy().
    return f"{t.dtype}{list(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes()


def _value_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, torch.Tensor):
        return b"T" + _tensor_bytes(value)
    if isinstance(value, np.ndarray):
        return b"N" + f"{value.dtype}{list(value.shape)}".encode() + value.tobytes()
    if isinstance(value, bool | int | float | np.generic):
        return b"S" + repr(value.item() if isinstance(value, np.generic) else value).encode()
    if isinstance(value, tuple | list):
        return b"L" + b"".join(_value_bytes(v, where) for v in value)
    raise ValueError(
        f"{where}: cannot fingerprint a {type(value).__name__}; dataset items must be "
        f"(input, label) of tensors, numpy arrays or numbers"
    )


def fingerprint_indices(length: int, samples: int = FINGERPRINT_SAMPLES) -> list[int]:
    """`samples` evenly spaced ids in [0, length), first and last included."""
    if length <= samples:
        return list(range(length))
    return sorted({int(i) for i in np.linspace(0, length - 1, samples).round()})


def dataset_fingerprint(
    dataset: torch.utils.data.Dataset, samples: int = FINGERPRINT_SAMPLES
) -> DatasetFingerprint:
    """Fingerprint a map-style dataset of `(input, label)` items (see the module docstring)."""
    length = len(dataset)  # type: ignore[arg-type]  # map-style datasets define __len__
    digest = hashlib.sha256(f"lyceum.dataset length={length}".encode())
    indices = fingerprint_indices(length, samples)
    for i in indices:
        item = dataset[i]
        digest.update(f"item {i}".encode())
        digest.update(_value_bytes(tuple(item[:2]), where=f"dataset item {i}"))
    return DatasetFingerprint(length=length, samples=len(indices), sha256=digest.hexdigest())


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict: every name, dtype, shape and value byte, in order."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def model_identity(
    spec: str, model: nn.Module, checkpoint_sha256: str | None = None
) -> ModelIdentity:
    """The identity of a teacher: its spec (or any name), checkpoint hash and weight hash."""
    return ModelIdentity(
        spec=spec, checkpoint_sha256=checkpoint_sha256, weights_sha256=state_dict_sha256(model)
    )


def check_dataset(manifest: Manifest, dataset: torch.utils.data.Dataset, where: str) -> None:
    """Raise unless `dataset` is the one the knowledge was dumped from."""
    got = dataset_fingerprint(dataset)
    if got != manifest.dataset:
        raise ValueError(
            f"{where}: the knowledge was dumped from a different dataset ({manifest.dataset.length} "
            f"samples, fingerprint {manifest.dataset.sha256[:16]}) than the one given "
            f"({got.length} samples, fingerprint {got.sha256[:16]}); sample ids would not match. "
            f"Pass the dataset (split, order, preprocessing) the teacher dumped, or re-dump."
        )
