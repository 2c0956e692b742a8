"""What the YAML-driven commands (`prune`, `quantize`, the searches) share: their command
line, reading a job config, building its model and data splits from specs, and starting a
search's worker processes (`spawn_workers`).

The compression library takes built objects; spec strings and checkpoints are resolved here,
through `lyceum.proto.specs` (imports by name, checkpoints without pickle).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from pydantic import BaseModel
from torch import nn

from lyceum.deploy._config_help import add_config_help
from lyceum.deploy._exit_codes import signal_exit
from lyceum.proto.configs import read_yaml_mapping, validate_mapping
from lyceum.proto.specs import load_dataset, load_model, parse_spec

if TYPE_CHECKING:
    from lyceum.compression.nas import BudgetedSpace
    from lyceum.compression.search import SearchResult

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def add_job_parser(
    subparsers: Any,
    name: str,
    *,
    help: str,
    description: str,
    config: tuple[Callable[[], type[BaseModel]], str],
    run: Callable[[Path], str],
) -> argparse.ArgumentParser:
    """Register `lyceum NAME CONFIG.yaml` on the CLI's subparsers: `run(path)` does the job
    and returns the summary it prints. `config` is the config model (imported when `--help`
    asks for it: torch-pruning and torchao are heavy) and its public import path, whose keys
    `--help` lists with their defaults."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument(
        "config",
        type=Path,
        metavar="CONFIG.yaml",
        help="The YAML job config (keys below; unknown keys are rejected), e.g. "
        f"deploy/configs/{name}.yaml. Required, no default.",
    )
    add_config_help(parser, *config)

    def command(args: argparse.Namespace) -> int:
        print(run(args.config))
        return 0

    parser.set_defaults(func=command)
    return parser


def load_job_config(path: str | Path, cls: type[ConfigT], what: str) -> ConfigT:
    """Read a YAML job config (data only: `yaml.safe_load`) and validate it as `cls`; errors
    name the file (and line, for YAML syntax) and each offending key."""
    return validate_mapping(cls, read_yaml_mapping(path, what), str(path), what)


def build_model(spec: str, kwargs: dict[str, Any], checkpoint: Path | None) -> nn.Module:
    """The model a config's spec (and its `*_kwargs`) names, with its checkpoint loaded."""
    return load_model(parse_spec(spec, kwargs), checkpoint)


def build_split(spec: str, kwargs: dict[str, Any], split: str) -> torch.utils.data.Dataset:
    """The dataset factory called with `split=...` plus the config's keyword arguments."""
    return load_dataset(parse_spec(spec, {**kwargs, "split": split}))


def worker_count(text: str) -> int:
    """`--workers N`: argparse's type, so that 0 or -1 is a usage error instead of one worker."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"--workers {text!r}: expected a whole number of worker processes, 1 or more"
        )
    return value


def spawn_workers(command: Sequence[str], storage: str | None, workers: int) -> int:
    """Run `lyceum COMMAND` as `workers` processes here, each one worker of the search on the
    study in `storage` (`--storage`, `--workers 1`, `--worker-name "worker I"` appended), and
    return the worst of their exit codes once all have ended (a signal's as the shell's).

    The study is what they share, so an in-memory one (`storage` None) is refused."""
    if storage is None:
        raise ValueError(
            f"lyceum {' '.join(command)} --workers {workers} needs a shared storage: the "
            "config's study.storage is unset (a study in one process's memory); set it or pass "
            "--storage (a path, journal:PATH or a SQLAlchemy URL)"
        )
    base = [sys.executable, "-m", "lyceum.deploy.cli", *command, "--storage", storage]
    base += ["--workers", "1"]
    procs = [subprocess.Popen([*base, "--worker-name", f"worker {i}"]) for i in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    finally:
        # Interrupted (Ctrl-C reaches the workers too): each gets a moment to fail its trial
        # in the study (else it stays RUNNING until its heartbeat goes stale), then none is
        # left running behind the CLI.
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return max(signal_exit(-code) if code < 0 else code for code in codes)


def write_search_plots(result: SearchResult, budgeted: BudgetedSpace, directory: Path) -> str:
    """Write a search's `rewards.png` and `tradeoffs.png` into `directory` (what `nas best
    --plots` and `nas supernet search --plots` draw) and return the line naming them."""
    from lyceum.compression.nas import plot_search, search_plot_data

    written = plot_search(search_plot_data(result, budgeted), directory)
    return "plots: " + ", ".join(str(p) for p in written)
