"""A pipeline run's checkpoint: state dicts and a JSON state, never a pickle.

`out_dir/checkpoint/` holds the latest one: `state.json` (where the run stands: the next step
of its plan and the batches done of the epoch in progress, the open stages' facts, the
report's rows so far, each epoch's loss, the config values a resume must keep),
`model.safetensors` (the model being trained: float, pruned or fake-quantized) and
`train.pt` (optimizer, losses' adapters and the torch RNG: tensors, numbers and strings,
read back with `weights_only=True`). It is rewritten after every epoch, at every stage
boundary and every `checkpoint_every` batches.

A checkpoint is written whole into `checkpoint.tmp/` and then swapped in by two renames
(the old one moves to `checkpoint.old/` first, and is removed last), so a kill at any moment
leaves one whole checkpoint: `checkpoint/`, or `checkpoint.old/` between the renames.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lyceum.compression._io import write_bytes_atomic
from lyceum.proto.manifest import fsync_directory
from lyceum.student_client._checkpoints import save_weights

if TYPE_CHECKING:
    from lyceum.compression.pipeline.schema import PipelineConfig

__all__ = [
    "CHECKPOINT",
    "RunState",
    "find_checkpoint",
    "load_model_tensors",
    "read_checkpoint",
    "run_identity",
    "write_checkpoint",
]

VERSION = 1
CHECKPOINT = "checkpoint"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
TRAIN_FILE = "train.pt"
# Config keys that change nothing a checkpoint holds: a resume may change them.
_FREE_KEYS = {"out_dir", "progress", "latency", "latency_runs", "checkpoint_every", "window"}


def run_identity(config: PipelineConfig) -> dict[str, Any]:
    """The config values a resumed run must share with the run that wrote the checkpoint:
    all of them but those that change no tensor nor figure."""
    data = json.loads(config.model_dump_json())
    return {k: v for k, v in data.items() if k not in _FREE_KEYS}


def check_same_run(saved: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    """Refuse to resume the run in `out` with a config whose identity differs from `saved`."""
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differ:
        raise ValueError(
            f"--resume: the run in {str(out)!r} was written with other values of "
            f"{differ}; resume with the config it was written with, or give another --out"
        )


@dataclass
class RunState:
    """Where a pipeline run stands, as `state.json` holds it."""

    identity: dict[str, Any]
    step: int = 0  # index in the plan of the next step to run
    position: int = 0  # batches done of that step's epoch (an epoch step only)
    loss_sum: float = 0.0  # the epoch in progress's summed batch losses
    optimizer_stage: int | None = None  # the stage whose optimizer config trains now
    float_flops: int | None = None  # the float model's MACs when quantization began
    finished: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, path: Path, data: dict[str, Any]) -> RunState:
        if data.get("version") != VERSION:
            raise ValueError(
                f"{path}: a pipeline state of version {data.get('version')!r}, this Lyceum "
                f"reads version {VERSION}; start a new run with another --out"
            )
        data = {k: v for k, v in data.items() if k != "version"}
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"{path}: not a pipeline state ({exc})") from None


def find_checkpoint(out_dir: Path) -> Path | None:
    """The whole checkpoint in `out_dir`, if any (`checkpoint/`, else `checkpoint.old/`)."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        if (out_dir / name / STATE_FILE).is_file():
            return out_dir / name
    return None


def write_checkpoint(
    out_dir: Path,
    state: RunState,
    model: torch.nn.Module | None,
    train: dict[str, Any],
) -> Path:
    """Write the checkpoint (the model's state dict unless None: a finished run's int8
    model is its stage's program) and swap it in; returns its folder."""
    tmp, final, old = (out_dir / f"{CHECKPOINT}{s}" for s in (".tmp", "", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if model is not None:
        save_weights(tmp / MODEL_FILE, model)
    buffer = io.BytesIO()
    torch.save(train, buffer)
    write_bytes_atomic(tmp / TRAIN_FILE, buffer.getvalue())
    write_bytes_atomic(tmp / STATE_FILE, json.dumps(state.to_json(), indent=1).encode())
    fsync_directory(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_directory(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(
    folder: Path,
) -> tuple[RunState, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The state, the model's tensors (None for a finished run) and the training state."""
    from safetensors.torch import load_file

    path = folder / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: damaged ({exc}); start a new run with another --out") from None
    state = RunState.from_json(path, data)
    model_path = folder / MODEL_FILE
    tensors = load_file(str(model_path)) if model_path.is_file() else None
    train = torch.load(folder / TRAIN_FILE, map_location="cpu", weights_only=True)
    return state, tensors, train


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(tensors)`, first sizing the buffers that observers fill
    lazily (empty until the first batch: a fake-quantized model built again is)."""
    for name, buffer in model.named_buffers():
        saved = tensors.get(name)
        if saved is not None and buffer.numel() == 0 and buffer.shape != saved.shape:
            buffer.resize_(saved.shape)
    model.load_state_dict(tensors)
