"""The example job configs under deploy/configs stay valid as the config models change."""

from __future__ import annotations

from pathlib import Path

from lyceum.compression.pruning import PruneJobConfig
from lyceum.compression.quantization import QuantizeJobConfig
from lyceum.deploy._jobs import load_job_config

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "configs"


def test_prune_example_config_is_valid():
    config = load_job_config(CONFIGS / "prune.yaml", PruneJobConfig, "prune")
    assert config.strategy.kind == "uniform"
    assert config.distill is not None and config.distill.temperature == 4.0


def test_quantize_example_config_is_valid():
    config = load_job_config(CONFIGS / "quantize.yaml", QuantizeJobConfig, "quantize")
    assert config.scheme.kind == "qat"
    assert config.scheme.weights == "channel_wise_abs_max"


def test_student_example_config_is_valid():
    from lyceum.student_client import load_config

    config = load_config(CONFIGS / "student.yaml")
    assert set(config.teachers) == {"served", "dumped"}
    assert config.dataset.labeled == 100
