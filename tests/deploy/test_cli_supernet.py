"""`lyceum nas supernet train|search|extract`: real processes, each reading what the one before
wrote; the extracted subnet loads through `load_model` by its path alone and scores as the
trained supernet's subnet does; trained from a teacher's dump, a resume without it is refused.
The search's own options (`--workers`, `--plots`) run on a supernet written as trained
(`trained_like`), so they need no training first."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState
from safetensors.torch import save_file

from lyceum.compression.nas import (
    SUBNET_FILE,
    SUPERNET_FILE,
    BudgetedSpace,
    LatencyTable,
    OFASpace,
    OFASpaceConfig,
    SupernetJobConfig,
    load_trained,
    read_search,
    search_plot_data,
)
from lyceum.compression.search import CACHED_ATTR, open_study, trial_tokens
from lyceum.deploy._exit_codes import USAGE
from lyceum.deploy.cli import main
from lyceum.deploy.examples import digits
from lyceum.proto.evaluation import top1_accuracy
from lyceum.proto.specs import WEIGHTS_FILE, load_model
from tests._support.supernets import TINY, tiny_space, trained_like
from tests._support.teachers import make_dump

HANG_GUARD_S = 600  # far past what each command takes on a loaded two-core machine


def _lyceum(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`lyceum ARGS` in a fresh interpreter; `subprocess.run` kills and waits on a timeout."""
    return subprocess.run(
        [sys.executable, "-m", "lyceum.deploy.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.integration
@pytest.mark.slow
def test_train_search_extract_from_files_alone(tmp_path: Path) -> None:
    space = OFASpace(OFASpaceConfig.model_validate(TINY))
    figures = BudgetedSpace(space).figures
    budget = (
        figures(space.init_tokens()).flops + figures(space.tokens(space.smallest())).flops
    ) // 2
    config = {
        "space": TINY,
        "kernel_transform": True,
        "dataset_kwargs": {"limit": 64},
        "out_dir": str(tmp_path / "run"),
        "train": {"epochs_per_phase": 1, "batch_size": 32, "random_subnets": 1},
        "calibration_batches": 2,
        "budget": {"max_flops": budget},
        "search": {"max_iterations": 4},
        "study": {"storage": str(tmp_path / "ofa.db"), "study": "ofa"},
    }
    path = tmp_path / "supernet.yaml"
    path.write_text(yaml.safe_dump(config))

    trained = _lyceum(tmp_path, "nas", "supernet", "train", str(path))
    assert trained.returncode == 0, trained.stderr
    assert "supernet written to" in trained.stdout
    assert re.search(r"largest subnet: top-1 \d\.\d{4} \(BN re-calibrated\)", trained.stdout)
    # Four phases of one epoch (largest, kernel, depth, expansion): the last epoch's checkpoint.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "optim-0004.safetensors",
        "state.json",
        "supernet-0004.safetensors",
    ]

    searched = _lyceum(tmp_path, "nas", "supernet", "search", str(path))
    assert searched.returncode == 0, searched.stderr
    assert "5 subnets evaluated" in searched.stdout
    found = re.search(r"top-1 (\d\.\d{4}), ([\d,]+) MACs.*tokens ([\d,]+)", searched.stdout)
    assert found, searched.stdout
    reward, flops, tokens = float(found[1]), int(found[2].replace(",", "")), found[3]
    assert flops <= budget

    out = tmp_path / "subnet"
    extracted = _lyceum(
        tmp_path, "nas", "supernet", "extract", str(path), "--tokens", tokens, "--out", str(out)
    )
    assert extracted.returncode == 0, extracted.stderr
    spec = 'lyceum.compression.nas:ofa_subnet{"config": "%s"}' % (out / SUBNET_FILE)
    model = load_model(spec, out / WEIGHTS_FILE)
    # Re-calibrated on the same batches as the search's reward: the same accuracy.
    assert top1_accuracy(model, digits("val", limit=64)) == pytest.approx(reward, abs=5e-5)
    # The extracted architecture is the one the tokens name in the trained supernet's space.
    supernet = load_trained(SupernetJobConfig.model_validate(config))
    expected = supernet.space.build_subnet(supernet.set_tokens([int(t) for t in tokens.split(",")]))
    shapes = {k: v.shape for k, v in expected.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes

    bad = _lyceum(
        tmp_path, "nas", "supernet", "extract", str(path), "--tokens", "1,x", "--out", "o"
    )
    assert bad.returncode == 2 and "--tokens '1,x': expected comma-separated integers" in bad.stderr


def _searchable(tmp_path: Path, **extra: object) -> tuple[Path, SupernetJobConfig]:
    """A config whose out_dir holds a supernet as `train` writes it, and the config itself."""
    config = SupernetJobConfig.model_validate(
        {
            "space": TINY,
            "dataset_kwargs": {"limit": 64},
            "out_dir": str(tmp_path / "run"),
            "train": {"batch_size": 32},
            "calibration_batches": 1,
            "search": {"max_iterations": 7, "seed": 0},
            "study": {"storage": str(tmp_path / "ofa.db"), "study": "ofa"},
            **extra,
        }
    )
    state = {k: v.contiguous() for k, v in trained_like(tiny_space()).state_dict().items()}
    config.out_dir.mkdir(parents=True)
    save_file(state, config.out_dir / SUPERNET_FILE, metadata={"format": "pt"})
    path = tmp_path / "supernet.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    return path, config


@pytest.mark.integration
@pytest.mark.slow
def test_search_by_two_workers_fills_one_study_then_plots_it_once(tmp_path: Path) -> None:
    path, config = _searchable(tmp_path)
    plots = tmp_path / "plots"
    done = _lyceum(
        tmp_path, "nas", "supernet", "search", str(path), "--workers", "2", "--plots", str(plots)
    )
    assert done.returncode == 0, done.stderr
    space = OFASpace(config.space)
    study = open_study(config.study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    # max_iterations + 1 completed trials whatever the number of workers, each subnet
    # evaluated once (a repeat copies its twin's reward instead).
    assert len(complete) == config.search.max_iterations + 1 == 8
    table = space.range_table()
    evaluated = [
        space.subnet(trial_tokens(t, table) or []).canonical(space)
        for t in complete
        if CACHED_ATTR not in t.system_attrs
    ]
    assert len(evaluated) == len(set(evaluated))
    # Each worker ran its search to the end on the shared study, and printed its summary.
    assert done.stdout.count("8 subnets evaluated") == 2
    best = max(complete, key=lambda t: (t.value or 0.0, -t.number))
    assert done.stdout.count(f"best: top-1 {best.value:.4f},") == 2
    # The plots once, after both: from the study.
    assert done.stdout.count("plots: ") == 1
    assert f"plots: {plots / 'rewards.png'}, {plots / 'tradeoffs.png'}" in done.stdout
    for name in ("rewards.png", "tradeoffs.png"):
        assert (plots / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_search_by_workers_without_a_storage_is_refused_naming_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = _searchable(tmp_path, study={"study": "ofa"})
    assert main(["nas", "supernet", "search", str(path), "--workers", "2"]) == USAGE
    err = capsys.readouterr().err
    assert f"lyceum nas supernet search {path} --workers 2 needs a shared storage" in err
    assert "set it or pass --storage" in err


@pytest.mark.slow
def test_search_plots_accuracy_against_macs_and_predicted_latency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lut = tmp_path / "lut.json"
    spec = "lyceum.compression.nas:ofa_space" + json.dumps(TINY)
    assert main(["nas", "lut", "--space", spec, "--runs", "1", "--out", str(lut)]) == 0
    table = LatencyTable.load(lut)
    space = tiny_space()
    latencies = sorted(
        table.predict(space.ops(space.tokens(c))) for c in (space.largest(), space.smallest())
    )
    budget = {"max_latency_ms": sum(latencies) / 2}
    path, config = _searchable(tmp_path, lut=str(lut), budget=budget)
    capsys.readouterr()
    plots = tmp_path / "plots"
    assert main(["nas", "supernet", "search", str(path), "--plots", str(plots)]) == 0
    printed = capsys.readouterr().out
    assert f"plots: {plots / 'rewards.png'}, {plots / 'tradeoffs.png'}" in printed
    for name in ("rewards.png", "tradeoffs.png"):
        assert (plots / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # What tradeoffs.png drew: a latency panel beside the MACs one, the budget on it.
    result, budgeted = read_search(space, config.study, budget=config.budget, lut=table)
    data = search_plot_data(result, budgeted)
    assert data.latency_ms is not None and len(data.latency_ms) == 8
    assert data.max_latency_ms == budget["max_latency_ms"]
    assert all(x <= budget["max_latency_ms"] for x in data.latency_ms)


@pytest.mark.integration
@pytest.mark.slow
def test_train_distilled_from_a_teachers_dump(tmp_path: Path) -> None:
    dump = make_dump(tmp_path / "dump", 3, digits("train", limit=64))
    elastic = {"kernels": [3, 5], "depths": [1, 2], "expands": [2, 3]}
    config = {
        "space": TINY,
        "dataset_kwargs": {"limit": 64},
        "out_dir": str(tmp_path / "run"),
        "train": {
            "phases": [{"name": "all", "epochs": 1, **elastic}],
            "batch_size": 32,
            "random_subnets": 1,
        },
        "calibration_batches": 2,
        "teacher": {"knowledge_dir": str(dump), "alpha": 0.8, "temperature": 2.0},
    }
    path = tmp_path / "supernet.yaml"
    path.write_text(yaml.safe_dump(config))
    trained = _lyceum(tmp_path, "nas", "supernet", "train", str(path))
    assert trained.returncode == 0, trained.stderr
    for name in ("largest", "smallest"):
        assert re.search(rf"{name} subnet: top-1 \d\.\d{{4}} \(BN re-calibrated\)", trained.stdout)
    state = json.loads((tmp_path / "run" / "checkpoints" / "state.json").read_text())
    recorded = state["schedule"]["teacher"]
    assert state["epochs_done"] == 1 and recorded["alpha"] == 0.8
    assert len(recorded["outputs_sha256"]) == 64

    # The same run resumed without its teacher is refused: the subnets learnt from another loss.
    del config["teacher"]
    path.write_text(yaml.safe_dump(config))
    resumed = _lyceum(tmp_path, "nas", "supernet", "train", str(path), "--resume")
    assert resumed.returncode == 2
    assert "it differs in teacher (checkpoint {'alpha': 0.8, 'outputs_sha256': " in resumed.stderr
    assert "now None)" in resumed.stderr


def test_search_by_evolution_from_the_yaml_then_plots_it_without_a_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    search = {"method": "evolution", "population": 4, "tournament": 2, "max_iterations": 7}
    path, config = _searchable(tmp_path, search=search)
    plots = tmp_path / "plots"
    assert main(["nas", "supernet", "search", str(path), "--plots", str(plots)]) == 0
    assert "plots: " in capsys.readouterr().out
    assert (plots / "rewards.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    result, budgeted = read_search(tiny_space(), config.study, budget=config.budget)
    assert len(result.history) == 8 and all(h["accepted"] is None for h in result.history)
    assert search_plot_data(result, budgeted).chain is None  # no SA chain to draw
    # The study remembers its method: annealing on it is refused, naming the setting.
    annealing = config.model_copy(update={"search": config.search.model_copy(
        update={"method": "annealing"})})  # fmt: skip
    path.write_text(yaml.safe_dump(annealing.model_dump(mode="json", exclude_unset=True)))
    capsys.readouterr()
    assert main(["nas", "supernet", "search", str(path)]) != 0
    assert "method: saved evolution, here annealing" in capsys.readouterr().err
