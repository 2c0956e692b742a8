"""The pruning job: config validation, the CLI layer and an end-to-end run on digits."""

from __future__ import annotations

import argparse
import copy
import json
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from optuna.trial import TrialState

from lyceum.compression.pruning import (
    AutoPruning,
    PruneJobConfig,
    PruningConfig,
    SensitivityPruning,
    UniformPruning,
    describe_prune_job,
    load_pruned,
    run_prune_job,
)
from lyceum.compression.search import DRAW_ATTR, StudyConfig, open_study
from lyceum.deploy import _cli_prune, cli
from lyceum.deploy.examples import digits, student_cnn, train_classifier
from lyceum.proto.evaluation import top1_accuracy


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


def test_the_job_strategy_is_the_pruning_config_union(tmp_path: Path) -> None:
    annotation = PruneJobConfig.model_fields["strategy"].annotation
    assert typing.get_args(annotation) == typing.get_args(PruningConfig)
    for kind, cls in [
        ("uniform", UniformPruning),
        ("sensitivity", SensitivityPruning),
        ("auto", AutoPruning),
    ]:
        strategy = {"kind": kind, "flops": -0.3} if kind != "auto" else {"kind": kind}
        config = PruneJobConfig.model_validate(_raw(tmp_path, strategy=strategy))
        assert type(config.strategy) is cls


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"epochs": 3}, "key 'epochs': got 3: Extra inputs are not permitted"),
        ({"strategy": {"kind": "uniform", "flops": -0.5, "ratoi": 0.1}}, "key 'strategy.ratoi'"),
        ({"strategy": {"kind": "magic"}}, "key 'strategy.kind': Input tag 'magic'"),
        ({"model": "resnet_cnn"}, "key 'model': spec 'resnet_cnn': expected 'package.module:"),
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
    assert top1_accuracy(rebuilt, digits("test")) == report["after"]["accuracy"]
    bad = _write(tmp_path, {**_raw(tmp_path), "epochs": 1})
    assert cli.main(["prune", str(bad)]) == 2
    assert "key 'epochs': got 1: Extra inputs are not permitted" in capsys.readouterr().err


@pytest.mark.slow
def test_auto_job_writes_study_and_best_tokens(tmp_path: Path) -> None:
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
    # The search lives in an Optuna study beside the outputs: rerunning the job resumes it.
    study = open_study(
        StudyConfig(storage=str(tmp_path / "out" / "search.db"), study="auto-pruning")
    )
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert report.best_tokens == study.best_trial.system_attrs[DRAW_ATTR]["tokens"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["best_tokens"] == report.best_tokens


@pytest.mark.parametrize("float_epochs", [0, 1])
def test_before_is_the_model_as_given_after_its_float_epochs(
    tmp_path: Path, float_epochs: int
) -> None:
    config = PruneJobConfig.model_validate(
        _raw(tmp_path, float_epochs=float_epochs, finetune_epochs=0, latency_runs=1)
    )
    torch.manual_seed(0)
    model = student_cnn(width=16)
    reference = copy.deepcopy(model)
    # The examples' own training loop, not the job's: the same Adam steps, found independently.
    train_classifier(reference, digits("train"), epochs=float_epochs, lr=config.float_lr, seed=0)
    splits: dict[str, Any] = {
        "train_data": digits("train"),
        "val_data": digits("val"),
        "test_data": digits("test"),
    }
    report = run_prune_job(config, model=model, **splits)
    assert report.before.accuracy == top1_accuracy(reference, digits("test"))
    text = _cli_prune.summary(config, report)
    if float_epochs:
        assert report.before.accuracy > 0.5  # one epoch of digits is far above chance
        assert "untrained" not in text
    else:
        assert "note: the uncompressed model is the untrained model as built" in text
    assert text.endswith(
        "from lyceum.compression.pruning import load_pruned\n"
        "from lyceum.deploy.examples import student_cnn\n"
        f"model = load_pruned(student_cnn(width=16), {str(tmp_path / 'out')!r})"
    )


def test_plan_line_names_each_strategy_and_where_the_weights_come_from(tmp_path: Path) -> None:
    # Only the lengths are read: ranges stand in for datasets.
    splits: dict[str, Any] = {"train_data": range(10), "val_data": range(3), "test_data": range(4)}
    sensitivity = PruneJobConfig.model_validate(
        _raw(tmp_path, strategy={"kind": "sensitivity", "flops": -0.3, "ratios": [0.2, 0.4]})
    )
    assert describe_prune_job(sensitivity, **splits) == (
        'plan: prune lyceum.deploy.examples:student_cnn{"width": 16}, untrained (no checkpoint, '
        "float_epochs 0); sensitivity: each group alone at 2 ratios scored on val, then -30% "
        f"FLOPs (criterion l1); fine-tune 2 epochs; data 10 train / 3 val / 4 test samples; "
        f"out {tmp_path / 'out'}"
    )
    auto = PruneJobConfig.model_validate(
        _raw(
            tmp_path,
            strategy={"kind": "auto", "criterion": "fpgm", "search": {"max_iterations": 4}},
            checkpoint="w.safetensors",
            float_epochs=3,
            finetune_epochs=0,
        )
    )
    line = describe_prune_job(auto, **splits)
    assert line.startswith(
        'plan: prune lyceum.deploy.examples:student_cnn{"width": 16} from w.safetensors, '
        "then trained 3 more float epochs; auto: simulated annealing over 5 trials, each "
        "fine-tuned 1 epoch and scored on val, 50%-55% of the FLOPs removed (criterion fpgm); "
        "no fine-tuning; "
    )


def test_help_gives_every_option_and_config_key_a_sentence_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["prune", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for key in PruneJobConfig.model_fields:
        assert f"\n  {key}: " in text
    for line in (
        "  model: (required)",
        "  finetune_epochs: 10",
        "  progress: true",
        "  distill: null",
        "    with kind: sensitivity",
        "      ratios: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]",
        "      search: (the defaults below)",
        "        max_iterations: 100",
    ):
        assert f"\n{line}\n" in text
    for action in _subparser("prune")._actions:
        assert action.help and action.help.endswith("."), action.dest


def _subparser(name: str) -> argparse.ArgumentParser:
    [commands] = [
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ]
    return commands.choices[name]
