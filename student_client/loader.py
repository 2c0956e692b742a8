"""`DistillLoader`: the student's batches joined with their teachers' knowledge, prefetched.

    loader = DistillLoader(train_set, {"cnn": OnlineTeacher(...), "dump": OfflineTeacher(...)},
                           batch_size=64, shuffle=True, window=4,
                           merger=Merger({"logits": "mean"}))
    for epoch in range(epochs):
        for inputs, labels, knowledge in loader:   # one epoch per pass
            ...

Each pass is one epoch in the sampler's order. While the student trains on batch k, the
knowledge of batches k+1..k+window is already being computed (online teachers work in other
processes), so the student only waits when the teachers are slower than its step;
`stats.wait_s` says how long it did. `knowledge` holds the merged fields keyed by
column, plus `sample_id` (the ids of the batch, int64), which the merger joined on.

Across epochs: when this epoch's last batches are requested, the first batches of the next
epoch are requested too (its order is known: `seed + epoch`, or the sampler's `set_epoch`), so
the student does not wait one teacher forward pass at the start of every epoch. The next pass
takes those requests over if it starts with the same batches (after `set_epoch` or
`load_state_dict` it may not: then they are dropped). Only when every teacher answers by ids
(`index` mode, offline dumps): a `query` teacher needs inputs, which are loaded in order.
`prefetch_next_epoch=False` turns it off (e.g. so the last epoch does not ask for more).

Without teachers (`teachers={}`) it is the same loader for supervised training: batches in
the same order, the same resumable position, and `knowledge` holding only `sample_id`.

Resuming: `state_dict()` is `{epoch, seed, position}` (position = batches already yielded in
this epoch); after `load_state_dict`, the next pass yields the remaining batches of that
epoch, with the same order, not the epoch from its start. The order must be reproducible: the
built-in shuffle draws it from `seed + epoch`; a `sampler` must be deterministic given its
`set_epoch` (as `DistributedSampler` is, one shard of ids per rank).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import threading
import time
import warnings
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from lyceum.proto.codec import KnowledgeBatch
from lyceum.proto.schema import SAMPLE_ID
from lyceum.student_client._connections import TeacherError
from lyceum.student_client.merger import MergedSchema, Merger
from lyceum.student_client.sources import KnowledgeSource, TeacherUnavailableError

__all__ = ["DistillLoader", "LoaderStats"]

_POLL_S = 0.05  # longest single wait on one teacher before checking the others again
_READY = 2  # merged batches buffered for the student, beyond the window in flight


@dataclass
class LoaderStats:
    """Counters since the loader was built.

    `wait_s`: how long the student waited for its next batch (knowledge, and data), its
    idle time. `knowledge_wait_s`: how long the producer waited for the teachers, which the
    window hides from the student as long as it stays below the student's own step time.
    """

    batches: int = 0
    samples: int = 0
    wait_s: float = 0.0
    knowledge_wait_s: float = 0.0


@dataclass
class _Ready:
    batch: tuple[Any, Any, dict[str, torch.Tensor]]
    samples: int


@dataclass
class _InFlight:
    request_id: int
    ids: torch.Tensor
    inputs: Any
    labels: Any


def _apply(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`fn` on every tensor of a batch: a tensor, or dicts, lists and tuples of them (what
    `default_collate` makes of a dataset whose inputs are several tensors)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _apply(v, fn) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_apply(v, fn) for v in value))
    if isinstance(value, tuple | list):
        return type(value)(_apply(v, fn) for v in value)
    return value


class DistillLoader:
    """Yields `(inputs, labels, knowledge)` per batch, with knowledge prefetched (see above).

    `teachers`: name -> `KnowledgeSource`. `merger`: how fields of several teachers combine
    (default: each field passes through, which refuses fields sent by several teachers).
    `shuffle`/`seed` or `sampler` choose the order; `window` is how many batches ahead the
    knowledge is requested. `num_workers`, `collate_fn` and `pin_memory` are the DataLoader's,
    for the student's own data (workers load it in other processes; the teachers are only
    ever asked from this one); `pin_memory` also pins the knowledge (skipped, with a warning,
    without an accelerator), and `device` moves inputs, labels and knowledge there, tensors
    nested in dicts, lists and tuples included (non-blocking when pinned).
    """

    def __init__(
        self,
        dataset: Dataset,
        teachers: Mapping[str, KnowledgeSource],
        batch_size: int,
        *,
        shuffle: bool = False,
        sampler: Sampler[int] | None = None,
        seed: int = 0,
        window: int = 4,
        merger: Merger | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
        prefetch_next_epoch: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if window < 0:
            raise ValueError(f"window must be >= 0 (batches requested ahead), got {window}")
        if shuffle and sampler is not None:
            raise ValueError(
                "give shuffle=True or a sampler, not both (a sampler decides the order itself)"
            )
        self.dataset = dataset
        self.teachers = dict(teachers)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.sampler = sampler
        self.seed = seed
        self.window = window
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.collate_fn = collate_fn or default_collate
        if pin_memory and not torch.accelerator.is_available():
            # As DataLoader does: pinned memory only exists for an accelerator, so a config
            # written for a GPU machine still runs on a CPU one, unpinned.
            warnings.warn(
                "DistillLoader: pin_memory=True but no accelerator is available, so batches "
                "are not pinned; pass pin_memory=False on a CPU-only machine",
                stacklevel=2,
            )
            pin_memory = False
        self.pin_memory = pin_memory
        self.device = torch.device(device) if device is not None else None
        self.merger = merger or Merger({})
        # Validate the teachers' schemas against the strategies now, before any training.
        self.merged: MergedSchema = (
            self.merger.check({name: source.schema for name, source in self.teachers.items()})
            if self.teachers
            else MergedSchema(teachers=(), fields=())
        )
        self.epoch = 0
        self.position = 0
        self.stats = LoaderStats()
        self._request_ids = itertools.count()
        self.prefetch_next_epoch = (
            prefetch_next_epoch
            and bool(self.teachers)
            and not any(source.needs_inputs for source in self.teachers.values())
        )
        # Requests for the next pass's first batches (request id, sample ids), in order, and
        # knowledge that arrived for requests still wanted; both outlive one pass.
        self._prefetched: collections.deque[tuple[int, list[int]]] = collections.deque()
        self._results: dict[str, dict[int, KnowledgeBatch]] = {name: {} for name in self.teachers}

    # -- order and resumption ------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch at the next pass."""
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        missing = [k for k in ("epoch", "seed", "position") if k not in state]
        if missing:
            raise ValueError(f"loader state {dict(state)}: missing keys {missing}")
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"loader state has seed {state['seed']} but this loader has seed {self.seed}: "
                f"the remaining ids of the epoch would differ; build the loader with "
                f"seed={state['seed']}"
            )
        if not 0 <= int(state["position"]) <= len(self):
            raise ValueError(
                f"loader state position {state['position']} is outside 0..{len(self)} batches "
                f"of an epoch: the checkpoint is from another dataset or batch size"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self, epoch: int) -> list[int]:
        if self.sampler is not None:
            set_epoch = getattr(self.sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
            return [int(i) for i in self.sampler]
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            return torch.randperm(n, generator=g).tolist()
        return list(range(n))

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The sample ids of every batch of an epoch (default: the current one), in order."""
        order = self._order(self.epoch if epoch is None else epoch)
        out = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # -- iteration -----------------------------------------------------------------------

    def __iter__(self) -> Generator[tuple[Any, Any, dict[str, torch.Tensor]], None, None]:
        """One epoch (the rest of it after `load_state_dict`). A producer thread loads the
        data, keeps the window of requests in flight, merges and moves each batch while the
        student trains on the previous one (torch releases the GIL in its kernels), so the
        student only waits when the teachers or the data are slower than its step. Only the
        producer touches the sources (ZeroMQ sockets are not thread-safe)."""
        remaining = self.batches()[self.position :]
        ready: queue.Queue[_Ready | BaseException | None] = queue.Queue(maxsize=_READY)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, args=(remaining, ready, stop), name="DistillLoader", daemon=True
        )
        producer.start()
        try:
            while True:
                started = time.perf_counter()
                item = ready.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                self.stats.wait_s += time.perf_counter() - started
                self.position += 1
                self.stats.batches += 1
                self.stats.samples += item.samples
                yield item.batch
            self.epoch, self.position = self.epoch + 1, 0
        finally:
            # Also when the consumer stops early (a checkpoint on SIGTERM): stop the producer
            # before anything else may touch the sources.
            stop.set()
            while producer.is_alive():
                with contextlib.suppress(queue.Empty):
                    ready.get_nowait()  # unblock a producer waiting to put
                producer.join(0.01)

    def _produce(
        self,
        remaining: list[list[int]],
        ready: queue.Queue[_Ready | BaseException | None],
        stop: threading.Event,
    ) -> None:
        try:
            data = iter(
                DataLoader(
                    self.dataset,
                    batch_sampler=remaining,  # type: ignore[arg-type]
                    num_workers=self.num_workers,
                    collate_fn=self.collate_fn,
                    pin_memory=self.pin_memory,
                )
            )
            # The DataLoader yields batches in `remaining`'s order, so ids come from there.
            batch_ids = iter(remaining)
            inflight: collections.deque[_InFlight] = collections.deque()
            results = self._results
            wanted = {rid for rid, _ids in self._prefetched}
            for arrived in results.values():  # left by a pass that stopped early
                for rid in [r for r in arrived if r not in wanted]:
                    del arrived[rid]
            upcoming: list[list[int]] | None = None  # the next epoch's batches, once needed
            exhausted = False
            while not stop.is_set():
                while not exhausted and len(inflight) <= self.window:
                    try:
                        inputs, labels = next(data)
                    except StopIteration:
                        exhausted = True
                        break
                    listed = next(batch_ids)
                    ids = torch.tensor(listed, dtype=torch.int64)
                    taken = self._take_prefetched(listed)
                    if taken is None:
                        inflight.append(self._submit(ids, inputs, labels))
                    else:
                        inflight.append(_InFlight(taken, ids, inputs, labels))
                if exhausted and self.prefetch_next_epoch:
                    if upcoming is None:
                        upcoming = self.batches(self.epoch + 1)
                    self._prefetch(
                        upcoming, self.window + 1 - len(inflight) - len(self._prefetched)
                    )
                if not inflight:
                    ready.put(None)
                    return
                head = inflight.popleft()
                pending = {b.request_id for b in inflight} | {r for r, _ in self._prefetched}
                knowledge = self._wait(head, results, pending, stop)
                if knowledge is None:
                    return
                item = _Ready(self._deliver(head.inputs, head.labels, knowledge), len(head.ids))
                while not stop.is_set():
                    with contextlib.suppress(queue.Full):
                        ready.put(item, timeout=0.05)
                        break
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put(exc)

    def _take_prefetched(self, ids: list[int]) -> int | None:
        """The request id already asking for batch `ids` (prefetched by the previous pass),
        or None. Prefetched requests that are not this pass's next batches are dropped."""
        if self._prefetched and self._prefetched[0][1] == ids:
            return self._prefetched.popleft()[0]
        while self._prefetched:  # another epoch or position than predicted: let them go
            rid, _ids = self._prefetched.popleft()
            for results in self._results.values():
                results.pop(rid, None)
        return None

    def _prefetch(self, upcoming: list[list[int]], room: int) -> None:
        """Ask for the next epoch's first batches, up to `room` more requests in flight."""
        while room > 0 and len(self._prefetched) < len(upcoming):
            listed = upcoming[len(self._prefetched)]
            ids = torch.tensor(listed, dtype=torch.int64)
            self._prefetched.append((self._submit(ids, None, None).request_id, listed))
            room -= 1

    def _submit(self, ids: torch.Tensor, inputs: Any, labels: Any) -> _InFlight:
        rid = next(self._request_ids)
        for name, source in self.teachers.items():
            try:
                source.submit(rid, ids, inputs if source.needs_inputs else None)
            except TeacherError as exc:
                raise _named(name, exc) from exc
        return _InFlight(rid, ids, inputs, labels)

    def _wait(
        self,
        head: _InFlight,
        results: dict[str, dict[int, KnowledgeBatch]],
        pending: set[int],
        stop: threading.Event,
    ) -> dict[str, torch.Tensor] | None:
        """The merged knowledge of `head`, or None if the consumer stopped meanwhile."""
        started = time.perf_counter()
        while True:
            missing = [name for name in self.teachers if head.request_id not in results[name]]
            if not missing:
                break
            if stop.is_set():
                return None
            for name in self.teachers:
                # Only the teacher the head waits on is waited for; the others are drained.
                timeout = _POLL_S if name == missing[0] else 0.0
                try:
                    done = self.teachers[name].poll(timeout)
                except TeacherError as exc:
                    raise _named(name, exc) from exc
                for rid, batch in done:
                    # Requests of an abandoned pass (e.g. stopped for a checkpoint) are dropped.
                    if rid == head.request_id or rid in pending:
                        results[name][rid] = batch
        self.stats.knowledge_wait_s += time.perf_counter() - started
        batches = {name: results[name].pop(head.request_id) for name in self.teachers}
        knowledge = self.merger.merge(head.ids, batches) if batches else {}
        knowledge[SAMPLE_ID] = head.ids
        return knowledge

    def _deliver(
        self, inputs: Any, labels: Any, knowledge: dict[str, torch.Tensor]
    ) -> tuple[Any, Any, dict[str, torch.Tensor]]:
        if self.pin_memory:  # inputs and labels were pinned by the DataLoader
            knowledge = _apply(knowledge, torch.Tensor.pin_memory)
        device = self.device
        if device is None:
            return inputs, labels, knowledge
        nb = self.pin_memory  # a copy from pageable memory would block anyway

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=nb)

        return _apply(inputs, move), _apply(labels, move), _apply(knowledge, move)


def _named(name: str, exc: TeacherError) -> TeacherError:
    """The same error, saying which of the loader's teachers it came from (unless it does:
    the trainer names each `OnlineTeacher` after its key)."""
    named = f"teacher {name!r}" in exc.message
    message = exc.message if named else f"distillation teacher {name!r}: {exc.message}"
    if isinstance(exc, TeacherUnavailableError):
        return TeacherUnavailableError(message)
    return TeacherError(exc.code, message)
