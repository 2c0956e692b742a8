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
import pyarrow as pa
import torch

from lyceum.proto.codec import (
    Compression,
    check_unique_ids,
    from_record_batch,
    ipc_size,
    read_ipc,
)
from lyceum.proto.errors import FAILED_PRECONDITION, INVALID_ARGUMENT, UNAUTHENTICATED, UNAVAILABLE
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import ModelIdentity, dataset_fingerprint
from lyceum.proto.schema import FORMAT_VERSION, KnowledgeSchema
from lyceum.teacher_server.batcher import Done, DynamicBatcher, Inputs, Job, Knowledge
from lyceum.teacher_server.errors import ServeError
from lyceum.teacher_server.metrics import EventLimiter, ServerMetrics
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

    def begin_drain(self) -> None:
        """The server has begun to drain: tell whoever routes students here (health checks,
        load balancers) to send new work elsewhere; requests keep being answered (refused
        with UNAVAILABLE by the service) until `stop`."""
        ...

    def stop(self, grace_s: float) -> None:
        """Stop accepting connections; finish replies in flight within `grace_s`."""
        ...


_IPC_SLACK = 1 << 20


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
        model: ModelIdentity | None = None,
        named_inputs: bool = False,
        compression: Compression = "none",
    ) -> None:
        self.batcher = batcher
        # Arrow IPC body compression of every knowledge reply (the student's reader undoes it).
        self.compression: Compression = compression
        self.input_schema = input_schema
        self.sequence_input = sequence_input
        # Inputs are named tensors (input_ids, attention_mask, ...): one dict per sample.
        self.named_inputs = named_inputs
        self.dataset = dataset
        self.dataset_len = len(dataset) if dataset is not None else 0  # type: ignore[arg-type]
        self.token = token
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        # What peers can trigger is logged once per peer per interval (the metrics count all).
        self.events = EventLimiter()
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
            # The manifest's fingerprint: a student in index mode checks it against its own
            # dataset, as it does a dump's (64 items read once, milliseconds).
            dataset_fingerprint_json=(
                dataset_fingerprint(dataset).model_dump_json() if dataset is not None else ""
            ),
            model_identity_json=model.model_dump_json() if model is not None else "",
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
        self.events.log(
            "request_error",
            f"{transport} {peer}",
            transport=transport,
            peer=peer,
            request_id=request_id,
            code=error.code_name,
            message=error.message[:300],
        )

    def reply_batch(self, knowledge: Knowledge) -> pa.RecordBatch:
        """A reply's record batch; refuses at once (INVALID_ARGUMENT, never retried: every
        replica would say the same) one larger than the message limit, which the transport
        would otherwise fail to send, and the student retry until its timeout."""
        batch = knowledge.record_batch()
        # The exact size costs a pass over the batch's metadata on every reply; the buffers'
        # bytes (what IPC adds is padding and headers, under 1 MiB) tell when it is needed.
        size = batch.get_total_buffer_size()  # an upper bound; `nbytes` walks slices
        if size > self.max_message_bytes - _IPC_SLACK:
            size = ipc_size(batch)
        if size > self.max_message_bytes:
            raise ServeError(
                INVALID_ARGUMENT,
                f"the reply to this request would be {size} bytes, over this teacher's message "
                f"limit of {self.max_message_bytes} bytes (Describe.max_message_bytes): ask for "
                f"fewer samples or shorter sequences per request, or serve with a larger "
                f"--max-message-bytes",
            )
        return batch

    def _check_count(self, n: int) -> None:
        if n == 0:
            raise ServeError(INVALID_ARGUMENT, "request has no samples; send at least one id")
        if n > self.batcher.max_batch:
            raise ServeError(
                INVALID_ARGUMENT,
                f"request has {n} samples, more than this teacher's limit of "
                f"{self.batcher.max_batch} per request (Describe.max_request_samples); split it",
            )

    def _decode_query(self, data: memoryview) -> tuple[np.ndarray, Inputs]:
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
        if self.named_inputs:
            per_key = {
                f.name: list(batch.tensors[f.name].unbind()) for f in self.input_schema.fields
            }
            return ids, [{k: v[i] for k, v in per_key.items()} for i in range(len(ids))]
        x = batch.tensors[self.input_schema.fields[0].name]
        return ids, (list(x.unbind()) if self.sequence_input else x)

    def _load_index(self, ids: np.ndarray) -> tuple[np.ndarray, Inputs]:
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
        if self.named_inputs:
            return ids, [_as_tensors(item_inputs(item)) for item in items]
        # The `(tensor, label)` item inline: two calls per sample were ~7% of the server's CPU
        # on a 256-sample request.
        samples = [
            item[0]
            if type(item) is tuple and type(item[0]) is torch.Tensor
            else _as_tensor(item_inputs(item))
            for item in items
        ]
        return ids, (samples if self.sequence_input else torch.stack(samples))


def _as_tensor(x: object) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _as_tensors(x: object) -> dict[str, torch.Tensor]:
    if not isinstance(x, dict):
        raise ServeError(
            INVALID_ARGUMENT,
            f"this teacher takes named inputs, but its dataset gave a {type(x).__name__}",
        )
    return {k: _as_tensor(v) for k, v in x.items()}
