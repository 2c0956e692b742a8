"""Precision and scale in the trainer: the fp32 default is the plain loop bit for bit, bf16
autocasts the forward, `accumulate` steps as one bigger batch does (and a run stopped inside
a group resumes to the unbroken weights), `clip_grad_norm` clips and reports the norm."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lyceum.deploy.examples import digits, student_mlp
from lyceum.student_client.trainer import StepInfo, train
from lyceum.student_client.trainer_config import load_config, validate_config
from tests._support.students import supervised_config

SEED = 3  # supervised_config's
ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, name: str, **extra: Any) -> dict[str, Any]:
    return supervised_config(tmp_path / name, **extra)


def _limited(n: int) -> dict[str, Any]:
    """The digits' training split cut to its first `n` items (validation as in the config)."""
    return {
        "train": "lyceum.deploy.examples:digits",
        "train_kwargs": {"split": "train", "limit": n},
        "validation": "lyceum.deploy.examples:digits",
        "validation_kwargs": {"split": "val"},
    }


def _assert_same_weights(
    got: nn.Module, want: nn.Module, rtol: float = 0.0, atol: float = 0.0
) -> None:
    """Equal weights: bit for bit unless a tolerance is given."""
    expected = want.state_dict()
    actual = got.state_dict()
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    ("patch", "key", "value"),
    [
        ({"accumulate": 0}, "accumulate", "0"),
        ({"precision": "fp16"}, "precision", "'fp16'"),
        ({"clip_grad_norm": 0}, "clip_grad_norm", "0"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm", "-1.0"),
    ],
)
def test_bad_scale_keys_are_named(
    tmp_path: Path, patch: dict[str, Any], key: str, value: str
) -> None:
    with pytest.raises(ValueError) as err:
        validate_config({**_config(tmp_path, "ckpt"), **patch}, "cfg.yaml")
    message = str(err.value)
    assert f"key '{key}'" in message and value in message, message


def test_the_fp32_default_is_the_plain_loop_bit_for_bit(tmp_path: Path) -> None:
    """One epoch of the trainer against the loop written out by hand: the same init, the
    loader's order (randperm seeded with seed + epoch), cross-entropy, Adam."""
    result = train(_config(tmp_path, "ckpt", epochs=1))

    torch.manual_seed(SEED)
    model = student_mlp(32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = digits("train")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED)).tolist()
    for start in range(0, len(order), 64):
        ids = order[start : start + 64]
        x = torch.stack([data[i][0] for i in ids])
        y = torch.tensor([data[i][1] for i in ids])
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _assert_same_weights(result.model, model)


def test_bf16_runs_the_forward_in_bf16_and_trains(tmp_path: Path) -> None:
    seen: set[tuple[str, torch.dtype]] = set()

    def record(module: nn.Module, _args: Any, output: Any) -> None:
        if module.training and isinstance(output, torch.Tensor):
            seen.add((type(module).__name__, output.dtype))

    hook = nn.modules.module.register_module_forward_hook(record)
    try:
        result = train(_config(tmp_path, "ckpt", precision="bf16"))
    finally:
        hook.remove()
    # The layers' outputs and the logits (the Sequential's) are bf16; Flatten passes the
    # float32 images through.
    assert seen == {
        ("Flatten", torch.float32),
        ("Linear", torch.bfloat16),
        ("ReLU", torch.bfloat16),
        ("Sequential", torch.bfloat16),
    }
    losses = [e.loss for e in result.epochs]
    assert losses[1] < losses[0] < 2.4  # ln(10) = 2.30 untrained
    assert result.val_accuracy is not None and result.val_accuracy > 0.85
    # The master weights stayed float32, and so did what the checkpoint holds.
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    state = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert {v.dtype for v in state["model"].values()} == {torch.float32}


def test_accumulate_2_at_batch_16_steps_as_batch_32(tmp_path: Path) -> None:
    """The loader's order is one permutation cut into batches, so batch 32's batch k is batch
    16's 2k and 2k + 1. 1,017 ids: 31 batches of 32 then one of 25, against 63 of 16 and one
    of 9 (the last group's two batches weighted 16/25 and 9/25). The cosine schedule counts
    optimizer steps: 32 in both runs."""
    common: dict[str, Any] = {
        "dataset": _limited(1017),
        "epochs": 1,
        "schedule": {"name": "cosine"},
    }
    big = train(_config(tmp_path, "big", batch_size=32, **common))
    steps: list[StepInfo] = []
    small = train(
        _config(tmp_path, "small", batch_size=16, accumulate=2, **common), on_step=steps.append
    )
    assert len(steps) == 64 and [s.stepped for s in steps] == [False, True] * 32
    assert [len(s.sample_ids) for s in steps[-2:]] == [16, 9]
    _assert_same_weights(small.model, big.model, rtol=1e-5, atol=1e-6)
    state = torch.load(tmp_path / "small" / "last.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 32 and state["scheduler"]["T_max"] == 32


def test_a_run_stopped_inside_a_group_resumes_to_the_unbroken_weights(tmp_path: Path) -> None:
    """accumulate: 3 over 20 batches an epoch: groups of 3, the last of 2. SIGTERM after
    batch 4 (inside the group of batches 4-6): the checkpoint is the position after batch 3,
    where that group began; the resumed run does batches 4-6 again and ends, two epochs
    later, with the weights of the run that was never stopped."""
    config = _config(tmp_path, "stopped", accumulate=3, schedule={"name": "cosine"})
    whole = train({**config, "checkpoint_dir": str(tmp_path / "whole")})

    def stop_after_batch_4(step: StepInfo) -> None:
        if step.epoch == 0 and step.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer: checkpoint, return

    stopped = train(config, on_step=stop_after_batch_4)
    assert stopped.ended == "signal" and stopped.stopped_at == (0, 3)
    state = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert state["loader"] == {"epoch": 0, "seed": SEED, "position": 3}
    assert state["scheduler"]["last_epoch"] == 1  # one optimizer step: batches 1-3

    with pytest.raises(ValueError, match=r"another accumulate .*'3' there, '2' in this config"):
        train({**config, "accumulate": 2}, resume=True)

    again: list[StepInfo] = []
    resumed = train(config, resume=True, on_step=again.append)
    assert resumed.ended == "finished" and [e.epoch for e in resumed.epochs] == [0, 1]
    assert again[0].step == 4 and not again[0].stepped and again[2].stepped
    _assert_same_weights(resumed.model, whole.model)


def test_clipping_bounds_the_update_and_reports_the_norm_before_it(tmp_path: Path) -> None:
    """One step of plain SGD on one batch of 64 with the norm clipped to 1e-3: the update is
    lr * 1e-3 long, along the gradient, whose norm (computed here at the initial weights)
    is what the step reports."""
    steps: list[StepInfo] = []
    result = train(
        _config(
            tmp_path,
            "ckpt",
            dataset=_limited(64),
            epochs=1,
            optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0},
            clip_grad_norm=1e-3,
        ),
        on_step=steps.append,
    )
    torch.manual_seed(SEED)
    model = student_mlp(32)
    data = digits("train", limit=64)
    x = torch.stack([data[i][0] for i in range(64)])
    y = torch.tensor([data[i][1] for i in range(64)])
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads if g is not None])))
    (step,) = steps
    assert step.stepped and step.grad_norm == pytest.approx(norm, rel=1e-5)
    assert norm > 1e-2  # far above the bound: the clip acted
    before = dict(model.named_parameters())
    delta = torch.cat(
        [(p.detach() - before[n].detach()).flatten() for n, p in result.model.named_parameters()]
    )
    grad = torch.cat([before[n].grad.flatten() for n, _ in result.model.named_parameters()])  # type: ignore[union-attr]
    scale = 0.5 * 1e-3 / (norm + 1e-6)  # lr * max_norm / norm (clip_grad_norm_'s epsilon)
    assert float(torch.linalg.vector_norm(delta)) == pytest.approx(scale * norm, rel=1e-5)
    # atol: a float32 weight near 0.1 moves by whole ulps (7e-9 there).
    torch.testing.assert_close(delta, -grad * scale, rtol=1e-3, atol=3e-8)


def test_without_clipping_no_norm_is_reported(tmp_path: Path) -> None:
    steps: list[StepInfo] = []
    train(_config(tmp_path, "ckpt", dataset=_limited(128), epochs=1), on_step=steps.append)
    assert [(s.stepped, s.grad_norm) for s in steps] == [(True, None), (True, None)]


def test_the_readmes_scale_keys_and_the_example_config_are_valid(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "parallel:" in b]
    keys = yaml.safe_load(block)
    config = validate_config({**_config(tmp_path, "ckpt"), **keys})
    assert (config.precision, config.accumulate, config.clip_grad_norm, config.parallel) == (
        "bf16",
        4,
        1.0,
        "fsdp",
    )
    shipped = load_config(ROOT / "deploy" / "configs" / "student.yaml")
    assert (shipped.accumulate, shipped.precision, shipped.clip_grad_norm) == (1, "fp32", None)
