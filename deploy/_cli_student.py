"""`lyceum student train CONFIG.yaml`: distil a student from online and offline teachers.

Thin: loads the YAML config and calls `lyceum.student_client.trainer.train`, its Python
equivalent. Under `torchrun --nproc-per-node N` every rank runs this command (DDP).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "train",
        help="train a student distilled from teachers (YAML config)",
        description="Train the student a YAML config describes: teachers online (replicas, "
        "failover) or offline, merged, with checkpoints every epoch and on SIGTERM. Run under "
        "torchrun for DDP.",
    )
    p.add_argument("config", type=Path, metavar="CONFIG.yaml", help="trainer config (YAML)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from checkpoint_dir/last.pt (mid-epoch after a SIGTERM)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: every `lyceum` command (a teacher server too) builds this parser, and
    # only `student train` needs the trainer (torch.distributed, tqdm).
    from lyceum.student_client.trainer import train
    from lyceum.student_client.trainer_config import load_config

    config = load_config(args.config)
    result = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.interrupted:
        print(f"interrupted: checkpoint {result.checkpoint}; continue with --resume")
        return 0
    last = result.epochs[-1]
    acc = "n/a" if last.val_accuracy is None else f"{100 * last.val_accuracy:.2f}%"
    print(
        f"trained {len(result.epochs)} epochs: final loss {last.loss:.4f}, validation accuracy "
        f"{acc}" + (f", checkpoint {result.checkpoint}" if result.checkpoint else "")
    )
    return 0
