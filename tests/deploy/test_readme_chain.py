"""The README's command-line chain, run as written: teacher -> dump -> serve -> distil -> prune
-> quantize, in a fresh directory holding only the clone's `deploy/configs/`.

The block is the one after the `readme-chain` marker, taken from README.md itself. Two things
differ from a user's shell, and only these: `lyceum` is a script that runs this interpreter's
`-m lyceum.deploy.cli` (the test's own install), and the served port 50051 becomes a free one,
in the block and in the copied student.yaml (a fixed port could be taken on a CI machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
MARKER = "<!-- readme-chain:"
PORT = "50051"


def chain_block(readme: str) -> str:
    """The first ```bash block after the marker line."""
    _, marker, rest = readme.partition(MARKER)
    assert marker, f"README.md has no {MARKER!r} line"
    found = re.search(r"```bash\n(.*?)```", rest, flags=re.S)
    assert found is not None, "no ```bash block after the readme-chain marker"
    return found.group(1)


def commands(block: str) -> list[str]:
    """The block's commands (continuation lines joined, runs of spaces as one), comments and
    blanks left out."""
    lines = [line.split(" #")[0].rstrip() for line in block.splitlines()]
    joined = "\n".join(line for line in lines if line and not line.startswith("#"))
    return [" ".join(c.split()) for c in joined.replace("\\\n", " ").splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_chain_block_is_the_documented_chain() -> None:
    """Each step the README promises is in the block, in order, reading the files the step
    before it wrote."""
    steps = [c.split(" --")[0] for c in commands(chain_block(README.read_text()))]
    assert steps == [
        "lyceum student train deploy/configs/teacher.yaml",
        "lyceum teacher dump",
        "lyceum teacher serve",
        "TEACHER=$!",
        "until [ -f runs/serving.json ] || ! kill -0 $TEACHER 2>/dev/null; do sleep 1; done",
        "lyceum student train deploy/configs/student.yaml",
        "kill $TEACHER",
        "lyceum prune deploy/configs/prune.yaml",
        "lyceum quantize deploy/configs/quantize.yaml",
    ]
    block = chain_block(README.read_text())
    assert block.count("--checkpoint runs/teacher/model.safetensors") == 2
    assert "--out runs/knowledge" in block
    assert f"--grpc-port {PORT} --ready-file runs/serving.json &" in " ".join(commands(block))
    configs = REPO / "deploy" / "configs"
    student = (configs / "student.yaml").read_text()
    assert f"grpc://127.0.0.1:{PORT}" in student and "dir: runs/knowledge" in student
    assert "checkpoint: runs/student/model.safetensors" in (configs / "prune.yaml").read_text()
    quantize = (configs / "quantize.yaml").read_text()
    assert "checkpoint: runs/prune/model.safetensors" in quantize
    assert "checkpoint: runs/teacher/model.safetensors" in quantize


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_readme_chain_runs_as_written(tmp_path: Path) -> None:
    port = str(_free_port())
    shutil.copytree(REPO / "deploy" / "configs", tmp_path / "deploy" / "configs")
    student = tmp_path / "deploy" / "configs" / "student.yaml"
    student.write_text(student.read_text().replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{port}"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # exec: `$!` of `lyceum teacher serve ... &` is the server's own pid, so `kill` stops it.
    (bin_dir / "lyceum").write_text(
        f'#!/bin/sh\nexec {sys.executable} -m lyceum.deploy.cli "$@"\n', encoding="utf-8"
    )
    (bin_dir / "lyceum").chmod(0o755)
    block = chain_block(README.read_text()).replace(f"--grpc-port {PORT}", f"--grpc-port {port}")
    script = tmp_path / "chain.sh"
    # -E: the ERR trap also fires inside the block; it names the command that failed.
    script.write_text(
        "set -eEu -o pipefail\n"
        "trap 'echo \"chain: line $LINENO failed (exit $?): $BASH_COMMAND\" >&2' ERR\n" + block
    )
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: the background teacher goes with it
    )
    try:
        out, _ = proc.communicate(timeout=1400)
    finally:
        # Whatever happened, nothing the chain started outlives the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    tail = out[-6000:]
    assert proc.returncode == 0, tail
    assert "chain: line" not in out, tail

    runs = tmp_path / "runs"
    # 1. the teacher: a real accuracy, not a loop that ran
    teacher = re.search(r"trained 5 epochs \(supervised, no teachers\).*?accuracy ([\d.]+)%", out)
    assert teacher is not None and float(teacher.group(1)) > 90, tail
    assert _header(runs / "teacher" / "model.safetensors")["format"] == "pt"
    # 2. the dump
    manifest = json.loads((runs / "knowledge" / "manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["dataset"]["length"] == 1257
    # 3-4. the student, distilled from the served teacher and the dump
    distilled = re.search(r"trained 30 epochs: .*?validation accuracy ([\d.]+)%", out)
    assert distilled is not None and float(distilled.group(1)) > 85, tail
    assert json.loads((runs / "serving.json").read_text())["grpc"] == int(port)
    # 5. the pruned student: half the MACs, its plan beside its weights
    prune = json.loads((runs / "prune" / "report.json").read_text())
    assert prune["flops_reduction"] == pytest.approx(0.5, abs=0.02)
    assert prune["after"]["accuracy"] > 0.85, prune
    assert (runs / "prune" / "prune_plan.json").is_file()
    assert _header(runs / "prune" / "model.safetensors")["format"] == "lyceum-pruned"
    assert "Give 'runs/prune/model.safetensors' as the checkpoint of quantize" in out
    # 6. the int8 program of the pruned student, loaded by the line the summary prints
    quant = json.loads((runs / "quantize" / "report.json").read_text())["report"]
    assert quant["int8_accuracy"] > 0.85, quant
    assert quant["int8_tensor_bytes"] < quant["fp32_tensor_bytes"] / 3, quant
    load_line = out[out.index("Load the int8 program in Python") :].splitlines()[1:3]
    assert load_line == [
        "from lyceum.compression.quantization import load_int8",
        "model = load_int8('runs/quantize/model_int8.pt2').module()",
    ]
    check = "\n".join(
        [
            *load_line,
            "import torch",
            "from lyceum.deploy.examples import digits",
            "test = digits('test')",
            "x = torch.stack([test[i][0] for i in range(len(test))])",
            "y = torch.tensor([int(test[i][1]) for i in range(len(test))])",
            "print((model(x).argmax(1) == y).float().mean().item())",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) == pytest.approx(quant["int8_accuracy"], abs=1e-6)
