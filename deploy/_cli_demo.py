"""`lyceum demo`: the main job on the bundled digits data (see lyceum.deploy.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from lyceum.deploy.demo import DemoConfig, run_demo


def _default(name: str) -> Any:
    """DemoConfig's default for a field: the options and their help show the library's value."""
    return DemoConfig.model_fields[name].default


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a teacher on digits, dump its knowledge, distil a student from it",
        description="Train a teacher CNN on scikit-learn's digits, dump its knowledge to "
        "Arrow shards, and train a small student from scratch and distilled from that "
        "knowledge with the same steps and seeds; then `lyceum compress` runs the pipelines "
        "deploy/configs/demo_distill_quant.yaml and demo_prune_quant.yaml on the first seed's "
        "scratch student (PaddleSlim's hybrid table: distilled, int8, pruned -50% FLOPs, "
        "pruned + int8, each with its size on disk); prints the tables of the results.",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(_default("seeds")),
        metavar="SEED",
        help="Seeds of the student runs; each student row shows one figure per seed "
        f"(default: {' '.join(map(str, _default('seeds')))})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=_default("steps"),
        metavar="N",
        help="Optimizer steps of every student run (default: %(default)s)",
    )
    p.add_argument(
        "--labeled",
        type=int,
        default=_default("labeled"),
        metavar="N",
        help="Training labels a student may use, those of the first N samples; distilled "
        "students also learn from the teacher's knowledge of every sample (default: %(default)s)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="Keep the checkpoints and knowledge here (default: a temporary directory, removed "
        "at the end)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="Torch intra-op threads (default 1: these models are tiny, and more threads "
        "spin against each other and against the teacher processes on a small machine)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    config = DemoConfig(
        seeds=tuple(args.seeds), steps=args.steps, labeled=args.labeled, workdir=args.workdir
    )
    result = run_demo(config)
    print()
    print(result.table())
    return 0
