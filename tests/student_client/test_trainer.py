"""The trainer: config errors name the key, a signal checkpoints mid-epoch, --resume
continues, an empty dataset and unreachable teachers are named, a second signal aborts."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lyceum.deploy.cli import main as cli_main
from lyceum.deploy.examples import digits
from lyceum.student_client._train_env import StopSignals
from lyceum.student_client.sources import OfflineTeacher, TeacherUnavailableError
from lyceum.student_client.trainer import StepInfo, build_sources, train
from lyceum.student_client.trainer_config import load_config, validate_config
from tests._support.students import trainer_config
from tests._support.teachers import make_dump


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dump(tmp_path_factory.mktemp("dump"), seed=0, dataset=digits("train"))


def _config(dump_dir: Path, checkpoint_dir: Path, **extra: Any) -> dict[str, Any]:
    return trainer_config(dump_dir, checkpoint_dir, **extra)


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
        (
            {"teachers": {"t": {"endpoints": ["grpc://h:1"], "verify": "off"}}},
            "teachers.t",
            "'verify' is for offline teachers",
        ),
        ({"teachers": {"t": {"dir": "/x", "verify": "never"}}}, "teachers.t.verify", "'never'"),
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


@pytest.mark.parametrize("verify", ["off", "first_touch"])
def test_an_offline_teacher_takes_its_verify_mode_from_the_config(
    tmp_path: Path, dump_dir: Path, verify: str
) -> None:
    raw = _config(dump_dir, tmp_path)
    name, teacher = next(iter(raw["teachers"].items()))
    config = validate_config({**raw, "teachers": {name: {**teacher, "verify": verify}}})
    sources = build_sources(config)
    try:
        (source,) = sources.values()
        assert isinstance(source, OfflineTeacher)
        source.submit(0, torch.arange(4))
        source.poll(0.0)
        # Off never hashes; first_touch hashed exactly the one shard those ids live in.
        assert source.knowledge.hashed_shards == ([] if verify == "off" else ["shard-00000.arrow"])
    finally:
        for s in sources.values():
            s.close()


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
    assert interrupted.ended == "signal" and interrupted.signum == signal.SIGTERM
    assert interrupted.interrupted and interrupted.epochs == []
    assert interrupted.stopped_at == (0, 5) and interrupted.checkpoint == ckpt / "last.pt"
    assert interrupted.summary() == (
        f"stopped by SIGTERM at epoch 1/2, after batch 5/20: checkpoint {ckpt / 'last.pt'}, "
        f"weights {ckpt / 'model.safetensors'} (for --checkpoint)"
    )
    state = torch.load(ckpt / "last.pt", weights_only=True)
    assert state["loader"] == {"epoch": 0, "seed": 3, "position": 5}
    assert state["written"] == "on SIGTERM"
    # No epoch file yet; the weights as of the stop beside the checkpoint.
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt", "model.safetensors"]

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
    assert resumed.ended == "finished" and resumed.val_accuracy is not None
    assert resumed.val_accuracy > 0.5
    assert (ckpt / "epoch-002.pt").is_file()
    # Model, optimizer and order were all restored: the same weights as without the stop.
    for name, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value)


def test_a_yaml_merge_spec_runs_the_users_strategy(tmp_path: Path, dump_dir: Path) -> None:
    """`merge: {logits: module:function}` in the YAML: the trainer imports it and merges with
    it (two teachers, so every batch goes through it)."""
    from tests._support import custom_strategies

    raw = _config(dump_dir, tmp_path / "ckpt", epochs=1, batch_size=256)
    raw["teachers"] = {"a": {"dir": str(dump_dir)}, "b": {"dir": str(dump_dir)}}
    raw["merge"] = {"logits": "tests._support.custom_strategies:counting_mean"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    custom_strategies.CALLS.clear()
    steps: list[int] = []
    train(load_config(path), on_step=lambda s: steps.append(len(s.sample_ids)))
    assert steps == custom_strategies.CALLS and sum(steps) == len(digits("train"))
    raw["merge"] = {"logits": "tests._support.custom_strategies:no_such_function"}
    raw["checkpoint_dir"] = None
    with pytest.raises(ValueError, match="config key 'merge': field 'logits': merge strategy"):
        train(validate_config(raw))


def test_an_empty_training_dataset_is_refused_as_empty(tmp_path: Path, dump_dir: Path) -> None:
    raw = _config(dump_dir, tmp_path / "ckpt")
    raw["dataset"] = {**raw["dataset"], "train": "tests._support.students:empty_digits"}
    with pytest.raises(ValueError) as err:
        train(raw)
    message = str(err.value)
    assert (
        "config key 'dataset.train'" in message
        and "tests._support.students:empty_digits" in message
    )
    assert "is empty (0 samples)" in message and "dataset.train_kwargs" in message
    assert not (tmp_path / "ckpt").exists()


def test_teachers_unreachable_before_the_first_step_raise_and_save_nothing(
    tmp_path: Path, dump_dir: Path
) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = _config(dump_dir, tmp_path / "ckpt")
    raw["teachers"] = {"cnn": {"endpoints": [f"grpc://127.0.0.1:{port}"], "mode": "index"}}
    with pytest.raises(TeacherUnavailableError) as err:
        train(raw)
    assert f"teacher 'cnn': could not describe it; endpoints tried: grpc://127.0.0.1:{port}" in (
        str(err.value)
    )
    assert not (tmp_path / "ckpt").exists()


def test_a_second_signal_aborts_at_once() -> None:
    """The first Ctrl-C asks for a checkpoint after the batch; the second one raises
    KeyboardInterrupt at once, through the handler that was there before."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
