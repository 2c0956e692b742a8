"""`OnlineTeacher`: the student's client of an online teacher, one or more replicas of it
behind failover (a `KnowledgeSource`, and a blocking `request` for scripts and tests).

    teacher = OnlineTeacher(["grpc://10.0.0.5:50051", "zmq://10.0.0.6:5555"], mode="index",
                            credentials=CredentialOptions(token_file="token"))
    info = teacher.describe()
    batch = teacher.request([3, 1, 4])                               # index mode
    batch = teacher.request([0, 1], inputs=torch.rand(2, 1, 8, 8))   # query mode

Endpoints: `grpc://host:port`, `grpcs://host:port` (TLS), `unix:///path` (gRPC over a unix
socket), `dns:///name:port` (every address behind the name, round-robin), `zmq://host:port`,
`ipc:///path` (ZeroMQ over a unix socket). Several endpoints are replicas of one teacher.

Each request is split into chunks the teacher accepts (its `max_request_samples`), encoded
once, and spread over the replicas by the failover policy (`_failover`): a replica that fails
is set aside with backoff and the chunks it owed are asked again elsewhere, so the loader sees
each sample's knowledge exactly once. If no replica answers anything for `timeout_s` while
chunks are owed, `TeacherUnavailableError` names the teacher and every endpoint with its last
error. A refusal that no replica would answer differently (bad input, a bad token) raises
`TeacherError` with the teacher's code, ends that request, and leaves the others running.

Before the first request the teacher is checked (`_teacher_checks`): in index mode its dataset
against the student's, and every replica against the first (model identity, schemas and, in
index mode, dataset); a replica that is not the same teacher is refused, not mixed in.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from lyceum.proto.codec import KnowledgeBatch, decode, encode
from lyceum.proto.errors import INTERNAL, UNAVAILABLE, is_retryable
from lyceum.proto.schema import KnowledgeSchema
from lyceum.proto.sizes import message_cost
from lyceum.proto.vocab import Vocabulary, check_student_vocabulary
from lyceum.student_client._connections import Connection, TeacherError
from lyceum.student_client._credentials import CredentialOptions
from lyceum.student_client._endpoints import connect
from lyceum.student_client._failover import Answer, Failover
from lyceum.student_client._query_inputs import QueryInputs, query_columns, query_lengths
from lyceum.student_client._replica_state import Replica, Request, split_request
from lyceum.student_client._teacher_checks import (
    UNAVAILABLE_FIX,
    TeacherInfo,
    check_dataset,
    check_mode,
    check_replica,
    teacher_error,
)

__all__ = ["OnlineTeacher", "TeacherTimeouts", "TeacherUnavailableError", "sample_ids"]

Mode = Literal["query", "index"]


class TeacherTimeouts(BaseModel):
    """How long an `OnlineTeacher` waits, for the teacher as a whole and for each replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Give up (TeacherUnavailableError) when no replica has answered anything "
        "for this long while knowledge is owed.",
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Set a replica aside, and ask another, when it leaves a request "
        "unanswered for this long.",
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Wait this long for a replica's Describe reply."
    )


class TeacherUnavailableError(TeacherError):
    """No replica of a teacher answered within the timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(UNAVAILABLE, message)


def sample_ids(ids: Sequence[int] | np.ndarray | torch.Tensor, where: str) -> np.ndarray:
    """Sample ids as the uint64 array the wire carries; refuses negative or non-integer ids,
    which the cast would turn into huge ones (-1 became 18446744073709551615)."""
    array = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids).reshape(-1)
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(
            f"{where}: sample ids must be integers (indices into the dataset), got "
            f"{array.dtype} values such as {array[:3].tolist()}"
        )
    if array.dtype.kind == "i" and array.size and int(array.min()) < 0:
        bad = array[array < 0]
        raise ValueError(
            f"{where}: sample ids must be non-negative (indices into the dataset), got "
            f"{bad[:5].tolist()}{' ...' if bad.size > 5 else ''}"
        )
    return array.astype(np.uint64, copy=False)


class OnlineTeacher:
    """One teacher served by one or more replicas (see the module docstring).

    `mode`: `query` sends the student's inputs, `index` only the ids (the teacher reads its
    own copy of the dataset). `credentials`: a bearer token, TLS (`tls=True` turns `grpc://`
    endpoints into `grpcs://`) and CURVE keys (`CredentialOptions`); none by default.
    `timeouts`: `TeacherTimeouts`. `dataset`: the student's dataset; in index mode a teacher
    whose dataset has another fingerprint (or reports none) is refused (`ValueError`), since
    its sample ids would index other samples. Without it, nothing is checked. `vocab`: the
    student's vocabulary (`proto.vocab.Vocabulary`: its size, and its tokenizer's hash if
    known); a teacher whose knowledge is indexed by another tokenizer, or by more ids than
    the student has, is refused (`ValueError` naming both); a larger student vocabulary of
    the same tokenizer is padding (`align_logits`). `name` names the teacher in messages.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        mode: Mode = "query",
        credentials: CredentialOptions | None = None,
        timeouts: TeacherTimeouts | None = None,
        name: str | None = None,
        dataset: torch.utils.data.Dataset | None = None,
        vocab: Vocabulary | None = None,
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
        self.credentials = credentials if credentials is not None else CredentialOptions()
        try:
            self._presented = self.credentials.build(listed)
        except ValueError as exc:
            raise ValueError(f"OnlineTeacher {listed}: {exc}") from None
        # grpc:// endpoints become grpcs://; dns:/// names get a TLS channel from connect().
        self._tls = self.credentials.tls or self.credentials.tls_ca is not None
        if self.credentials.tls:
            listed = [e.replace("grpc://", "grpcs://", 1) for e in listed]
        self.endpoints = listed
        self.mode: Mode = mode
        self.timeouts = timeouts if timeouts is not None else TeacherTimeouts()
        self.name = name or ",".join(listed)
        self._named = name is not None  # else messages name the endpoints only, once each
        self.dataset = dataset
        self.vocab = vocab  # the student's, checked against the teacher's at describe
        for e in listed:  # fail on a bad URL now, not at the first request
            self._connect(e).close()
        self._failover = Failover(
            listed,
            connect=self._connect,
            join=self._join,
            teacher=self._whole,
            request_timeout_s=self.timeouts.request_timeout_s,
        )
        self._info: TeacherInfo | None = None
        self._first_endpoint = ""  # the replica whose description the others must match
        self._blocking_ids = itertools.count(1)  # request()'s own request ids, negated
        self._requests: dict[int, Request] = {}
        self._early: list[tuple[int, KnowledgeBatch]] = []  # finished while request() waited

    @property
    def duplicates_dropped(self) -> int:
        """Late answers to chunks that another replica had answered already."""
        return self._failover.duplicates_dropped

    @property
    def failovers(self) -> int:
        """Chunks asked again after the replica that owed them failed."""
        return self._failover.failovers

    @property
    def busy_refusals(self) -> int:
        """Chunks a busy replica refused (RESOURCE_EXHAUSTED) and that were asked again."""
        return self._failover.busy_refusals

    def _at(self, endpoint: str) -> str:
        """'teacher NAME at ENDPOINT' for messages; 'teacher at ENDPOINT' if no name was given
        (the default name is the endpoints themselves)."""
        return f"teacher {self.name!r} at {endpoint}" if self._named else f"teacher at {endpoint}"

    @property
    def _whole(self) -> str:
        return f"teacher {self.name!r}" if self._named else "online teacher"

    def _connect(self, endpoint: str) -> Connection:
        return connect(endpoint, self._presented, self._tls)

    # -- description ---------------------------------------------------------------------

    def describe(self) -> TeacherInfo:
        """The teacher's schemas and limits, from the first replica that answers.

        Every replica is described once here, so one that is not the same teacher is refused
        before any knowledge is used; one that is down is set aside and tried again later.
        """
        if self._info is None:
            for replica in self._failover.replicas:
                self._join(replica, None)
            if self._info is None:
                raise TeacherUnavailableError(self._unavailable("could not describe it"))
        return self._info

    @property
    def schema(self) -> KnowledgeSchema:
        return self.describe().schema

    @property
    def needs_inputs(self) -> bool:
        return self.mode == "query"

    def _join(self, replica: Replica, timeout_s: float | None) -> bool:
        """Open (or reopen) a replica's connection and check it serves the same teacher;
        False if it is down (set aside)."""
        try:
            conn = replica.conn or self._connect(replica.endpoint)
            replica.conn = conn
            if replica.info is None:
                reply = conn.describe(timeout_s or self.timeouts.connect_timeout_s)
                replica.info = TeacherInfo.from_reply(reply)
        except TeacherError as exc:
            if not is_retryable(exc.code):
                raise self._refusal(replica.endpoint, exc.code, exc.message) from None
            self._failover.set_aside(replica, str(exc))
            return False
        info = replica.info
        if self._info is None:
            where = self._at(replica.endpoint)
            check_mode(info, self.mode, where)
            check_student_vocabulary(info.schema, self.vocab, where)
            if self.mode == "index" and self.dataset is not None:
                check_dataset(info, self.dataset, where)
            self._info, self._first_endpoint = info, replica.endpoint
            return True
        check_replica(
            self._info,
            info,
            self._first_endpoint,
            replica.endpoint,
            self.mode == "index",
            self._whole,
        )
        return True

    def _refusal(self, endpoint: str, code: int, message: str) -> TeacherError:
        """A refusal no other replica would answer differently (bad input, credentials)."""
        return teacher_error(f"{self._at(endpoint)} refused", code, message)

    # -- requests ------------------------------------------------------------------------

    def submit(self, request_id: int, ids: torch.Tensor, inputs: QueryInputs | None = None) -> None:
        if self.mode == "query" and inputs is None:
            raise ValueError(f"{self._whole} is in query mode: submit needs the inputs")
        self._submit(request_id, ids, inputs if self.mode == "query" else None)

    def _submit(
        self,
        request_id: int,
        ids: Sequence[int] | np.ndarray | torch.Tensor,
        inputs: QueryInputs | None,
    ) -> None:
        """Queue a request: index mode without `inputs`, query mode with them."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id} is already in flight")
        id_array = sample_ids(ids, self._whole)
        info = self.describe()
        encoder: Callable[[slice], object] | None = None
        lengths: list[int] | None = None
        if inputs is not None:
            input_schema = info.input_schema
            if input_schema is None:
                raise ValueError(
                    f"{self._whole} did not describe its inputs, so it cannot take a query; "
                    f"ask by ids only (mode='index')"
                )
            columns = query_columns(input_schema, inputs, self._whole)
            lengths = query_lengths(input_schema, inputs)

            def encoder(part: slice) -> object:
                return encode(input_schema, id_array[part], columns(part))  # type: ignore[arg-type]

        step, costs, budget = _byte_limits(info, lengths)
        chunks = split_request(request_id, id_array, step, encoder, costs, budget)
        self._requests[request_id] = Request(torch.from_numpy(id_array.astype(np.int64)), chunks)
        self._failover.add(chunks)

    def poll(self, timeout_s: float) -> list[tuple[int, KnowledgeBatch]]:
        deadline = time.monotonic() + timeout_s
        while True:
            collected = self._collect(deadline)  # if it raises, _early keeps what it has
            done, self._early = self._early + collected, []
            now = time.monotonic()
            if done or now >= deadline or not self._requests:
                return done
            if now - self._failover.last_progress > self.timeouts.timeout_s:
                raise TeacherUnavailableError(
                    self._unavailable(
                        f"no replica answered within {self.timeouts.timeout_s:g}s "
                        f"({sum(len(r.ids) for r in self._requests.values())} samples owed)"
                    )
                )

    def _collect(self, deadline: float) -> list[tuple[int, KnowledgeBatch]]:
        """One round of the failover policy; the requests it finished. A refusal or a reply
        that does not decode ends its request and is raised once the round's other answers
        are kept for the next poll."""
        found = self._failover.collect(deadline)
        error: Exception | None = None
        finished: set[int] = set()
        for answer in found.answers:
            rid = answer.chunk.request_id
            try:
                answer.chunk.batch = self._decode(answer)
            except (ValueError, TeacherError) as exc:
                error = error or exc
                self._drop(rid)
                continue
            finished.add(rid)
        if found.refusal is not None:
            refusal = found.refusal
            error = error or self._refusal(refusal.replica.endpoint, refusal.code, refusal.message)
            self._drop(refusal.request_id)
        done = []
        for rid in sorted(finished):
            request = self._requests.get(rid)
            if request is not None and request.done:
                del self._requests[rid]
                done.append((rid, request.batch()))
        if error is not None:
            self._early += done
            raise error
        return done

    def _drop(self, request_id: int) -> None:
        self._failover.forget(request_id)
        self._requests.pop(request_id, None)

    def _decode(self, answer: Answer) -> KnowledgeBatch:
        chunk = answer.chunk
        batch = decode(answer.knowledge, self.describe().schema)
        got = batch.sample_ids.numpy().astype(np.uint64)
        if not np.array_equal(np.sort(got), np.sort(chunk.ids)):
            raise TeacherError(
                INTERNAL,
                f"{self._at(answer.replica.endpoint)} answered a request for "
                f"{len(chunk.ids)} ids with the knowledge of other ids (e.g. "
                f"{np.setdiff1d(got, chunk.ids)[:5].tolist()}): a server bug",
            )
        return batch

    def _unavailable(self, what: str) -> str:
        tried = "; ".join(f"{r.endpoint} ({r.last_error})" for r in self._failover.replicas)
        return f"{self._whole}: {what}; endpoints tried: {tried}. {UNAVAILABLE_FIX}"

    def outstanding(self) -> dict[int, torch.Tensor]:
        return {rid: r.ids for rid, r in self._requests.items()}

    def request(
        self,
        ids: Sequence[int] | np.ndarray | torch.Tensor,
        inputs: QueryInputs | None = None,
    ) -> KnowledgeBatch:
        """Knowledge for `ids`, blocking, with failover: index mode without `inputs`, query
        mode with them, whatever `mode` says. Inputs: one tensor, per-sample tensors, or
        named tensors (`{"input_ids": [B, T], "attention_mask": [B, T]}`) for a teacher
        that takes them (see `_query_inputs`)."""
        rid = -next(self._blocking_ids)  # negative: never collides with a loader's request ids
        self._submit(rid, ids, inputs)
        mine: KnowledgeBatch | None = None
        others: list[tuple[int, KnowledgeBatch]] = []
        try:
            while mine is None:
                for done_id, batch in self.poll(self.timeouts.timeout_s):
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
        self._failover.close()

    def __enter__(self) -> OnlineTeacher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OnlineTeacher({self.endpoints!r}, mode={self.mode!r})"


def _byte_limits(
    info: TeacherInfo, lengths: list[int] | None
) -> tuple[int, np.ndarray | None, int]:
    """How to cut a request so that no reply exceeds the teacher's message limit: samples per
    chunk, each sample's reply bytes (None: count only) and the bytes a chunk may take.

    Fixed-shape knowledge costs the same per sample, so it only lowers the samples per chunk;
    token-level knowledge costs per position, known from the query's sequence lengths. In
    index mode the teacher's sequences are not known here: a reply still too large is refused
    by the teacher at once, naming the sizes."""
    cost = message_cost(info.schema)
    budget = info.max_message_bytes - cost.fixed
    step = info.max_request_samples
    if not cost.sequences:
        return min(step, max(budget // max(cost.per_sample, 1), 1)), None, budget
    if lengths is None:
        return step, None, budget
    costs = cost.per_sample + cost.per_position * np.asarray(lengths, dtype=np.int64)
    return step, costs, budget
