"""The trainer's checkpoint files: what they hold, how they are written and read, and what a
`checkpoint_dir` may already hold when a run starts.

A checkpoint is a plain state dict (`torch.save` of tensors, numbers and strings; read back
with `weights_only=True`, never unpickled): the model, the optimizer, the LR schedule, the
losses' learned adapters, the loader's `{epoch, seed, position}`, the finished epochs'
figures, when it was written, and the run's identity: the config values a resume must keep
(model spec, data, batch size and accumulation, seed, ranks, optimizer, schedule, loss
terms), so resuming with another model is refused by name instead of failing on a tensor
shape.

Files: `epoch-NNN.pt` after every epoch and `last.pt` (what `--resume` reads) after every
epoch and whenever a run stops early; beside them, at the same moments, `model.safetensors`:
the student's weights alone, what every command's `--checkpoint` takes (`teacher serve`,
`teacher dump`, `prune`, `quantize`), which refuse the resumable files and name this one.
Each is written to a temp file beside it (`last.tmp`, `model.tmp`), fsynced and renamed over
the old one: a crash, a full disk or a second Ctrl-C mid-write leaves the previous file whole
and no temp file behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from lyceum.proto.display import plural
from lyceum.proto.manifest import fsync_directory
from lyceum.proto.specs import WEIGHTS_FILE
from lyceum.student_client.trainer_config import TrainConfig

__all__ = [
    "LAST",
    "VERSION",
    "WEIGHTS",
    "check_identity",
    "epoch_file",
    "position",
    "prepare",
    "read",
    "restore",
    "run_identity",
    "save",
    "save_weights",
    "trainer_files",
]

VERSION = 2
LAST = "last.pt"
WEIGHTS = WEIGHTS_FILE  # what lyceum.proto.specs names when it refuses a trainer checkpoint
# The trainer's own files; `--overwrite` removes these and nothing else a user keeps there.
_PATTERNS = (
    "last.pt",
    "last.tmp",
    "epoch-[0-9]*.pt",
    "epoch-[0-9]*.tmp",
    WEIGHTS,
    "model.tmp",
)
# What a checkpoint written before an identity key existed implies for it.
_IMPLIED = {"accumulate": "1"}
_START_OVER = (
    "resume with the config it was written with, or start a new run: without --resume and "
    "with --overwrite (removes that run's checkpoints), or with another checkpoint_dir"
)


def epoch_file(epoch: int) -> str:
    """The file written after epoch `epoch` (counted from 0): `epoch-001.pt` for the first."""
    return f"epoch-{epoch + 1:03d}.pt"


def trainer_files(directory: Path) -> list[Path]:
    """The trainer's files in `directory`: `last.pt`, `epoch-NNN.pt` and their temp files."""
    if not directory.is_dir():
        return []
    found = {p for pattern in _PATTERNS for p in directory.glob(pattern) if p.is_file()}
    return sorted(found)


def run_identity(config: TrainConfig, world: int) -> dict[str, str]:
    """The config values a resumed run must share with the run that wrote the checkpoint:
    the model and the shapes of its state, the order of the ids, and the optimizer's and
    schedule's state (a checkpoint restores those, whatever the config says)."""
    terms = [
        f"{t.name}: {t.kind} {_keys(t.field)} -> {_keys(t.student)}" for t in config.losses.terms
    ]
    return {
        "model": str(config.model_spec()),
        "training dataset": str(config.dataset.train_spec()),
        "batch_size": str(config.batch_size),
        "accumulate": str(config.accumulate),
        "seed": str(config.seed),
        "DDP ranks": str(world),
        "optimizer": config.optimizer.model_dump_json(),
        "schedule": config.schedule.model_dump_json(),
        "loss terms": "; ".join(terms) or "none (supervised)",
    }


def _keys(keys: str | tuple[str, ...]) -> str:
    return keys if isinstance(keys, str) else f"[{', '.join(keys)}]"


def prepare(directory: Path | None, *, resume: bool, overwrite: bool, clear: bool) -> None:
    """Check `checkpoint_dir` before a run starts: `resume` needs `last.pt`; a new run is
    refused where another run's checkpoints are, unless `overwrite`, which removes them when
    `clear` (rank 0 only, under DDP)."""
    if resume and overwrite:
        raise ValueError(
            "give --resume (continue the run in checkpoint_dir) or --overwrite (start a new "
            "one there), not both"
        )
    if directory is None:
        if resume:
            raise ValueError("--resume needs checkpoint_dir in the config (where last.pt is)")
        return
    if resume:
        last = directory / LAST
        if not last.is_file():
            if not directory.is_dir():
                why = "the directory does not exist"
            else:
                held = trainer_files(directory)
                why = f"it holds {_listing(held)}" if held else "it holds no checkpoint"
            raise ValueError(
                f"--resume: no checkpoint {str(last)!r} ({why}); start without --resume for a "
                f"new run, or set checkpoint_dir to the directory of the run to continue"
            )
        return
    held = trainer_files(directory)
    if not held:
        return
    if overwrite:
        if clear:
            for path in held:
                path.unlink(missing_ok=True)
        return
    raise ValueError(
        f"checkpoint_dir {str(directory)!r} already holds a run ({_contents(directory, held)}): "
        f"continue it with --resume, or start a new run there with --overwrite (removes "
        f"last.pt, epoch-*.pt and {WEIGHTS}, nothing else), or set checkpoint_dir to another "
        f"directory"
    )


def _listing(paths: list[Path]) -> str:
    names = [p.name for p in paths]
    return ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])}, ... {names[-1]}"


def _contents(directory: Path, held: list[Path]) -> str:
    epochs = [p for p in held if p.suffix == ".pt" and p.name.startswith("epoch-")]
    parts = []
    if (directory / LAST).is_file():
        try:
            parts.append(f"last.pt {position(read(directory / LAST))}")
        except ValueError:
            parts.append("last.pt, unreadable")
    if len(epochs) == 1:
        parts.append(epochs[0].name)
    elif epochs:
        parts.append(f"{plural(len(epochs), 'epoch file')} {epochs[0].name}..{epochs[-1].name}")
    if (directory / WEIGHTS).is_file():
        parts.append(WEIGHTS)
    return "; ".join(parts) or _listing(held)


def position(state: Mapping[str, Any]) -> str:
    """Where the run of a checkpoint stands: `after epoch 2` or `in epoch 3, after batch 5`."""
    loader = state["loader"]
    epoch, done = int(loader["epoch"]), int(loader["position"])
    if done:
        return f"in epoch {epoch + 1}, after batch {done}"
    return f"after epoch {epoch}" if epoch else "before its first epoch"


class _Writes:
    """A file as `torch.save` sees it, keeping the first write error: torch turns an
    OSError raised by `write` into an unrelated RuntimeError ("unexpected pos")."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return int(self._file.write(data))
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._file.flush()


def save(path: Path, state: Mapping[str, Any]) -> None:
    """Write `state` to `path` atomically (temp file, fsync, rename, fsync the directory).

    A write that fails raises the OSError (ENOSPC, EROFS, ...) with `path` as its filename;
    the temp file is removed, and so it is when anything else interrupts the write."""

    def write(f: IO[bytes]) -> None:
        out = _Writes(f)
        try:
            torch.save(dict(state), out)  # type: ignore[arg-type]  # torch only calls write
        except Exception:
            if out.error is None:
                raise
        if out.error is not None:
            raise out.error

    _write_atomically(path, write)


def save_weights(
    path: Path,
    model: nn.Module | Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `model`'s state dict (or the state dict given) to `path` as safetensors,
    atomically as `save` does, with `metadata` in its header (`format: pt`, or the derived
    format of a pruned student).

    Tensors that share memory (tied weights) are stored as copies: safetensors refuses shared
    tensors, and a strict `load_state_dict` needs every key."""
    from safetensors.torch import save as to_safetensors

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    state = model.state_dict() if isinstance(model, nn.Module) else model
    for name, value in state.items():
        tensor = value.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            tensor = tensor.clone()
        storages.add(storage)
        tensors[name] = tensor.contiguous()
    data = to_safetensors(tensors, metadata={"format": "pt", **(metadata or {})})
    _write_atomically(path, lambda f: f.write(data))


def _write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def read(path: Path) -> dict[str, Any]:
    """A checkpoint's state; a file that is not a Lyceum checkpoint of this version is named
    as such (the file's own OSError, e.g. a missing file, passes through)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # whatever torch.load raises for bytes that are no checkpoint
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read ({exc}); it is damaged or not a Lyceum "
            f"student checkpoint: {_START_OVER}"
        ) from None
    version = state.get("version") if isinstance(state, dict) else None
    if version != VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} is not a Lyceum student checkpoint of version {VERSION} "
            f"(version {version!r}); {_START_OVER}"
        )
    return state


def check_identity(path: Path, state: Mapping[str, Any], identity: Mapping[str, str]) -> None:
    """Refuse to resume from a checkpoint written with other identifying config values."""
    saved: Mapping[str, str] = {**_IMPLIED, **state.get("run", {})}
    differ = [
        f"{key} {saved.get(key)!r} there, {value!r} in this config"
        for key, value in identity.items()
        if saved.get(key) != value
    ]
    if differ:
        raise ValueError(
            f"--resume: checkpoint {str(path)!r} was written by a run with another "
            f"{', '.join(k for k in identity if saved.get(k) != identity[k])} "
            f"({'; '.join(differ)}); {_START_OVER}"
        )


def restore(path: Path, what: str, load: Callable[[Any], object], state: Any) -> None:
    """`load(state)` (a `load_state_dict`), a mismatch named with the checkpoint and the fix."""
    try:
        load(state)
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(
            f"--resume: the {what} saved in checkpoint {str(path)!r} does not fit this "
            f"config's {what} ({detail}); {_START_OVER}"
        ) from None
