"""`OnlineTeacher`: one teacher behind one or more replicas, with failover (a `KnowledgeSource`).

Import it from `lyceum.student_client.sources`.

`OnlineTeacher` treats its endpoints as replicas of one teacher. Each request is split into
chunks the teacher accepts (its `max_request_samples`); each chunk goes to the replica with
the fewest outstanding samples (ties in turn). A replica that fails (its stream breaks, it
refuses with a retryable code, or it leaves a chunk unanswered for `request_timeout_s`) is
set aside with exponential backoff and its connection is reopened; the chunks it owed are
re-asked from another replica, or from it once it is back. A late answer to a chunk that was
re-asked is dropped, so the loader sees each sample's knowledge once. If no replica answers
anything for `timeout_s` while chunks are owed, `TeacherUnavailableError` names the teacher and
every endpoint with its last error.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
import numpy as np
import torch

from lyceum.proto.codec import KnowledgeBatch, decode, encode
from lyceum.proto.schema import KnowledgeSchema
from lyceum.student_client._connections import (
    Connection,
    Credentials,
    GrpcConnection,
    TeacherError,
    wait_any,
)
from lyceum.student_client._credentials import CredentialOptions
from lyceum.student_client._positions import jagged_offsets
from lyceum.student_client.online import TeacherInfo, connect

__all__ = ["OnlineTeacher", "TeacherUnavailableError", "concat_batches"]

Mode = Literal["query", "index"]

# Codes after which another replica (or the same one later) may well succeed: the teacher is
# gone, draining, overloaded, or the stream was cut. Anything else (bad input, bad token,
# schema trouble) would fail on every replica, so it is raised at once.
_RETRYABLE = {1, 2, 4, 8, 10, 14}
_BACKOFF_S = (0.05, 5.0)  # first and largest pause before a failed replica is tried again
# RESOURCE_EXHAUSTED: the replica is busy, not broken. Its connection and the chunks it is
# working on are kept (reconnecting threw them away: a student whose window exceeded the
# teacher's queue re-sent everything, was refused again and never got an answer); only the
# refused chunk is asked again, after a pause that doubles while refusals go on.
_BUSY = 8
_BUSY_PAUSE_S = (0.005, 1.0)
_WAIT_S = 0.05  # longest wait for replies before request timeouts are looked at again


class TeacherUnavailableError(TeacherError):
    """No replica of a teacher answered within the timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(14, message)


def concat_batches(batches: Sequence[KnowledgeBatch]) -> KnowledgeBatch:
    """One batch holding the rows of `batches` in order (same schema; jagged fields too)."""
    if len(batches) == 1:
        return batches[0]
    schema = batches[0].schema
    tensors: dict[str, torch.Tensor] = {}
    for column in batches[0].tensors:
        parts = [b.tensors[column] for b in batches]
        if parts[0].is_nested:
            values = torch.cat([p.values() for p in parts])
            lengths = torch.cat([jagged_offsets(p).diff() for p in parts])
            offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
            torch.cumsum(lengths, 0, out=offsets[1:])
            tensors[column] = torch.nested.nested_tensor_from_jagged(values, offsets=offsets)
        else:
            tensors[column] = torch.cat(parts)
    ids = torch.cat([b.sample_ids for b in batches])
    return KnowledgeBatch(sample_ids=ids, tensors=tensors, schema=schema)


class _RoundRobinGrpc(GrpcConnection):
    """A gRPC connection to `dns:///name:port` whose channel resolves every address behind the
    name and spreads streams over them with gRPC's `round_robin` policy (a Kubernetes headless
    Service of teacher replicas)."""

    def __init__(self, target: str, credentials: Credentials, tls: bool) -> None:
        super().__init__(
            target, credentials, tls=tls, extra_options=[("grpc.lb_policy_name", "round_robin")]
        )


def _open(endpoint: str, credentials: Credentials, tls: bool) -> Connection:
    if endpoint.startswith("dns:///"):
        return _RoundRobinGrpc(endpoint, credentials, tls)
    return connect(endpoint, credentials)


@dataclass(eq=False)  # identity: a chunk is one piece of work, hashed as such
class _Chunk:
    """Part of a request small enough for the teacher; answered once, whoever answers."""

    request_id: int
    ids: np.ndarray  # uint64
    inputs: torch.Tensor | None
    batch: KnowledgeBatch | None = None
    wire: set[int] = field(default_factory=set)  # wire request ids in flight for it


@dataclass
class _Replica:
    endpoint: str
    conn: Connection | None = None
    info: TeacherInfo | None = None
    owed: dict[int, _Chunk] = field(default_factory=dict)  # wire request id -> chunk
    sent_at: dict[int, float] = field(default_factory=dict)
    failures: int = 0  # since its last answer; > 0: suspect, only probed (see _dispatch)
    probe_at: float | None = None  # when the probe now in flight was sent
    down_until: float = 0.0
    busy_streak: int = 0  # RESOURCE_EXHAUSTED refusals since its last answer
    last_error: str = "not tried"

    @property
    def owed_samples(self) -> int:
        return sum(len(c.ids) for c in self.owed.values())


@dataclass
class _Request:
    ids: torch.Tensor
    chunks: list[_Chunk]


class OnlineTeacher:
    """One teacher served by one or more replicas (see the module docstring).

    `endpoints`: `grpc://host:port`, `grpcs://host:port`, `zmq://host:port`, `unix:///path`,
    `ipc:///path` or `dns:///name:port` (every address behind the name, round-robin).
    `mode`: `query` sends the student's inputs, `index` only the ids (the teacher reads its
    own copy of the dataset). `tls=True` turns `grpc://` endpoints into TLS (`grpcs://`).

    Credentials: a bearer `token` (or `token_file`) on both transports; for gRPC, `tls_ca`,
    `tls_cert` + `tls_key` (mutual TLS) and `tls_server_name` (the name the certificate was
    issued for, when it differs from the endpoint's host); for ZeroMQ, the teacher's CURVE
    public key `curve_server_key` (or `curve_server_key_file`), and for a teacher with an
    allow-list the student's own `curve_secret_key` (or `curve_secret_key_file`: a bare
    z85 key or a zmq `.key_secret` certificate). Keys are 40-character z85 text. The
    student's public key follows from its secret key; `curve_public_key` is only checked
    against it. Without a secret key a fresh key pair is used per connection.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        mode: Mode = "query",
        tls: bool = False,
        token: str | bytes | None = None,
        token_file: str | Path | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
        curve_server_key: str | bytes | None = None,
        curve_server_key_file: str | Path | None = None,
        curve_public_key: str | bytes | None = None,
        curve_secret_key: str | bytes | None = None,
        curve_secret_key_file: str | Path | None = None,
        name: str | None = None,
        timeout_s: float = 60.0,
        request_timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        listed = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not listed:
            raise ValueError(
                "OnlineTeacher: no endpoints; give at least one, e.g. grpc://host:port"
            )
        if len(set(listed)) != len(listed):
            raise ValueError(f"OnlineTeacher: endpoints {listed} name the same replica twice")
        if mode not in ("query", "index"):
            raise ValueError(f"OnlineTeacher: mode {mode!r}: expected 'query' or 'index'")
        try:
            self.credentials = CredentialOptions(
                token=token,
                token_file=token_file,
                tls=tls,
                tls_ca=tls_ca,
                tls_cert=tls_cert,
                tls_key=tls_key,
                tls_server_name=tls_server_name,
                curve_server_key=curve_server_key,
                curve_server_key_file=curve_server_key_file,
                curve_public_key=curve_public_key,
                curve_secret_key=curve_secret_key,
                curve_secret_key_file=curve_secret_key_file,
            ).build(listed)
        except ValueError as exc:
            raise ValueError(f"OnlineTeacher {listed}: {exc}") from None
        # grpc:// endpoints become grpcs://; dns:/// names get a TLS channel in _open.
        self._tls = tls or tls_ca is not None
        if tls:
            listed = [e.replace("grpc://", "grpcs://", 1) for e in listed]
        self.endpoints = listed
        self.mode: Mode = mode
        self.name = name or ",".join(listed)
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        for e in listed:  # fail on a bad URL now, not at the first request
            _open(e, self.credentials, self._tls).close()
        self._replicas = [_Replica(e) for e in listed]
        self._info: TeacherInfo | None = None
        self._wire_ids = itertools.count(1)
        self._rotation = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._queue: list[_Chunk] = []  # chunks waiting for a replica
        self._last_progress = time.monotonic()
        self._early: list[tuple[int, KnowledgeBatch]] = []  # finished while request() waited
        self.duplicates_dropped = 0
        self.failovers = 0
        self.busy_refusals = 0  # chunks a replica refused with RESOURCE_EXHAUSTED, asked again

    # -- description ---------------------------------------------------------------------

    def describe(self) -> TeacherInfo:
        """The teacher's schemas and limits, from the first replica that answers."""
        if self._info is None:
            for replica in self._replicas:
                if self._connect(replica):
                    break
            else:
                raise TeacherUnavailableError(self._unavailable("could not describe it"))
        assert self._info is not None  # set by the first successful _connect
        return self._info

    @property
    def schema(self) -> KnowledgeSchema:
        return self.describe().schema

    @property
    def needs_inputs(self) -> bool:
        return self.mode == "query"

    def _connect(self, replica: _Replica, timeout_s: float | None = None) -> bool:
        """Open (or reopen) a replica's connection and check it serves the same teacher."""
        try:
            conn = replica.conn or _open(replica.endpoint, self.credentials, self._tls)
            replica.conn = conn
            if replica.info is None:
                reply = conn.describe(timeout_s or self.connect_timeout_s)
                replica.info = TeacherInfo.from_reply(reply)
        except TeacherError as exc:
            if exc.code not in _RETRYABLE:
                raise TeacherError(
                    exc.code, f"teacher {self.name!r} at {replica.endpoint}: {exc.message}"
                ) from None
            self._fail(replica, str(exc))
            return False
        info = replica.info
        if self._info is None:
            self._check_mode(info, replica.endpoint)
            self._info = info
        elif info.schema != self._info.schema or info.input_schema != self._info.input_schema:
            raise ValueError(
                f"teacher {self.name!r}: replica {replica.endpoint} serves a different schema "
                f"({info.schema.to_json()}) than the others ({self._info.schema.to_json()}); "
                f"replicas must run the same model and outputs"
            )
        return True

    def _check_mode(self, info: TeacherInfo, endpoint: str) -> None:
        if self.mode == "index" and not info.accepts_index:
            raise ValueError(
                f"teacher {self.name!r} at {endpoint} has no dataset, so it cannot serve "
                f"mode='index'; start it with --dataset or use mode='query'"
            )
        if self.mode == "query" and info.input_schema is None:
            raise ValueError(
                f"teacher {self.name!r} at {endpoint} did not describe its inputs; use mode='index'"
            )

    # -- requests ------------------------------------------------------------------------

    def submit(
        self, request_id: int, ids: torch.Tensor, inputs: torch.Tensor | None = None
    ) -> None:
        if self.mode == "query" and inputs is None:
            raise ValueError(f"teacher {self.name!r} is in query mode: submit needs the inputs")
        self._submit(request_id, ids, inputs if self.mode == "query" else None)

    def _submit(self, request_id: int, ids: torch.Tensor, inputs: torch.Tensor | None) -> None:
        """Queue a request: index mode without `inputs`, query mode with them."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id} is already in flight")
        info = self.describe()
        if inputs is not None and info.input_schema is None:
            raise ValueError(
                f"teacher {self.name!r} did not describe its inputs, so it cannot take a query; "
                f"ask by ids only (mode='index')"
            )
        ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
        id_array = ids.numpy().astype(np.uint64)
        step = max(info.max_request_samples, 1)
        chunks = [
            _Chunk(
                request_id,
                id_array[lo : lo + step],
                inputs[lo : lo + step] if inputs is not None else None,
            )
            for lo in range(0, len(id_array), step)
        ]
        if not self._queue and not any(r.owed for r in self._replicas):
            self._last_progress = time.monotonic()  # the timeout counts from the first wait
        self._requests[request_id] = _Request(ids, chunks)
        self._queue.extend(chunks)
        self._dispatch()

    def _available(self, now: float) -> list[_Replica]:
        return [r for r in self._replicas if r.down_until <= now]

    def _dispatch(self) -> None:
        """Send queued chunks, each to the healthy replica owing the fewest samples.

        A replica that failed is suspect until it answers again: while a healthy one exists,
        a suspect gets only a copy of one chunk at a time (a probe; whoever answers first
        wins, the other answer is dropped), so a replica that went silent (a ZeroMQ peer
        killed: no error, just no answers) holds up nothing while it is tried again.
        """
        while self._queue:
            now = time.monotonic()
            candidates = [r for r in self._available(now) if r.info is not None]
            for r in self._available(now):
                # A replica never described yet (down at start): a short try while others
                # work, so a silent one does not stall them for connect_timeout_s.
                if r.info is None and self._connect(r, 0.2 if candidates else None):
                    candidates.append(r)
            if not candidates:
                return  # everyone is backing off; poll() retries when the first pause ends
            healthy = [r for r in candidates if r.failures == 0]
            pool = healthy or candidates
            turn = next(self._rotation)
            replica = min(
                (pool[(turn + k) % len(pool)] for k in range(len(pool))),
                key=lambda r: r.owed_samples,
            )
            chunk = self._queue.pop(0)
            self._send(replica, chunk)
            if healthy and replica in healthy:
                for suspect in candidates:
                    # _send reopens the connection that _fail closed.
                    if suspect.failures and suspect.probe_at is None:
                        self._send(suspect, chunk, probe=True)
                        break

    def _send(self, replica: _Replica, chunk: _Chunk, probe: bool = False) -> None:
        wire = next(self._wire_ids)
        if replica.conn is None:
            replica.conn = _open(replica.endpoint, self.credentials, self._tls)
        info = self.describe()
        try:
            if chunk.inputs is None:
                replica.conn.submit(wire, ids=chunk.ids)
            else:
                assert info.input_schema is not None  # checked by _submit
                column = info.input_schema.fields[0].name
                payload = encode(info.input_schema, chunk.ids, {column: chunk.inputs})
                replica.conn.submit(wire, inputs=payload)
        except (TeacherError, grpc.RpcError, OSError) as exc:
            self._queue.insert(0, chunk)
            self._fail(replica, f"send failed: {exc}")
            return
        replica.owed[wire] = chunk
        if probe:
            replica.probe_at = time.monotonic()
        else:
            replica.sent_at[wire] = time.monotonic()
        chunk.wire.add(wire)

    def _fail(self, replica: _Replica, reason: str) -> None:
        """Set a replica aside with backoff; re-queue every chunk it still owes."""
        replica.failures += 1
        replica.last_error = reason
        replica.probe_at = None
        # A replica never reached is retried less often: trying it costs a describe.
        cap = _BACKOFF_S[1] if replica.info is not None else 6 * _BACKOFF_S[1]
        pause = min(_BACKOFF_S[0] * 2 ** (replica.failures - 1), cap)
        replica.down_until = time.monotonic() + pause
        lost = [c for c in replica.owed.values() if c.batch is None]
        for wire, chunk in replica.owed.items():
            chunk.wire.discard(wire)
        replica.owed.clear()
        replica.sent_at.clear()
        if replica.conn is not None:
            replica.conn.close()
            replica.conn = None
        # Unique, unanswered chunks go back to the front, in their original order.
        requeue = [c for c in dict.fromkeys(lost) if not c.wire]
        self.failovers += len(requeue)
        self._queue[:0] = requeue

    def _refused_busy(self, replica: _Replica, wire: int, chunk: _Chunk, message: str) -> None:
        """Ask a chunk a busy replica refused again later (see `_BUSY`)."""
        del replica.owed[wire]
        replica.sent_at.pop(wire, None)
        if replica.probe_at is not None and not replica.owed:
            replica.probe_at = None
        chunk.wire.discard(wire)
        if not chunk.wire:  # not in flight elsewhere
            self._queue.insert(0, chunk)
        replica.busy_streak += 1
        self.busy_refusals += 1
        replica.last_error = f"busy: {message}"
        pause = min(_BUSY_PAUSE_S[0] * 2 ** (replica.busy_streak - 1), _BUSY_PAUSE_S[1])
        replica.down_until = max(replica.down_until, time.monotonic() + pause)

    def poll(self, timeout_s: float) -> list[tuple[int, KnowledgeBatch]]:
        deadline = time.monotonic() + timeout_s
        while True:
            done, self._early = self._early + self._collect(deadline), []
            now = time.monotonic()
            if done or now >= deadline or not self._requests:
                return done
            if now - self._last_progress > self.timeout_s:
                raise TeacherUnavailableError(
                    self._unavailable(
                        f"no replica answered within {self.timeout_s:g}s "
                        f"({sum(len(r.ids) for r in self._requests.values())} samples owed)"
                    )
                )

    def _collect(self, deadline: float) -> list[tuple[int, KnowledgeBatch]]:
        """One round: retry backed-off replicas, read replies, time out silent chunks; waits
        on replies until `deadline` at most."""
        now = time.monotonic()
        if self._queue:
            self._dispatch()
        busy = [
            r for r in self._replicas if (r.owed or r.probe_at is not None) and r.conn is not None
        ]
        finished: set[int] = set()
        if busy:
            # One wait on every busy replica at once, until a reply, the deadline, or the
            # moment a backed-off replica may take the queued chunks.
            wake = deadline
            if self._queue:
                wake = min(wake, min(r.down_until for r in self._replicas))
            wait_any(
                [r.conn for r in busy if r.conn is not None],
                min(max(0.0, wake - time.monotonic()), _WAIT_S),
            )
        for replica in busy:
            if replica.conn is None:  # failed earlier in this round
                continue
            failure = ""
            for reply in replica.conn.poll(0.0):
                if reply.knowledge is not None:
                    replica.failures, replica.probe_at = 0, None  # it answers: healthy again
                    replica.busy_streak = 0
                chunk = replica.owed.get(reply.request_id)
                if chunk is None:
                    self.duplicates_dropped += 1  # a late answer to a chunk re-asked elsewhere
                    continue
                if reply.knowledge is None and reply.error_code == _BUSY:
                    self._refused_busy(replica, reply.request_id, chunk, reply.error_message)
                    continue
                if reply.knowledge is None:
                    if reply.error_code not in _RETRYABLE:
                        raise TeacherError(
                            reply.error_code,
                            f"teacher {self.name!r} at {replica.endpoint} refused a request: "
                            f"{reply.error_message}",
                        )
                    # Left in `owed`: _fail below re-queues it with the rest.
                    failure = str(TeacherError(reply.error_code, reply.error_message))
                    continue
                chunk.batch = self._decode(replica, chunk, reply.knowledge)
                self._last_progress = time.monotonic()
                # The chunk may also be in flight elsewhere (re-asked): forget it everywhere,
                # so a late copy is dropped as a duplicate when it arrives.
                for other in self._replicas:
                    for wire in chunk.wire & other.owed.keys():
                        del other.owed[wire]
                        other.sent_at.pop(wire, None)
                chunk.wire.clear()
                finished.add(chunk.request_id)
            if failure:
                self._fail(replica, failure)
            else:
                oldest = min([*replica.sent_at.values(), replica.probe_at or now])
                if now - oldest > self.request_timeout_s:
                    self._fail(
                        replica, f"no answer to a request within {self.request_timeout_s:g}s"
                    )
        if not busy and self._queue:
            # Every replica is backing off: sleep until the first may be tried again.
            wake = min(min(r.down_until for r in self._replicas), deadline)
            time.sleep(max(0.0, min(wake - time.monotonic(), 0.05)))
        done = []
        for rid in sorted(finished):
            request = self._requests[rid]
            if all(c.batch is not None for c in request.chunks):
                del self._requests[rid]
                done.append((rid, concat_batches([c.batch for c in request.chunks if c.batch])))
        return done

    def _decode(self, replica: _Replica, chunk: _Chunk, data: memoryview) -> KnowledgeBatch:
        batch = decode(data, self.describe().schema)
        got = batch.sample_ids.numpy().astype(np.uint64)
        if not np.array_equal(np.sort(got), np.sort(chunk.ids)):
            raise TeacherError(
                13,
                f"teacher {self.name!r} at {replica.endpoint} answered a request for "
                f"{len(chunk.ids)} ids with the knowledge of other ids (e.g. "
                f"{np.setdiff1d(got, chunk.ids)[:5].tolist()}): a server bug",
            )
        return batch

    def _unavailable(self, what: str) -> str:
        tried = "; ".join(f"{r.endpoint} ({r.last_error})" for r in self._replicas)
        return f"teacher {self.name!r}: {what}; endpoints tried: {tried}"

    def outstanding(self) -> dict[int, torch.Tensor]:
        return {rid: r.ids for rid, r in self._requests.items()}

    def request(
        self, ids: Sequence[int] | np.ndarray | torch.Tensor, inputs: torch.Tensor | None = None
    ) -> KnowledgeBatch:
        """Knowledge for `ids`, blocking, with failover: index mode without `inputs`, query
        mode with them, whatever `mode` says (as the single-endpoint client does)."""
        rid = -next(self._wire_ids)  # negative: never collides with a loader's request ids
        self._submit(rid, torch.as_tensor(np.asarray(ids), dtype=torch.int64), inputs)
        mine: KnowledgeBatch | None = None
        others: list[tuple[int, KnowledgeBatch]] = []
        try:
            while mine is None:
                for done_id, batch in self.poll(self.timeout_s):
                    if done_id == rid:
                        mine = batch
                    else:
                        # Kept aside, not in _early yet: poll() would return them at once
                        # and never reach its timeout check.
                        others.append((done_id, batch))
        finally:
            self._early = others + self._early
        return mine

    def close(self) -> None:
        for replica in self._replicas:
            if replica.conn is not None:
                replica.conn.close()
                replica.conn = None

    def __enter__(self) -> OnlineTeacher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OnlineTeacher({self.endpoints!r}, mode={self.mode!r})"
