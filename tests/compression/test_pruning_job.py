"""The pruning job: config validation, the CLI layer and an end-to-end run on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lyceum.compression.pruning import (
    PruneJobConfig,
    UniformPruning,
    evaluate_accuracy,
    load_pruned,
)
from lyceum.deploy import _cli_prune, cli
from lyceum.deploy.examples import digits, student_cnn, train_classifier


def _raw(tmp_path: Path, **overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "model": "lyceum.deploy.examples:student_cnn",
        "model_kwargs": {"width": 16},
        "dataset": "lyceum.deploy.examples:digits",
        "strategy": {"kind": "uniform", "flops": -0.5},
        "finetune_epochs": 2,
        "latency_runs": 3,
        "out_dir": str(tmp_path / "out"),
    }
    raw.update(overrides)
    return raw


def _write(tmp_path: Path, raw: dict[str, object]) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_config_parses_and_selects_strategy(tmp_path: Path) -> None:
    config = _cli_prune.load_config(_write(tmp_path, _raw(tmp_path)))
    assert config.strategy == UniformPruning(flops=-0.5)
    auto = PruneJobConfig.model_validate(
        _raw(tmp_path, strategy={"kind": "auto", "min_ratio": 0.4, "search": {"seed": 3}})
    )
    assert auto.strategy.kind == "auto" and auto.strategy.search.seed == 3


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"epochs": 3}, "epochs: Extra inputs are not permitted"),
        ({"strategy": {"kind": "uniform", "flops": -0.5, "ratoi": 0.1}}, "strategy.uniform.ratoi"),
        ({"strategy": {"kind": "magic"}}, "strategy: Input tag 'magic'"),
        ({"model": "resnet_cnn"}, "model: Value error, expected a 'module:callable' spec"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, overrides: dict, named: str) -> None:
    path = _write(tmp_path, _raw(tmp_path, **overrides))
    with pytest.raises(ValueError, match=r"invalid prune config") as info:
        _cli_prune.load_config(path)
    assert named in str(info.value)


@pytest.mark.slow
def test_cli_job_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    trained = train_classifier(student_cnn(width=16), digits("train"), epochs=4, seed=0)
    ckpt = tmp_path / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(ckpt))
    path = _write(tmp_path, _raw(tmp_path, checkpoint=str(ckpt)))

    assert cli.main(["prune", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "FLOPs removed: 5" in printed

    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert abs(report["flops_reduction"] - 0.5) <= 0.02
    assert report["after"]["flops"] < report["before"]["flops"]
    assert report["after"]["params"] < report["before"]["params"]
    assert report["before"]["accuracy"] > 0.8
    assert report["after"]["accuracy"] > report["before"]["accuracy"] - 0.1

    rebuilt = load_pruned(student_cnn(width=16), out)
    # The report's accuracy was measured on the model that was saved.
    assert evaluate_accuracy(rebuilt, digits("test")) == report["after"]["accuracy"]
    bad = _write(tmp_path, {**_raw(tmp_path), "epochs": 1})
    assert cli.main(["prune", str(bad)]) == 2
    assert "epochs: Extra inputs are not permitted" in capsys.readouterr().err


@pytest.mark.slow
def test_auto_job_writes_state_and_best_tokens(tmp_path: Path) -> None:
    strategy = {
        "kind": "auto",
        "min_ratio": 0.45,
        "max_ratio": 0.55,
        "search": {"max_iterations": 3, "seed": 0},
    }
    config = PruneJobConfig.model_validate(
        _raw(tmp_path, strategy=strategy, finetune_epochs=1, candidate_finetune_epochs=1)
    )
    torch.manual_seed(0)
    report = _cli_prune.run(config)
    assert 0.45 <= report.flops_reduction <= 0.55
    state = json.loads((tmp_path / "out" / "search_state.json").read_text())
    assert len(state["history"]) == 4
    assert report.best_tokens == state["best_tokens"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["best_tokens"] == report.best_tokens
