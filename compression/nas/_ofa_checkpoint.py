"""Supernet training checkpoints as safetensors and JSON: nothing in them is ever unpickled.

A checkpoint directory holds `state.json` (the epochs done, the schedule it belongs to and
whether a teacher taught, the names of its tensor files) and two safetensors files named by epoch: the supernet's state dict
and the optimizer's tensors (Adam's moments and steps, keyed `STATE.PARAM.NAME`); the
optimizer's numbers (its param groups) are in the JSON. `state.json` is written last, so a crash
mid-write leaves the previous checkpoint whole; the previous epoch's files are removed after.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lyceum.compression._io import write_bytes_atomic, write_json_atomic

STATE_FILE = "state.json"
_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """What resuming needs besides the weights: where training stopped and what it ran."""

    epochs_done: int
    schedule: dict[str, Any]


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs_done: int,
    schedule: dict[str, Any],
) -> None:
    from safetensors.torch import save

    previous = _read_state(directory) if (directory / STATE_FILE).is_file() else None
    model_file, optim_file = (
        f"supernet-{epochs_done:04d}.safetensors",
        f"optim-{epochs_done:04d}.safetensors",
    )
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(directory / model_file, save(weights))
    optim = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    numbers: dict[str, dict[str, Any]] = {}
    for param, state in optim["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"STATE.{param}.{name}"] = value.detach().contiguous()
            else:
                numbers.setdefault(str(param), {})[name] = value
    write_bytes_atomic(directory / optim_file, save(tensors))
    write_json_atomic(
        directory / STATE_FILE,
        {
            "format_version": _VERSION,
            "epochs_done": epochs_done,
            "schedule": schedule,
            "model_file": model_file,
            "optimizer_file": optim_file,
            "param_groups": optim["param_groups"],
            "optimizer_numbers": numbers,
        },
    )
    if previous is not None:
        for key in ("model_file", "optimizer_file"):
            old = directory / previous[key]
            if old.name not in (model_file, optim_file):
                old.unlink(missing_ok=True)


def _read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: not a supernet checkpoint ({exc}); start without resume"
        ) from exc
    if not isinstance(state, dict) or state.get("format_version") != _VERSION:
        raise ValueError(
            f"{path}: supernet checkpoint format_version {state.get('format_version')!r} is not "
            f"supported (this reader handles {_VERSION}); start without resume"
        )
    return state


def has_checkpoint(directory: Path) -> bool:
    return (directory / STATE_FILE).is_file()


def load_checkpoint(
    directory: Path, model: nn.Module, schedule: dict[str, Any]
) -> tuple[Checkpoint, dict[str, Any]]:
    """Load the weights into `model` if the checkpoint was written by `schedule`; return where
    training stopped and the optimizer's state dict (for `optimizer.load_state_dict`)."""
    from safetensors.torch import load_file

    state = _read_state(directory)
    if state["schedule"] != schedule:
        differs = ", ".join(
            f"{key} (checkpoint {state['schedule'].get(key)}, now {schedule.get(key)})"
            for key in sorted(state["schedule"].keys() | schedule.keys())
            if state["schedule"].get(key) != schedule.get(key)
        )
        raise ValueError(
            f"the supernet checkpoint in {str(directory)!r} was written by another schedule, "
            f"config or teacher setting; it differs in {differs}. Resume with the same "
            f"settings, or start without resume in a new checkpoint_dir"
        )
    try:
        model.load_state_dict(load_file(str(directory / state["model_file"])))
    except RuntimeError as exc:
        raise ValueError(
            f"the supernet checkpoint in {str(directory)!r} does not fit this supernet ({exc}); "
            f"resume with the supernet (space, kernel_transform) that wrote it"
        ) from exc
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(directory / state["optimizer_file"])).items():
        _, param, name = key.split(".", 2)
        per_param.setdefault(int(param), {})[name] = value
    for param, numbers in state["optimizer_numbers"].items():
        per_param.setdefault(int(param), {}).update(numbers)
    optim = {"state": per_param, "param_groups": state["param_groups"]}
    return Checkpoint(state["epochs_done"], state["schedule"]), optim
