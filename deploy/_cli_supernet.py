"""`lyceum nas supernet train|search|extract CONFIG.yaml`: once-for-all, trained once.

`train` trains the supernet by progressive shrinking into the config's `out_dir` (`--resume`
continues from its checkpoints), distilling in place from the largest subnet or, with a
`teacher:` section, from a Lyceum teacher's knowledge (a dump or endpoints, read once);
`search` runs a search worker on the trained supernet (`--workers N`: N processes here; the
same command on other machines with the same `--storage URL` adds workers; `--plots DIR`
draws the study's subnets); `extract` writes one subnet (`--tokens`, e.g. from `search`) as
model.safetensors + subnet.json, which every command's checkpoint option loads. Python:
`lyceum.compression.nas.run_supernet_train` and its siblings.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lyceum.deploy._config_help import add_config_help
from lyceum.deploy._jobs import (
    build_split,
    load_job_config,
    spawn_workers,
    worker_count,
    write_search_plots,
)


def _supernet_config() -> type[BaseModel]:
    """The config class, imported when `--help` asks for it (every command builds every parser)."""
    from lyceum.compression.nas import SupernetJobConfig

    return SupernetJobConfig


def _config(args: argparse.Namespace, what: str) -> Any:
    from lyceum.compression.nas import SupernetJobConfig

    config = load_job_config(args.config, SupernetJobConfig, what)
    if getattr(args, "storage", None) is not None:
        config = config.model_copy(
            update={"study": config.study.model_copy(update={"storage": args.storage})}
        )
    return config


def _splits(config: Any) -> tuple[Any, Any]:
    return (
        build_split(config.dataset, config.dataset_kwargs, "train"),
        build_split(config.dataset, config.dataset_kwargs, "val"),
    )


def _train(args: argparse.Namespace) -> int:
    from lyceum.compression.nas import SUPERNET_FILE, run_supernet_train
    from lyceum.student_client.losses import soft_label_kd

    config = _config(args, "nas supernet train")
    train, val = _splits(config)
    kd = functools.partial(soft_label_kd, temperature=config.train.distill.temperature)
    teacher = None
    if config.teacher is not None:
        from lyceum.deploy._nas_knowledge import teacher_knowledge

        teacher = teacher_knowledge(config.teacher, train, key="teacher")
    accuracy = run_supernet_train(config, train, val, kd, teacher=teacher, resume=args.resume)
    print(f"supernet written to {config.out_dir / SUPERNET_FILE}")
    for name, value in accuracy.items():
        print(f"{name} subnet: top-1 {value:.4f} (BN re-calibrated)")
    return 0


def _search(args: argparse.Namespace) -> int:
    from lyceum.compression.nas import LatencyTable, OFASpace, read_search, run_supernet_search

    config = _config(args, "nas supernet search")
    if args.workers > 1:
        command = ["nas", "supernet", "search", str(args.config)]
        code = spawn_workers(command, config.study.storage, args.workers)
        if code != 0 or args.plots is None:
            return code
        # Once, when every worker has ended: the study holds all their trials.
        lut = LatencyTable.load(config.lut) if config.lut is not None else None
        result, budgeted = read_search(
            OFASpace(config.space), config.study, budget=config.budget, lut=lut
        )
        print(write_search_plots(result, budgeted, args.plots))
        return 0
    train, val = _splits(config)
    result, budgeted = run_supernet_search(config, train, val, worker=args.worker_name)
    f = budgeted.figures(result.best_tokens)
    latency = "" if f.latency_ms is None else f", {f.latency_ms:.3f} ms predicted"
    print(
        f"best: top-1 {result.best_reward:.4f}, {f.flops:,} MACs, {f.params:,} params{latency}; "
        f"tokens {','.join(map(str, result.best_tokens))}"
    )
    print(f"{len(result.history)} subnets evaluated, {result.redraws} over budget re-drawn")
    if args.plots is not None:
        print(write_search_plots(result, budgeted, args.plots))
    return 0


def _extract(args: argparse.Namespace) -> int:
    from lyceum.compression.nas import run_supernet_extract

    config = _config(args, "nas supernet extract")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        raise ValueError(
            f"--tokens {args.tokens!r}: expected comma-separated integers (the `tokens` "
            f"`lyceum nas supernet search` prints)"
        ) from None
    train, _ = _splits(config)
    out = run_supernet_extract(config, tokens, args.out, train)
    print(f"subnet written to {out} (model.safetensors, subnet.json)")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `supernet` and its actions on `lyceum nas`'s subparsers."""
    supernet = subparsers.add_parser(
        "supernet",
        help="once-for-all: train a supernet once, search and extract its subnets",
        description="Train a once-for-all supernet by progressive shrinking, search its "
        "subnets under budgets without training them, extract one as a plain model.",
    )
    sub = supernet.add_subparsers(dest="supernet_command", required=True, metavar="ACTION")
    config_help = "lyceum.compression.nas.SupernetJobConfig as YAML."
    train = sub.add_parser(
        "train",
        help="Train the supernet into the config's out_dir.",
        # Raw: the config keys' help below is laid out by add_config_help.
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the supernet by progressive shrinking. The smaller subnets of each\n"
        "sandwich step learn from the largest one's logits (train.distill); with a teacher\n"
        "section every subnet, the largest included, learns from a Lyceum teacher instead\n"
        "(teacher.alpha, teacher.temperature), e.g. `teacher: {knowledge_dir: DUMP}` with a\n"
        "`lyceum teacher dump` of the training split, or `teacher: {endpoints: [grpc://...]}`.",
        add_help=False,
    )
    train.add_argument("config", type=Path, metavar="CONFIG.yaml", help=config_help)
    add_config_help(train, _supernet_config, "lyceum.compression.nas.SupernetJobConfig")
    train.add_argument(
        "--resume", action="store_true", help="Continue from out_dir/checkpoints (default: off)."
    )
    train.set_defaults(func=_train)
    search = sub.add_parser("search", help="Search subnets of the trained supernet.")
    search.add_argument("config", type=Path, metavar="CONFIG.yaml", help=config_help)
    search.add_argument(
        "--storage", help="Override study.storage: a path, journal:PATH or a SQLAlchemy URL."
    )
    search.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        help="Worker processes here, sharing the study (needs study.storage or --storage; "
        "each one is this command with --workers 1, named 'worker I'); the exit code is "
        "their worst (default: 1).",
    )
    search.add_argument(
        "--worker-name", default="supernet", help="This worker's name (default: supernet)."
    )
    search.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="After the search (with --workers N, once all have ended, from the study) write "
        "rewards.png (top-1 over trials, the SA chain) and tradeoffs.png (top-1 against MACs "
        "and, with a lut, predicted latency; budgets drawn) into DIR, as `nas best --plots`.",
    )
    search.set_defaults(func=_search)
    extract = sub.add_parser("extract", help="Write one subnet as a plain model.")
    extract.add_argument("config", type=Path, metavar="CONFIG.yaml", help=config_help)
    extract.add_argument("--tokens", required=True, help="Comma-separated tokens of the subnet.")
    extract.add_argument("--out", type=Path, required=True, help="Directory to write.")
    extract.set_defaults(func=_extract)
    return supernet
