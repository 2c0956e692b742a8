"""In-process teachers: the knowledge of an offline dump of the same teacher, bit for bit, and
the same trained student; feature pairs named by module path on both sides train; a module
path that does not exist is refused, naming it and close names (exit code 2 from the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lyceum.deploy.examples import digits
from lyceum.proto.manifest import model_identity
from lyceum.proto.specs import load_model, parse_spec
from lyceum.student_client import (
    InProcessTeacher,
    InProcessTeacherConfig,
    OfflineTeacher,
    TeacherConfig,
    train,
    validate_config,
)
from lyceum.student_client.trainer import StepInfo
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine
from tests._support.teachers import ENV, REPO, save_checkpoint

TEACHER = "lyceum.deploy.examples:teacher_cnn"
WIDTH = {"width": 8}  # layer2 and layer3: [16, 4, 4] maps on the digits
STUDENT = "tests._support.models:feature_cnn"  # s1.0 [8, 4, 4], s2.1 and s3.1 [16, 4, 4]
OUTPUTS = ["logits=@output", "layer2", "layer3"]
LIMIT = 256  # digits kept: a few batches per epoch
_TIMEOUT_S = 180.0


def _data() -> torch.utils.data.Dataset[tuple[torch.Tensor, int]]:
    return digits("train", limit=LIMIT)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A seeded width-8 teacher's weights, and an offline dump of it with the same fields."""
    root = tmp_path_factory.mktemp("teacher")
    checkpoint = save_checkpoint(root / "teacher.safetensors", seed=3)
    spec = parse_spec(TEACHER, WIDTH)
    model = load_model(spec, checkpoint)
    data = _data()
    # As `lyceum teacher dump --output logits=@output --output layer2=layer2 ...` makes it.
    outputs = tuple(
        OutputSpec.parse(o) for o in ("logits=@output", "layer2=layer2", "layer3=layer3")
    )
    engine = TeacherEngine(model, EngineConfig(outputs=outputs), data[0][0])
    config = DumpConfig(shard_rows=100, batch_size=48, workers=0, progress=False)
    dump_knowledge(engine, data, root / "dump", config, model_identity(str(spec), model))
    return checkpoint, root / "dump"


def _in_process_entry(checkpoint: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model": TEACHER,
        "model_kwargs": WIDTH,
        "checkpoint": str(checkpoint),
        "outputs": OUTPUTS,
        **extra,
    }


def _feature_terms(l2_student: str = "s1.0") -> list[dict[str, Any]]:
    """An L2 term through a learned 1x1 adapter (8 -> 16 channels) and an FSP term, each
    pairing teacher and student maps by module path."""
    return [
        {
            "name": "l2",
            "kind": "mse",
            "field": "layer3",
            "student": l2_student,
            "student_channels": 8,
            "spatial": True,
        },
        {"name": "fsp", "kind": "fsp", "field": ["layer2", "layer3"], "student": ["s2.1", "s3.1"]},
    ]


def _config(teacher: dict[str, Any], checkpoint_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model": STUDENT,
        "dataset": {"train": "lyceum.deploy.examples:digits", "train_kwargs": {"limit": LIMIT}},
        "teachers": {"t": teacher},
        "losses": {
            "terms": [
                {"name": "kd", "kind": "soft_label", "field": "logits", "temperature": 4.0},
                *_feature_terms(),
            ]
        },
        "epochs": 2,
        "batch_size": 32,
        "seed": 5,
        "checkpoint_dir": str(checkpoint_dir),
        "progress": False,
        **extra,
    }


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lyceum.deploy.cli", *args]
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, env=env)


# -- the knowledge ---------------------------------------------------------------------------


def test_in_process_knowledge_equals_the_offline_dump(teacher: tuple[Path, Path]) -> None:
    checkpoint, dump = teacher
    data = _data()
    offline = OfflineTeacher(dump, data)
    inproc = InProcessTeacher.from_spec(
        parse_spec(TEACHER, WIDTH), checkpoint, data, outputs=OUTPUTS, name="t"
    )
    try:
        assert inproc.schema == offline.schema
        assert inproc.needs_inputs
        # Batches of other sizes and compositions than the dump's (48, in id order).
        for rid, ids in enumerate([torch.tensor([5, 200, 17, 0]), torch.randperm(LIMIT)[:37]]):
            inputs = torch.stack([data[int(i)][0] for i in ids])
            offline.submit(rid, ids)
            inproc.submit(rid, ids, inputs)
            assert set(inproc.outstanding()) == {rid}
            ((got_id, got),) = inproc.poll(0.0)
            ((_, want),) = offline.poll(0.0)
            assert got_id == rid and inproc.outstanding() == {}
            assert torch.equal(got.sample_ids, ids)
            assert sorted(got.tensors) == ["layer2", "layer3", "logits"]
            for column, value in want.tensors.items():
                assert got.tensors[column].dtype == value.dtype == torch.float32
                assert torch.equal(got.tensors[column], value), column
    finally:
        inproc.close()
        offline.close()


def test_the_teacher_runs_in_eval_mode_without_gradients(teacher: tuple[Path, Path]) -> None:
    checkpoint, _ = teacher
    rng = torch.get_rng_state()
    inproc = InProcessTeacher.from_spec(parse_spec(TEACHER, WIDTH), checkpoint, _data())
    try:
        # Building it (a factory's random init) leaves the student's random stream alone.
        assert torch.equal(torch.get_rng_state(), rng)
        model = inproc.engine.model
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert [f.name for f in inproc.schema.fields] == ["logits"]
    finally:
        inproc.close()


# -- training --------------------------------------------------------------------------------


@pytest.mark.integration
def test_student_train_in_process_gives_the_offline_runs_weights(
    teacher: tuple[Path, Path], tmp_path: Path
) -> None:
    """The same config but for the teacher entry: `lyceum student train` with the teacher
    in its process, `train()` reading the dump; the weights are equal, adapters included."""
    checkpoint, dump = teacher
    config = tmp_path / "inproc.yaml"
    config.write_text(yaml.safe_dump(_config(_in_process_entry(checkpoint), tmp_path / "a")))
    run = _cli("student", "train", str(config))
    assert run.returncode == 0, run.stderr
    offline = train(_config({"dir": str(dump)}, tmp_path / "b"))
    assert offline.ended == "finished"
    got, want = load_file(tmp_path / "a" / "model.safetensors"), offline.model.state_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    adapters = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["objective"]
    assert adapters.keys() == {"losses.l2.adapter.weight", "losses.l2.adapter.bias"}
    want_adapters = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["objective"]
    for name, value in want_adapters.items():
        assert torch.equal(adapters[name], value), name


def test_a_feature_pair_by_module_names_trains(teacher: tuple[Path, Path], tmp_path: Path) -> None:
    """L2 (with its learned adapter) and FSP on maps named by module path on both sides, and
    nothing else in the loss: the loss falls, and the adapter is trained and checkpointed."""
    checkpoint, _ = teacher
    raw = _config(
        _in_process_entry(checkpoint),
        tmp_path,
        epochs=6,
        losses={"task_weight": 0.0, "terms": _feature_terms()},
        optimizer={"name": "adam", "lr": 0.01},
    )
    losses: dict[int, list[float]] = {}

    def on_step(info: StepInfo) -> None:
        losses.setdefault(info.epoch, []).append(info.loss)

    result = train(raw, on_step=on_step)
    assert result.ended == "finished"
    first, last = result.epochs[0].loss, result.epochs[-1].loss
    assert last < 0.5 * first, [e.loss for e in result.epochs]
    assert sum(losses[5]) / len(losses[5]) == pytest.approx(last)
    # The adapter is the optimizer's too: it moved between the first and the last epoch.
    early = torch.load(tmp_path / "epoch-001.pt", weights_only=True)["objective"]
    late = torch.load(tmp_path / "epoch-006.pt", weights_only=True)["objective"]
    assert late["losses.l2.adapter.weight"].shape == (16, 8, 1, 1)
    assert not torch.equal(early["losses.l2.adapter.weight"], late["losses.l2.adapter.weight"])
    # The student handed back runs without the trainer's hooks.
    assert not any(m._forward_hooks for m in result.model.modules())
    assert set(load_file(tmp_path / "model.safetensors")) == set(result.model.state_dict())


def test_a_bad_student_module_path_is_refused_naming_close_names(
    teacher: tuple[Path, Path], tmp_path: Path
) -> None:
    checkpoint, _ = teacher
    raw = _config(_in_process_entry(checkpoint), tmp_path)
    raw["losses"]["terms"][1]["student"] = "s1.9"
    with pytest.raises(ValueError, match=r"losses.terms 'l2': student 's1\.9': ") as exc:
        train(raw)
    assert "has no submodule 's1.9'; close names: ['s1.1', 's1.0', 's1']" in str(exc.value)
    assert "the student's forward, which returns ['logits', 's1', 's2', 's3']" in str(exc.value)
    assert not (tmp_path / "last.pt").exists()


def test_a_bad_teacher_module_path_is_refused_naming_close_names(
    teacher: tuple[Path, Path],
) -> None:
    checkpoint, _ = teacher
    with pytest.raises(ValueError, match=r"teacher 't' outputs 'layer9'") as exc:
        InProcessTeacher.from_spec(
            parse_spec(TEACHER, WIDTH), checkpoint, _data(), outputs=["layer9"], name="t"
        )
    assert "close names: ['layer3', 'layer2', 'layer1', " in str(exc.value)


@pytest.mark.integration
def test_the_cli_refuses_a_bad_module_path_with_exit_code_2(
    teacher: tuple[Path, Path], tmp_path: Path
) -> None:
    checkpoint, _ = teacher
    raw = _config(_in_process_entry(checkpoint), tmp_path / "run")
    raw["losses"]["terms"][1]["student"] = "features.6"
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = _cli("student", "train", str(config))
    assert run.returncode == 2, run.stderr
    assert "no submodule 'features.6'" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


# -- the config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "phrase"),
    [
        ({"model": TEACHER, "dir": "/x"}, "['dir'] are not keys of an in-process teacher"),
        ({"model": TEACHER, "endpoints": ["grpc://h:1"]}, "an online teacher has 'endpoints:'"),
        ({"model": TEACHER, "outputs": ["layer3.0"]}, "'layer3.0' needs a field name"),
        ({"model": TEACHER, "device": "tpu"}, "device 'tpu'"),
        ({"mode": "index"}, "or 'model' for a teacher run in the student's process"),
    ],
)
def test_teacher_entries_are_told_apart_and_errors_name_the_key(
    entry: dict[str, Any], phrase: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"key 'teachers\.t") as exc:
        validate_config(_config(entry, tmp_path))
    assert phrase in str(exc.value)


def test_a_config_mixes_in_process_and_offline_teachers(tmp_path: Path) -> None:
    config = validate_config(
        {
            **_config({"model": TEACHER}, tmp_path),
            "teachers": {"big": {"model": TEACHER, "device": "cpu"}, "dump": {"dir": "/x"}},
            "merge": {"logits": "mean"},
        }
    )
    big, dump = config.teachers["big"], config.teachers["dump"]
    assert isinstance(big, InProcessTeacherConfig) and big.outputs == ("logits=@output",)
    assert isinstance(dump, TeacherConfig) and dump.dir == Path("/x")


def test_the_example_config_distils_with_its_feature_pairs(tmp_path: Path) -> None:
    """deploy/configs/inprocess.yaml as shipped, on a saved width-32 teacher and a few
    batches: every module path it names exists, and it trains."""
    raw = yaml.safe_load((REPO / "deploy" / "configs" / "inprocess.yaml").read_text())
    entry = raw["teachers"]["cnn"]
    entry["checkpoint"] = str(save_checkpoint(tmp_path / "teacher.safetensors", width=32))
    raw["dataset"] = {"train": "lyceum.deploy.examples:digits", "train_kwargs": {"limit": 96}}
    raw.update(epochs=1, batch_size=32, checkpoint_dir=str(tmp_path / "run"), progress=False)
    result = train(raw)
    assert result.ended == "finished" and len(result.epochs) == 1
    adapters = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["objective"]
    assert adapters["losses.l2.adapter.weight"].shape == (64, 32, 1, 1)
    assert adapters["losses.hint.regressor.weight"].shape == (64, 32, 1, 1)
