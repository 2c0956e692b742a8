"""`lyceum quantize CONFIG.yaml`: config validation, spec resolution, outputs on disk."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lyceum.compression.quantization import (
    QAT,
    QuantizeJobConfig,
    QuantReport,
    describe_quantize_job,
    load_int8,
)
from lyceum.deploy import _cli_quantize, _jobs, cli
from lyceum.deploy.examples import Digits


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _base(tmp_path: Path) -> dict:
    return {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": "lyceum.deploy.examples:digits",
        "scheme": {"kind": "ptq", "weights": "channel_wise_abs_max", "observer": "percentile"},
        "float_epochs": 10,
        "float_lr": 0.01,
        "calibration_batches": 4,
        "latency": False,
        "out_dir": str(tmp_path / "out"),
    }


def test_bad_keys_and_values_are_named(tmp_path: Path) -> None:
    config = _base(tmp_path)
    config["scheme"] = {"kind": "qat", "wieghts": "abs_max"}
    with pytest.raises(ValueError, match=r"key 'scheme\.wieghts'"):
        _cli_quantize.load_config(_write(tmp_path, config))
    config = _base(tmp_path) | {"calibration_batchs": 3}
    with pytest.raises(ValueError, match="calibration_batchs"):
        _cli_quantize.load_config(_write(tmp_path, config))
    config = _base(tmp_path) | {"model": "student_mlp"}
    with pytest.raises(ValueError) as err:
        _cli_quantize.load_config(_write(tmp_path, config))
    assert (
        "invalid quantize config: key 'model': spec 'student_mlp': expected "
        "'package.module:callable' (a colon between the module path and the callable name)"
    ) in str(err.value)
    config = _base(tmp_path) | {"model": "lyceum.deploy.examples:nope"}
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        _cli_quantize.run_quantize_job(_cli_quantize.load_config(_write(tmp_path, config)))


def test_ptq_job_writes_program_and_report(tmp_path: Path) -> None:
    config = _cli_quantize.load_config(_write(tmp_path, _base(tmp_path)))
    assert config.scheme.kind == "ptq"
    assert cli.main(["quantize", str(_write(tmp_path, _base(tmp_path)))]) == 0
    out = tmp_path / "out"
    payload = json.loads((out / "report.json").read_text())
    report = payload["report"]
    assert payload["config"]["scheme"]["observer"] == "percentile"
    assert report["program_path"] == str(out / "model_int8.pt2")
    assert report["int8_bytes"] == (out / "model_int8.pt2").stat().st_size
    assert report["fp32_bytes"] == (out / "model_fp32.pt2").stat().st_size
    assert report["int8_tensor_bytes"] < 0.3 * report["fp32_tensor_bytes"]
    assert report["int8_accuracy"] > 0.85 and report["fp32_accuracy"] > 0.85
    assert report["int8_accuracy"] >= report["fp32_accuracy"] - 0.01
    program = load_int8(out / "model_int8.pt2")
    assert program.module()(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_specs_read_as_every_other_spec(tmp_path: Path) -> None:
    # Dotted attributes and inline JSON kwargs, as `lyceum teacher dump --model` takes them.
    config = _cli_quantize.load_config(
        _write(
            tmp_path,
            _base(tmp_path)
            | {
                "model": 'lyceum.deploy.examples:student_mlp{"hidden": 16}',
                "model_kwargs": {"num_classes": 10},
                "dataset": 'lyceum.deploy.examples:digits{"limit": 50}',
                "teacher": {"model": "lyceum.deploy.examples:TeacherCNN.__call__"},
                "scheme": {"kind": "qat"},
            },
        )
    )
    assert str(config.model_spec()) == (
        'lyceum.deploy.examples:student_mlp{"hidden": 16, "num_classes": 10}'
    )
    model = _jobs.build_model(config.model, config.model_kwargs, None)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [16, 10]
    split = _jobs.build_split(config.dataset, config.dataset_kwargs, "test")
    assert isinstance(split, Digits)
    assert len(split) == 50 and split.split == "test"
    for bad, why in (
        ("lyceum.deploy.examples:", "expected 'package.module:callable'"),
        ('lyceum.deploy.examples:digits{"limit": ', "keyword arguments are not valid JSON"),
    ):
        with pytest.raises(ValueError, match="invalid quantize config") as err:
            _cli_quantize.load_config(_write(tmp_path, _base(tmp_path) | {"dataset": bad}))
        assert f"key 'dataset': spec {bad!r}: {why}" in str(err.value)
    with pytest.raises(ValueError, match=r"key 'teacher.model': spec 'teacher_cnn': expected"):
        _cli_quantize.load_config(
            _write(
                tmp_path,
                _base(tmp_path) | {"scheme": {"kind": "qat"}, "teacher": {"model": "teacher_cnn"}},
            )
        )


def test_a_yaml_of_required_keys_is_the_python_config_and_reads_back(tmp_path: Path) -> None:
    required = {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": "lyceum.deploy.examples:digits",
        "scheme": {"kind": "qat"},
        "out_dir": str(tmp_path / "out"),
    }
    loaded = _cli_quantize.load_config(_write(tmp_path, required))
    built = QuantizeJobConfig(
        model="lyceum.deploy.examples:student_mlp",
        dataset="lyceum.deploy.examples:digits",
        scheme=QAT(),
        out_dir=tmp_path / "out",
    )
    assert loaded == built
    # The scheme's defaults are the documented QAT recipe, the teacher is off.
    assert (loaded.scheme.weights, loaded.scheme.activations) == (
        "channel_wise_abs_max",
        "moving_average_abs_max",
    )
    assert loaded.teacher is None and loaded.epochs == 3
    # What a job writes as its config (JSON) loads back to the same config.
    dumped = _write(tmp_path, json.loads(loaded.model_dump_json()))
    assert _cli_quantize.load_config(dumped) == loaded


def test_plan_line_names_the_scheme_epochs_teacher_and_data(tmp_path: Path) -> None:
    config = QuantizeJobConfig.model_validate(
        _base(tmp_path)
        | {
            "scheme": {"kind": "qat", "activations": "abs_max"},
            "epochs": 2,
            "float_epochs": 0,
            "checkpoint": "student.safetensors",
            "latency": True,
            "teacher": {"model": "lyceum.deploy.examples:teacher_cnn", "alpha": 0.7},
        }
    )
    # Only the lengths are read: ranges stand in for datasets.
    lengths: dict[str, Any] = {"train_data": range(1000), "test_data": range(5)}
    assert describe_quantize_job(config, **lengths) == (
        "plan: quantize lyceum.deploy.examples:student_mlp from student.safetensors; QAT 2 "
        "epochs (weights channel_wise_abs_max, activations abs_max), distilled from "
        "lyceum.deploy.examples:teacher_cnn (T=4, alpha=0.7); latency fp32 vs int8 compiled; "
        f"data 1,000 train / 5 test samples; out {tmp_path / 'out'}"
    )


def test_help_gives_every_option_and_config_key_a_sentence_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["quantize", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for key in QuantizeJobConfig.model_fields:
        assert f"\n  {key}: " in text
    for line in (
        "  scheme: (required)",
        "    with kind: ptq",
        '      observer: "minmax"',
        "        pattern: (required)",
        "  float_epochs: 0",
        "  calibration_batches: 8",
        "  teacher: null",
        "    temperature: 4.0",
    ):
        assert f"\n{line}\n" in text
    [commands] = [
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ]
    for action in commands.choices["quantize"]._actions:
        assert action.help and action.help.endswith("."), action.dest


def test_summary_names_an_untrained_model_and_ends_with_the_loader(tmp_path: Path) -> None:
    config = QuantizeJobConfig.model_validate(_base(tmp_path) | {"float_epochs": 0})
    program = str(tmp_path / "out" / "model_int8.pt2")
    report = QuantReport(
        mode="ptq",
        weights="channel_wise_abs_max",
        activations="moving_average_abs_max",
        observer="percentile",
        layers={},
        fp32_accuracy=0.1,
        int8_accuracy=0.1,
        fp32_bytes=2,
        int8_bytes=1,
        size_ratio=0.5,
        fp32_tensor_bytes=4,
        int8_tensor_bytes=1,
        latency_batch=64,
        threads=1,
        fp32_eager_ms=None,
        fp32_compiled_ms=None,
        int8_compiled_ms=None,
        program_path=program,
    )
    text = _cli_quantize.summary(config, report)
    assert "\nnote: the uncompressed model is the untrained model as built" in text
    assert text.endswith(
        "from lyceum.compression.quantization import load_int8\n"
        f"model = load_int8({program!r}).module()"
    )
    trained = config.model_copy(update={"float_epochs": 1})
    assert "note:" not in _cli_quantize.summary(trained, report)
