"""prune -> quantize -> dump of a pruned model, from files alone: each command a real process
that reads what the one before wrote, the pruned model named by its `model.safetensors`.

The figures cross-check by independent paths: the float accuracy quantize measures of the
pruned model it rebuilt is the one prune reported, and the dumped logits are those of
`load_pruned` in this process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from lyceum.compression.pruning import load_pruned
from lyceum.compression.quantization import load_int8
from lyceum.deploy.cli import main as cli_main
from lyceum.deploy.examples import digits, resnet_cnn

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HANG_GUARD_S = 600  # far past what each command takes on a loaded two-core machine
MODEL = 'lyceum.deploy.examples:resnet_cnn{"width": 8}'
TEST_SET = 'lyceum.deploy.examples:digits{"split": "test"}'


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


def _job(cwd: Path, command: str, config: dict[str, object]) -> str:
    path = cwd / f"{command}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = _lyceum(cwd, command, path.name)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _dump_args(checkpoint: str, out: str) -> list[str]:
    return [
        "teacher", "dump", "--model", MODEL, "--checkpoint", checkpoint, "--dataset", TEST_SET,
        "--out", out,
    ]  # fmt: skip


def _dump(cwd: Path, checkpoint: str, out: str) -> subprocess.CompletedProcess[str]:
    return _lyceum(cwd, *_dump_args(checkpoint, out))


@pytest.mark.timeout(1200)
def test_prune_then_quantize_then_dump_the_pruned_model_from_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdout = _job(
        tmp_path,
        "prune",
        {
            "model": MODEL,
            "float_epochs": 3,
            "dataset": "lyceum.deploy.examples:digits",
            "strategy": {"kind": "uniform", "flops": -0.5},
            "finetune_epochs": 1,
            "latency_runs": 3,
            "out_dir": "pruned",
            "progress": False,
        },
    )
    assert "Give 'pruned/model.safetensors' as the checkpoint of quantize" in stdout
    pruned_report = yaml.safe_load((tmp_path / "pruned" / "report.json").read_text())

    quant_out = _job(
        tmp_path,
        "quantize",
        {
            "model": MODEL,
            "checkpoint": "pruned/model.safetensors",
            "dataset": "lyceum.deploy.examples:digits",
            "scheme": {
                "kind": "ptq",
                "weights": "channel_wise_abs_max",
                "activations": "moving_average_abs_max",
            },
            "calibration_batches": 4,
            "latency": False,
            "out_dir": "int8",
            "progress": False,
        },
    )
    assert "from pruned/model.safetensors" in quant_out  # the plan line names the pruned model
    quant = yaml.safe_load((tmp_path / "int8" / "report.json").read_text())["report"]
    # The same pruned model measured on the same test split, by two commands.
    assert quant["fp32_accuracy"] == pruned_report["after"]["accuracy"]
    assert quant["int8_accuracy"] > pruned_report["after"]["accuracy"] - 0.05, quant

    done = _dump(tmp_path, "pruned/model.safetensors", "knowledge")
    assert done.returncode == 0, done.stderr[-4000:]

    # What the files hold, read here by other paths.
    model = load_pruned(resnet_cnn(width=8), tmp_path / "pruned")
    test = digits("test")
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = np.array([int(test[i][1]) for i in range(len(test))])
    with torch.no_grad():
        expected = model(x).numpy()
    shard = pa.ipc.open_file(tmp_path / "knowledge" / "shard-00000.arrow").read_all()
    logits = shard["logits"].combine_chunks().flatten().to_numpy().reshape(shard.num_rows, -1)
    assert shard["sample_id"].to_numpy().tolist() == list(range(len(test)))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    accuracy = float((logits.argmax(1) == y).mean())
    assert accuracy == pytest.approx(pruned_report["after"]["accuracy"], abs=1e-9)
    # The int8 program holds the pruned architecture itself: no plan, no factory.
    program = load_int8(tmp_path / "int8" / "model_int8.pt2").module()
    with torch.no_grad():
        int8_accuracy = float((program(x).argmax(1).numpy() == y).mean())
    assert int8_accuracy == pytest.approx(quant["int8_accuracy"], abs=1e-9)
    stem = model.stem[0].out_channels  # type: ignore[index,union-attr]  # modules
    assert stem < 8
    shapes = [tuple(t.shape) for t in program.state_dict().values()]
    assert (stem, 1, 3, 3) in shapes, shapes

    # The weights moved without their plan: refused by the command, naming the fix (through
    # the CLI's entry point and error boundary in this process: one interpreter fewer).
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tmp_path / "pruned" / "model.safetensors", lone / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli_main(_dump_args("lone/model.safetensors", "lone-knowledge")) == 2
    refused = capsys.readouterr().err
    assert "holds pruned weights" in refused
    assert "prune_plan.json, is not beside it in 'lone'" in refused
    assert "Traceback" not in refused
    assert not (tmp_path / "lone-knowledge").exists()
