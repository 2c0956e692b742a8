"""`lyceum student train CONFIG.yaml`: distil a student from online and offline teachers, or,
without `teachers:`, train a model on its labels (how the examples' teacher is made).

Thin: loads the YAML config, calls `lyceum.student_client.trainer.train` (its Python
equivalent) and turns how the run ended into one line and an exit code. Under `torchrun
--nproc-per-node N` every rank runs this command (DDP); rank 0 prints, every rank exits
with the run's code.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path

from pydantic import BaseModel

from lyceum.deploy import _exit_codes
from lyceum.deploy._config_help import add_config_help

_EXIT_CODES = "exit codes:\n" + "\n".join(
    f"  {code:<4} {meaning}"
    for code, meaning in (
        (_exit_codes.OK, "every epoch ran"),
        (_exit_codes.USAGE, "bad input (config, specs, checkpoint_dir): the message says the fix"),
        (
            _exit_codes.UNAVAILABLE,
            "teachers stayed unavailable; the batches done are checkpointed: --resume later",
        ),
        (
            _exit_codes.signal_exit(signal.SIGINT),
            "SIGINT, after the batch in progress and its checkpoint (a second one aborts)",
        ),
        (_exit_codes.signal_exit(signal.SIGTERM), "SIGTERM, the same"),
    )
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "train",
        help="train a student distilled from teachers, or a model on its labels (YAML config)",
        description="Train the student a YAML config describes: teachers online (replicas,\n"
        "failover) or offline, merged, with checkpoints every epoch and whenever the run\n"
        "stops early. Without 'teachers:' it is plain supervised training on the labels\n"
        "(losses: left out, or only task_weight): how a teacher is made. Every run writes\n"
        "checkpoint_dir/model.safetensors, the weights alone: what --checkpoint takes in\n"
        "teacher serve, teacher dump, prune and quantize (they refuse last.pt, which is for\n"
        "--resume). Run under torchrun for DDP.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.add_argument(
        "config",
        type=Path,
        metavar="CONFIG.yaml",
        help="Trainer config (YAML; keys below), e.g. deploy/configs/teacher.yaml "
        "(supervised) or deploy/configs/student.yaml (distilled)",
    )
    add_config_help(p, _train_config, "lyceum.student_client.TrainConfig")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        action="store_true",
        help="Continue the run in checkpoint_dir from its last.pt (mid-epoch if it stopped early)",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="Start a new run in a checkpoint_dir that holds another run's checkpoints, "
        "removing them first (last.pt, epoch-*.pt, model.safetensors; nothing else)",
    )
    p.set_defaults(func=run)


def _train_config() -> type[BaseModel]:
    # Imported only for --help: the trainer config pulls in torch.
    from lyceum.student_client.trainer_config import TrainConfig

    return TrainConfig


def run(args: argparse.Namespace) -> int:
    # Imported here: every `lyceum` command (a teacher server too) builds this parser, and
    # only `student train` needs the trainer (torch, torch.distributed).
    from lyceum.student_client.trainer import train
    from lyceum.student_client.trainer_config import load_config

    config = load_config(args.config)
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if result.ended == "finished":
        code = _exit_codes.OK
    elif result.ended == "signal":
        assert result.signum is not None  # the trainer sets it with ended="signal"
        code = _exit_codes.signal_exit(result.signum)
    else:
        code = _exit_codes.UNAVAILABLE
    if int(os.environ.get("RANK", "0")) != 0:
        return code
    if code == _exit_codes.OK:
        print(result.summary())
        return code
    line = f"lyceum: {result.summary()}"
    if result.checkpoint is not None:
        command = f"lyceum student train {shlex.quote(str(args.config))} --resume"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            command += " (under the same torchrun command)"
        when = " once the teachers are back" if result.ended == "teachers_unavailable" else ""
        line += f"; resume{when} with: {command}"
    print(line, file=sys.stderr)
    return code
