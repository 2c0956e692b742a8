"""What `lyceum prune` and `lyceum quantize` show a user, run as real processes on tiny jobs.

The plan line comes first on stdout, progress goes to stderr as log lines (stderr is a pipe
here, so no carriage returns), the summary ends with Python that loads the result, and that
Python, run as printed in a fresh process, gives the outputs the job measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lyceum.compression.pruning import load_pruned
from lyceum.compression.quantization import load_int8
from lyceum.deploy.examples import digits, student_cnn, train_classifier
from lyceum.proto.evaluation import top1_accuracy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Well past what these jobs take on a loaded two-core machine; only a hang reaches it.
HANG_GUARD_S = 600
UMASK = 0o027  # not the usual 022: the outputs must follow the umask, not a fixed 0644

# Appended to a printed snippet: the logits of the whole test split, saved for comparison.
SAVE_TEST_LOGITS = """
import torch
from safetensors.torch import save_file
from lyceum.deploy.examples import digits
test = digits("test")
x = torch.stack([test[i][0] for i in range(len(test))])
with torch.no_grad():
    save_file({"logits": model(x).contiguous()}, LOGITS)
"""


def _python(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter in `cwd`; `subprocess.run` kills and waits for it on a timeout."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        umask=UMASK,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _lyceum(cwd: Path, command: str, config: dict) -> subprocess.CompletedProcess[str]:
    path = cwd / f"{command}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = _python(cwd, "-m", "lyceum.deploy.cli", command, path.name)
    assert done.returncode == 0, done.stderr
    return done


def _snippet(stdout: str, header: str) -> str:
    """The lines after `header`'s line: the summary ends with the snippet."""
    lines = stdout.splitlines()
    [start] = [i for i, line in enumerate(lines) if line.startswith(header)]
    return "\n".join(lines[start + 1 :]) + "\n"


def _run_snippet(cwd: Path, code: str, name: str) -> torch.Tensor:
    script = cwd / f"{name}.py"
    script.write_text(code + f"LOGITS = {name + '.safetensors'!r}\n" + SAVE_TEST_LOGITS)
    done = _python(cwd, script.name)
    assert done.returncode == 0, done.stderr
    return load_file(str(cwd / f"{name}.safetensors"))["logits"]


def _test_accuracy(logits: torch.Tensor) -> float:
    test = digits("test")
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    return int((logits.argmax(dim=1) == labels).sum()) / len(test)


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}


def test_prune_shows_plan_progress_and_python_that_loads_the_result(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = train_classifier(student_cnn(width=16), digits("train"), epochs=4, seed=0)
    save_file(
        {k: v.contiguous() for k, v in trained.state_dict().items()},
        str(tmp_path / "w.safetensors"),
    )
    done = _lyceum(
        tmp_path,
        "prune",
        {
            "model": "lyceum.deploy.examples:student_cnn",
            "model_kwargs": {"width": 16},
            "checkpoint": "w.safetensors",
            "dataset": "lyceum.deploy.examples:digits",
            "strategy": {"kind": "uniform", "flops": -0.5},
            "finetune_epochs": 1,
            "latency_runs": 3,
            "distill": {"temperature": 4.0, "alpha": 0.5},
            "out_dir": "out",
        },
    )
    assert done.stdout.splitlines()[0] == (
        'plan: prune lyceum.deploy.examples:student_cnn{"width": 16} from w.safetensors; uniform to '
        "-50% FLOPs (criterion l1); fine-tune 1 epoch distilled from the unpruned model "
        "(T=4, alpha=0.5); data 1,257 train / 180 val / 360 test samples; out out"
    )
    assert "\r" not in done.stderr
    # 1,257 samples in batches of 64: 20 batches; a short epoch logs its closing line only.
    assert "fine-tune: 20/20 batch (100%)" in done.stderr

    report = yaml.safe_load((tmp_path / "out" / "report.json").read_text())
    # 'before' is the model the config names, measured independently here.
    before = top1_accuracy(trained, digits("test"))
    assert report["before"]["accuracy"] == before
    assert f"\n{'test accuracy':<15}{before:>14.4f}" in done.stdout
    assert "untrained" not in done.stdout

    snippet = _snippet(done.stdout, "Load the pruned model in Python")
    assert snippet.startswith("from lyceum.compression.pruning import load_pruned\n")
    logits = _run_snippet(tmp_path, snippet, "pruned")
    assert _test_accuracy(logits) == report["after"]["accuracy"]
    rebuilt = load_pruned(student_cnn(width=16), tmp_path / "out")
    test = digits("test")
    with torch.no_grad():
        here = rebuilt(torch.stack([test[i][0] for i in range(len(test))]))
    assert torch.equal(logits, here)

    want = 0o666 & ~UMASK
    assert _modes(tmp_path / "out") == {
        "model.safetensors": want,
        "prune_plan.json": want,
        "report.json": want,
    }


def test_quantize_shows_plan_progress_and_python_that_loads_the_result(tmp_path: Path) -> None:
    done = _lyceum(
        tmp_path,
        "quantize",
        {
            "model": "lyceum.deploy.examples:student_mlp",
            "dataset": "lyceum.deploy.examples:digits",
            "scheme": {"kind": "ptq", "observer": "percentile"},
            "float_epochs": 10,
            "calibration_batches": 4,
            "latency": False,
            "out_dir": "out",
        },
    )
    assert done.stdout.splitlines()[0] == (
        "plan: quantize lyceum.deploy.examples:student_mlp trained 10 float epochs first; PTQ "
        "calibrated on 4 batches of 64 (weights channel_wise_abs_max, activations "
        "moving_average_abs_max, observer percentile); no latency; data 1,257 train / 360 test "
        "samples; out out"
    )
    assert "\r" not in done.stderr
    for line in (
        "float training: 200/200 batch (100%)",
        "calibration: 4/4 batch (100%)",
        "int8: converting",
    ):
        assert line in done.stderr

    report = yaml.safe_load((tmp_path / "out" / "report.json").read_text())["report"]
    snippet = _snippet(done.stdout, "Load the int8 program in Python")
    assert snippet == (
        "from lyceum.compression.quantization import load_int8\n"
        "model = load_int8('out/model_int8.pt2').module()\n"
    )
    logits = _run_snippet(tmp_path, snippet, "int8")
    assert _test_accuracy(logits) == report["int8_accuracy"]
    test = digits("test")
    with torch.no_grad():
        here = load_int8(tmp_path / "out" / "model_int8.pt2").module()(
            torch.stack([test[i][0] for i in range(len(test))])
        )
    assert torch.equal(logits, here)

    # What the summary says of plain torch.export.load: it needs `import torchao` first ...
    plain = (
        "import torch\nimport torchao\nmodel = torch.export.load('out/model_int8.pt2').module()\n"
    )
    assert torch.equal(_run_snippet(tmp_path, plain, "plain"), logits)
    # ... because the program calls quantized_decomposed ops that torch alone does not register.
    bare = tmp_path / "bare.py"
    bare.write_text("import torch\ntorch.export.load('out/model_int8.pt2')\n")
    failed = _python(tmp_path, bare.name)
    assert failed.returncode != 0
    assert "torch.ops.quantized_decomposed" in failed.stderr

    want = 0o666 & ~UMASK
    assert set(_modes(tmp_path / "out").values()) == {want}
