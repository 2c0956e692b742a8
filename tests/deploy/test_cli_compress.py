"""`lyceum compress`: a distil -> QAT pipeline stopped by SIGTERM inside the QAT window
checkpoints the batch in progress, exits 143, and resumed ends with the same int8 weights and
figures as an uninterrupted run; configs that make no sense exit 2 naming the key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lyceum.compression.quantization import load_int8
from lyceum.deploy.cli import main
from lyceum.deploy.examples import digits
from tests._support.teachers import ENV, make_dump
from tests._support.waiting import wait_until

LIMIT = 320  # 10 batches of 32 per epoch
QAT_EPOCH_STEP = 3  # start distil, epoch 0, start qat, epoch 1 (the QAT window)


def _pipeline(tmp_path: Path, dump: Path) -> dict[str, Any]:
    return {
        "model": 'lyceum.deploy.examples:student_mlp{"hidden": 16}',
        "dataset": "tests.deploy.compress_data:paused_digits",
        "dataset_kwargs": {
            "limit": LIMIT,
            "checkpoint": str(tmp_path / "cut/checkpoint/state.json"),
            # Paused at the first item of the QAT epoch, released once the signal is sent.
            "at_step": QAT_EPOCH_STEP,
            "after_batches": 0,
            "paused": str(tmp_path / "paused"),
            "release": str(tmp_path / "release"),
        },
        "epochs": 2,
        "batch_size": 32,
        "window": 2,
        # No checkpoint inside an epoch but the one the signal asks for.
        "checkpoint_every": 0,
        "latency": False,
        "progress": False,
        "out_dir": str(tmp_path / "cut"),
        "stages": [
            {
                "name": "distil",
                "kind": "train",
                "start_epoch": 0,
                "end_epoch": 1,
                "teachers": {"dump": {"dir": str(dump)}},
                "losses": {
                    "terms": [
                        {"name": "kd", "kind": "soft_label", "field": "logits", "temperature": 4.0}
                    ]
                },
            },
            {
                "name": "qat",
                "kind": "quantize",
                "start_epoch": 1,
                "end_epoch": 1,
                "scheme": {"kind": "qat"},
            },
        ],
    }


def _compress(config: Path, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "lyceum.deploy.cli", "compress", str(config), *flags],
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(proc: subprocess.Popen[bytes]) -> str:
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    return text


def _exited(proc: subprocess.Popen[bytes]) -> str:
    out = proc.stdout.read().decode() if proc.stdout is not None else ""
    return f"exited {proc.returncode}:\n{out[-4000:]}"


def _tensors(program: Path) -> dict[str, torch.Tensor]:
    exported = load_int8(program)
    found = {**exported.state_dict, **exported.constants}
    return {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}


@pytest.mark.integration
@pytest.mark.slow
def test_stopped_by_sigterm_inside_the_qat_window_and_resumed_it_ends_equal(
    tmp_path: Path,
) -> None:
    dump = make_dump(tmp_path / "dump", 0, digits("train", limit=LIMIT))
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(_pipeline(tmp_path, dump)))
    # The same config, uninterrupted, elsewhere (its dataset never blocks: the state file it
    # watches is the stopped run's, which does not exist yet).
    reference = _finish(_compress(config, "--out", str(tmp_path / "whole")))
    assert "| qat | quantize | 1 |" in reference

    proc = _compress(config)
    try:
        wait_until(
            lambda: (tmp_path / "paused").exists(),
            "the run blocked on the first batch of the QAT window",
            gave_up=lambda: None if proc.poll() is None else _exited(proc),
        )
        proc.send_signal(signal.SIGTERM)
        (tmp_path / "release").touch()  # the batch in progress completes, then the stop
        out, _ = proc.communicate(timeout=300)
        text = out.decode()
        assert proc.returncode == 143, text
    finally:
        proc.kill()
        proc.wait()
    assert "stopped on SIGTERM" in text and "epoch 2 after batch 1" in text, text
    assert f"lyceum compress {config} --resume" in text, text
    # The checkpoint is the batch boundary after the batch in progress: step 3, batch 1.
    state = json.loads((tmp_path / "cut/checkpoint/state.json").read_text())
    assert (state["step"], state["position"], state["finished"]) == (QAT_EPOCH_STEP, 1, False)
    assert [e["epoch"] for e in state["epochs"]] == [0]
    assert not (tmp_path / "cut/stages/qat").exists()
    assert not (tmp_path / "cut/report.json").exists()

    resumed = _finish(_compress(config, "--resume"))
    assert "| qat | quantize | 1 |" in resumed
    a = _tensors(tmp_path / "whole/stages/qat/model_int8.pt2")
    b = _tensors(tmp_path / "cut/stages/qat/model_int8.pt2")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole = json.loads((tmp_path / "whole/report.json").read_text())
    cut = json.loads((tmp_path / "cut/report.json").read_text())
    assert whole == cut
    epochs = [
        json.loads((tmp_path / f"{run}/checkpoint/state.json").read_text())["epochs"]
        for run in ("whole", "cut")
    ]
    assert epochs[0] == epochs[1] and [e["stages"] for e in epochs[0]][-1] == ["distil", "qat"]


TRAIN = {"name": "distil", "kind": "train", "start_epoch": 0, "end_epoch": 4}
QAT = {
    "name": "qat",
    "kind": "quantize",
    "start_epoch": 3,
    "end_epoch": 4,
    "scheme": {"kind": "qat"},
}


@pytest.mark.parametrize(
    ("stages", "extra", "phrase"),
    [
        ([TRAIN, QAT], {"compressor": {"epoch": 5}}, "key 'compressor': got {'epoch': 5}: Extra"),
        ([TRAIN, {**QAT, "end_epoch": 9}], {}, "key 'stages.1.end_epoch' (stage 'qat'): 9 is"),
        (
            [
                TRAIN,
                QAT,
                {
                    "name": "prune",
                    "kind": "prune",
                    "start_epoch": 4,
                    "strategy": {"kind": "uniform", "flops": -0.5},
                },
            ],
            {},
            "key 'stages.2.start_epoch' (stage 'prune'): starts after quantize stage 'qat'",
        ),
        (
            [{**TRAIN, "distill_from": "qat"}, QAT],
            {},
            "key 'stages.0.distill_from' (stage 'distil'): stage 'qat'",
        ),
    ],
    ids=["unknown-key", "outside-the-total", "quantization-before-pruning", "unwritten-output"],
)
def test_a_config_that_makes_no_sense_exits_2_naming_the_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    stages: list[dict[str, Any]],
    extra: dict[str, Any],
    phrase: str,
) -> None:
    config = tmp_path / "pipeline.yaml"
    raw = {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": "lyceum.deploy.examples:digits",
        "epochs": 5,
        "out_dir": str(tmp_path / "run"),
        "stages": stages,
        **extra,
    }
    config.write_text(yaml.safe_dump(raw))
    assert main(["compress", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lyceum: error: {config}: invalid pipeline config: "), err
    assert phrase in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_the_exit_code_of_a_real_process(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text("model: x:y\ndataset: x:y\nout_dir: run\nstages: []\nepoch: 3\n")
    done = subprocess.run(
        [sys.executable, "-m", "lyceum.deploy.cli", "compress", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "key 'epoch': got 3: Extra inputs are not permitted" in done.stderr
    assert "key 'stages'" in done.stderr
