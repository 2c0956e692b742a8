"""The request bookkeeping of knowledge sources that answer as soon as they are asked."""

from __future__ import annotations

import torch

from lyceum.proto.codec import KnowledgeBatch


class AnsweredAtOnce:
    """`poll` and `outstanding` for a source whose `submit` computes its answer right away
    (a dump read from disk, a teacher run in the student's process): answers wait in
    `_ready` until the next `poll` hands them all out."""

    def __init__(self) -> None:
        self._ready: dict[int, KnowledgeBatch] = {}

    def poll(self, timeout_s: float) -> list[tuple[int, KnowledgeBatch]]:
        done, self._ready = list(self._ready.items()), {}
        return done

    def outstanding(self) -> dict[int, torch.Tensor]:
        return {rid: b.sample_ids for rid, b in self._ready.items()}
