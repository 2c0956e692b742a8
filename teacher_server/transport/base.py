"""What every transport shares: the `Transport` contract and the request path behind it.

`TeacherService` is the transport-independent half of a request: authenticate, check limits,
decode query inputs (or load index-mode samples from the dataset), and hand the request to
the dynamic batcher. Both transports call it the same way, so gRPC and ZeroMQ give the same
answers, codes and messages for the same request.
"""

from __future__ import annotations

import hmac
import math
from typing import Any, Protocol

import numpy as np
import torch

from lyceum.proto.codec import check_unique_ids, from_record_batch, read_ipc
from lyceum.proto.schema import FORMAT_VERSION, KnowledgeSchema
from lyceum.teacher_server.batcher import Done, DynamicBatcher, Job
from lyceum.teacher_server.errors import (
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    UNAUTHENTICATED,
    UNAVAILABLE,
    ServeError,
)
from lyceum.teacher_server.metrics import ServerMetrics, log_event
from lyceum.v1 import knowledge_pb2 as pb

QUERY, INDEX = "query", "index"


class Transport(Protocol):
    """A way for students to reach the teacher (gRPC, ZeroMQ).

    Exists so the server can start, drain and stop every transport the same way and a new one
    (e.g. shared memory) plugs in without touching the batcher or the request path.
    """

    name: str

    @property
    def endpoints(self) -> list[str]:
        """Bound endpoints as URLs students can use (`grpc://127.0.0.1:50051`, `ipc://...`)."""
        ...

    def start(self) -> None: ...

    def stop(self, grace_s: float) -> None:
        """Stop accepting connections; finish replies in flight within `grace_s`."""
        ...


class TeacherService:
    """Authentication, limits, decoding and submission of one request, for every transport."""

    def __init__(
        self,
        batcher: DynamicBatcher,
        input_schema: KnowledgeSchema,
        sequence_input: bool,
        dataset: torch.utils.data.Dataset | None,
        token: bytes | None,
        max_message_bytes: int,
        metrics: ServerMetrics,
        teacher_id: str,
    ) -> None:
        self.batcher = batcher
        self.input_schema = input_schema
        self.sequence_input = sequence_input
        self.dataset = dataset
        self.dataset_len = len(dataset) if dataset is not None else 0  # type: ignore[arg-type]
        self.token = token
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        # (transport, mode) -> its request and sample counters: prometheus_client's labels()
        # lookup costs microseconds per call, on every request.
        self._counters: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.draining = False
        self.describe_reply = pb.DescribeReply(
            format_version=FORMAT_VERSION,
            knowledge_schema_json=batcher.schema.to_json(),
            input_schema_json=input_schema.to_json(),
            teacher_id=teacher_id,
            accepts_index=dataset is not None,
            max_request_samples=batcher.max_batch,
            max_message_bytes=max_message_bytes,
        )

    def authenticate(self, presented: bytes | None) -> None:
        """Raise UNAUTHENTICATED unless the request carries the server's token (if it has one)."""
        if self.token is None:
            return
        if presented is None:
            raise ServeError(UNAUTHENTICATED, "this teacher requires a bearer token; none was sent")
        # Constant time: the comparison must not leak how many leading bytes matched.
        if not hmac.compare_digest(presented, self.token):
            raise ServeError(UNAUTHENTICATED, "invalid bearer token")

    def submit(
        self,
        transport: str,
        mode: str,
        payload: memoryview | np.ndarray,
        done: Done,
        *,
        defer: bool = False,
    ) -> None:
        """Decode (query) or load (index) a request and queue it; raises `ServeError` if refused.

        `payload` is Arrow IPC bytes in query mode and an array of sample ids in index mode.
        `defer=True`: the caller calls `run_ready()` after queueing (see `DynamicBatcher`).
        """
        counters = self._counters.get((transport, mode))
        if counters is None:
            counters = self._counters[(transport, mode)] = (
                self.metrics.requests.labels(transport, mode),
                self.metrics.samples.labels(transport, mode),
            )
        requests, samples = counters
        requests.inc()
        if self.draining:
            raise ServeError(UNAVAILABLE, "the teacher is shutting down; use another replica")
        if mode == QUERY:
            ids, inputs = self._decode_query(payload)  # type: ignore[arg-type]
        else:
            ids, inputs = self._load_index(payload)  # type: ignore[arg-type]

        def finished(result: object) -> None:
            if not isinstance(result, ServeError):
                samples.inc(len(ids))
            done(result)  # type: ignore[arg-type]

        self.batcher.submit(Job(ids=ids, inputs=inputs, done=finished), defer=defer)

    def run_ready(self, *, again: bool = False, max_batch_s: float = math.inf) -> bool:
        """Run a batch of queued requests on the calling (transport) thread if one is ready
        (see `DynamicBatcher.run_ready`)."""
        return self.batcher.run_ready(again=again, max_batch_s=max_batch_s)

    def record_error(self, transport: str, error: ServeError, peer: str, request_id: int) -> None:
        self.metrics.errors.labels(transport, error.code_name).inc()
        log_event(
            "request_error",
            transport=transport,
            peer=peer,
            request_id=request_id,
            code=error.code_name,
            message=error.message[:300],
        )

    def _check_count(self, n: int) -> None:
        if n == 0:
            raise ServeError(INVALID_ARGUMENT, "request has no samples; send at least one id")
        if n > self.batcher.max_batch:
            raise ServeError(
                INVALID_ARGUMENT,
                f"request has {n} samples, more than this teacher's limit of "
                f"{self.batcher.max_batch} per request (Describe.max_request_samples); split it",
            )

    def _decode_query(
        self, data: memoryview
    ) -> tuple[np.ndarray, torch.Tensor | list[torch.Tensor]]:
        if data.nbytes > self.max_message_bytes:
            raise ServeError(
                INVALID_ARGUMENT,
                f"inputs of {data.nbytes} bytes exceed the limit of {self.max_message_bytes}",
            )
        try:
            record_batch = read_ipc(data)
            # Arrow trusts the buffers and offsets a message declares; hostile ones would make
            # later reads run out of bounds, so check every one before touching the values.
            record_batch.validate(full=True)
            batch = from_record_batch(record_batch, self.input_schema, where="query inputs")
        except ValueError as exc:
            raise ServeError(INVALID_ARGUMENT, f"query inputs rejected: {exc}") from None
        except Exception as exc:  # pyarrow raises many types on hostile bytes: all are bad input
            raise ServeError(
                INVALID_ARGUMENT, f"query inputs are not a valid Arrow IPC stream: {exc!r}"
            ) from None
        self._check_count(len(batch))
        ids = batch.sample_ids.numpy().view(np.uint64)
        x = batch.tensors[self.input_schema.fields[0].name]
        return ids, (list(x.unbind()) if self.sequence_input else x)

    def _load_index(self, ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor | list[torch.Tensor]]:
        if self.dataset is None:
            raise ServeError(
                FAILED_PRECONDITION,
                "index mode needs a teacher started with --dataset; this one has none, so send "
                "inputs (query mode) instead",
            )
        self._check_count(len(ids))
        if int(ids.max()) >= self.dataset_len:
            bad = ids[ids >= self.dataset_len][:5].tolist()
            raise ServeError(
                INVALID_ARGUMENT,
                f"sample ids {bad} are out of range: the teacher's dataset has "
                f"{self.dataset_len} samples (ids 0..{self.dataset_len - 1})",
            )
        try:
            check_unique_ids(ids)
        except ValueError as exc:
            raise ServeError(
                INVALID_ARGUMENT, f"request repeats sample ids; send each id once ({exc})"
            ) from None
        # `type is`: a subclass may override __getitem__ (transforms) that a gather would skip.
        if type(self.dataset) is torch.utils.data.TensorDataset and not self.sequence_input:
            # One gather instead of a view per id and a stack: same values, ~20x less CPU.
            return ids, self.dataset.tensors[0][torch.from_numpy(ids.astype(np.int64))]
        # torch's batched-fetch protocol (DataLoader uses it too): one call per request
        # instead of one Python-level __getitem__ per id, which was most of the CPU of an
        # index-mode request for in-memory datasets (~4 us per id for digits).
        index = ids.tolist()
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(index) if getitems is not None else [self.dataset[i] for i in index]  # type: ignore[index]
        samples = [_as_tensor(item[0]) for item in items]
        return ids, (samples if self.sequence_input else torch.stack(samples))


def _as_tensor(x: object) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
