"""`lyceum nas search|best|lut|latency`: architecture search on one Optuna study.

`search CONFIG.yaml --workers N` starts N worker processes of the same search here (each the
command itself with `--workers 1`); the same command on other machines with the same
`--storage URL` adds workers there. Python: `lyceum.compression.nas.search_architecture`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lyceum.deploy import _cli_supernet
from lyceum.deploy._config_help import add_config_help
from lyceum.deploy._jobs import (
    build_split,
    load_job_config,
    spawn_workers,
    worker_count,
    write_search_plots,
)
from lyceum.proto.specs import WEIGHTS_FILE, parse_spec

_SPACE = "lyceum.compression.nas:lightnas_space"


def _nas_config() -> type[BaseModel]:
    """The config class, imported when `--help` asks for it (every command builds every parser)."""
    from lyceum.compression.nas import NASConfig

    return NASConfig


def _space(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    from lyceum.compression.nas import NASSpace

    parsed = parse_spec(spec, kwargs or {})
    space = parsed.resolve()(**parsed.kwargs)
    if not isinstance(space, NASSpace):
        raise ValueError(
            f"--space {spec}: returned {type(space).__name__}, which lacks NASSpace's methods "
            "(range_table, init_tokens, is_feasible, ops, all_ops, build)"
        )
    return space


def _tokens(text: str, space: Any) -> list[int]:
    """`--tokens`, checked against the space's ranges before the space sees them."""
    from lyceum.compression.search.chain import check_tokens

    try:
        tokens = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--tokens {text!r}: expected comma-separated integers, e.g. 3,1,1"
        ) from None
    return check_tokens(tokens, space.range_table(), "--tokens")


def _search(args: argparse.Namespace) -> int:
    from lyceum.compression.nas import LatencyTable, NASConfig, TrainingReward, search_architecture

    config = load_job_config(args.config, NASConfig, "nas search")
    if args.storage is not None:
        config = config.model_copy(
            update={"study": config.study.model_copy(update={"storage": args.storage})}
        )
    if args.workers > 1:
        return spawn_workers(
            ["nas", "search", str(args.config)], config.study.storage, args.workers
        )
    space = _space(config.space, config.space_kwargs)
    train = build_split(config.dataset, config.dataset_kwargs, "train")
    val = build_split(config.dataset, config.dataset_kwargs, "val")
    teacher = None
    if config.distill is not None:
        from lyceum.deploy._nas_knowledge import teacher_knowledge

        teacher = teacher_knowledge(config.distill, train)
    reward = TrainingReward(
        space,
        train,
        val,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        teacher=teacher,
    )
    lut = LatencyTable.load(config.lut) if config.lut is not None else None
    result, budgeted = search_architecture(
        space,
        reward,
        budget=config.budget,
        lut=lut,
        search=config.search,
        study=config.study,
        worker=args.worker_name,
    )
    print(_best_line(result.best_tokens, result.best_reward, budgeted.figures(result.best_tokens)))
    print(f"{len(result.history)} trials, {result.redraws} infeasible candidates re-drawn")
    return 0


def _best_line(tokens: list[int], reward: float, figures: Any) -> str:
    latency = "" if figures.latency_ms is None else f", {figures.latency_ms:.3f} ms predicted"
    return (
        f"best: reward {reward:.4f}, {figures.flops:,} MACs, {figures.params:,} params{latency}; "
        f"tokens {','.join(map(str, tokens))}"
    )


def _best(args: argparse.Namespace) -> int:
    from lyceum.compression.nas import Budget, LatencyTable, NASConfig, read_search
    from lyceum.compression.search import StudyConfig

    if args.config is not None:
        config = load_job_config(args.config, NASConfig, "nas best")
        space = _space(config.space, config.space_kwargs)
        storage = args.storage or config.study.storage
        name = args.study or config.study.study
        lut_path, budget = args.lut or config.lut, config.budget
    else:
        space, storage, name = _space(args.space), args.storage, args.study or "lightnas"
        lut_path, budget = args.lut, Budget()
    if storage is None:
        raise ValueError(
            "nas best: give --storage URL (or --config CONFIG.yaml with study.storage)"
        )
    lut = LatencyTable.load(lut_path) if lut_path is not None else None
    study = StudyConfig(storage=storage, study=name)
    result, budgeted = read_search(space, study, budget=budget, lut=lut)
    print(_best_line(result.best_tokens, result.best_reward, budgeted.figures(result.best_tokens)))
    if args.plots is not None:
        print(write_search_plots(result, budgeted, args.plots))
    return 0


def _lut(args: argparse.Namespace) -> int:
    from lyceum.compression.nas import build_latency_table

    table = build_latency_table(
        _space(args.space),
        device=args.device,
        threads=args.threads,
        batch=args.batch,
        runs=args.runs,
        clock=args.clock,
        sweeps=args.sweeps,
    )
    table.save(args.out)
    print(
        f"{len(table.entries)} ops measured, overhead {table.overhead_ms:.4f} ms per network + "
        f"{table.per_op_ms:.4f} ms per op; written to {args.out}"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from lyceum.compression.nas import Architecture, NASConfig, train_architecture
    from lyceum.compression.search import open_study, search_result

    config = load_job_config(args.config, NASConfig, "nas train")
    space = _space(config.space, config.space_kwargs)
    if args.tokens is not None:
        tokens, origin = _tokens(args.tokens, space), "--tokens"
    else:
        # The study's best: what `lyceum nas best` prints.
        study = open_study(config.study)
        tokens = search_result(study, space.range_table()).best_tokens
        origin = f"the best of study {config.study.study!r} in {config.study.storage}"
    final = config.final
    if args.out is not None:
        final = final.model_copy(update={"out_dir": args.out})
    if args.seed is not None:
        final = final.model_copy(update={"seed": args.seed})
    architecture = Architecture(space=config.space, space_kwargs=config.space_kwargs, tokens=tokens)
    print(
        f"training tokens {','.join(map(str, tokens))} ({origin}) for {final.epochs} epochs, "
        f"seed {final.seed}",
        flush=True,
    )
    train = build_split(config.dataset, config.dataset_kwargs, "train")
    teacher = None
    if final.distill:
        if config.distill is None:
            raise ValueError(
                f"{args.config}: final.distill is true and the config has no distill: section "
                "naming the teacher; add one or set final.distill: false"
            )
        from lyceum.deploy._nas_knowledge import teacher_knowledge

        teacher = teacher_knowledge(config.distill, train)
    report = train_architecture(
        architecture,
        final,
        train_data=train,
        test_data=build_split(config.dataset, config.dataset_kwargs, final.test_split),
        teacher=teacher,
    )
    weights = report.out_dir / WEIGHTS_FILE
    print(
        f"{final.test_split} accuracy {report.accuracy:.4f}, {report.flops:,} MACs, "
        f"{report.params:,} params, {report.latency_ms:.3f} ms measured (batch 1, 1 thread); "
        f"written to {report.out_dir}"
    )
    print(
        f"Give {str(weights)!r} as the checkpoint of quantize, teacher dump/serve and student "
        f"train with --model lyceum.compression.nas:nas_model (tokens.json beside it rebuilds "
        f"the network); in Python: lyceum.compression.nas.load_architecture({str(weights)!r})"
    )
    return 0


def _latency(args: argparse.Namespace) -> int:
    from lyceum.compression.nas import LatencyTable, measure_network

    space = _space(args.space)
    table = LatencyTable.load(args.lut)
    tokens = _tokens(args.tokens, space)
    print(f"predicted: {table.predict(space.ops(tokens)):.4f} ms")
    if args.measure:
        print(f"measured: {measure_network(space, tokens, table):.4f} ms")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `nas` and its actions on the `lyceum` CLI's subparsers."""
    nas = subparsers.add_parser(
        "nas",
        help="architecture search (Light-NAS) under FLOPs and latency budgets",
        description="Search architectures by simulated annealing (or regularized evolution: "
        "search.method: evolution in the YAML) on an Optuna study that any number of workers "
        "share.",
    )
    sub = nas.add_subparsers(dest="nas_command", required=True, metavar="ACTION")
    _cli_supernet.add_parser(sub)
    search = sub.add_parser(
        "search",
        help="run search workers on a YAML config's study",
        # Raw: the config keys' help below is laid out by add_config_help.
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    search.add_argument(
        "config", type=Path, metavar="CONFIG.yaml", help="lyceum.compression.nas.NASConfig as YAML"
    )
    add_config_help(search, _nas_config, "lyceum.compression.nas.NASConfig")
    search.add_argument(
        "--storage", help="Override study.storage: a path, journal:PATH or a SQLAlchemy URL"
    )
    search.add_argument(
        "--workers", type=worker_count, default=1, help="Worker processes here (default 1)"
    )
    search.add_argument(
        "--worker-name",
        default="nas",
        help="Name of this worker in the study's trials; --workers N names the processes it "
        "starts (default: nas)",
    )
    search.set_defaults(func=_search)
    best = sub.add_parser("best", help="the best architecture of a study")
    best.add_argument(
        "--config",
        type=Path,
        help="The search's config: its space, budget, lut and study (the options override)",
    )
    best.add_argument("--storage", help="The study's storage (default: the config's)")
    best.add_argument("--study", help="Study name (default: the config's, else lightnas)")
    best.add_argument(
        "--space", default=_SPACE, help=f"Space spec without --config (default: {_SPACE})"
    )
    best.add_argument("--lut", type=Path, help="Latency table, to print the predicted latency")
    best.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="Write rewards.png (reward over trials, the SA chain) and tradeoffs.png "
        "(accuracy against MACs and latency, budgets drawn) into DIR",
    )
    best.set_defaults(func=_best)
    lut = sub.add_parser("lut", help="measure a latency table of every op of a space")
    lut.add_argument("--space", default=_SPACE, help=f"Space spec (default: {_SPACE})")
    lut.add_argument("--device", default="cpu", help="Device (default cpu)")
    lut.add_argument("--threads", type=int, default=1, help="Intra-op threads (default 1)")
    lut.add_argument("--batch", type=int, default=1, help="Batch size (default 1)")
    lut.add_argument("--runs", type=int, default=30, help="Timed passes per op (default 30)")
    lut.add_argument(
        "--sweeps",
        type=int,
        default=3,
        help="Passes over all ops sharing the runs, so that a moment of a shared machine's "
        "slowness touches a few of an op's passes, not all (default 3)",
    )
    lut.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall: the latency a user sees (default); thread: the thread's CPU time, which "
        "time spent descheduled on a loaded machine does not inflate (CPU, --threads 1 only)",
    )
    lut.add_argument("--out", type=Path, required=True, help="Where to write the table (JSON)")
    lut.set_defaults(func=_lut)
    train = sub.add_parser(
        "train",
        help="fully train a found architecture and save it (model.safetensors + tokens.json)",
    )
    train.add_argument(
        "config",
        type=Path,
        metavar="CONFIG.yaml",
        help="The search's config (its space, dataset and final: section)",
    )
    train.add_argument(
        "--tokens", help="Comma-separated tokens (default: the best of the config's study)"
    )
    train.add_argument("--out", type=Path, help="Override final.out_dir")
    train.add_argument("--seed", type=int, help="Override final.seed")
    train.set_defaults(func=_train)
    latency = sub.add_parser("latency", help="predicted (and measured) latency of tokens")
    latency.add_argument("--lut", type=Path, required=True, help="Latency table")
    latency.add_argument("--space", default=_SPACE, help=f"Space spec (default: {_SPACE})")
    latency.add_argument("--tokens", required=True, help="Comma-separated tokens")
    latency.add_argument("--measure", action="store_true", help="Also measure the network")
    latency.set_defaults(func=_latency)
    return nas
