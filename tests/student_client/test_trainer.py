"""The trainer: config errors name the key, SIGTERM checkpoints mid-epoch, --resume continues."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from teachers import make_dump

from lyceum.deploy.cli import main as cli_main
from lyceum.deploy.examples import digits
from lyceum.student_client.trainer import StepInfo, train
from lyceum.student_client.trainer_config import load_config, validate_config

TRAIN = "lyceum.deploy.examples:digits"


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dump(tmp_path_factory.mktemp("dump"), seed=0, dataset=digits("train"))


def _config(dump_dir: Path, checkpoint_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": {
            "train": TRAIN,
            "validation": TRAIN,
            "validation_kwargs": {"split": "val"},
        },
        "teachers": {"dump": {"dir": str(dump_dir)}},
        "losses": {
            "terms": [{"name": "kd", "kind": "soft_label", "field": "logits", "temperature": 4.0}]
        },
        "epochs": 2,
        "batch_size": 64,
        "seed": 3,
        "checkpoint_dir": str(checkpoint_dir),
        "progress": False,
        **extra,
    }


@pytest.mark.parametrize(
    ("patch", "key", "value"),
    [
        ({"optimizer": {"lr": -1}}, "optimizer.lr", "-1"),
        ({"epochz": 3}, "epochz", "3"),
        ({"teachers": {"t": {"dir": "/x", "endpoints": ["grpc://h:1"]}}}, "teachers.t", "'dir'"),
        ({"merge": {"logits": "median"}}, "merge", "'median'"),
        ({"model": "no_colon"}, "model", "'no_colon'"),
        ({"merge": {"logits": "mine:"}}, "merge", "'mine:'"),
        (
            {"teachers": {"t": {"dir": "/x", "curve_server_key_file": "/k"}}},
            "teachers.t",
            "are for online teachers",
        ),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, patch: dict[str, Any], key: str, value: str
) -> None:
    raw = {**_config(tmp_path, tmp_path), **patch}
    with pytest.raises(ValueError) as err:
        validate_config(raw, "cfg.yaml")
    message = str(err.value)
    assert f"key '{key}'" in message and value in message, message


def test_bad_yaml_file_names_the_key_through_the_cli(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**_config(tmp_path, tmp_path), "batch_size": "big"}))
    assert cli_main(["student", "train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "key 'batch_size': got 'big'" in err and "valid integer" in err


def test_sigterm_checkpoints_mid_epoch_and_resume_continues(tmp_path: Path, dump_dir: Path) -> None:
    ckpt = tmp_path / "ckpt"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(dump_dir, ckpt)))
    config = load_config(path)

    full: list[tuple[int, list[int]]] = []
    uninterrupted = train(
        config.model_copy(update={"checkpoint_dir": tmp_path / "full"}),
        on_step=lambda s: full.append((s.epoch, s.sample_ids.tolist())),
    )

    first: list[tuple[int, list[int]]] = []

    def stop_at_step_5(step: StepInfo) -> None:
        first.append((step.epoch, step.sample_ids.tolist()))
        if step.epoch == 0 and step.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer: checkpoint, return

    interrupted = train(config, on_step=stop_at_step_5)
    assert interrupted.interrupted and interrupted.epochs == []
    state = torch.load(ckpt / "last.pt", weights_only=True)
    assert state["loader"] == {"epoch": 0, "seed": 3, "position": 5}

    second: list[tuple[int, list[int]]] = []
    resumed = train(
        config, resume=True, on_step=lambda s: second.append((s.epoch, s.sample_ids.tolist()))
    )
    # The remaining batches of epoch 0, then epoch 1: not a restart from sample 0.
    assert first + second == full
    assert second[0] == full[5]
    assert [e.epoch for e in resumed.epochs] == [0, 1]
    assert sorted(i for e, ids in first + second if e == 0 for i in ids) == list(
        range(len(digits("train")))
    )
    assert resumed.val_accuracy is not None and resumed.val_accuracy > 0.5
    assert (ckpt / "epoch-002.pt").is_file()
    # Model, optimizer and order were all restored: the same weights as without the stop.
    for name, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value)


def test_a_yaml_merge_spec_runs_the_users_strategy(tmp_path: Path, dump_dir: Path) -> None:
    """`merge: {logits: module:function}` in the YAML: the trainer imports it and merges with
    it (two teachers, so every batch goes through it)."""
    import custom_strategies

    raw = _config(dump_dir, tmp_path / "ckpt", epochs=1, batch_size=256)
    raw["teachers"] = {"a": {"dir": str(dump_dir)}, "b": {"dir": str(dump_dir)}}
    raw["merge"] = {"logits": "custom_strategies:counting_mean"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    custom_strategies.CALLS.clear()
    steps: list[int] = []
    train(load_config(path), on_step=lambda s: steps.append(len(s.sample_ids)))
    assert steps == custom_strategies.CALLS and sum(steps) == len(digits("train"))
    raw["merge"] = {"logits": "custom_strategies:no_such_function"}
    with pytest.raises(ValueError, match="config key 'merge': field 'logits': merge strategy"):
        train(validate_config(raw))
