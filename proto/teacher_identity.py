"""Which teacher produced a dump's knowledge: its spec, checkpoint hash and weight hash.

A resumed dump must come from the same teacher; `lyceum.proto.manifest` records it (and
re-exports these names).
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lyceum.proto.fingerprint import hash_tensor

__all__ = ["ModelIdentity", "model_identity", "state_dict_sha256"]


class ModelIdentity(BaseModel):
    """Which teacher produced the knowledge; a resumed dump must come from the same one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str = Field(description="Model spec string (`module:callable{kwargs}`) or a name.")
    checkpoint_sha256: str | None = Field(
        default=None, description="sha256 of the checkpoint file, if one was loaded."
    )
    weights_sha256: str = Field(
        description="sha256 of the model's state dict (names, dtypes, shapes, bytes): catches "
        "randomly initialised or in-process-trained weights that no checkpoint names."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Free-form descriptions given by the caller."
    )

    def difference(
        self, other: ModelIdentity, mine: str = "the directory", theirs: str = "this run"
    ) -> str | None:
        """How `other` differs from this identity, or None if it is the same teacher; `mine`
        and `theirs` name the two sides in the message."""
        for name in ("spec", "checkpoint_sha256", "weights_sha256", "labels"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                return f"model {name}: {mine} has {a!r}, {theirs} has {b!r}"
        return None


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict: every name, dtype, shape and value byte, in order."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        hash_tensor(digest, t)
    return digest.hexdigest()


def model_identity(
    spec: str, model: nn.Module, checkpoint_sha256: str | None = None
) -> ModelIdentity:
    """The identity of a teacher: its spec (or any name), checkpoint hash and weight hash."""
    return ModelIdentity(
        spec=spec, checkpoint_sha256=checkpoint_sha256, weights_sha256=state_dict_sha256(model)
    )
