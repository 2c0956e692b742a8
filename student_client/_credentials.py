"""A student's credentials for online teachers: which options fit which endpoints, CURVE keys.

`OnlineTeacher(endpoints, credentials=CredentialOptions(...))` and `TeacherConfig` (YAML
keys of the same names, `TeacherConfig.credential_options()`) gather them in one
`CredentialOptions` and call its `check`, so a mistake gets the same message either way,
naming the option and what it needs. `TeacherConfig` only checks the shape of the options;
`OnlineTeacher` also reads the files (`build`), on the machine that trains (keys through
`lyceum.proto.curve_keys`, the reader the teacher uses too).

CURVE (ZeroMQ) needs the teacher's public key to connect at all; a teacher with an
allow-list (`--zmq-curve-clients`) also needs the student's own key pair. The student's
public key follows from its secret key (`zmq.curve_public`), so the secret alone is enough;
a public key given as well must be that key's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import zmq
from pydantic import BaseModel, ConfigDict, Field

from lyceum.proto.curve_keys import read_curve_key, z85_key
from lyceum.proto.secret_files import read_token_file, warn_if_exposed
from lyceum.student_client._connections import Credentials
from lyceum.student_client._endpoints import GRPC_SCHEMES, ZMQ_SCHEMES

__all__ = [
    "CredentialOptions",
    "client_curve_keys",
    "server_curve_key",
]


class CredentialOptions(BaseModel):
    """A student's security options for one online teacher, by the names every entry point
    uses (`OnlineTeacher`, `TeacherConfig`). Nothing is read until `build`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Secrets stay out of repr() (logs, tracebacks).
    token: str | bytes | None = Field(
        default=None,
        repr=False,
        description="Bearer token, on both transports; or give token_file.",
    )
    token_file: str | Path | None = Field(
        default=None,
        description="File holding the bearer token (what the teacher's --token-file names).",
    )
    tls: bool = Field(
        default=False, description="gRPC: TLS for grpc:// and dns:/// endpoints (grpcs://)."
    )
    tls_ca: str | Path | None = Field(
        default=None,
        description="gRPC: CA certificate (PEM) the teacher's certificate is checked against.",
    )
    tls_cert: str | Path | None = Field(
        default=None, description="gRPC: the student's certificate (PEM), for mutual TLS."
    )
    tls_key: str | Path | None = Field(
        default=None, description="gRPC: the private key of tls_cert (PEM)."
    )
    tls_server_name: str | None = Field(
        default=None,
        description="gRPC: the name the teacher's certificate was issued for, when it differs "
        "from the endpoint's host (e.g. an IP address).",
    )
    curve_server_key: str | bytes | None = Field(
        default=None,
        description="ZeroMQ: the teacher's CURVE public key (40-character z85); or give "
        "curve_server_key_file.",
    )
    curve_server_key_file: str | Path | None = Field(
        default=None,
        description="ZeroMQ: file with the teacher's CURVE public key (bare z85 or a zmq "
        "certificate).",
    )
    curve_public_key: str | bytes | None = Field(
        default=None,
        description="ZeroMQ: the student's CURVE public key; it follows from the secret key, "
        "so it is only checked against it.",
    )
    curve_secret_key: str | bytes | None = Field(
        default=None,
        repr=False,
        description="ZeroMQ: the student's CURVE secret key (z85), for a teacher with an "
        "allow-list; without one a fresh key pair is used per connection.",
    )
    curve_secret_key_file: str | Path | None = Field(
        default=None,
        description="ZeroMQ: file with the student's CURVE secret key (bare z85 or a zmq "
        ".key_secret certificate).",
    )

    def check(self, endpoints: Sequence[str]) -> None:
        """Raise `ValueError` naming the option if the options cannot work together or with
        `endpoints` (TLS needs a gRPC endpoint, CURVE a ZeroMQ one)."""
        pairs: tuple[tuple[str, object, str, object], ...] = (
            ("token", self.token, "token_file", self.token_file),
            (
                "curve_server_key",
                self.curve_server_key,
                "curve_server_key_file",
                self.curve_server_key_file,
            ),
            (
                "curve_secret_key",
                self.curve_secret_key,
                "curve_secret_key_file",
                self.curve_secret_key_file,
            ),
        )
        for inline, inline_value, from_file, file_value in pairs:
            if inline_value is not None and file_value is not None:
                raise ValueError(f"give {inline!r} or {from_file!r}, not both")
        for name, key in (
            ("curve_server_key", self.curve_server_key),
            ("curve_public_key", self.curve_public_key),
            ("curve_secret_key", self.curve_secret_key),
        ):
            if key is not None:
                z85_key(key, name)
        secret = self.curve_secret_key is not None or self.curve_secret_key_file is not None
        if self.curve_public_key is not None and not secret:
            raise ValueError(
                "'curve_public_key' is half of the student's CURVE key pair: also give "
                "'curve_secret_key' (or 'curve_secret_key_file'), from which the public key follows"
            )
        if secret and self.curve_server_key is None and self.curve_server_key_file is None:
            raise ValueError(
                "the student's CURVE keys need the teacher's public key: give 'curve_server_key' "
                "(40-character z85) or 'curve_server_key_file' (the teacher's public key or "
                "certificate)"
            )
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("'tls_key' is the key of a client certificate: also give 'tls_cert'")
        if self.tls_cert is not None and self.tls_key is None:
            raise ValueError(
                "'tls_cert' (a client certificate) needs its private key: give 'tls_key'"
            )
        curve = self._given(
            "curve_server_key",
            "curve_server_key_file",
            "curve_public_key",
            "curve_secret_key",
            "curve_secret_key_file",
        )
        if curve and not any(e.startswith(ZMQ_SCHEMES) for e in endpoints):
            raise ValueError(
                f"{curve} secure ZeroMQ (CURVE), but no endpoint is zmq://host:port or ipc:///path "
                f"(endpoints: {list(endpoints)}); drop the CURVE options, or use TLS options for gRPC"
            )
        tls_options = self._given("tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name")
        if tls_options and not any(e.startswith(GRPC_SCHEMES) for e in endpoints):
            raise ValueError(
                f"{tls_options} secure gRPC (TLS), but no endpoint is grpc://, grpcs://, unix:// or "
                f"dns:/// (endpoints: {list(endpoints)}); for ZeroMQ use the curve_* options"
            )

    def build(self, endpoints: Sequence[str]) -> Credentials:
        """Check the options, then read the files they name: what a connection to one of
        `endpoints` presents."""
        self.check(endpoints)
        token = self.token
        if self.token_file is not None:
            token = read_token_file(self.token_file, "token_file")
        public_key, secret_key = client_curve_keys(
            self.curve_public_key, self.curve_secret_key, self.curve_secret_key_file
        )
        if self.curve_secret_key_file is not None:
            warn_if_exposed(self.curve_secret_key_file, "curve_secret_key_file")
        tls_key = None
        if self.tls_key is not None:
            tls_key = Path(self.tls_key).read_bytes()
            warn_if_exposed(self.tls_key, "tls_key")
        return Credentials(
            token=token.encode() if isinstance(token, str) else token,
            tls_ca=Path(self.tls_ca).read_bytes() if self.tls_ca is not None else None,
            tls_cert=Path(self.tls_cert).read_bytes() if self.tls_cert is not None else None,
            tls_key=tls_key,
            tls_server_name=self.tls_server_name,
            curve_server_key=server_curve_key(self.curve_server_key, self.curve_server_key_file),
            curve_public_key=public_key,
            curve_secret_key=secret_key,
        )

    def _given(self, *names: str) -> list[str]:
        return [n for n in names if getattr(self, n) is not None and getattr(self, n) is not False]


def server_curve_key(key: str | bytes | None, key_file: str | Path | None) -> bytes | None:
    """The teacher's CURVE public key, inline or from a file; None when not given."""
    if key_file is not None:
        return read_curve_key(key_file, "curve_server_key_file", secret=False)
    return None if key is None else z85_key(key, "curve_server_key")


def client_curve_keys(
    public: str | bytes | None,
    secret: str | bytes | None,
    secret_file: str | Path | None,
) -> tuple[bytes | None, bytes | None]:
    """The student's CURVE (public, secret) keys, or (None, None) when not given; the public
    key is derived from the secret one, and a public key given too must match it."""
    if secret_file is not None:
        secret_key = read_curve_key(secret_file, "curve_secret_key_file", secret=True)
    elif secret is not None:
        secret_key = z85_key(secret, "curve_secret_key")
    else:
        return None, None
    derived = zmq.curve_public(secret_key)
    if public is not None and z85_key(public, "curve_public_key") != derived:
        raise ValueError(
            "'curve_public_key' is not the public key of the given CURVE secret key (it is "
            f"{derived.decode()}); give the matching pair, or leave 'curve_public_key' out"
        )
    return derived, secret_key
