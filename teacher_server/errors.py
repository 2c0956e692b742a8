"""Domain errors of the online server and their status codes on the wire.

Both transports answer a failed request with a code and a message; the codes are the proto's
`ErrorCode` numbers, which equal gRPC's status codes, so a ZeroMQ error reply and a gRPC
status carry the same number and the same text.
"""

from __future__ import annotations

import grpc

from lyceum.v1 import knowledge_pb2 as pb

INVALID_ARGUMENT = pb.ERROR_CODE_INVALID_ARGUMENT
RESOURCE_EXHAUSTED = pb.ERROR_CODE_RESOURCE_EXHAUSTED
FAILED_PRECONDITION = pb.ERROR_CODE_FAILED_PRECONDITION
INTERNAL = pb.ERROR_CODE_INTERNAL
UNAVAILABLE = pb.ERROR_CODE_UNAVAILABLE
UNAUTHENTICATED = pb.ERROR_CODE_UNAUTHENTICATED

_GRPC_STATUS = {code.value[0]: code for code in grpc.StatusCode}


class ServeError(Exception):
    """A request the server refuses or cannot complete: a wire code and a message for the student."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return code_name(self.code)

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return _GRPC_STATUS[self.code]

    def __repr__(self) -> str:
        return f"ServeError({self.code_name}, {self.message!r})"


def code_name(code: int) -> str:
    """`INVALID_ARGUMENT` for 3, etc.; the number itself for codes the proto does not name."""
    try:
        return pb.ErrorCode.Name(code).removeprefix("ERROR_CODE_")  # type: ignore[arg-type]
    except ValueError:
        return str(code)
