"""`lyceum prune CONFIG.yaml`: parse, build the model and data sets from specs, run, report.

The library (`lyceum.compression.pruning.run_prune_job`) takes built objects; specs and the
checkpoint are resolved here (lyceum.deploy._jobs) so that the library never imports by name.
The output is a plan line before the work, the before/after table and a Python snippet that
loads the result.
"""

from __future__ import annotations

import argparse
import keyword
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lyceum.deploy._jobs import add_job_parser, build_model, build_split, load_job_config
from lyceum.proto.specs import WEIGHTS_FILE
from lyceum.student_client.losses import soft_label_kd

if TYPE_CHECKING:
    from pydantic import BaseModel

    from lyceum.compression.pruning import PruneJobConfig, PruneReport


def load_config(path: str | Path) -> PruneJobConfig:
    from lyceum.compression.pruning import PruneJobConfig

    return load_job_config(path, PruneJobConfig, "prune")


def run(config: PruneJobConfig, *, plan: bool = False) -> PruneReport:
    """Build the model and the three splits from their specs and run the job; with `plan`,
    print the plan line first (flushed: the job can run for minutes)."""
    # Imported here: torch-pruning is heavy and only this command needs it.
    from lyceum.compression.pruning import describe_prune_job, run_prune_job

    model = build_model(config.model, config.model_kwargs, config.checkpoint)
    splits = {
        name: build_split(config.dataset, config.dataset_kwargs, split)
        for name, split in (
            ("train_data", config.train_split),
            ("val_data", config.val_split),
            ("test_data", config.test_split),
        )
    }
    if plan:
        print(describe_prune_job(config, **splits), flush=True)
    distill_loss = None
    if config.distill is not None:
        distill_loss = partial(soft_label_kd, temperature=config.distill.temperature)
    return run_prune_job(config, model=model, distill_loss=distill_loss, **splits)


def load_snippet(config: PruneJobConfig) -> str:
    """Python that rebuilds the pruned model: a fresh instance from the config's factory,
    then `load_pruned` applies the saved plan and loads the weights."""
    spec = config.model_spec()
    module, _, factory = spec.target.partition(":")
    kwargs = spec.kwargs
    if all(k.isidentifier() and not keyword.iskeyword(k) for k in kwargs):
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    else:
        args = f"**{kwargs!r}"
    return "\n".join(
        [
            "from lyceum.compression.pruning import load_pruned",
            # A dotted factory (`Class.create`) is reached through its first name.
            f"from {module} import {factory.split('.')[0]}",
            f"model = load_pruned({factory}({args}), {str(config.out_dir)!r})",
        ]
    )


def summary(config: PruneJobConfig, report: PruneReport) -> str:
    """The before/after table, what 'before' was, and how to load the result."""
    from lyceum.compression.pruning.plan import PLAN_FILE

    b, a = report.before, report.after
    rows = [
        ("", "before", "after"),
        ("MACs", f"{b.flops:,}", f"{a.flops:,}"),
        ("params", f"{b.params:,}", f"{a.params:,}"),
        ("size (bytes)", f"{b.size_bytes:,}", f"{a.size_bytes:,}"),
        ("latency (ms)", f"{b.latency_ms:.3f}", f"{a.latency_ms:.3f}"),
        (f"{config.test_split} accuracy", f"{b.accuracy:.4f}", f"{a.accuracy:.4f}"),
    ]
    lines = [f"{r[0]:<15}{r[1]:>14}{r[2]:>14}" for r in rows]
    lines.append(f"FLOPs removed: {report.flops_reduction:.1%}; written to {report.out_dir}")
    note = config.untrained_note()
    if note is not None:
        lines.append(note)
    lines.append(
        f"Give {str(Path(report.out_dir) / WEIGHTS_FILE)!r} as the checkpoint of quantize, "
        f"teacher dump/serve and student train, with the same --model: {PLAN_FILE} beside it "
        f"rebuilds the pruned layers."
    )
    lines.append(
        "Load the pruned model in Python (a fresh, unpruned instance from the same factory; "
        "load_pruned applies the saved plan, then loads the weights):"
    )
    lines.append(load_snippet(config))
    return "\n".join(lines)


def _run(path: Path) -> str:
    config = load_config(path)
    return summary(config, run(config, plan=True))


def _config_class() -> type[BaseModel]:
    from lyceum.compression.pruning import PruneJobConfig

    return PruneJobConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `prune` on the `lyceum` CLI's subparsers; dispatch with `args.func(args)`."""
    return add_job_parser(
        subparsers,
        "prune",
        help="structured pruning of a model to a FLOPs target",
        description="Prune, fine-tune and save a model as described by a YAML job config:\n"
        "prints the plan, shows progress on stderr, then prints the before/after table and\n"
        "the Python that loads the result. Writes prune_plan.json, model.safetensors and\n"
        "report.json to out_dir. Python: lyceum.compression.pruning.run_prune_job.",
        config=(_config_class, "lyceum.compression.pruning.PruneJobConfig"),
        run=_run,
    )
