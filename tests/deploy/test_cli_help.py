"""`--help` of every `lyceum` command: every option and positional says what it is, and an
option with a default shows it."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from lyceum.deploy.cli import build_parser


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser of the tree; each one's `prog` is its command line (`lyceum teacher dump`)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _subcommand_help(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str | None]]:
    """The one-line help of each subcommand, as the parent's `--help` lists it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield choice.dest, choice.help


def _shown(default: object) -> list[str]:
    """How a default may appear in a help sentence."""
    if isinstance(default, list | tuple):
        items = [str(d) for d in default]
        return [" ".join(items), ", ".join(items), str(default)]
    return [str(default)]


def _offenders(parser: argparse.ArgumentParser) -> list[str]:
    found = []
    for p in _parsers(parser):
        command, formatter = p.prog, p._get_formatter()
        for sub, help_text in _subcommand_help(p):
            if not (help_text or "").strip():
                found.append(f"{command} {sub}: no help line")
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            name = f"{command} {'/'.join(action.option_strings) or action.metavar or action.dest}"
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                found.append(f"{name}: no help")
                continue
            default = action.default
            if default is None or default is False or default == argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action)
            if "default" not in text or not any(s in text for s in _shown(default)):
                found.append(f"{name}: help does not show its default {default!r}")
    return found


def test_every_option_and_positional_has_help_and_shows_its_default() -> None:
    offenders = _offenders(build_parser())
    assert not offenders, f"{len(offenders)} options lack help or a default:\n" + "\n".join(
        offenders
    )


def test_the_walk_finds_what_it_checks() -> None:
    """The check itself: it sees every subcommand, and it flags a bare option."""
    commands = {p.prog for p in _parsers(build_parser())}
    assert {
        "lyceum teacher dump",
        "lyceum teacher serve",
        "lyceum student train",
        "lyceum knowledge info",
        "lyceum knowledge verify",
        "lyceum prune",
        "lyceum quantize",
        "lyceum demo",
    } <= commands
    bare = argparse.ArgumentParser(prog="x")
    bare.add_argument("--size", type=int, default=3, help="how big")
    bare.add_argument("--name")
    bare.add_argument("--ok", default=7, help="fine (default: %(default)s)")
    assert _offenders(bare) == [
        "x --size: help does not show its default 3",
        "x --name: no help",
    ]


def test_debug_is_a_top_level_option() -> None:
    parser = build_parser()
    assert parser.parse_args(["--debug", "demo"]).debug is True
    assert parser.parse_args(["demo"]).debug is False
    assert "LYCEUM_DEBUG=1" in parser.format_help()


@pytest.mark.parametrize(
    ("command", "model"),
    [
        (["nas", "search"], "lyceum.compression.nas.NASConfig"),
        (["nas", "supernet", "train"], "lyceum.compression.nas.SupernetJobConfig"),
    ],
)
def test_a_yaml_driven_nas_command_lists_its_config_keys(
    command: list[str], model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert f"config keys, with their defaults ({model}):" in shown
    # The search section with the NAS default warm-up and both methods' settings.
    for key in ("search: (the defaults below)", 'method: "annealing"', "warmup: 5", "population"):
        assert key in shown, key
