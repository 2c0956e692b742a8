"""Generated stubs are current, and importing the package stays lean."""

from __future__ import annotations

import subprocess
import sys

from lyceum.proto.generate import stale_files


def test_generated_stubs_are_current():
    assert stale_files() == [], "run `make proto` and commit the regenerated stubs"


def test_import_is_lean():
    code = (
        "import sys, lyceum.proto, lyceum.teacher_server, lyceum.student_client, "
        "lyceum.compression, lyceum.deploy; "
        "import socket; "
        "bad = [m for m in ('grpc', 'zmq', 'torch_pruning', 'torchao', 'sklearn', 'matplotlib') "
        "if m in sys.modules]; "
        "import torch; print(torch.cuda.is_initialized(), bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False"
    assert out.stdout.strip().endswith("[]"), out.stdout
