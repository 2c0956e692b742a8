"""`lyceum demo`: the main job on the bundled digits data (see lyceum.deploy.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lyceum.deploy.demo import DemoConfig, run_demo


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a teacher on digits, dump its knowledge, distil a student from it",
        description="Train a teacher CNN on scikit-learn's digits, dump its knowledge to "
        "Arrow shards, and train a small student from scratch and distilled from that "
        "knowledge with the same steps and seeds; prints a table of the results.",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per student")
    p.add_argument("--labeled", type=int, default=100, help="labels the student may use")
    p.add_argument("--workdir", type=Path, help="keep the knowledge here (default: a temp dir)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: these models are tiny, and more threads "
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
