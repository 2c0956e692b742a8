"""The offline knowledge manifest: what a dump directory holds, shared by writer and reader.

A dump directory holds Arrow IPC files `shard-NNNNN.arrow` and `manifest.json`. Shard k covers
the sample ids `[k * shard_rows, min((k + 1) * shard_rows, length))`. The manifest names the
knowledge schema, the teacher (model spec, checkpoint and weight hashes) and the dataset
(a fingerprint), and lists the complete shards only: the writer rewrites it atomically after
each shard lands, so a reader or a resumed dump never trusts a half-written file.

The dataset fingerprint (`lyceum.proto.fingerprint`) is what stops the failure Pantheon had: knowledge dumped from one
dataset silently joined to another. It is the dataset's length plus a sha256 of the raw bytes
of some of its items (input and label); `dataset.samples` says how many items were hashed, and
a reader recomputes the fingerprint over the same items. Two coverages
(`lyceum teacher dump --fingerprint`):

- `sampled` (the default): 64 evenly spaced items, first and last included (all of them when
  the dataset has 64 or fewer). Cheap on every open, whatever the dataset's size, and it
  catches another split, length, order or preprocessing, which change (nearly) every item.
  The trade-off: a dataset that differs only in items that were not hashed (e.g. one edited
  sample, #500 of 1,797) is accepted, and its sample ids are joined to the wrong knowledge.
- `full`: every item is hashed, so any difference is refused. It costs one pass over the
  dataset's items (reading and hashing, without the model) when the dump starts and whenever
  a student opens the knowledge with its dataset, which is worth it when a dataset is edited
  in place.

Format history (`format_version`; readers accept any minor version of their major):

- 1.0: schema, model, dataset, shard_rows, shards.
- 1.1: `created_at` and `lyceum_version` (when, and by which Lyceum, the dump was started;
  kept when it is resumed), `--fingerprint full`. Both fields are optional, so 1.0 manifests
  read unchanged, and they are left out of the file when unknown (a 1.0 dump resumed by this
  Lyceum stays a 1.0 file).
- 1.2: `compression` (zstd shards).
- 1.3: `stored_inputs` (`teacher dump --store-inputs`: fields of the schema that hold the
  samples' inputs, not knowledge), `shard_tokens` and `shard_starts` (shards sized in
  tokens: shard k holds ids `[shard_starts[k], shard_starts[k + 1])`). Each is left out of
  the file when unused, so such a dump's manifest is read by 1.2 readers too.
"""

from __future__ import annotations

import bisect
import importlib.metadata
import itertools
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The dataset fingerprint lives in its own module; its names stay importable from here.
from lyceum.proto.fingerprint import (
    FINGERPRINT_SAMPLES,
    Coverage,
    DatasetFingerprint,
    coverage_samples,
    dataset_fingerprint,
    fingerprint_indices,
    verify_dataset,
)
from lyceum.proto.schema import KnowledgeSchema

# Which teacher made the knowledge lives in its own module too; its names stay here.
from lyceum.proto.teacher_identity import ModelIdentity, model_identity, state_dict_sha256

__all__ = [
    "FINGERPRINT_SAMPLES",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "Coverage",
    "DatasetFingerprint",
    "Manifest",
    "ModelIdentity",
    "ShardInfo",
    "check_dataset",
    "check_manifest_version",
    "coverage_samples",
    "dataset_fingerprint",
    "fingerprint_indices",
    "fsync_directory",
    "lyceum_version",
    "model_identity",
    "now_utc",
    "shard_file_name",
    "state_dict_sha256",
    "verify_dataset",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = "1.3"
"""Major.minor of the manifest format. Readers refuse other majors."""


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


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

    format_version: str = Field(
        default=MANIFEST_VERSION,
        description="Manifest format version, major.minor; readers refuse another major.",
    )
    created_at: datetime | None = Field(
        default=None,
        description="When the dump was started (UTC); kept when it is resumed. None in 1.0 "
        "manifests.",
    )
    lyceum_version: str | None = Field(
        default=None,
        description="Version of the Lyceum that started the dump. None in 1.0 manifests.",
    )
    knowledge_schema: KnowledgeSchema = Field(description="The knowledge fields in every shard.")
    model: ModelIdentity = Field(description="The teacher that produced the knowledge.")
    dataset: DatasetFingerprint = Field(description="The dataset the sample ids index.")
    shard_rows: int = Field(gt=0, description="Samples per shard (the last may hold fewer).")
    compression: Literal["zstd"] | None = Field(
        default=None,
        description="Arrow IPC body compression of the shards' record batches: zstd, or None "
        "(uncompressed, left out of the JSON; all manifests before 1.2). Compressed shards "
        "are decompressed when opened.",
    )
    stored_inputs: tuple[str, ...] | None = Field(
        default=None,
        description="Fields of knowledge_schema that hold the samples' inputs (`teacher dump "
        "--store-inputs`), read with `OfflineKnowledge.inputs`; None: none stored (all "
        "manifests before 1.3).",
    )
    shard_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Shards sized in tokens (`--shard-tokens`): each holds at most this many "
        "sequence positions (a longer sample alone) and at most shard_rows samples; None: "
        "shard_rows samples each.",
    )
    shard_starts: tuple[int, ...] | None = Field(
        default=None,
        description="With shard_tokens: the first sample id of each shard, from 0 up.",
    )
    shards: tuple[ShardInfo, ...] = Field(default=(), description="Complete shards, by index.")

    @model_validator(mode="after")
    def _check_shards(self) -> Manifest:
        check_manifest_version(self.format_version)
        missing = [n for n in self.stored_inputs or () if n not in self.knowledge_schema.names]
        if missing:
            raise ValueError(
                f"manifest: stored inputs {missing} are not fields of the knowledge schema "
                f"{list(self.knowledge_schema.names)}"
            )
        starts = self.shard_starts
        if (starts is None) != (self.shard_tokens is None):
            raise ValueError("manifest: shard_tokens and shard_starts go together")
        if starts is not None and (
            not starts
            or starts[0] != 0
            or any(b <= a for a, b in itertools.pairwise(starts))
            or starts[-1] >= self.dataset.length
        ):
            raise ValueError(
                f"manifest: shard_starts must rise from 0 below the {self.dataset.length} "
                f"samples, got {list(starts[:8])}{'...' if len(starts) > 8 else ''}"
            )
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
        if self.shard_starts is not None:
            return len(self.shard_starts)
        return -(-self.dataset.length // self.shard_rows)

    def shard_of(self, sample_id: int) -> int:
        """The shard that holds `sample_id`."""
        if self.shard_starts is not None:
            return bisect.bisect_right(self.shard_starts, sample_id) - 1
        return sample_id // self.shard_rows

    def shard_range(self, index: int) -> tuple[int, int]:
        """The ids `[start, stop)` shard `index` covers."""
        if not 0 <= index < self.num_shards:
            raise ValueError(
                f"shard index {index} is outside [0, {self.num_shards}) for "
                f"{self.dataset.length} samples of {self.shard_rows} per shard"
            )
        if self.shard_starts is not None:
            stop = (
                self.shard_starts[index + 1]
                if index + 1 < len(self.shard_starts)
                else self.dataset.length
            )
            return self.shard_starts[index], stop
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

    def missing_ranges(self) -> list[tuple[int, int, int, int]]:
        """Runs of consecutive missing shards as `(first id, last id, first shard, last shard)`,
        ids and shards inclusive."""
        runs: list[tuple[int, int, int, int]] = []
        for k in self.missing_shards():
            start, stop = self.shard_range(k)
            if runs and runs[-1][3] == k - 1:
                runs[-1] = (runs[-1][0], stop - 1, runs[-1][2], k)
            else:
                runs.append((start, stop - 1, k, k))
        return runs

    def describe_missing(self) -> str:
        """The missing ids, merged: `ids 1000-1256 (shard 3), ids 1536-2047 (shards 6-7)`."""
        parts = []
        for first, last, k0, k1 in self.missing_ranges():
            shards = f"shard {k0}" if k0 == k1 else f"shards {k0}-{k1}"
            parts.append(f"ids {first}-{last} ({shards})")
        return ", ".join(parts)

    def incomplete_reason(self) -> str | None:
        """Why the dump is incomplete, as a sentence with the fix, or None if complete."""
        if self.complete:
            return None
        return (
            f"the dump is incomplete ({self.rows:,} of {self.dataset.length:,} samples; "
            f"missing {self.describe_missing()}): rerun the same `lyceum teacher dump` "
            f"command to finish it"
        )

    def incompatibility(self, other: Manifest) -> str | None:
        """Why a dump described by `other` may not continue this one, or None if it may."""
        model = self.model.difference(other.model)
        if model:
            return model
        if self.stored_inputs != other.stored_inputs:
            return (
                f"stored inputs: the directory has {list(self.stored_inputs or [])}, this run "
                f"{list(other.stored_inputs or [])}; rerun "
                f"{'with' if self.stored_inputs else 'without'} --store-inputs"
            )
        theirs, ours = other.knowledge_schema, self.knowledge_schema
        if ours != theirs and ours.format_version != theirs.format_version:
            return (
                f"knowledge format: the directory's is {ours.format_version}, this run's "
                f"{theirs.format_version} (knowledge stored another way); dump into a "
                f"new directory"
            )
        if self.knowledge_schema != other.knowledge_schema:
            return (
                f"knowledge schema: the directory has "
                f"{[f.describe() for f in self.knowledge_schema.fields]}, this run has "
                f"{[f.describe() for f in other.knowledge_schema.fields]}"
            )
        if (
            self.dataset.samples != other.dataset.samples
            and self.dataset.length == other.dataset.length
        ):
            return (
                f"dataset fingerprint: the directory's hashed {self.dataset.samples:,} of "
                f"{self.dataset.length:,} samples (--fingerprint {self.dataset.coverage}), this "
                f"run's {other.dataset.samples:,} (--fingerprint {other.dataset.coverage}); rerun "
                f"with --fingerprint {self.dataset.coverage}"
            )
        if self.dataset != other.dataset:
            return (
                f"dataset: the directory has {self.dataset.length} samples with fingerprint "
                f"{self.dataset.sha256[:16]}, this run has {other.dataset.length} samples with "
                f"fingerprint {other.dataset.sha256[:16]}"
            )
        if self.shard_tokens != other.shard_tokens:
            return (
                f"shard tokens: the directory has {self.shard_tokens}, this run "
                f"{other.shard_tokens}; rerun with "
                + (
                    f"--shard-tokens {self.shard_tokens}"
                    if self.shard_tokens
                    else "no --shard-tokens"
                )
            )
        if self.shard_starts != other.shard_starts:
            return (
                "shard boundaries: the dataset's sequence lengths are not those the directory "
                "was sharded by; dump into a new directory"
            )
        if self.shard_rows != other.shard_rows:
            return (
                f"shard rows: the directory has {self.shard_rows}, this run has {other.shard_rows}"
            )
        if self.compression != other.compression:
            return (
                f"compression: the directory's shards are {self.compression or 'none'}, this "
                f"run's {other.compression or 'none'}; rerun with --compression "
                f"{self.compression or 'none'}"
            )
        return None

    def write(self, directory: str | Path) -> None:
        """Write `manifest.json` atomically: temp file, fsync, rename, fsync the directory."""
        directory = Path(directory)
        tmp = directory / (MANIFEST_NAME + ".tmp")
        # Unknown optional fields are left out, so a 1.0 manifest rewritten on resume stays
        # a valid 1.0 file for older readers.
        data = self.model_dump_json(indent=1, exclude_none=True).encode()
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
        version = str(raw.get("format_version", "")) if isinstance(raw, dict) else ""
        if isinstance(raw, dict):
            check_manifest_version(version)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            if _newer_minor(version):
                raise ValueError(
                    f"{str(path)!r} was written by a newer Lyceum (manifest {version}; this "
                    f"Lyceum reads up to {MANIFEST_VERSION}) and has fields this one does not "
                    f"know: upgrade Lyceum to read it ({exc.error_count()} errors: {exc})"
                ) from exc
            raise


def lyceum_version() -> str | None:
    """The installed Lyceum's version, or None when it runs from an uninstalled source tree."""
    try:
        return importlib.metadata.version("lyceum-kd")
    except importlib.metadata.PackageNotFoundError:
        return None


def now_utc() -> datetime:
    """The current time in UTC to the second: a manifest's `created_at`."""
    return datetime.now(UTC).replace(microsecond=0)


def _newer_minor(version: str) -> bool:
    try:
        theirs = tuple(int(p) for p in version.split("."))
    except ValueError:
        return False
    return theirs > tuple(int(p) for p in MANIFEST_VERSION.split("."))


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


def check_dataset(manifest: Manifest, dataset: torch.utils.data.Dataset, where: str) -> None:
    """Raise unless `dataset` is the one the knowledge was dumped from."""
    verify_dataset(
        manifest.dataset,
        dataset,
        where,
        "Pass the dataset (split, order, preprocessing) the teacher dumped, or re-dump.",
    )
