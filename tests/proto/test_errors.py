"""The wire's error codes: the same numbers as gRPC's status codes and the proto's enum, one
name for each, which are retryable, and both sides' exceptions built on them."""

from __future__ import annotations

import grpc
import pytest

from lyceum.proto import errors
from lyceum.student_client import TeacherError, TeacherUnavailableError
from lyceum.teacher_server.errors import ServeError
from lyceum.v1 import knowledge_pb2 as pb

PROTO_NAMES = set(pb.ErrorCode.DESCRIPTOR.values_by_name)
NAMES = [
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "INTERNAL",
    "UNAVAILABLE",
    "UNAUTHENTICATED",
]


@pytest.mark.parametrize("name", NAMES)
def test_codes_are_grpc_status_numbers_with_their_names(name: str) -> None:
    code = getattr(errors, name)
    assert code == getattr(grpc.StatusCode, name).value[0]
    assert errors.code_name(code) == name
    if f"ERROR_CODE_{name}" in PROTO_NAMES:  # the codes a teacher sends
        assert code == pb.ErrorCode.Value(f"ERROR_CODE_{name}")


def test_every_code_the_proto_names_is_known() -> None:
    named = {n.removeprefix("ERROR_CODE_") for n in PROTO_NAMES} - {"UNSPECIFIED"}
    assert named <= set(NAMES)


def test_retryable_codes_are_those_another_try_may_fix() -> None:
    retryable = {n for n in NAMES if errors.is_retryable(getattr(errors, n))}
    assert retryable == {
        "CANCELLED",
        "UNKNOWN",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "ABORTED",
        "UNAVAILABLE",
    }
    assert errors.BUSY == errors.RESOURCE_EXHAUSTED and errors.is_retryable(errors.BUSY)
    assert not errors.is_retryable(42)


def test_a_number_no_side_defines_is_named_as_a_number() -> None:
    assert errors.code_name(42) == "code 42"
    assert str(TeacherError(42, "odd")) == "code 42: odd"


def test_both_sides_exceptions_use_the_one_name_helper() -> None:
    served = ServeError(errors.RESOURCE_EXHAUSTED, "the queue is full")
    assert served.code_name == "RESOURCE_EXHAUSTED"
    assert served.grpc_status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert repr(served) == "ServeError(RESOURCE_EXHAUSTED, 'the queue is full')"
    seen = TeacherError(errors.UNAUTHENTICATED, "invalid bearer token")
    assert seen.code_name == "UNAUTHENTICATED"
    assert str(seen) == "UNAUTHENTICATED: invalid bearer token"
    gone = TeacherUnavailableError("no replica answered")
    assert gone.code == errors.UNAVAILABLE and str(gone) == "UNAVAILABLE: no replica answered"
