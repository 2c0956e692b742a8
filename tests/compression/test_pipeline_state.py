"""The pipeline's checkpoint folder: state dicts and JSON read back without unpickling, and a
kill between its two renames still leaves one whole checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lyceum.compression.pipeline.state import (
    RunState,
    find_checkpoint,
    load_model_tensors,
    read_checkpoint,
    write_checkpoint,
)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_a_checkpoint_reads_back_whole(tmp_path: Path) -> None:
    model = _model(0)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    state = RunState(identity={"seed": 0}, step=3, position=2, loss_sum=1.25, optimizer_stage=0)
    train: dict[str, Any] = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    folder = write_checkpoint(tmp_path, state, model, train)
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.safetensors",
        "state.json",
        "train.pt",
    ]
    assert json.loads((folder / "state.json").read_text())["version"] == 1
    read, tensors, saved = read_checkpoint(folder)
    assert read == state
    assert tensors is not None
    other = _model(1)
    load_model_tensors(other, tensors)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True)
    )
    assert torch.equal(saved["rng"], train["rng"])
    assert saved["optimizer"]["state"][0]["step"] == 1


def test_a_kill_between_the_renames_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    first = RunState(identity={}, step=1)
    write_checkpoint(tmp_path, first, _model(0), {})
    # As if killed after `checkpoint` became `checkpoint.old` and before the new one moved in.
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    found = find_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint.old"
    assert read_checkpoint(found)[0] == first
    second = RunState(identity={}, step=2)
    write_checkpoint(tmp_path, second, None, {})  # a finished run: no model file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    state, tensors, _ = read_checkpoint(tmp_path / "checkpoint")
    assert (state, tensors) == (second, None)


def test_lazily_sized_buffers_are_sized_before_loading() -> None:
    class Lazy(nn.Module):
        abs_max: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("abs_max", torch.empty(0))

    model = Lazy()
    load_model_tensors(model, {"abs_max": torch.tensor([1.0, 2.0])})
    assert torch.equal(model.abs_max, torch.tensor([1.0, 2.0]))
