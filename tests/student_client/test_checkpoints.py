"""The trainer's checkpoint files: a used checkpoint_dir is refused unless --resume or
--overwrite, a resume that cannot fit is named, and a write that fails keeps what was there."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lyceum.deploy.cli import main as cli_main
from lyceum.deploy.examples import digits
from lyceum.student_client import _checkpoints as checkpoints
from lyceum.student_client.trainer import train
from tests._support.students import trainer_config
from tests._support.teachers import make_dump


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dump(tmp_path_factory.mktemp("dump"), seed=0, dataset=digits("train"))


def _config(dump_dir: Path, ckpt: Path, **extra: Any) -> dict[str, Any]:
    return trainer_config(dump_dir, ckpt, **{"epochs": 1, **extra})


def test_a_new_run_into_a_used_checkpoint_dir_is_refused(
    tmp_path: Path, dump_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    raw = _config(dump_dir, ckpt)
    train(raw)
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    with pytest.raises(ValueError) as err:
        train(raw)
    message = str(err.value)
    assert f"checkpoint_dir {str(ckpt)!r} already holds a run" in message
    assert "last.pt after epoch 1; epoch-001.pt" in message
    assert "--resume" in message and "--overwrite" in message
    # The same through the CLI: exit 2 and the message; nothing was touched.
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["student", "train", str(path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before


def test_overwrite_removes_the_old_runs_files_and_nothing_else(
    tmp_path: Path, dump_dir: Path
) -> None:
    """A three-epoch run, then a one-epoch run with --overwrite: epoch-002.pt and
    epoch-003.pt of the old run are gone; the user's own files stay."""
    ckpt = tmp_path / "ckpt"
    train(_config(dump_dir, ckpt, epochs=3))
    (ckpt / "last.tmp").write_bytes(b"a temp file left by a crash")
    (ckpt / "notes.txt").write_text("mine")
    (ckpt / "epoch-best.pt").write_bytes(b"mine too: not epoch-NNN")
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "last.pt").write_bytes(b"in a subdirectory: not the trainer's")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(dump_dir, ckpt)))
    assert cli_main(["student", "train", str(path), "--overwrite"]) == 0
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "epoch-001.pt",
        "epoch-best.pt",
        "last.pt",
        "model.safetensors",
        "notes.txt",
        "sub",
    ]
    state = torch.load(ckpt / "last.pt", weights_only=True)
    assert len(state["epochs"]) == 1 and state["loader"]["epoch"] == 1
    assert (ckpt / "notes.txt").read_text() == "mine"
    assert (ckpt / "sub" / "last.pt").read_bytes() == b"in a subdirectory: not the trainer's"


def test_resume_without_a_checkpoint_says_how_to_start(tmp_path: Path, dump_dir: Path) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(ValueError) as err:
        train(_config(dump_dir, ckpt), resume=True)
    message = str(err.value)
    assert f"--resume: no checkpoint {str(ckpt / 'last.pt')!r} (the directory does not exist)" in (
        message
    )
    assert "start without --resume" in message
    ckpt.mkdir()
    (ckpt / "epoch-001.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\(it holds epoch-001.pt\)"):
        train(_config(dump_dir, ckpt), resume=True)


def test_resume_after_the_model_width_changed_names_the_model(
    tmp_path: Path, dump_dir: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    train(_config(dump_dir, ckpt, model_kwargs={"hidden": 32}))
    wider = _config(dump_dir, ckpt, model_kwargs={"hidden": 64}, epochs=2)
    with pytest.raises(ValueError) as err:
        train(wider, resume=True)
    message = str(err.value)
    assert f"--resume: checkpoint {str(ckpt / 'last.pt')!r} was written by a run with " in message
    assert "another model (model 'lyceum.deploy.examples:student_mlp{\"hidden\": 32}' there, " in (
        message
    )
    assert "'lyceum.deploy.examples:student_mlp{\"hidden\": 64}' in this config)" in message
    assert "--overwrite" in message and "another checkpoint_dir" in message


def test_resume_of_weights_that_do_not_fit_names_the_shapes(tmp_path: Path, dump_dir: Path) -> None:
    """Same spec, other shapes (the model's code changed): load_state_dict's mismatch is
    named with the checkpoint and the fix, not a traceback."""
    ckpt = tmp_path / "ckpt"
    train(_config(dump_dir, ckpt))
    state = torch.load(ckpt / "last.pt", weights_only=True)
    state["model"]["1.weight"] = torch.zeros(16, 64)
    checkpoints.save(ckpt / "last.pt", state)
    with pytest.raises(ValueError) as err:
        train(_config(dump_dir, ckpt, epochs=2), resume=True)
    message = str(err.value)
    assert f"the model saved in checkpoint {str(ckpt / 'last.pt')!r} does not fit" in message
    assert "size mismatch for 1.weight" in message and "torch.Size([16, 64])" in message
    assert "--overwrite" in message


@contextmanager
def _full_directory(path: Path) -> Iterator[Path]:
    """A directory where writing a checkpoint fails with ENOSPC: a 16 KiB tmpfs where
    mounting works (root), else `epoch-001.tmp` (the first file the trainer writes) as a
    symlink to /dev/full."""
    path.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        (path / "epoch-001.tmp").symlink_to("/dev/full")
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_a_checkpoint_on_a_full_disk_raises_enospc_with_the_path(
    tmp_path: Path, dump_dir: Path
) -> None:
    with _full_directory(tmp_path / "full") as ckpt:
        with pytest.raises(OSError) as err:
            train(_config(dump_dir, ckpt))
        assert err.value.errno == errno.ENOSPC
        assert err.value.filename == str(ckpt / "epoch-001.pt")
        assert list(ckpt.iterdir()) == []  # no half-written temp file left


def test_a_write_interrupted_by_a_second_ctrl_c_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    checkpoints.save(path, {"version": checkpoints.VERSION, "n": torch.tensor(1)})

    def interrupted(_obj: object, f: Any) -> None:
        f.write(b"the first bytes of a checkpoint")
        raise KeyboardInterrupt  # what the second Ctrl-C raises mid-write

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(path, {"version": checkpoints.VERSION, "n": torch.tensor(2)})
    monkeypatch.undo()
    assert int(torch.load(path, weights_only=True)["n"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
