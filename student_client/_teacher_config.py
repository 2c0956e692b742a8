"""A trainer config's `teachers:` entries that reach a teacher elsewhere: online endpoints or
an offline dump (`TeacherConfig`); `TeacherEntry` adds the in-process kind
(`_inprocess_config`), told apart by its `model:` key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from lyceum.student_client._credentials import CredentialOptions
from lyceum.student_client._inprocess_config import InProcessTeacherConfig, teacher_kind
from lyceum.student_client._lm_config import VocabConfig
from lyceum.student_client._shard_check import VerifyMode

__all__ = ["TeacherConfig", "TeacherEntry"]


class TeacherConfig(BaseModel):
    """One teacher: online `endpoints` (replicas of one model) or an offline dump `dir`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: tuple[str, ...] | None = Field(
        default=None,
        description="grpc://host:port, grpcs://, zmq://host:port or dns:///name:port; several "
        "endpoints are replicas of the same teacher.",
    )
    dir: Path | None = Field(default=None, description="Directory of a `lyceum teacher dump`.")
    verify: VerifyMode = Field(
        default="background",
        description="Offline only: when shard checksums are checked. background: a thread "
        "hashes every shard at open, a read waits only for the shards it touches; first_touch: "
        "each shard when first read; off: sizes, schema and ids only. Shards verified once are "
        "remembered across runs (see OfflineKnowledge).",
    )
    mode: Literal["query", "index"] = Field(
        default="query", description="Online only: send inputs (query) or only ids (index)."
    )
    tls: bool = Field(default=False, description="Online only: TLS for grpc:// endpoints.")
    tls_ca: Path | None = Field(default=None, description="CA certificate (PEM) of the teacher.")
    tls_cert: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    tls_key: Path | None = Field(default=None, description="Client key (mutual TLS).")
    tls_server_name: str | None = Field(
        default=None,
        description="gRPC: the name the teacher's certificate was issued for, when it differs "
        "from the endpoint's host (e.g. an IP address).",
    )
    token_file: Path | None = Field(default=None, description="File holding the bearer token.")
    curve_server_key: str | None = Field(
        default=None,
        description="ZeroMQ: the teacher's CURVE public key, 40 z85 characters (quote it in "
        "YAML); or give curve_server_key_file.",
    )
    curve_server_key_file: Path | None = Field(
        default=None,
        description="ZeroMQ: file with the teacher's CURVE public key (bare z85 or a zmq "
        "certificate).",
    )
    curve_secret_key_file: Path | None = Field(
        default=None,
        description="ZeroMQ: the student's CURVE secret key (bare z85 or a zmq .key_secret "
        "certificate), for a teacher with an allow-list; its public key follows from it. A "
        "file only: secrets stay out of the YAML.",
    )
    timeout_s: float = Field(
        default=60.0, gt=0, description="Fail if no replica answers for this long."
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="Re-ask a request another replica after this long."
    )
    vocab: VocabConfig | None = Field(
        default=None,
        description="The student's vocabulary (size, tokenizer), checked against this "
        "teacher's before training: another tokenizer, or fewer ids, is refused. None: a "
        "causal_lm student declares its model's vocab_size; else nothing is checked.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> TeacherConfig:
        if (self.endpoints is None) == (self.dir is None):
            raise ValueError(
                "give exactly one of 'endpoints' (an online teacher) or 'dir' (an offline dump), "
                "or 'model' for a teacher run in the student's process"
            )
        if self.dir is not None:
            online = sorted(self.model_fields_set - {"dir", "verify", "vocab"})
            if online:
                raise ValueError(
                    f"{online} are for online teachers (endpoints); a teacher read from 'dir' "
                    f"takes only 'verify' and 'vocab'"
                )
            return self
        if "verify" in self.model_fields_set:
            raise ValueError(
                "'verify' is for offline teachers (dir): an online teacher's knowledge is "
                "checked by its codec as it arrives"
            )
        if not self.endpoints:
            raise ValueError("'endpoints' is empty: list at least one, e.g. grpc://host:50051")
        self.credential_options().check(self.endpoints)
        return self

    def credential_options(self) -> CredentialOptions:
        """This teacher's security options, as `OnlineTeacher(credentials=...)` takes them."""
        return CredentialOptions(
            token_file=self.token_file,
            tls=self.tls,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_server_name=self.tls_server_name,
            curve_server_key=self.curve_server_key,
            curve_server_key_file=self.curve_server_key_file,
            curve_secret_key_file=self.curve_secret_key_file,
        )


TeacherEntry = Annotated[
    Annotated[TeacherConfig, Tag("remote")] | Annotated[InProcessTeacherConfig, Tag("in_process")],
    Discriminator(teacher_kind),
]
"""A `teachers:` value: in-process with a `model:` key, else online (endpoints) or offline (dir)."""
