"""`lyceum quantize CONFIG.yaml`: config validation, spec resolution, outputs on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lyceum.compression.quantization import QAT, QuantizeJobConfig, load_int8
from lyceum.deploy import _cli_quantize, cli


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
    with pytest.raises(ValueError, match=r"scheme\.qat\.wieghts"):
        _cli_quantize.load_config(_write(tmp_path, config))
    config = _base(tmp_path) | {"calibration_batchs": 3}
    with pytest.raises(ValueError, match="calibration_batchs"):
        _cli_quantize.load_config(_write(tmp_path, config))
    config = _base(tmp_path) | {"model": "student_mlp"}
    with pytest.raises(ValueError, match=r"'module:callable'.*'student_mlp'"):
        _cli_quantize.load_config(_write(tmp_path, config))
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


def test_config_defaults(tmp_path: Path) -> None:
    config = QuantizeJobConfig(
        model="lyceum.deploy.examples:student_mlp",
        dataset="lyceum.deploy.examples:digits",
        scheme=QAT(),
        out_dir=tmp_path,
    )
    assert config.scheme.kind == "qat"
