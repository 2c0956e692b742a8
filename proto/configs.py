"""Config files and what is wrong with them: one YAML reader, one explanation of pydantic errors.

Every YAML-driven command (`student train`, `prune`, `quantize`) reads its file with
`read_yaml_mapping` and validates it with `validate_mapping`; the CLI's error boundary explains
the `ValidationError`s of configs built from options with `explain_validation_error`. Kept in
`proto` because the student client and the deploy commands both use it and import nothing of
each other.

A problem is one line: where (the key path as the user wrote it, `losses.terms.0.kind`, or the
command-line option it came from, `--topk`), the value given, and pydantic's message without
its "Value error, " prefix and documentation URL. Errors that only follow from another one are
dropped: the other branches of a union whose input matched one branch, and the "should have at
least 1 item" pydantic adds to a list whose only item failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["explain_validation_error", "read_yaml_mapping", "validate_mapping"]

ModelT = TypeVar("ModelT", bound=BaseModel)

_MAX_VALUE_CHARS = 120
_PREFIXES = ("Value error, ", "Assertion failed, ")
# Names pydantic gives union branches in an error's location (`merge.logits.str`); used only
# when the input is not at hand to tell a branch from a key (see `_looks_like_branch`).
_TYPE_LABELS = frozenset(("int", "float", "str", "bool", "bytes", "none", "list", "tuple", "dict"))
_NOT_KEYED = (str, int, float, bool, list, tuple)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Read a YAML file of `what` settings (data only: `yaml.safe_load`) into a dict.

    A syntax error names the file, line and column (`cfg.yaml:4:7: ...`) and quotes the line;
    an empty file or a top level that is not a mapping says so. An `OSError` (missing file,
    no permission) propagates with its path set.
    """
    path = Path(path)
    with path.open("rb") as stream:  # bytes: yaml detects the encoding and marks carry the name
        try:
            raw = yaml.safe_load(stream)
        except yaml.MarkedYAMLError as exc:
            raise ValueError(_yaml_problem(path, exc)) from exc
        except yaml.YAMLError as exc:  # e.g. bytes that are not text: a ReaderError
            raise ValueError(f"{path}: not a readable YAML file: {exc}") from exc
    if raw is None:
        raise ValueError(f"{path}: the file is empty; expected the {what} settings as YAML")
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path}: expected a mapping of {what} settings ('key: value' lines) at the top "
            f"level, got a {type(raw).__name__}"
        )
    return raw


def _yaml_problem(path: Path, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "syntax error"
    if mark is None:
        return f"{path}: not valid YAML: {problem}"
    text = f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
    if exc.context and exc.context_mark is not None and exc.problem:
        start = exc.context_mark
        text += f" ({exc.context} that starts at line {start.line + 1}, column {start.column + 1})"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if mark.line < len(lines):
        text += f"\n    {lines[mark.line]}\n    {' ' * mark.column}^"
    return text


def validate_mapping(cls: type[ModelT], raw: Mapping[str, Any], source: str, what: str) -> ModelT:
    """`cls.model_validate(raw)`; a failure is a `ValueError` naming `source` and each problem."""
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        header = f"{source}: invalid {what} config"
        raise ValueError(explain_validation_error(exc, header, data=raw)) from exc


def explain_validation_error(
    exc: ValidationError,
    header: str | None = None,
    *,
    data: object = None,
    options: Mapping[str, str] | None = None,
) -> str:
    """What a user needs of `exc`: one line per problem, after `header` when given.

    `data` is the input that was validated: with it, the key path skips the names pydantic
    gives union branches exactly. `options` maps a config field to the command-line option it
    came from (`{"topk": "--topk"}`), so a problem is named as the user typed it.
    """
    problems = _problems(exc.errors(include_url=False), data, options or {})
    if len(problems) == 1:
        return problems[0] if header is None else f"{header}: {problems[0]}"
    listing = "\n".join(f"  {p}" for p in problems)
    return f"{header or 'invalid input'} ({len(problems)} problems):\n{listing}"


@dataclass(frozen=True)
class _Problem:
    path: tuple[int | str, ...]  # as the user wrote it
    branch: int | None  # where pydantic named a union branch: its index in `path`
    depth: int  # loc elements after the branch name: > 0 when the input matched that branch
    kind: str
    message: str
    value: object


def _problems(errors: Sequence[Any], data: object, options: Mapping[str, str]) -> list[str]:
    found = [_problem(err, data) for err in errors]
    # A list whose items failed also fails its length check: only the items' errors count.
    found = [
        p
        for p in found
        if not (p.kind == "too_short" and any(_under(q.path, p.path) for q in found))
    ]
    # Union branches: keep the branch(es) the input got furthest into; branches that failed at
    # their top (wrong type) merge into one "should be X or Y". In the errors' order.
    unions: dict[tuple[int | str, ...], list[_Problem]] = {}
    for p in found:
        if p.branch is not None:
            unions.setdefault(p.path[: p.branch], []).append(p)
    lines: list[str] = []
    for p in found:
        if p.branch is None:
            lines.append(_line(p, p.message, options))
            continue
        branches = unions.pop(p.path[: p.branch], [])
        if not branches:
            continue  # the union's lines were written at its first error
        deepest = max(b.depth for b in branches)
        kept = [b for b in branches if b.depth == deepest]
        if deepest > 0:
            lines.extend(_line(b, b.message, options) for b in kept)
        else:
            lines.append(_line(kept[0], _either(b.message for b in kept), options))
    return list(dict.fromkeys(lines))


def _problem(err: Any, data: object) -> _Problem:
    loc: tuple[int | str, ...] = tuple(err["loc"])
    path: list[int | str] = []
    branch: int | None = None
    depth = 0
    node, walkable = data, data is not None
    for i, part in enumerate(loc):
        if walkable:
            step = _step(node, part, last=i == len(loc) - 1, kind=err["type"])
            walkable = step is not _STOP
            if step is _BRANCH:
                is_branch = True
            else:
                is_branch, node = False, step
        else:
            is_branch = _looks_like_branch(part)
        if is_branch:
            if branch is None:
                branch, depth = len(path), len(loc) - i - 1
            continue
        path.append(part)
    message = str(err["msg"])
    for prefix in _PREFIXES:
        message = message.removeprefix(prefix)
    value = err.get("input")
    discriminator = str(err.get("ctx", {}).get("discriminator", ""))
    if err["type"] == "union_tag_invalid" and discriminator[:1] == discriminator[-1:] == "'":
        # The tag is what is wrong, not the mapping around it: point at the tag's key.
        path.append(discriminator[1:-1])
        value = err["ctx"].get("tag")
    return _Problem(tuple(path), branch, depth, err["type"], message, value)


_BRANCH, _STOP = object(), object()


def _step(node: object, part: int | str, last: bool, kind: str) -> object:
    """The input under `node` at location element `part`; `_BRANCH` where `part` is
    pydantic's name for a union branch (neither a key nor an index of the input, and not the
    key a "missing" error names); `_STOP` where the input cannot be followed further."""
    if isinstance(node, Mapping):
        if part in node:
            return node[part]
        return _STOP if last and kind == "missing" else _BRANCH
    if isinstance(node, list | tuple) and isinstance(part, int):
        return node[part] if 0 <= part < len(node) else _STOP
    if isinstance(part, str) and (node is None or isinstance(node, _NOT_KEYED)):
        return _BRANCH  # a scalar has no keys: the element names the branch that refused it
    return _STOP


def _looks_like_branch(part: int | str) -> bool:
    """Without the input: names of types (`str`, `dict[str,float]`, `function-after[...]`,
    `TeacherConfig`) are branch names; field names are snake_case."""
    if not isinstance(part, str):
        return False
    return part in _TYPE_LABELS or any(c in part for c in "[](),-") or part[:1].isupper()


def _under(path: tuple[int | str, ...], parent: tuple[int | str, ...]) -> bool:
    return len(path) > len(parent) and path[: len(parent)] == parent


def _either(messages: Any) -> str:
    """`Input should be a valid string` + `... a valid dictionary` -> one sentence with "or"."""
    unique = list(dict.fromkeys(messages))
    lead = "Input should be "
    if all(m.startswith(lead) for m in unique):
        return lead + " or ".join(m.removeprefix(lead) for m in unique)
    return "; or ".join(unique)


def _line(p: _Problem, message: str, options: Mapping[str, str]) -> str:
    where = _where(p.path, options)
    if p.kind == "missing":
        return f"{where}: required, but not given"
    value = _shown(p.value, message)
    if where.startswith("option ") and where.split(" ")[1] in message:
        where = ""  # the message names the option itself (a validator written for the CLI)
    parts = [part for part in (where, f"got {value}" if value else "", message) if part]
    return ": ".join(parts)


def _where(path: tuple[int | str, ...], options: Mapping[str, str]) -> str:
    if not path:
        return ""
    head, rest = path[0], ".".join(str(p) for p in path[1:])
    if isinstance(head, str) and head in options:
        return f"option {options[head]}" + (f" (item {rest})" if rest else "")
    return "key '" + ".".join(str(p) for p in path) + "'"


def _shown(value: object, message: str) -> str:
    """The value as the user gave it, or "" where showing it adds nothing: the message has it
    already, or it is an object the CLI built rather than something the user typed."""
    if not _plain(value):
        return ""
    shown = repr(value)
    # A quoted string or a container the message quotes already; a number is always shown
    # ("Input should be greater than 0" for 0 is no place to leave the value out).
    quoted = not isinstance(value, int | float) and shown in message
    if quoted or "got " in message:
        return ""
    if len(shown) > _MAX_VALUE_CHARS:
        shown = shown[: _MAX_VALUE_CHARS - 3] + "..."
    return shown


def _plain(value: object) -> bool:
    if value is None or isinstance(value, str | int | float | bool | Path):
        return True
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return False
