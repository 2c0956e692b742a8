"""`lyceum demo`: the main job on the bundled digits data (see lyceum.deploy.demo), and with
`--lm` the language-model demo on the stdlib's sources (see lyceum.deploy.demo_lm)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from lyceum.deploy.demo import DemoConfig, run_demo
from lyceum.deploy.demo_lm import LMDemoConfig, run_lm_demo


def _default(name: str) -> Any:
    """DemoConfig's default for a field: the options and their help show the library's value."""
    return DemoConfig.model_fields[name].default


def _lm_default(name: str) -> Any:
    return LMDemoConfig.model_fields[name].default


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a teacher on digits (or, --lm, a language model), dump its knowledge, "
        "distil a student from it",
        description="Train a teacher CNN on scikit-learn's digits, dump its knowledge to "
        "Arrow shards, and train a small student from scratch and distilled from that "
        "knowledge with the same steps and seeds; then `lyceum compress` runs the pipelines "
        "deploy/configs/demo_distill_quant.yaml and demo_prune_quant.yaml on the first seed's "
        "scratch student (PaddleSlim's hybrid table: distilled, int8, pruned -50% FLOPs, "
        "pruned + int8, each with its size on disk); prints the tables of the results. "
        "With --lm: "
        "train a BPE tokenizer and a tiny Llama teacher on the Python standard library's "
        "sources, dump its top-k log-probs, and train a smaller Llama student on "
        "cross-entropy alone and with top-k KD over the seeds; prints each run's held-out "
        "perplexity and KL to the teacher. Progress goes to stderr, the table to stdout.",
    )
    p.add_argument(
        "--lm",
        action="store_true",
        help="Run the language-model demo instead of the digits one (default: off; needs the "
        "hf extra: transformers, tokenizers)",
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
        help="Digits demo: optimizer steps of every student run (default: %(default)s)",
    )
    p.add_argument(
        "--labeled",
        type=int,
        default=_default("labeled"),
        metavar="N",
        help="Digits demo: training labels a student may use, those of the first N samples; "
        "distilled "
        "students also learn from the teacher's knowledge of every sample (default: %(default)s)",
    )
    p.add_argument(
        "--topk",
        type=int,
        default=_lm_default("topk"),
        metavar="K",
        help="With --lm: top-k log-probs per position the teacher dumps and the KD students "
        "learn from (default: %(default)s)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="Keep the checkpoints, tokenizer and knowledge here (default: a temporary "
        "directory, removed at the end)",
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
    if args.lm:
        return _run_lm(args)
    if args.topk != _lm_default("topk"):
        raise ValueError("--topk is an option of the language-model demo: add --lm, or drop it")
    config = DemoConfig(
        seeds=tuple(args.seeds), steps=args.steps, labeled=args.labeled, workdir=args.workdir
    )
    result = run_demo(config)
    print()
    print(result.table())
    return 0


def _run_lm(args: argparse.Namespace) -> int:
    digits_only = [
        option
        for option, name in (("--steps", "steps"), ("--labeled", "labeled"))
        if getattr(args, name) != _default(name)
    ]
    if digits_only:
        raise ValueError(
            f"{' and '.join(digits_only)} apply to the digits demo, not to --lm: drop them"
        )
    config = LMDemoConfig(seeds=tuple(args.seeds), topk=args.topk, workdir=args.workdir)
    result = run_lm_demo(config)
    print(result.table())
    return 0
