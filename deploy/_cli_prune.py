"""`lyceum prune CONFIG.yaml`: parse, build the model and data sets from specs, run, report.

The library (`lyceum.compression.pruning.run_prune_job`) takes built objects; specs and the
checkpoint are resolved here (lyceum.deploy._jobs) so that the library never imports by name.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lyceum.deploy._jobs import build_model, build_split, load_job_config
from lyceum.student_client.losses import soft_label_kd

if TYPE_CHECKING:
    from lyceum.compression.pruning import PruneJobConfig, PruneReport


def load_config(path: str | Path) -> PruneJobConfig:
    from lyceum.compression.pruning import PruneJobConfig

    return load_job_config(path, PruneJobConfig, "prune")


def run(config: PruneJobConfig) -> PruneReport:
    """Build the model and the three splits from their specs and run the job."""
    # Imported here: torch-pruning is heavy and only this command needs it.
    from lyceum.compression.pruning import run_prune_job

    model = build_model(config.model, config.model_kwargs, config.checkpoint)
    splits = {
        name: build_split(config.dataset, config.dataset_kwargs, split)
        for name, split in (
            ("train_data", config.train_split),
            ("val_data", config.val_split),
            ("test_data", config.test_split),
        )
    }
    distill_loss = None
    if config.distill is not None:
        distill_loss = partial(soft_label_kd, temperature=config.distill.temperature)
    return run_prune_job(config, model=model, distill_loss=distill_loss, **splits)


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
