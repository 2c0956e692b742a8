"""`lyceum prune CONFIG.yaml`: parse, build the model and data sets from specs, run, report.

The library (`lyceum.compression.pruning.run_prune_job`) takes built objects; resolving the
`module:callable` spec strings happens here so that the library never imports by name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lyceum.compression.pruning import PruneJobConfig, PruneReport, run_prune_job

__all__ = ["add_parser", "load_config", "main", "resolve_spec", "run"]


def resolve_spec(spec: str) -> Callable[..., Any]:
    """Import `module:callable` (no eval, no pickle) and return the callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"spec {spec!r}: expected 'module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"spec {spec!r}: cannot import module {module_name!r}: {e}") from e
    target = getattr(module, attr, None)
    if not callable(target):
        raise ValueError(f"spec {spec!r}: module {module_name!r} has no callable {attr!r}")
    return target


def load_config(path: str | Path) -> PruneJobConfig:
    """Read a YAML job config; errors name the offending key (e.g. 'strategy.ratoi')."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        return PruneJobConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in e.errors()
        )
        raise ValueError(f"{path}: invalid prune config: {problems}") from None


def run(config: PruneJobConfig) -> PruneReport:
    """Build the model and the three splits from their specs and run the job."""
    model = resolve_spec(config.model)(**config.model_kwargs)
    dataset = resolve_spec(config.dataset)
    splits = {
        name: dataset(split=split, **config.dataset_kwargs)
        for name, split in (
            ("train_data", config.train_split),
            ("val_data", config.val_split),
            ("test_data", config.test_split),
        )
    }
    return run_prune_job(config, model=model, **splits)


def _summary(report: PruneReport) -> str:
    b, a = report.before, report.after
    rows = [
        ("", "before", "after"),
        ("MACs", f"{b.flops:,}", f"{a.flops:,}"),
        ("params", f"{b.params:,}", f"{a.params:,}"),
        ("size (bytes)", f"{b.size_bytes:,}", f"{a.size_bytes:,}"),
        ("latency (ms)", f"{b.latency_ms:.3f}", f"{a.latency_ms:.3f}"),
        ("accuracy", f"{b.accuracy:.4f}", f"{a.accuracy:.4f}"),
    ]
    lines = [f"{r[0]:<14}{r[1]:>14}{r[2]:>14}" for r in rows]
    lines.append(f"FLOPs removed: {report.flops_reduction:.1%}; written to {report.out_dir}")
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> int:
    report = run(load_config(args.config))
    print(_summary(report))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `prune` on the `lyceum` CLI's subparsers; dispatch with `args.func(args)`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "prune",
        help="structured pruning of a model to a FLOPs target",
        description="Prune, fine-tune and save a model as described by a YAML job config "
        "(lyceum.compression.pruning.PruneJobConfig).",
    )
    parser.add_argument("config", type=Path, help="YAML job config")
    parser.set_defaults(func=_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m lyceum.deploy._cli_prune CONFIG.yaml`)."""
    top = argparse.ArgumentParser(prog="lyceum")
    add_parser(top.add_subparsers(dest="command", required=True))
    args = top.parse_args(["prune", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except ValueError as e:
        top.exit(2, f"lyceum prune: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
