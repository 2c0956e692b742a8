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


def test_demo_pipeline_configs_are_valid_with_the_demo_paths(tmp_path):
    from lyceum.deploy._demo_pipelines import DISTILL_QUANT, PRUNE_QUANT, demo_pipeline

    assert DISTILL_QUANT.parent == PRUNE_QUANT.parent == CONFIGS
    for path, read in ((DISTILL_QUANT, {"distil", "int8"}), (PRUNE_QUANT, {"pruned", "int8"})):
        config = demo_pipeline(
            path,
            out_dir=tmp_path / "run",
            checkpoint=tmp_path / "model.safetensors",
            knowledge_dir=tmp_path / "knowledge",
            labeled=50,
            seed=3,
        )
        assert (config.out_dir, config.checkpoint) == (
            tmp_path / "run",
            tmp_path / "model.safetensors",
        )
        assert (config.labeled, config.seed) == (50, 3)
        dirs = [t.dir for s in config.stages for t in getattr(s, "teachers", {}).values()]
        assert dirs and all(d == tmp_path / "knowledge" for d in dirs)
        assert read <= {s.name for s in config.stages}  # the rows the demo reads by name


def test_supernet_example_config_is_valid_and_its_budget_leaves_a_search():
    from lyceum.compression.nas import BudgetedSpace, OFASpace, SupernetJobConfig

    config = load_job_config(CONFIGS / "supernet.yaml", SupernetJobConfig, "nas supernet train")
    space = OFASpace(config.space)
    flops = BudgetedSpace(space).figures
    largest, smallest = (
        flops(space.init_tokens()).flops,
        flops(space.tokens(space.smallest())).flops,
    )
    assert config.budget.max_flops is not None
    assert smallest < config.budget.max_flops < largest
    assert config.budget.max_flops == int(0.6 * largest)  # the -40% its comment says
