"""`lyceum student train` without teachers: plain supervised training on the labels, the
same loop (checkpoints, resume mid-epoch, signals), how a user makes a teacher. Configs that
mix the two (terms without teachers, nothing to learn from) are refused by key."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lyceum.deploy.cli import main as cli_main
from lyceum.deploy.examples import digits
from lyceum.proto.evaluation import top1_accuracy
from lyceum.proto.specs import load_model
from lyceum.student_client import load_config, validate_config
from lyceum.student_client.loader import DistillLoader
from lyceum.student_client.trainer import train
from tests._support.models import GO, REACHED
from tests._support.students import MLP, supervised_config
from tests._support.trainers import TrainerProcess, run_trainer, write_config

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "configs"
BATCHES = 20  # the digits' training split in batches of 64


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainerProcess]:
    """A supervised run through the CLI, two epochs without a stop: its checkpoint_dir."""
    where = tmp_path_factory.mktemp("supervised")
    path = write_config(where / "cfg.yaml", supervised_config(where / "ckpt"))
    return where / "ckpt", run_trainer(path, name="uninterrupted")


# -- configs --------------------------------------------------------------------------------


def test_no_teachers_and_no_losses_is_supervised() -> None:
    config = validate_config(supervised_config(Path("ckpt")))
    assert config.supervised and config.teachers == {}
    assert config.losses.terms == () and config.losses.task_weight == 1.0
    # An empty teachers mapping and losses with only task_weight are the same run.
    same = validate_config(
        supervised_config(Path("ckpt"), teachers={}, losses={"task_weight": 0.5})
    )
    assert same.supervised and same.losses.task_weight == 0.5


def test_the_teacher_example_config_is_supervised() -> None:
    config = load_config(CONFIGS / "teacher.yaml")
    assert config.supervised
    assert config.model == "lyceum.deploy.examples:teacher_cnn" and config.model_kwargs == {}
    assert config.checkpoint_dir == Path("runs/teacher")


def test_the_readme_pastes_the_teacher_config_as_shipped() -> None:
    """The README's first example is `deploy/configs/teacher.yaml`, key for key."""
    readme = (CONFIGS.parents[1] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    shipped = yaml.safe_load((CONFIGS / "teacher.yaml").read_text())
    assert [yaml.safe_load(b) for b in blocks].count(shipped) == 1
    assert "lyceum student train deploy/configs/teacher.yaml\n" in readme
    assert "--checkpoint teacher.pt" not in readme


def test_distillation_terms_without_teachers_are_refused_naming_the_key() -> None:
    raw = supervised_config(
        Path("ckpt"),
        losses={"terms": [{"name": "kd", "kind": "soft_label", "field": "logits"}]},
    )
    with pytest.raises(ValueError) as err:
        validate_config(raw)
    message = str(err.value)
    assert "key 'losses'" in message
    assert "losses.terms ['kd'] are distillation terms, but the config has no teachers" in message
    assert "add a 'teachers:' section" in message
    assert "remove losses.terms for plain supervised training" in message


def test_task_weight_zero_without_teachers_is_refused() -> None:
    with pytest.raises(ValueError) as err:
        validate_config(supervised_config(Path("ckpt"), losses={"task_weight": 0}))
    message = str(err.value)
    assert "key 'losses'" in message
    assert "losses.task_weight is 0 and the config has no teachers" in message
    assert "give task_weight > 0" in message


def test_teachers_without_terms_are_refused() -> None:
    raw = supervised_config(Path("ckpt"), teachers={"dump": {"dir": "knowledge"}})
    with pytest.raises(ValueError) as err:
        validate_config(raw)
    message = str(err.value)
    assert "the config has teachers ['dump'] but no losses.terms" in message
    assert "remove 'teachers:' for plain supervised training" in message


def test_merge_without_teachers_is_refused() -> None:
    with pytest.raises(ValueError, match="merge combine the teachers' fields, but the config "):
        validate_config(supervised_config(Path("ckpt"), merge={"logits": "mean"}))


def test_terms_without_teachers_exit_2_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the CLI's entry point and error boundary, in this process (a process's exit
    code is `main`'s return value)."""
    raw = supervised_config(
        tmp_path / "ckpt",
        losses={"terms": [{"name": "kd", "kind": "soft_label", "field": "logits"}]},
    )
    path = write_config(tmp_path / "cfg.yaml", raw)
    assert cli_main(["student", "train", str(path)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"lyceum: error: {path}: invalid trainer config: key 'losses'")
    assert "no teachers whose knowledge they could read" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "ckpt").exists()


# -- the loader without teachers ------------------------------------------------------------


def test_the_loader_without_teachers_yields_ids_and_resumes_mid_epoch() -> None:
    data = digits("train")
    loader = DistillLoader(data, {}, 64, shuffle=True, seed=7)
    assert loader.merged.fields == () and len(loader) == BATCHES
    first = list(loader)
    for (inputs, labels, knowledge), ids in zip(first, loader.batches(0), strict=True):
        assert list(knowledge) == ["sample_id"] and knowledge["sample_id"].tolist() == ids
        want = torch.stack([data[i][0] for i in ids])
        torch.testing.assert_close(inputs, want)
        assert labels.tolist() == [data[i][1] for i in ids]
    # Stopped after 5 batches of epoch 1, another loader continues with the other 15.
    stopped = iter(loader)
    for _ in range(5):
        next(stopped)
    stopped.close()
    state = loader.state_dict()
    assert state == {"epoch": 1, "seed": 7, "position": 5}
    resumed = DistillLoader(data, {}, 64, shuffle=True, seed=7)
    resumed.load_state_dict(state)
    rest = [k["sample_id"].tolist() for _x, _y, k in resumed]
    assert rest == loader.batches(1)[5:]
    assert resumed.state_dict() == {"epoch": 2, "seed": 7, "position": 0}


# -- runs -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_supervised_training_reaches_a_real_accuracy_and_writes_the_weights(
    uninterrupted: tuple[Path, TrainerProcess],
) -> None:
    """Two epochs on the labels: the validation accuracy the run reports (> 85%; an
    untrained MLP scores about 10%) is the accuracy of the weights it wrote, measured here."""
    ckpt, run = uninterrupted
    summary = run.stdout().strip()
    found = re.fullmatch(
        r"trained 2 epochs \(supervised, no teachers\): final loss ([0-9.]+), validation "
        r"accuracy ([0-9.]+)%, checkpoint (\S+), weights (\S+) \(for --checkpoint\)",
        summary,
    )
    assert found is not None, summary
    assert found.group(3) == str(ckpt / "last.pt")
    assert found.group(4) == str(ckpt / "model.safetensors")
    reported = float(found.group(2))
    assert reported > 85.0
    assert "no teachers: supervised training on every label (the task loss alone)" in run.stderr()

    assert sorted(p.name for p in ckpt.iterdir()) == [
        "epoch-001.pt",
        "epoch-002.pt",
        "last.pt",
        "model.safetensors",
    ]
    weights = load_file(str(ckpt / "model.safetensors"))
    state = torch.load(ckpt / "last.pt", weights_only=True)
    assert weights.keys() == state["model"].keys()
    for name, value in state["model"].items():
        assert torch.equal(weights[name], value)
    assert state["objective"] == {} and state["run"]["loss terms"] == "none (supervised)"
    model = load_model(f'{MLP}{{"hidden": 32}}', ckpt / "model.safetensors")
    measured = top1_accuracy(model, digits("val"))
    assert measured == pytest.approx(reported / 100, abs=5e-5)


@pytest.mark.integration
def test_sigterm_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(
    tmp_path: Path, uninterrupted: tuple[Path, TrainerProcess]
) -> None:
    """SIGTERM inside step 3 of epoch 1: exit 143 with `last.pt` and the weights as of the
    stop; `--resume` continues from batch 3 and ends with the uninterrupted run's weights."""
    ckpt, gate = tmp_path / "ckpt", tmp_path / "gate"
    gate.mkdir()
    raw = {
        **supervised_config(ckpt),
        "model": "tests._support.models:gated_mlp",
        "model_kwargs": {"gate": str(gate), "at": 3, "hidden": 32},
    }
    path = write_config(tmp_path / "cfg.yaml", raw)
    with TrainerProcess(path, name="stopped") as stopped:
        stopped.wait_for(gate / REACHED)
        stopped.proc.send_signal(signal.SIGTERM)
        (gate / GO).touch()
        assert stopped.wait() == 128 + signal.SIGTERM
    assert stopped.stderr().splitlines()[-1] == (
        f"lyceum: stopped by SIGTERM at epoch 1/2, after batch 3/{BATCHES}: checkpoint "
        f"{ckpt / 'last.pt'}, weights {ckpt / 'model.safetensors'} (for --checkpoint); resume "
        f"with: lyceum student train {path} --resume"
    )
    state = torch.load(ckpt / "last.pt", weights_only=True)
    assert state["loader"] == {"epoch": 0, "seed": 3, "position": 3}
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt", "model.safetensors"]
    at_stop = load_file(str(ckpt / "model.safetensors"))
    for name, value in state["model"].items():
        assert torch.equal(at_stop[name], value)

    resumed = run_trainer(path, "--resume", name="resumed")
    assert resumed.stdout().startswith("trained 2 epochs (supervised, no teachers): ")
    assert f"continuing epoch 1/2 after batch 3/{BATCHES}" in resumed.stderr()
    got = load_file(str(ckpt / "model.safetensors"))
    want = load_file(str(uninterrupted[0] / "model.safetensors"))
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)


def test_train_in_python_says_it_was_supervised(tmp_path: Path) -> None:
    result = train(supervised_config(tmp_path / "ckpt", epochs=1))
    assert result.supervised and result.ended == "finished"
    assert result.checkpoint == tmp_path / "ckpt" / "last.pt"
    assert result.weights == tmp_path / "ckpt" / "model.safetensors"
    assert result.val_accuracy is not None and result.val_accuracy > 0.5
