"""`ServeError`: a request the server refuses or cannot complete, with its wire code.

The codes and their names are the wire's (`lyceum.proto.errors`), shared with the student.
"""

from __future__ import annotations

import grpc

from lyceum.proto.errors import code_name

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
