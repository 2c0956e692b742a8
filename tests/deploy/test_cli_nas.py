"""`lyceum nas search|best|lut|latency` as a user runs them, on a tiny space of this module.

The space (`tiny_space`, three tokens: conv width, kernel, activation) trains in a fraction of
a second on 64 digits, so a search of a few trials by two worker processes runs in seconds;
the worker processes resolve it through `tests._support.teachers.ENV` (the repository on
PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState
from torch import nn

from lyceum.compression.nas import (
    BudgetedSpace,
    LatencyTable,
    NASConfig,
    NASNetwork,
    NASSpace,
    Op,
    lightnas_space,
    op_key,
)
from lyceum.compression.search import CACHED_ATTR, StudyConfig, open_study, trial_tokens
from lyceum.deploy._exit_codes import USAGE
from lyceum.deploy._jobs import load_job_config
from lyceum.deploy.cli import main
from lyceum.proto.specs import WEIGHTS_FILE, load_model
from tests._support.teachers import ENV, REPO

LYCEUM = [sys.executable, "-m", "lyceum.deploy.cli"]
SPACE = "tests.deploy.test_cli_nas:tiny_space"
HANG_GUARD_S = 300


class TinySpace:
    """conv(1 -> width, kernel) + activation + pooled linear head, on 8x8 digits."""

    widths = (4, 8)
    kernels = (1, 3)

    def range_table(self) -> list[int]:
        return [2, 2, 2]

    def init_tokens(self) -> list[int]:
        return [1, 1, 1]

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        return True

    def ops(self, tokens: Sequence[int]) -> list[Op]:
        w, k, relu = self.widths[tokens[0]], self.kernels[tokens[1]], tokens[2]
        return [
            Op(op_key("conv", cout=w, k=k), lambda: nn.Conv2d(1, w, k, padding=k // 2), (1, 8, 8)),
            Op(op_key("act", c=w, relu=relu), lambda: nn.ReLU() if relu else nn.Tanh(), (w, 8, 8)),
            Op(
                op_key("head", c=w),
                lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 10)),
                (w, 8, 8),
            ),
        ]

    def all_ops(self) -> list[Op]:
        seen: dict[str, Op] = {}
        for a in range(2):
            for b in range(2):
                for c in range(2):
                    for op in self.ops([a, b, c]):
                        seen.setdefault(op.key, op)
        return list(seen.values())

    def build(self, tokens: Sequence[int]) -> nn.Module:
        return nn.Sequential(*(op.build() for op in self.ops(tokens)))


def tiny_space() -> TinySpace:
    return TinySpace()


def _config(tmp_path: Path, **extra: object) -> Path:
    config = {
        "space": SPACE,
        "dataset_kwargs": {"limit": 64},
        "epochs": 1,
        "batch_size": 32,
        "search": {"max_iterations": 5, "seed": 0},
        "study": {"storage": str(tmp_path / "nas.db"), "study": "tiny"},
        **extra,
    }
    path = tmp_path / "nas.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LYCEUM, *args],
        env={**os.environ, **ENV},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


@pytest.mark.integration
def test_search_by_two_workers_on_sqlite_then_best(tmp_path: Path) -> None:
    config = _config(tmp_path)
    done = _cli("nas", "search", str(config), "--workers", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    study = open_study(StudyConfig(storage=str(tmp_path / "nas.db"), study="tiny"))
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # max_iterations + 1 completed trials whatever the number of workers; every candidate
    # trained once (a repeat copies its twin's reward instead of training).
    assert len(complete) == 6
    trained = [
        tuple(trial_tokens(t, [2, 2, 2]) or ())
        for t in complete
        if CACHED_ATTR not in t.system_attrs
    ]
    assert len(trained) == len(set(trained))
    assert "6 trials" in done.stdout and "infeasible candidates re-drawn" in done.stdout

    best = _cli(
        "nas", "best", "--storage", str(tmp_path / "nas.db"), "--study", "tiny", "--space", SPACE,
        cwd=tmp_path,
    )  # fmt: skip
    assert best.returncode == 0, best.stderr
    tokens = ",".join(map(str, trial_tokens(study.best_trial, [2, 2, 2]) or []))
    assert f"best: reward {study.best_value:.4f}," in best.stdout
    assert best.stdout.strip().endswith(f"tokens {tokens}")


def test_lut_then_latency_predicted_and_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lut.json"
    assert main(["nas", "lut", "--space", SPACE, "--runs", "3", "--out", str(out)]) == 0
    table = LatencyTable.load(out)
    space = tiny_space()
    assert isinstance(space, NASSpace)
    assert set(table.entries) == {op.key for op in space.all_ops()}
    assert (table.device, table.threads, table.batch) == ("cpu", 1, 1)
    assert f"{len(table.entries)} ops measured" in capsys.readouterr().out

    args = ["nas", "latency", "--lut", str(out), "--space", SPACE, "--tokens", "0,1,0"]
    assert main([*args, "--measure"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"predicted: {table.predict(space.ops([0, 1, 0])):.4f} ms"
    assert lines[1].startswith("measured: ") and float(lines[1].split()[1]) > 0


@pytest.mark.parametrize(
    ("args", "phrases"),
    [
        (["--tokens", "0,x,1"], ["--tokens '0,x,1'", "comma-separated integers"]),
        (["--tokens", "0,1"], ["--tokens: expected 3 tokens, got 2"]),
        (["--tokens", "0,5,1"], ["--tokens: token 1 is 5, outside its range [0, 1]"]),
    ],
)
def test_latency_refuses_bad_tokens_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], phrases: list[str]
) -> None:
    out = tmp_path / "lut.json"
    assert main(["nas", "lut", "--space", SPACE, "--runs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["nas", "latency", "--lut", str(out), "--space", SPACE, *args]) == USAGE
    err = capsys.readouterr().err
    for phrase in phrases:
        assert phrase in err


def test_search_refuses_an_unknown_key_and_a_workers_run_without_storage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["nas", "search", str(_config(tmp_path, epoch=2))]) == USAGE
    err = capsys.readouterr().err
    assert "epoch" in err and "nas.yaml" in err

    config = _config(tmp_path, study={"study": "tiny"})
    assert main(["nas", "search", str(config), "--workers", "2"]) == USAGE
    assert f"lyceum nas search {config} --workers 2 needs a shared storage" in (
        capsys.readouterr().err
    )
    # No workers is a usage error of the option (argparse exits 2), not one worker.
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exit_:
            main(["nas", "search", str(config), "--workers", bad])
        assert exit_.value.code == USAGE
        assert f"--workers {bad!r}: expected a whole number" in capsys.readouterr().err


def test_a_space_spec_that_is_not_a_nas_space_is_refused_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = "lyceum.deploy.examples:student_mlp"
    assert main(["nas", "lut", "--space", spec, "--out", str(tmp_path / "lut.json")]) == USAGE
    err = capsys.readouterr().err
    assert f"--space {spec}" in err and "NASSpace" in err
    assert not (tmp_path / "lut.json").exists()


def test_best_of_a_study_without_trials_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = str(tmp_path / "empty.db")
    assert main(["nas", "best", "--storage", storage, "--study", "none", "--space", SPACE]) == USAGE
    assert "study 'none' has no completed trial yet" in capsys.readouterr().err


def test_latency_with_a_table_of_another_space_names_the_missing_op(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lut.json"
    assert main(["nas", "lut", "--space", SPACE, "--runs", "1", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    table["entries"] = {k: v for k, v in table["entries"].items() if not k.startswith("head")}
    out.write_text(json.dumps(table))
    capsys.readouterr()
    assert main(["nas", "latency", "--lut", str(out), "--space", SPACE, "--tokens", "1,1,1"]) == 2
    assert "no entry for op head(c=8)" in capsys.readouterr().err


def test_train_the_best_of_a_search_then_load_it_by_the_model_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(
        tmp_path,
        search={"max_iterations": 2, "seed": 0},
        final={"epochs": 1, "batch_size": 32, "latency_runs": 3, "progress": False},
    )
    assert main(["nas", "search", str(config)]) == 0
    study = open_study(StudyConfig(storage=str(tmp_path / "nas.db"), study="tiny"))
    best = trial_tokens(study.best_trial, [2, 2, 2])
    capsys.readouterr()
    out = tmp_path / "final"
    assert main(["nas", "train", str(config), "--out", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"training tokens {','.join(map(str, best or []))} (the best of study 'tiny'" in printed
    assert "seed 1" in printed and "lyceum.compression.nas:nas_model" in printed
    model = load_model("lyceum.compression.nas:nas_model", out / WEIGHTS_FILE)
    assert isinstance(model, NASNetwork) and model.architecture.tokens == best
    assert model.architecture.space == SPACE
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 1 and f"test accuracy {report['accuracy']:.4f}" in printed

    assert main(["nas", "train", str(config), "--tokens", "0,0,7", "--out", str(out)]) == USAGE
    assert "--tokens: token 2 is 7, outside its range [0, 1]" in capsys.readouterr().err


def test_the_shipped_nas_config_is_valid() -> None:
    config = load_job_config(REPO / "deploy" / "configs" / "nas.yaml", NASConfig, "nas search")
    space = lightnas_space(**config.space_kwargs)
    figures = BudgetedSpace(space).figures(space.init_tokens())
    # Its budget is the -30% FLOPs of the space's initial network that its comment says.
    assert config.budget.max_flops == pytest.approx(0.7 * figures.flops, rel=1e-3)


def test_best_with_the_config_prints_the_best_and_writes_the_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, search={"max_iterations": 3, "seed": 0}, budget={"max_flops": 900})
    assert main(["nas", "search", str(config)]) == 0
    capsys.readouterr()
    plots = tmp_path / "plots"
    assert main(["nas", "best", "--config", str(config), "--plots", str(plots)]) == 0
    printed = capsys.readouterr().out
    study = open_study(StudyConfig(storage=str(tmp_path / "nas.db"), study="tiny"))
    assert f"best: reward {study.best_value:.4f}," in printed
    assert f"plots: {plots / 'rewards.png'}, {plots / 'tradeoffs.png'}" in printed
    assert (plots / "rewards.png").stat().st_size > 0
    # Without --config nor --storage there is no study to read.
    assert main(["nas", "best"]) == USAGE
    assert "give --storage URL" in capsys.readouterr().err
