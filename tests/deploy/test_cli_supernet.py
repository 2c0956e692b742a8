"""`lyceum nas supernet train|search|extract`: real processes, each reading what the one before
wrote; the extracted subnet loads through `load_model` by its path alone and scores as the
trained supernet's subnet does; trained from a teacher's dump, a resume without it is refused."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lyceum.compression.nas import (
    SUBNET_FILE,
    BudgetedSpace,
    OFASpace,
    OFASpaceConfig,
    SupernetJobConfig,
    load_trained,
)
from lyceum.deploy.examples import digits
from lyceum.proto.evaluation import top1_accuracy
from lyceum.proto.specs import WEIGHTS_FILE, load_model
from tests._support.supernets import TINY
from tests._support.teachers import make_dump

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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
    assert state["epochs_done"] == 1 and state["schedule"]["teacher"] == {"alpha": 0.8}

    # The same run resumed without its teacher is refused: the subnets learnt from another loss.
    del config["teacher"]
    path.write_text(yaml.safe_dump(config))
    resumed = _lyceum(tmp_path, "nas", "supernet", "train", str(path), "--resume")
    assert resumed.returncode == 2
    assert "it differs in teacher (checkpoint {'alpha': 0.8}, now None)" in resumed.stderr
