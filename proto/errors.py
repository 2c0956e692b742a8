"""The error codes of the wire, which of them are worth retrying, and their names.

Both transports answer a failed request with a code and a message, and both sides read the
same numbers: the proto's `ErrorCode` values, which equal gRPC's status codes, so a ZeroMQ
error reply and a gRPC status carry the same number and the same text. A student also meets
the gRPC-only statuses of a broken call (CANCELLED, DEADLINE_EXCEEDED, ...), so they are
listed here too, with the same numbers as `grpc.StatusCode`.
"""

from __future__ import annotations

from lyceum.v1 import knowledge_pb2 as pb

__all__ = [
    "ABORTED",
    "BUSY",
    "CANCELLED",
    "DEADLINE_EXCEEDED",
    "FAILED_PRECONDITION",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "RETRYABLE",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "UNKNOWN",
    "code_name",
    "is_retryable",
]

# The codes a teacher sends (the proto's ErrorCode enum).
INVALID_ARGUMENT: int = pb.ERROR_CODE_INVALID_ARGUMENT
RESOURCE_EXHAUSTED: int = pb.ERROR_CODE_RESOURCE_EXHAUSTED
FAILED_PRECONDITION: int = pb.ERROR_CODE_FAILED_PRECONDITION
INTERNAL: int = pb.ERROR_CODE_INTERNAL
UNAVAILABLE: int = pb.ERROR_CODE_UNAVAILABLE
UNAUTHENTICATED: int = pb.ERROR_CODE_UNAUTHENTICATED
# gRPC statuses of a call that broke on the way, which the proto does not name.
CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, ABORTED = 1, 2, 4, 10

_NAMES = {
    CANCELLED: "CANCELLED",
    UNKNOWN: "UNKNOWN",
    INVALID_ARGUMENT: "INVALID_ARGUMENT",
    DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    FAILED_PRECONDITION: "FAILED_PRECONDITION",
    ABORTED: "ABORTED",
    INTERNAL: "INTERNAL",
    UNAVAILABLE: "UNAVAILABLE",
    UNAUTHENTICATED: "UNAUTHENTICATED",
}

RETRYABLE = frozenset(
    {CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, UNAVAILABLE}
)
"""Codes after which another replica (or the same one later) may well succeed: the teacher is
gone, draining, overloaded, or the call was cut. Any other code (bad input, a bad token,
schema trouble) would come back from every replica."""

BUSY = RESOURCE_EXHAUSTED
"""The teacher's queue is full: it is busy, not broken (retry the refused request later)."""


def is_retryable(code: int) -> bool:
    """True if asking again (another replica, or the same one later) may succeed."""
    return code in RETRYABLE


def code_name(code: int) -> str:
    """`INVALID_ARGUMENT` for 3, etc.; `code N` for a number no side defines."""
    return _NAMES.get(code, f"code {code}")
