"""Generated stubs are current, and importing the package stays lean."""

from __future__ import annotations

import subprocess
import sys

from lyceum.proto.generate import stale_files


def test_generated_stubs_are_current():
    assert stale_files() == [], "run `make proto` and commit the regenerated stubs"


_LEAN_PROBE = """
import os, sys, threading
import lyceum.proto, lyceum.teacher_server, lyceum.student_client
import lyceum.compression, lyceum.deploy, lyceum.deploy.cli
import torch

def target(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the descriptor listdir itself used, closed by now
        return ""

sockets = sum(target(fd).startswith("socket:") for fd in os.listdir("/proc/self/fd"))
heavy = ("torchao", "torch_pruning", "matplotlib", "onnx", "onnxruntime")
print(torch.cuda.is_initialized(), threading.active_count(), sockets,
      [m for m in heavy if m in sys.modules])
"""


def test_import_is_lean():
    """Importing every package opens no socket, starts no thread, initialises no CUDA and
    loads none of the heavy optional libraries (those load with the command that needs them)."""
    out = subprocess.run([sys.executable, "-c", _LEAN_PROBE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False 1 0 []", out.stdout
