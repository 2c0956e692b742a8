"""`model.safetensors`, the weights every training run writes beside its checkpoints: what
`--checkpoint` takes everywhere. It serves, dumps and teaches a student; the resumable
`last.pt` is refused by every command, naming that file."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from lyceum.deploy.cli import main as cli_main
from lyceum.deploy.examples import digits
from lyceum.deploy.launcher import start_teacher
from lyceum.proto.specs import load_model, load_state_dict
from lyceum.student_client import OfflineKnowledge, OnlineTeacher
from lyceum.student_client import _checkpoints as checkpoints
from lyceum.student_client.trainer import train
from tests._support.teachers import ENV

MLP = 'lyceum.deploy.examples:student_mlp{"hidden": 32}'
DIGITS = 'lyceum.deploy.examples:digits{"split": "train"}'
_TIMEOUT_S = 180.0


def _supervised(checkpoint_dir: Path, epochs: int = 1) -> dict[str, Any]:
    return {
        "model": "lyceum.deploy.examples:student_mlp",
        "model_kwargs": {"hidden": 32},
        "dataset": {"train": "lyceum.deploy.examples:digits"},
        "epochs": epochs,
        "seed": 1,
        "checkpoint_dir": str(checkpoint_dir),
        "progress": False,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint_dir of a one-epoch supervised run of the demo's student MLP."""
    ckpt = tmp_path_factory.mktemp("trained") / "ckpt"
    train(_supervised(ckpt))
    return ckpt


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lyceum.deploy.cli", *args]
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, env=env, cwd=cwd)


def _logits(weights: Path) -> torch.Tensor:
    model = load_model(MLP, weights).eval()
    data = digits("train")
    with torch.no_grad():
        return model(torch.stack([data[i][0] for i in range(len(data))]))


# -- what is written ------------------------------------------------------------------------


def test_the_weights_file_is_the_models_state_and_loads_strictly(trained: Path) -> None:
    weights = load_state_dict(trained / "model.safetensors")
    state = torch.load(trained / "last.pt", weights_only=True)["model"]
    assert weights.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(weights[name], value)
    load_model(MLP, trained / "model.safetensors")  # strict: every key, every shape


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight


def test_tied_weights_are_written_as_copies_and_load_strictly(tmp_path: Path) -> None:
    model = _Tied()
    checkpoints.save_weights(tmp_path / "model.safetensors", model)
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(loaded) == ["embed.weight", "out.weight"]
    assert torch.equal(loaded["out.weight"], model.embed.weight.detach())
    fresh = _Tied()
    fresh.load_state_dict(loaded)  # strict
    assert torch.equal(fresh.out.weight, model.embed.weight)


def test_a_failed_write_keeps_the_previous_weights_and_no_temp_file(tmp_path: Path) -> None:
    """The temp file is `/dev/full` (every write fails with ENOSPC): the error names the
    weights file, the previous one stays whole, the temp file is gone."""
    path = tmp_path / "model.safetensors"
    before = nn.Linear(3, 2)
    checkpoints.save_weights(path, before)
    (tmp_path / "model.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError) as err:
        checkpoints.save_weights(path, nn.Linear(3, 2))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    kept = load_file(str(path))
    assert torch.equal(kept["weight"], before.weight.detach())


def test_overwrite_removes_the_old_runs_weights_too(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt).mkdir()
    save_file({"stale": torch.zeros(1)}, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=r"already holds a run \(model.safetensors\)"):
        train(_supervised(ckpt))
    result = train(_supervised(ckpt), overwrite=True)
    assert result.weights == ckpt / "model.safetensors"
    assert "stale" not in load_file(str(ckpt / "model.safetensors"))


# -- what takes it --------------------------------------------------------------------------


@pytest.mark.integration
def test_teacher_dump_takes_the_weights_file(tmp_path: Path, trained: Path) -> None:
    out = tmp_path / "knowledge"
    done = _cli(
        "teacher", "dump", "--model", MLP, "--checkpoint", str(trained / "model.safetensors"),
        "--dataset", DIGITS, "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with OfflineKnowledge(out) as knowledge:
        batch = knowledge.get(range(len(digits("train"))))
    assert batch.sample_ids.tolist() == list(range(len(digits("train"))))
    torch.testing.assert_close(batch.tensors["logits"], _logits(trained / "model.safetensors"))


@pytest.mark.integration
def test_the_weights_serve_and_a_student_distils_from_them(tmp_path: Path, trained: Path) -> None:
    """`teacher serve --checkpoint model.safetensors` answers with the trained model's
    logits, and a student trained from it (one epoch through the CLI) finishes."""
    weights = trained / "model.safetensors"
    with start_teacher(MLP, dataset=DIGITS, checkpoint=weights, exit_after_s=300) as teacher:
        client = OnlineTeacher(teacher.endpoint("grpc"), mode="index")
        try:
            batch = client.request([5, 0, 99])
        finally:
            client.close()
        order = batch.sample_ids.tolist()
        assert sorted(order) == [0, 5, 99]
        want = _logits(weights)[order]
        torch.testing.assert_close(batch.tensors["logits"], want, rtol=1e-4, atol=1e-4)

        raw = {
            **_supervised(tmp_path / "student"),
            "teachers": {"served": {"endpoints": [teacher.endpoint("grpc")], "mode": "index"}},
            "losses": {
                "terms": [{"name": "kd", "kind": "soft_label", "field": "logits", "temperature": 4}]
            },
        }
        path = tmp_path / "student.yaml"
        path.write_text(yaml.safe_dump(raw))
        done = _cli("student", "train", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("trained 1 epochs: final loss ")
    assert f"weights {tmp_path / 'student' / 'model.safetensors'} (for --checkpoint)" in (
        done.stdout
    )
    assert "teacher 'served': online, 1 endpoint" in done.stderr


# -- the trainer checkpoint is refused, naming the weights file ----------------------------


def _job(tmp_path: Path, kind: str, checkpoint: Path) -> Path:
    raw: dict[str, Any] = {
        "model": "lyceum.deploy.examples:student_mlp",
        "model_kwargs": {"hidden": 32},
        "checkpoint": str(checkpoint),
        "dataset": "lyceum.deploy.examples:digits",
        "out_dir": str(tmp_path / "out"),
        "progress": False,
    }
    if kind == "prune":
        raw["strategy"] = {"kind": "uniform", "flops": -0.5}
    else:
        raw["scheme"] = {"kind": "ptq"}
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _refused_line(stderr: str, last: Path, trained: Path) -> None:
    """The refusal of `last` (a trainer checkpoint) is stderr's last line, naming the
    weights file beside it."""
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"lyceum: error: checkpoint {str(last)!r} is a resumable trainer checkpoint (version, "
    ), line
    assert "model, objective, optimizer, scheduler, loader, epochs" in line
    assert "what `lyceum student train --resume` reads), not model weights" in line
    assert line.endswith(
        f"give the weights file the run wrote beside it instead: {trained / 'model.safetensors'}"
    )
    assert "Traceback" not in stderr


@pytest.mark.integration
def test_teacher_serve_refuses_the_trainer_checkpoint_naming_the_weights_file(
    trained: Path,
) -> None:
    """A process: were the refusal missing, it would serve (and be killed by its timeout)."""
    last = trained / "last.pt"
    done = _cli(
        "teacher", "serve", "--model", MLP, "--checkpoint", str(last), "--dataset", DIGITS,
        "--grpc-port", "0", "--exit-after-s", "60",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    _refused_line(done.stderr, last, trained)


@pytest.mark.parametrize("command", ["teacher dump", "prune", "quantize"])
def test_every_job_command_refuses_the_trainer_checkpoint_naming_the_weights_file(
    tmp_path: Path, trained: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process, through the CLI's entry point and error boundary (the exit code a
    process gets is `main`'s return value; `teacher serve` above is one)."""
    last = trained / "last.pt"
    if command == "teacher dump":
        args = ["teacher", "dump", "--model", MLP, "--checkpoint", str(last), "--dataset", DIGITS]
        args += ["--out", str(tmp_path / "knowledge")]
    else:
        args = [command, str(_job(tmp_path, command, last))]
    assert cli_main(args) == 2
    _refused_line(capsys.readouterr().err, last, trained)
    assert not (tmp_path / "knowledge").exists() and not (tmp_path / "out").exists()


def test_a_trainer_checkpoint_alone_is_refused_with_the_line_that_extracts_its_weights(
    tmp_path: Path, trained: Path
) -> None:
    """No model.safetensors beside it (a checkpoint copied alone): the message gives the
    extraction, which works (weights-only reading, nothing unpickled)."""
    alone = tmp_path / "last.pt"
    alone.write_bytes((trained / "last.pt").read_bytes())
    with pytest.raises(ValueError) as err:
        load_model(MLP, alone)
    message = str(err.value)
    assert f"checkpoint {str(alone)!r} is a resumable trainer checkpoint" in message
    assert f"{str(tmp_path)!r} has none: extract them once" in message
    extraction = message.split("extract them once, ")[1].split(", and give that file")[0]
    assert extraction == (
        f"safetensors.torch.save_file(torch.load({str(alone)!r}, weights_only=True)['model'], "
        f"{str(tmp_path / 'model.safetensors')!r})"
    )
    save_file(torch.load(alone, weights_only=True)["model"], str(tmp_path / "model.safetensors"))
    extracted = load_model(MLP, tmp_path / "model.safetensors")
    torch.testing.assert_close(
        extracted(digits("val")[0][0][None]),
        load_model(MLP, trained / "model.safetensors")(digits("val")[0][0][None]),
    )
