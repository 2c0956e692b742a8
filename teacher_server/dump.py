"""Offline dump: run a teacher over a whole dataset once and write its knowledge to Arrow shards.

- Layout, resuming and refusals are the writer's (`KnowledgeWriter`, in `_writer`): shard k
  holds ids `[k * shard_rows, ...)`; a kill leaves complete, listed shards, and rerunning the
  same dump continues at the first missing one. `DumpConfig.shard_tokens` sizes shards in
  tokens instead (boundaries from every sample's length, in the manifest);
  `DumpConfig.store_inputs` keeps the inputs beside the knowledge (`_stored_inputs`).
- The manifest records when and by which Lyceum the dump was started, and the dataset
  fingerprint's coverage (`DumpConfig.fingerprint`: 64 sampled items or every item, see
  `lyceum.proto.manifest`); a resume keeps the first run's creation time.
- Progress goes through `lyceum.proto.display.Progress`: a bar on a terminal, a log line
  every 30 s and one at the end elsewhere (a batch job's log).
- Many devices and machines: one engine per device in one process (`engines`), and ranks
  (`DumpConfig.rank` of `world_size`, e.g. torchrun's RANK and WORLD_SIZE), each dumping its
  own shards into the same directory (`_dump_dir`); the last rank to finish completes the
  manifest. Devices split their process's shards the same way, so every shard is batched as
  in a one-process dump and the finished directory holds the same bytes.

Pipeline: DataLoader workers read and collate samples, a thread per engine runs inference
(the calling thread for the first one), and a writer thread encodes, writes and hashes, so
only inference sits on the critical path.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lyceum.proto.display import Progress
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import (
    MANIFEST_NAME,
    Coverage,
    Manifest,
    ModelIdentity,
    coverage_samples,
    dataset_fingerprint,
    lyceum_version,
    now_utc,
)
from lyceum.proto.schema import FieldSpec
from lyceum.teacher_server._dump_dir import merge_knowledge, owed_by_ranks
from lyceum.teacher_server._inputs import (
    InputBatch,
    InputLayout,
    as_numpy_free,
    collate,
    real_length,
    sample_length,
)
from lyceum.teacher_server._stored_inputs import (
    input_columns,
    stored_input_fields,
    with_stored_inputs,
)
from lyceum.teacher_server._token_batches import (
    Plan,
    in_id_order,
    plan_window,
    token_shard_starts,
)
from lyceum.teacher_server._writer import Columns, KnowledgeWriter, WriterThread
from lyceum.teacher_server.engine import TeacherEngine

__all__ = [
    "DumpConfig",
    "KnowledgeWriter",
    "check_not_empty",
    "dump_knowledge",
    "merge_knowledge",
    "owed_by_ranks",
]

log = logging.getLogger(__name__)


class DumpConfig(BaseModel):
    """How a dump batches, shards and pipelines its work."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shard_rows: int = Field(default=65536, gt=0, description="Samples per shard file.")
    shard_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Shards sized in tokens (sequence inputs): each at most this many real "
        "positions (a longer sample alone) and at most `shard_rows` samples; every "
        "sample's length is read before the dump starts. None: `shard_rows` samples each.",
    )
    batch_size: int = Field(default=256, gt=0, description="Samples per inference batch.")
    workers: int = Field(
        default=1, ge=0, description="DataLoader worker processes (0: load in this process)."
    )
    record_batch_bytes: int = Field(
        default=4 << 20, gt=0, description="Accumulate at least this many bytes per record batch."
    )
    queue_depth: int = Field(
        default=8, gt=0, description="Inference batches buffered between engine and writer."
    )
    progress: bool = Field(
        default=True,
        description="Show progress: a bar on a terminal, else a log line every 30 s and at the end.",
    )
    rank: int = Field(
        default=0,
        ge=0,
        description="This process's rank among `world_size` processes dumping into one "
        "directory (torchrun's RANK); it dumps every world_size-th shard from its rank.",
    )
    world_size: int = Field(
        default=1,
        gt=0,
        description="Processes dumping into the directory together (torchrun's WORLD_SIZE).",
    )
    max_batch_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Token-budget batching of sequence inputs: each batch at most this many "
        "padded tokens (samples x longest), of sequences of similar length (sorted within "
        "windows of `bucket_window` ids), and at most `batch_size` samples. None: batches "
        "of `batch_size` consecutive ids.",
    )
    bucket_window: int = Field(
        default=4096,
        gt=0,
        description="Consecutive ids sorted by length together for token-budget batching; "
        "their knowledge is held until the window is done (it is written in id order).",
    )
    compression: Literal["none", "zstd"] = Field(
        default="none",
        description="Arrow IPC body compression of the shards: none (read zero-copy from the "
        "memory-mapped files), or zstd (smaller; each shard is decompressed into memory when "
        "a student opens it).",
    )
    store_inputs: bool = Field(
        default=False,
        description="Keep the inputs in the dump (`_stored_inputs`): each sample's tokens "
        "(its real positions) and its other named inputs but the mask, read back with "
        "`OfflineKnowledge.inputs` or `DumpInputs`, so a student needs no dataset of its own.",
    )
    fingerprint: Coverage = Field(
        default="sampled",
        description="Dataset fingerprint coverage: 'sampled' hashes 64 evenly spaced items "
        "(cheap; a dataset differing only elsewhere is accepted), 'full' hashes every item "
        "(one extra pass over the data here and on each student open; any difference is "
        "refused). See lyceum.proto.manifest.",
    )

    @model_validator(mode="after")
    def _check_rank(self) -> DumpConfig:
        if self.rank >= self.world_size:
            raise ValueError(
                f"rank {self.rank} is not below world size {self.world_size}: ranks are "
                f"0..{self.world_size - 1}"
            )
        return self


class _ShardBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of ids that never cross a shard boundary, so the batches (and so the bits of
    batched inference) of a resumed dump equal those of an uninterrupted one. `windows`:
    how many consecutive batches form each window written together (token budgets)."""

    def __init__(self, batches: list[list[int]], windows: list[int]) -> None:
        self.batches = batches
        self.windows = windows

    @classmethod
    def plan(
        cls,
        dataset: torch.utils.data.Dataset,
        ranges: Sequence[tuple[int, int]],
        config: DumpConfig,
    ) -> tuple[_ShardBatches, Plan | None]:
        batches: list[list[int]] = []
        windows: list[int] = []
        if config.max_batch_tokens is None:
            for start, stop in ranges:
                for lo in range(start, stop, config.batch_size):
                    batches.append(list(range(lo, min(lo + config.batch_size, stop))))
                    windows.append(1)
            return cls(batches, windows), None
        real = padded = 0
        for start, stop in ranges:
            for lo in range(start, stop, config.bucket_window):
                ids = list(range(lo, min(lo + config.bucket_window, stop)))
                lengths = [sample_length(item_inputs(dataset[i])) for i in ids]
                plan = plan_window(ids, lengths, config.max_batch_tokens, config.batch_size)
                batches.extend(plan.batches)
                windows.append(len(plan.batches))
                real, padded = real + plan.real_tokens, padded + plan.padded_tokens
        return cls(batches, windows), Plan(batches=[], real_tokens=real, padded_tokens=padded)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Indexed(torch.utils.data.Dataset[tuple[int, Any]]):
    """Yields `(id, input)`: the sample id travels with its input through the workers."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, as_numpy_free(item_inputs(self.dataset[i]))


def dump_knowledge(
    engine: TeacherEngine | Sequence[TeacherEngine],
    dataset: torch.utils.data.Dataset,
    out_dir: str | Path,
    config: DumpConfig,
    model_identity: ModelIdentity,
) -> Manifest:
    """Dump the engine's knowledge for every sample of `dataset` into `out_dir`; resumable.

    Sample id i is `dataset[i]`, whose input is `dataset[i][0]`. `engine`: one engine, or one
    per device (copies of one teacher), which split this process's shards between them.
    `model_identity` names the teacher (`lyceum.proto.manifest.model_identity(spec, model,
    checkpoint_sha256)`); a resumed dump must have the same one. With `config.world_size` > 1
    this process dumps only the shards of `config.rank` (see the module docstring).

    Returns the manifest as this process left it: complete once every shard is (for a rank,
    once the other ranks finished theirs too). An empty dataset is refused (`check_not_empty`).
    """
    engines = [engine] if isinstance(engine, TeacherEngine) else list(engine)
    if not engines:
        raise ValueError("dump_knowledge: no engine; give one engine, or one per device")
    length = check_not_empty(dataset, "the dataset")
    stored: tuple[FieldSpec, ...] = ()
    if config.store_inputs:
        stored = stored_input_fields(engines[0].input_schema, engines[0].schema)
    schema = with_stored_inputs(engines[0].schema, stored)
    begun = Path(out_dir) / MANIFEST_NAME
    if begun.is_file():
        # A dump begun by an earlier Lyceum (format 1.1) resumes when this run stores its
        # knowledge the same way; its shards must then carry the same schema metadata.
        schema = schema.as_version(Manifest.read(out_dir).knowledge_schema.format_version)
    fresh = Manifest(
        created_at=now_utc(),
        lyceum_version=lyceum_version(),
        knowledge_schema=schema,
        stored_inputs=tuple(f.name for f in stored) or None,
        model=model_identity,
        dataset=dataset_fingerprint(
            dataset, coverage_samples(config.fingerprint, length), progress=config.progress
        ),
        shard_rows=config.shard_rows,
        **_token_shards(engines[0], dataset, config),
        compression=None if config.compression == "none" else config.compression,
    )
    writer = KnowledgeWriter(
        out_dir, fresh, config.record_batch_bytes, config.rank, config.world_size
    )
    try:
        todo = writer.todo()
        if todo:
            _run_pipelines(engines, dataset, writer, config, todo, stored)
        return writer.close()
    finally:
        writer.abort()


def _token_shards(
    engine: TeacherEngine, dataset: torch.utils.data.Dataset, config: DumpConfig
) -> dict[str, Any]:
    """The manifest's `shard_tokens` and `shard_starts` for `config.shard_tokens` (none
    without it)."""
    if config.shard_tokens is None:
        return {}
    if not engine.layout.variable:
        raise ValueError(
            "--shard-tokens sizes shards of sequence inputs; this teacher's inputs are "
            "fixed-shape tensors: use --shard-rows"
        )
    length = len(dataset)  # type: ignore[arg-type]  # map-style datasets define __len__
    lengths = [real_length(item_inputs(dataset[i])) for i in range(length)]
    starts = token_shard_starts(lengths, config.shard_tokens, config.shard_rows)
    return {"shard_tokens": config.shard_tokens, "shard_starts": starts}


def check_not_empty(dataset: torch.utils.data.Dataset, name: str) -> int:
    """`len(dataset)`, or a ValueError saying that `name` is empty and what to check."""
    length = len(dataset)  # type: ignore[arg-type]  # map-style datasets define __len__
    if length == 0:
        raise ValueError(
            f"{name} is empty (0 samples): nothing to dump; check the dataset spec and its "
            f"arguments (split, path)"
        )
    return length


def _collate(items: list[tuple[int, Any]], layout: InputLayout) -> tuple[torch.Tensor, InputBatch]:
    """Ids and the batch of their inputs; runs in the loader workers, so reading and
    stacking stay off the inference thread."""
    batch = collate([x for _, x in items], layout)
    return torch.tensor([i for i, _ in items], dtype=torch.int64), batch


def _run_pipelines(
    engines: Sequence[TeacherEngine],
    dataset: torch.utils.data.Dataset,
    writer: KnowledgeWriter,
    config: DumpConfig,
    todo: Sequence[int],
    stored: tuple[FieldSpec, ...],
) -> None:
    manifest = writer.manifest
    # Device d takes every len(engines)-th of this process's shards: whole shards, so each is
    # batched as a one-device dump batches it.
    parts = [(e, todo[d :: len(engines)]) for d, e in enumerate(engines) if todo[d :: len(engines)]]
    samplers = [
        _ShardBatches.plan(dataset, [manifest.shard_range(k) for k in part], config)
        for _, part in parts
    ]
    plans = [plan for _, plan in samplers if plan is not None]
    real, padded = sum(p.real_tokens for p in plans), sum(p.padded_tokens for p in plans)
    if padded:
        log.info(
            "token-budget batches: %d real tokens in %d computed positions (padding waste %.1f%%)",
            real,
            padded,
            100 * (1 - real / padded),
        )
    loaders = [
        torch.utils.data.DataLoader(
            _Indexed(dataset),
            batch_sampler=sampler,
            num_workers=config.workers,
            # The input layout, not the engine: a worker started by spawn or forkserver
            # (Python 3.14's default) is sent its collate function pickled, never the model.
            collate_fn=functools.partial(_collate, layout=engine.layout),
            pin_memory=engine.device.type == "cuda",
        )
        for (engine, _), (sampler, _) in zip(parts, samplers, strict=True)
    ]
    # Start every loader's workers before any thread: a forked worker would copy only the
    # calling thread, and forking while another thread holds a lock can leave it stuck.
    batches = [iter(loader) for loader in loaders]

    def rows(shards: Sequence[int]) -> int:
        return sum(stop - start for start, stop in map(manifest.shard_range, shards))

    mine = rows(writer.owned)
    bar = Progress(
        mine,
        _describe(writer.directory, config),
        "samples",
        initial=mine - rows(todo),
        enabled=config.progress,
        log=log,
    )
    sink = WriterThread(writer, config.queue_depth, bar)
    stop = threading.Event()
    errors: list[BaseException] = []

    def infer(engine: TeacherEngine, source: Iterator[Any], windows: Iterator[int]) -> None:
        try:
            window: list[tuple[torch.Tensor, Columns]] = []
            size = next(windows, 0)
            for ids, batch in source:
                if stop.is_set():
                    return
                columns = engine.infer(batch)
                if stored:
                    columns = {**columns, **input_columns(batch, stored)}
                window.append((ids, columns))
                if len(window) == size:
                    # A window's batches are sorted by length: the shard takes them in id order.
                    sink.put(*(window[0] if size == 1 else in_id_order(window)))
                    window, size = [], next(windows, 0)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    work = [
        (engine, source, iter(sampler.windows))
        for (engine, _), source, (sampler, _) in zip(parts, batches, samplers, strict=True)
    ]
    others = [
        threading.Thread(target=infer, args=w, name=f"lyceum-dump-{w[0].device}", daemon=True)
        for w in work[1:]
    ]
    try:
        for t in others:
            t.start()
        infer(*work[0])
        for t in others:
            t.join()
    finally:
        stop.set()
        for t in others:
            t.join()
        try:
            sink.join()  # the writer's last updates come before the bar's last line
        finally:
            bar.close()
    if errors:
        raise errors[0]


def _describe(directory: Path, config: DumpConfig) -> str:
    if config.world_size == 1:
        return f"dump {directory}"
    return f"dump {directory} rank {config.rank}/{config.world_size}"
