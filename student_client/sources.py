"""Knowledge sources: what the `DistillLoader` asks for knowledge, online or offline.

    teachers = {
        "cnn": OnlineTeacher(["grpc://10.0.0.5:50051", "zmq://10.0.0.6:5555"], mode="index"),
        "dump": OfflineTeacher("/data/knowledge/cnn"),
    }

Every source speaks `KnowledgeSource`: the loader `submit`s a request (its own request id, the
sample ids, and the inputs in query mode) without waiting, `poll`s for whichever requests are
complete, and can ask what is still `outstanding`. A request is answered exactly once, with
the knowledge of exactly the ids asked. `OnlineTeacher` (replicas, failover) lives in
`online`; `OfflineTeacher` reads a dump; `InProcessTeacher` (in `inprocess`) runs the teacher
model in the student's own process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from lyceum.proto.codec import KnowledgeBatch
from lyceum.proto.schema import KnowledgeSchema
from lyceum.proto.vocab import Vocabulary, check_student_vocabulary
from lyceum.student_client._answered import AnsweredAtOnce
from lyceum.student_client.offline import OfflineKnowledge, VerifyMode
from lyceum.student_client.online import OnlineTeacher, TeacherUnavailableError

__all__ = [
    "KnowledgeSource",
    "OfflineTeacher",
    "OnlineTeacher",
    "TeacherUnavailableError",
]


@runtime_checkable
class KnowledgeSource(Protocol):
    """One teacher as the `DistillLoader` sees it: requests tagged by id, answered in any order.

    Why it exists: the loader keeps a window of batches in flight and must not care whether
    the knowledge comes from memory-mapped files, one server or a set of replicas that fail
    and come back. It only needs to send requests without waiting, collect finished ones, and
    know which sample ids are still owed (so a resumed or failed run asks exactly for those).
    """

    @property
    def schema(self) -> KnowledgeSchema:
        """The knowledge schema of every batch this source returns."""
        ...

    @property
    def needs_inputs(self) -> bool:
        """True in query mode: `submit` must be given the batch's input tensors."""
        ...

    def submit(
        self, request_id: int, ids: torch.Tensor, inputs: torch.Tensor | None = None
    ) -> None:
        """Ask for the knowledge of `ids` (int64 `[B]`) without waiting; ids unique per call."""
        ...

    def poll(self, timeout_s: float) -> list[tuple[int, KnowledgeBatch]]:
        """Requests completed since the last poll, waiting up to `timeout_s` for one."""
        ...

    def outstanding(self) -> dict[int, torch.Tensor]:
        """Request id -> sample ids submitted but not yet returned by `poll`."""
        ...

    def close(self) -> None: ...


class OfflineTeacher(AnsweredAtOnce):
    """Knowledge read by id from a dump (`lyceum teacher dump`); never waits, never fails over.

    The gather happens at `submit`, while the window is being filled, so `poll` only hands
    over batches that are already in memory. `verify` is `OfflineKnowledge`'s: shard
    checksums are checked in the background by default, and a bad shard fails `submit`
    with its name. `vocab`, the student's vocabulary (its size, and its tokenizer's hash if
    known: `proto.vocab.tokenizer_sha256`), is checked against the dump's: a student of
    another tokenizer or of fewer ids is refused naming both.
    """

    def __init__(
        self,
        directory: str | Path,
        dataset: torch.utils.data.Dataset | None = None,
        *,
        verify: VerifyMode = "background",
        vocab: Vocabulary | None = None,
    ) -> None:
        self.knowledge = OfflineKnowledge(directory, dataset, verify=verify)
        check_student_vocabulary(self.knowledge.schema, vocab, f"dump {str(directory)!r}")
        super().__init__()

    @property
    def schema(self) -> KnowledgeSchema:
        return self.knowledge.schema

    @property
    def needs_inputs(self) -> bool:
        return False

    def submit(
        self, request_id: int, ids: torch.Tensor, inputs: torch.Tensor | None = None
    ) -> None:
        self._ready[request_id] = self.knowledge.get(ids)

    def inputs(self, ids: torch.Tensor) -> list[torch.Tensor | dict[str, torch.Tensor]]:
        """The inputs stored with the dump (`--store-inputs`) of `ids`: see
        `OfflineKnowledge.inputs`."""
        return self.knowledge.inputs(ids)

    def close(self) -> None:
        self.knowledge.close()

    def __repr__(self) -> str:
        return f"OfflineTeacher({str(self.knowledge.directory)!r})"
