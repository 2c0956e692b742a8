"""`--help` for commands driven by a YAML config: every key, its default and its sentence.

A YAML job's options are its config keys, so `lyceum prune --help` lists them (nested
sections indented, one block per `kind` of a discriminated union) from the pydantic model's
own field descriptions: the help cannot drift from the config it documents. The model is
imported only when help is asked for, because the config modules pull in torch-pruning or
torchao and every `lyceum` command builds every parser.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

_WIDTH = 100


def add_config_help(
    parser: argparse.ArgumentParser, load: Callable[[], type[BaseModel]], name: str
) -> None:
    """Give `parser` (made with `add_help=False`) a `-h/--help` that also lists every key of
    the config model `load()` returns; `name` is the model's public import path."""
    parser.add_argument(
        "-h",
        "--help",
        action=_ConfigHelp,
        load=load,
        title=f"config keys, with their defaults ({name}):",
        help="Show this help, with every config key, its default and what it does, and exit.",
    )


class _ConfigHelp(argparse.Action):
    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        *,
        load: Callable[[], type[BaseModel]],
        title: str,
        help: str,
    ) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self._load = load
        self._title = title

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.epilog = "\n".join([self._title, *config_keys(self._load())])
        parser.print_help()
        parser.exit()


def config_keys(model: type[BaseModel], indent: int = 2, skip: str | None = None) -> list[str]:
    """`key: default` lines, each followed by its wrapped description, nested sections
    indented; `skip` leaves out one key (a union member's tag, shown in its block's header)."""
    lines: list[str] = []
    pad = " " * indent
    for key, field in model.model_fields.items():
        if key == skip:
            continue
        lines.append(f"{pad}{key}: {_default(field)}")
        lines += textwrap.wrap(
            field.description or "",
            _WIDTH,
            initial_indent=pad + "    ",
            subsequent_indent=pad + "    ",
        )
        variants = list(_models(field.annotation))
        tag = field.discriminator if isinstance(field.discriminator, str) else None
        if tag is not None and len(variants) > 1:
            for variant in variants:
                lines.append(f"{pad}  with {tag}: {variant.model_fields[tag].default}")
                lines += config_keys(variant, indent + 4, skip=tag)
        else:
            for variant in variants:
                lines += config_keys(variant, indent + 2)
    return lines


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(the defaults below)"
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The config models an annotation holds: itself, a union's members, a list's items."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        yield from _models(typing.get_args(annotation)[0])
        return
    if origin in (typing.Union, types.UnionType, list, tuple):
        for arg in typing.get_args(annotation):
            yield from _models(arg)
