"""What the trainer tells its user: the teachers in use, the resume point, epoch progress.

Rank 0 only. Epoch progress goes through `lyceum.proto.display.Progress`: a tqdm bar on a
terminal, plain log lines (every `log_every_s`, and one per epoch) when stderr is a file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lyceum.proto.display import Progress, format_bytes, plural
from lyceum.proto.schema import KnowledgeSchema
from lyceum.student_client._checkpoints import position
from lyceum.student_client._train_results import EpochResult
from lyceum.student_client.sources import KnowledgeSource, OfflineTeacher, OnlineTeacher

__all__ = ["epoch_line", "epoch_progress", "log", "log_resume", "log_teachers", "teacher_line"]

log = logging.getLogger("lyceum.student_client.trainer")


def _fields(schema: KnowledgeSchema) -> str:
    return "; ".join(f.describe() for f in schema.fields)


def teacher_line(name: str, source: KnowledgeSource) -> str:
    """One teacher: kind, where its knowledge comes from, mode, and the fields it sends."""
    if isinstance(source, OnlineTeacher):
        info = source.describe()  # cached since the loader checked the schemas
        where = f"{plural(len(source.endpoints), 'endpoint')} {', '.join(source.endpoints)}"
        return (
            f"teacher {name!r}: online, {where}, mode {source.mode}, teacher id "
            f"{info.teacher_id or '(none)'}; knowledge {_fields(info.schema)}"
        )
    if isinstance(source, OfflineTeacher):
        manifest = source.knowledge.manifest
        return (
            f"teacher {name!r}: offline, dir {source.knowledge.directory}, "
            f"{plural(manifest.rows, 'sample')} in {plural(len(manifest.shards), 'shard')} "
            f"({format_bytes(manifest.bytes)}), model {manifest.model.spec}; knowledge "
            f"{_fields(source.schema)}"
        )
    return f"teacher {name!r}: {type(source).__name__}; knowledge {_fields(source.schema)}"


def log_teachers(sources: Mapping[str, KnowledgeSource], labeled: int | None = None) -> None:
    """A line per teacher; without any, the line that says the run is supervised."""
    if not sources:
        which = "every label" if labeled is None else f"the labels of ids < {labeled}"
        log.info("no teachers: supervised training on %s (the task loss alone)", which)
    for name, source in sources.items():
        log.info("%s", teacher_line(name, source))


def log_resume(path: Path, state: Mapping[str, Any], epochs: int, batches: int) -> None:
    """Where a resumed run continues: the checkpoint, when it was written, epoch and batch."""
    loader = state["loader"]
    epoch, done = int(loader["epoch"]), int(loader["position"])
    if epoch >= epochs:
        at = f"all {epochs} epochs are done"
    elif done:
        at = f"continuing epoch {epoch + 1}/{epochs} after batch {done}/{batches}"
    else:
        at = f"starting epoch {epoch + 1}/{epochs}"
    log.info("resumed from %s (written %s, %s): %s", path, state["written"], position(state), at)


def epoch_progress(
    epoch: int, epochs: int, batches: int, done: int, enabled: bool, every_s: float
) -> Progress:
    return Progress(
        total=batches,
        desc=f"epoch {epoch + 1}/{epochs}",
        unit="batch",
        initial=done,
        enabled=enabled,
        log=log,
        every_s=every_s,
    )


def epoch_line(e: EpochResult, epochs: int) -> str:
    return (
        f"epoch {e.epoch + 1}/{epochs}: loss {e.loss:.4f}, {e.validation()}, "
        f"{e.samples_per_s:.0f} samples/s, waited for batches {e.wait_s:.2f}s of "
        f"{e.seconds:.2f}s"
    )
