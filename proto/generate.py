"""Regenerate the protobuf and gRPC stubs (`make proto`); a test checks they are current.

Run as `python -m lyceum.proto.generate [--check]`. Needs grpcio-tools (the dev extra).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("lyceum/v1/knowledge.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto under `PROTO_ROOT` into `out_dir`; returns the generated files."""
    from grpc_tools import protoc  # dev-only dependency, imported only when generating

    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_ROOT / p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILES}; see the messages above")
    return [
        out_dir / p.replace(".proto", suffix) for p in PROTO_FILES for suffix in GENERATED_SUFFIXES
    ]


def stale_files() -> list[str]:
    """Generated files that differ from what `generate` writes now (empty if all current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            str(f.relative_to(tmp))
            for f in fresh
            if not (PROTO_ROOT / f.relative_to(tmp)).exists()
            or not filecmp.cmp(f, PROTO_ROOT / f.relative_to(tmp), shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: proto/{name} (run `make proto`)", file=sys.stderr)
        return 1 if stale else 0
    for f in generate(PROTO_ROOT):
        print(f"wrote {f.relative_to(PROTO_ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
