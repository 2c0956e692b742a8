"""What the YAML-driven commands (`prune`, `quantize`) share: their command line, reading a
job config and building its model and data splits from specs.

The compression library takes built objects; spec strings and checkpoints are resolved here,
through `lyceum.proto.specs` (imports by name, checkpoints without pickle).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel
from torch import nn

from lyceum.deploy._config_help import add_config_help
from lyceum.proto.configs import read_yaml_mapping, validate_mapping
from lyceum.proto.specs import load_dataset, load_model, parse_spec

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
