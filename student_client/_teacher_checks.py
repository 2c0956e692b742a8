"""What an online teacher says about itself (`TeacherInfo`), what a student checks before it
trusts it, and the fixes its errors suggest.

An online teacher in index mode loads sample N from its own copy of the dataset, so its
knowledge is only the student's if both datasets agree, the check an offline dump gets from
its manifest: `Describe` carries the teacher's dataset fingerprint and the student refuses a
mismatch. Replicas are interchangeable only if they are one teacher (same model identity,
schemas and, in index mode, dataset); a replica that differs is refused rather than mixed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lyceum.proto.errors import UNAUTHENTICATED, UNAVAILABLE
from lyceum.proto.manifest import DatasetFingerprint, ModelIdentity, verify_dataset
from lyceum.proto.schema import KnowledgeSchema
from lyceum.student_client._connections import TeacherError
from lyceum.v1 import knowledge_pb2 as pb

__all__ = [
    "UNAVAILABLE_FIX",
    "TeacherInfo",
    "check_dataset",
    "check_mode",
    "check_replica",
    "error_fix",
    "replica_difference",
    "teacher_error",
]


@dataclass(frozen=True)
class TeacherInfo:
    """What `describe()` returns: the teacher's schemas, identity and limits.

    `dataset` is the fingerprint of the teacher's dataset (None without one, or from a server
    older than the field); `model` its identity (spec, checkpoint and weights hashes; None from
    older servers). `teacher_id` is free-form text for people (it names the host).
    """

    schema: KnowledgeSchema
    input_schema: KnowledgeSchema | None
    teacher_id: str
    format_version: str
    accepts_index: bool
    max_request_samples: int
    max_message_bytes: int
    dataset: DatasetFingerprint | None = None
    model: ModelIdentity | None = None

    @classmethod
    def from_reply(cls, reply: pb.DescribeReply) -> TeacherInfo:
        return cls(
            schema=KnowledgeSchema.from_json(reply.knowledge_schema_json),
            input_schema=(
                KnowledgeSchema.from_json(reply.input_schema_json)
                if reply.input_schema_json
                else None
            ),
            teacher_id=reply.teacher_id,
            format_version=reply.format_version,
            accepts_index=reply.accepts_index,
            max_request_samples=reply.max_request_samples,
            max_message_bytes=reply.max_message_bytes,
            dataset=(
                DatasetFingerprint.model_validate_json(reply.dataset_fingerprint_json)
                if reply.dataset_fingerprint_json
                else None
            ),
            model=(
                ModelIdentity.model_validate_json(reply.model_identity_json)
                if reply.model_identity_json
                else None
            ),
        )


DATASET_FIX = (
    "Start the teacher with the student's dataset spec and arguments (`lyceum teacher serve "
    "--dataset SPEC --dataset-kwargs JSON`, the same split, order and preprocessing), or use "
    "mode='query' so the student sends its own inputs."
)


def check_mode(info: TeacherInfo, mode: str, where: str) -> None:
    """Raise unless the teacher can serve `mode` (index mode needs its dataset, query mode
    its input schema)."""
    if mode == "index" and not info.accepts_index:
        raise ValueError(
            f"{where} has no dataset, so it cannot serve mode='index'; start it with "
            f"--dataset or use mode='query'"
        )
    if mode == "query" and info.input_schema is None:
        raise ValueError(f"{where} did not describe its inputs; use mode='index'")


def check_dataset(info: TeacherInfo, dataset: torch.utils.data.Dataset, where: str) -> None:
    """Raise unless the teacher's dataset has the student's fingerprint (index mode).

    A teacher that reports no fingerprint (a server older than the field) is refused too:
    its ids cannot be checked, and a silent mismatch trains on the wrong labels (the issue's
    24% instead of 89%), which is worse than asking for an upgrade.
    """
    if info.dataset is None:
        raise ValueError(
            f"{where} does not report its dataset's fingerprint (a Lyceum teacher older than "
            f"this student), so index mode cannot check that its sample ids index the "
            f"student's dataset. Upgrade Lyceum on the teacher, or use mode='query'."
        )
    verify_dataset(info.dataset, dataset, where, DATASET_FIX)


def check_replica(
    first: TeacherInfo,
    other: TeacherInfo,
    first_at: str,
    other_at: str,
    index_mode: bool,
    teacher: str,
) -> None:
    """Raise unless replica `other` (endpoint `other_at`) is the same teacher as `first`
    (endpoint `first_at`); `teacher` names it in the message."""
    difference = replica_difference(first, other, first_at, other_at, index_mode)
    if difference:
        raise ValueError(
            f"{teacher}: replica {other_at} is not the same teacher as replica {first_at} "
            f"({difference}); replicas must serve the same model (spec, checkpoint, weights), "
            f"outputs and dataset: restart the odd one with the others' options, or list it "
            f"as a teacher of its own"
        )


def replica_difference(
    first: TeacherInfo, other: TeacherInfo, first_at: str, other_at: str, index_mode: bool
) -> str | None:
    """How replica `other` (at `other_at`) differs from `first` (at `first_at`), or None if
    they are one teacher. Model identities are compared when both report one (servers older
    than the field do not); datasets only in index mode, where they are read."""
    if other.schema != first.schema:
        return (
            f"knowledge schema: {first_at} serves {first.schema.to_json()}, {other_at} "
            f"serves {other.schema.to_json()}"
        )
    if other.input_schema != first.input_schema:
        return (
            f"input schema: {first_at} takes "
            f"{first.input_schema.to_json() if first.input_schema else None}, {other_at} takes "
            f"{other.input_schema.to_json() if other.input_schema else None}"
        )
    if first.model is not None and other.model is not None:
        model = first.model.difference(other.model, mine=first_at, theirs=other_at)
        if model:
            return model
    if index_mode and other.dataset != first.dataset:

        def shown(info: TeacherInfo) -> str:
            d = info.dataset
            if d is None:
                return "no dataset fingerprint"
            return f"{d.length} samples with fingerprint {d.sha256[:16]}"

        return f"dataset: {first_at} has {shown(first)}, {other_at} has {shown(other)}"
    return None


UNAVAILABLE_FIX = (
    "Check that the teacher is running (`lyceum teacher serve`), listening at that endpoint, "
    "and reachable from this machine."
)


def teacher_error(where: str, code: int, message: str) -> TeacherError:
    """A teacher's error as the student shows it: `where` (the teacher and its endpoint), the
    teacher's own words, and the fix where one applies."""
    fix = error_fix(code, message)
    return TeacherError(code, f"{where}: {message}" + (f". {fix}" if fix else ""))


def error_fix(code: int, message: str) -> str:
    """The sentence that tells the user what to do about a teacher's error (empty if the
    message says it already)."""
    text = message.lower()
    if code == UNAUTHENTICATED and "bearer token" in text:
        if "none was sent" in text:
            return (
                "Give the student the teacher's token: token_file naming a copy of the file "
                "the teacher's --token-file names (or token)."
            )
        return (
            "Check the student's token_file (or token): it must hold the same token as the "
            "file the teacher's --token-file names."
        )
    if code == UNAVAILABLE:
        if "ssl" in text or "handshake" in text or "certificate" in text:
            return (
                "Check the TLS options (tls_ca, tls_cert/tls_key, tls_server_name) against the "
                "teacher's --tls-cert and --tls-client-ca."
            )
        return UNAVAILABLE_FIX
    return ""
