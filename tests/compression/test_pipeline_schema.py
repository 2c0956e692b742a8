"""The pipeline schema: the two forms laid out as windows, and every config that makes no
sense refused before anything runs, naming the key to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lyceum.compression.pipeline import Window, load_pipeline, validate_pipeline
from lyceum.compression.pipeline._plan import build_plan, open_stages

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "configs"


def _config(*stages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": "lyceum.deploy.examples:digits",
        "out_dir": "runs/x",
        "stages": list(stages),
        **extra,
    }


TRAIN = {"name": "distil", "kind": "train", "start_epoch": 0, "end_epoch": 4}
QAT = {
    "name": "qat",
    "kind": "quantize",
    "start_epoch": 3,
    "end_epoch": 4,
    "scheme": {"kind": "qat"},
}
PRUNE = {"name": "prune", "kind": "prune", "strategy": {"kind": "uniform", "flops": -0.5}}


def _refusal(raw: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as info:
        validate_pipeline(raw, "p.yaml")
    return str(info.value)


def test_the_shipped_example_is_valid_and_windowed() -> None:
    config = load_pipeline(CONFIGS / "compress.yaml")
    assert [s.kind for s in config.stages] == ["train", "prune", "quantize"]
    assert config.windows() == [Window(0, 11), Window(6, 9), Window(10, 11)]


def test_sequential_stages_are_laid_end_to_end() -> None:
    config = validate_pipeline(
        _config(
            {"name": "t", "kind": "train", "epochs": 3},
            {**PRUNE, "epochs": 2},
            {"name": "q", "kind": "quantize", "scheme": {"kind": "ptq"}},
        )
    )
    assert config.windows() == [Window(0, 2), Window(3, 4), Window(5, None)]
    assert config.total_epochs() == 5
    plan = build_plan(config)
    kinds = [(s.kind, s.epoch, s.stage) for s in plan]
    assert kinds[:2] == [("start", 0, 0), ("epoch", 0, None)]
    assert kinds[-2:] == [("start", 5, 2), ("end", 5, 2)]
    # Inside the fine-tune: the train stage has ended, the prune stage is open.
    assert open_stages(plan, kinds.index(("epoch", 4, None))) == [1]


def test_qat_inside_a_distillation_window_converts_last() -> None:
    config = validate_pipeline(_config(TRAIN, QAT, epochs=5))
    plan = build_plan(config)
    assert [(s.kind, s.stage) for s in plan[-2:]] == [("end", 0), ("end", 1)]
    assert open_stages(plan, len(plan) - 3) == [0, 1]  # epoch 4: both windows


def test_an_unknown_key_is_named() -> None:
    message = _refusal(_config({**TRAIN, "start_epochs": 1}, epochs=5))
    assert "stages.0.start_epochs" in message and "Extra inputs are not permitted" in message
    message = _refusal({**_config(TRAIN, epochs=5), "checkpoint_path": "x"})
    assert "key 'checkpoint_path'" in message


def test_a_window_outside_the_total_is_named() -> None:
    message = _refusal(_config(TRAIN, {**QAT, "end_epoch": 7}, epochs=5))
    assert "key 'stages.1.end_epoch' (stage 'qat')" in message
    assert "7 is outside the run's 5 epochs (0-4)" in message


def test_quantization_before_pruning_is_refused() -> None:
    prune = {**PRUNE, "start_epoch": 4, "end_epoch": 4}
    message = _refusal(_config(TRAIN, QAT, prune, epochs=5))
    assert "key 'stages.2.start_epoch' (stage 'prune')" in message
    assert "quantization before pruning" in message
    # Sequentially: listed after the quantization.
    message = _refusal(
        _config(
            {"name": "t", "kind": "train", "epochs": 2},
            {"name": "q", "kind": "quantize", "scheme": {"kind": "ptq"}},
            {**PRUNE, "epochs": 1},
        )
    )
    assert "key 'stages.2.start_epoch' (stage 'prune')" in message


def test_a_stage_reading_an_output_no_earlier_stage_writes_is_refused() -> None:
    later = {"name": "student", "kind": "train", "epochs": 2, "distill_from": "teacher"}
    teacher = {"name": "teacher", "kind": "train", "epochs": 2}
    message = _refusal(_config(later, teacher))
    assert "key 'stages.0.distill_from' (stage 'student')" in message
    assert "has not written its model" in message
    message = _refusal(_config({**later, "distill_from": "nobody"}))
    assert "key 'stages.0.distill_from'" in message and "names no earlier stage" in message
    assert validate_pipeline(_config(teacher, later)).stages[1].kind == "train"


@pytest.mark.parametrize(
    ("raw", "key", "phrase"),
    [
        (
            _config(TRAIN, {**TRAIN, "name": "again", "start_epoch": 4}, epochs=5),
            "key 'stages.1.start_epoch' (stage 'again')",
            "one train stage at a time",
        ),
        (_config({**TRAIN, "end_epoch": 2}, epochs=5), "key 'epochs'", "epochs 3-4 of 5"),
        (_config(TRAIN, {**QAT, "end_epoch": 3}, epochs=5), "key 'stages.0.end_epoch'", "int8"),
        (_config(TRAIN, {**QAT, "name": "distil"}, epochs=5), "key 'stages.1.name'", "taken"),
        (_config(TRAIN, {**PRUNE, "epochs": 1}, epochs=5), "stages.1.start_epoch", "mix"),
        (_config(TRAIN), "key 'epochs'", "required with epoch windows"),
    ],
    ids=["two-train-windows", "idle-epochs", "training-after-int8", "same-name", "mixed", "total"],
)
def test_windows_that_make_no_sense_are_refused(raw: dict[str, Any], key: str, phrase: str) -> None:
    message = _refusal(raw)
    assert key in message and phrase in message, message


def test_labeled_with_distill_from_is_refused() -> None:
    float_stage = {"name": "float", "kind": "train", "epochs": 1}
    tune = {"name": "tune", "kind": "train", "epochs": 1, "distill_from": "float"}
    message = _refusal(_config(float_stage, tune, labeled=100))
    assert "key 'stages.1.distill_from' (stage 'tune')" in message
    assert "'labeled' hides the labels of ids >= 100" in message
