"""`lyceum compress PIPELINE.yaml [--resume] [--out DIR]`: train, prune and quantize in one run.

Thin: reads the pipeline YAML, calls `lyceum.compression.pipeline.compress` (its Python
equivalent) and prints the report. The library is imported when the command runs: it pulls in
torch-pruning and torchao, which building the parser must not.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lyceum.deploy import _exit_codes
from lyceum.deploy._config_help import add_config_help

_EXIT_CODES = "\n".join(
    f"  {code:<4} {meaning}"
    for code, meaning in (
        (_exit_codes.OK, "every stage ran; the report is printed and in out_dir"),
        (
            _exit_codes.USAGE,
            "bad input (an unknown key, a window that makes no sense, a spec, out_dir):\n"
            "       the message names the key and the fix",
        ),
        (_exit_codes.UNAVAILABLE, "a train stage's teachers stayed unavailable: --resume later"),
        (
            _exit_codes.signal_exit(signal.SIGINT),
            "SIGINT, after the batch (or stage boundary) in progress and its checkpoint:\n"
            "       --resume continues from it (a second signal stops at once; the last\n"
            "       checkpoint stands)",
        ),
        (_exit_codes.signal_exit(signal.SIGTERM), "SIGTERM, the same"),
    )
)


def _config_class() -> type[BaseModel]:
    from lyceum.compression.pipeline import PipelineConfig

    return PipelineConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `compress` on the `lyceum` CLI's subparsers; dispatch with `args.func(args)`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "compress",
        help="one YAML pipeline: distil, prune and quantize in sequence or in epoch windows",
        description="Run a compression pipeline (PaddleSlim's Compressor): stages that train\n"
        "(supervised, or distilled from teachers or from an earlier stage's model), prune\n"
        "(uniform, sensitivity, auto; its window is the fine-tune) and quantize (QAT over an\n"
        "epoch window, while a distillation window goes on; or PTQ), one after the other\n"
        "(each stage's 'epochs') or in windows over one run ('start_epoch'/'end_epoch').\n"
        "A checkpoint (state dicts + JSON, no pickle) is written to out_dir/checkpoint after\n"
        "every epoch, at every stage boundary, every checkpoint_every batches and, on\n"
        "SIGINT or SIGTERM, after the batch in progress (then it exits 130 or 143); each\n"
        "stage's model goes to out_dir/stages/NAME; the report (accuracy, size on disk,\n"
        "MACs, CPU latency per stage) to out_dir/report.md and report.json, and is printed.\n"
        "Python: lyceum.compression.pipeline.compress.\n\nexit codes:\n" + _EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument(
        "config",
        type=Path,
        metavar="PIPELINE.yaml",
        help="The pipeline config (YAML; keys below; unknown keys are rejected), e.g. "
        "deploy/configs/compress.yaml. Required, no default.",
    )
    add_config_help(parser, _config_class, "lyceum.compression.pipeline.PipelineConfig")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue the run in out_dir from its checkpoint (mid-stage and mid-epoch); the "
        "config must be the one it was started with (out_dir, progress, latency, "
        "checkpoint_every and window may change). Default: a new run, refused where out_dir "
        "holds one.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        default=None,
        help="The run directory, instead of the config's out_dir. Default: out_dir.",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from lyceum.compression.pipeline import compress, load_pipeline

    config = load_pipeline(args.config)
    result = compress(config, resume=args.resume, out_dir=args.out)
    if result.signum is not None:
        command = f"lyceum compress {shlex.quote(str(args.config))} --resume"
        if args.out is not None:
            command += f" --out {shlex.quote(str(args.out))}"
        name = signal.Signals(result.signum).name
        print(f"lyceum: compress stopped on {name}; continue with: {command}", file=sys.stderr)
        return _exit_codes.signal_exit(result.signum)
    print(result.report)
    print(
        f"report: {result.out_dir / 'report.md'} and report.json; stage models in "
        f"{result.out_dir / 'stages'}"
    )
    return _exit_codes.OK
