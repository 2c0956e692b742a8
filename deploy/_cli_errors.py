"""The `lyceum` command's error boundary: which failures are the user's, and how they read.

An expected failure is one line, `lyceum: error: <what, where, the fix>`, and an exit code of
`lyceum.deploy._exit_codes`, with no traceback: the message is the whole story.

- `ValueError` (bad options, specs, configs, knowledge) is `USAGE`; a pydantic
  `ValidationError` (one) becomes sentences that name the option or key.
- `OSError` is `USAGE`, told from its errno and path: no space left (and on which file
  system), read-only file system, permission denied, a path under a file, ..., with the
  command's option that named the path, so the fix can say "choose another --out".
- The student client's `TeacherUnavailableError` is `UNAVAILABLE` (retry later); any other
  `TeacherError` (a wrong or missing token: UNAUTHENTICATED) is `USAGE`.

Anything else is a bug: its traceback is shown with a request to report it. `--debug` (or
LYCEUM_DEBUG=1) turns the boundary off, so every error shows its traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from lyceum.deploy._exit_codes import FAILED, UNAVAILABLE, USAGE
from lyceum.proto.configs import explain_validation_error

__all__ = ["describe_os_error", "explain", "report_bug", "silence_stdout", "stdout_closed"]

# errno -> what happened, and the fix. "{opt}" is the option that named the path, when one did.
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free space there, or choose another {opt}"),
    errno.EDQUOT: ("disk quota exceeded", "free space there, or choose another {opt}"),
    errno.EROFS: ("read-only file system", "choose another {opt} on a writable file system"),
    errno.EACCES: ("permission denied", "fix its permissions, or choose another {opt}"),
    errno.EPERM: ("operation not permitted", "fix its permissions, or choose another {opt}"),
    errno.ENOTDIR: ("not a directory", "choose another {opt}, or move that file away"),
    errno.EEXIST: ("file exists", "choose another {opt}, or remove what is in the way"),
    errno.ENOENT: ("no such file or directory", "check that path"),
    errno.EISDIR: ("is a directory", "give a file, not a directory"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter {opt}"),
}
_GENERIC_OPTION = "path"
_UNNAMED_FIX = (
    "check the file systems this command writes to (free space, permissions), or write elsewhere"
)


def explain(
    exc: Exception, parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[str, int] | None:
    """The message and exit code of an expected failure; None for a bug."""
    if isinstance(exc, ValidationError):
        return explain_validation_error(exc, options=_field_options(parser, args)), USAGE
    if isinstance(exc, ValueError):
        return str(exc) or type(exc).__name__, USAGE
    if isinstance(exc, OSError):
        return describe_os_error(exc, _path_options(parser, args)), USAGE
    # Imported here: the student client is not needed to build the parser or run a teacher,
    # and an exception of its classes can only exist once it was imported.
    from lyceum.student_client import TeacherError, TeacherUnavailableError

    if isinstance(exc, TeacherUnavailableError):
        return str(exc), UNAVAILABLE
    if isinstance(exc, TeacherError):
        return str(exc), USAGE
    return None


def describe_os_error(exc: OSError, options: dict[str, str]) -> str:
    """A sentence from the errno and the path: `no space left on device while writing PATH
    (the file system mounted at /data): free space there, or choose another --out`."""
    what, fix = _OS_ERRORS.get(exc.errno or 0, ((exc.strerror or type(exc).__name__).lower(), ""))
    if exc.filename is None:
        # Failed writes (a full disk) often do not say which file: the detail is all there is.
        detail = f" ({exc.strerror})" if exc.strerror and exc.strerror.lower() != what else ""
        return f"{what}{detail}" + (f": {_UNNAMED_FIX}" if fix else "")
    path = os.fsdecode(exc.filename)
    other = None if exc.filename2 is None else os.fsdecode(exc.filename2)
    fix = fix.format(opt=_option_for(path, options))
    return what + _where(exc.errno or 0, path, other) + (f": {fix}" if fix else "")


def _where(code: int, path: str, other: str | None) -> str:
    """Where it happened, as the rest of the sentence after `what`."""
    target = path if other is None else f"{path} -> {other}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f" while writing {target} (the file system mounted at {_mount_point(path)})"
    if code == errno.EROFS:
        return f": cannot write {target} (the file system mounted at {_mount_point(path)})"
    if code == errno.ENOTDIR:
        blocker = next((p for p in _ancestors(path) if p.is_file()), None)
        if blocker is not None:
            return f": {blocker} is a file, so {path} cannot be created or read under it"
    if code == errno.EEXIST and Path(path).is_file():
        return f": {target} already exists as a file"
    return f": {target}"


def _ancestors(path: str) -> Iterator[Path]:
    """`path` and its parents, nearest first, as absolute paths."""
    full = Path(os.path.abspath(path))
    yield full
    yield from full.parents


def _mount_point(path: str) -> str:
    return str(next(p for p in _ancestors(path) if p.exists() and os.path.ismount(p)))


def _option_for(path: str, options: dict[str, str]) -> str:
    """The option whose value is `path` or a directory above it (the nearest), else "path"."""
    full = Path(os.path.abspath(path))
    best, best_len = _GENERIC_OPTION, -1
    for option, value in options.items():
        given = Path(os.path.abspath(value))
        if (full == given or given in full.parents) and len(given.parts) > best_len:
            best, best_len = option, len(given.parts)
    return best


def _invoked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[argparse.Action]:
    """The actions of the parser and of each subcommand on the command line that `args` is of."""
    actions: list[argparse.Action] = []
    current: argparse.ArgumentParser | None = parser
    while current is not None:
        actions.extend(current._actions)
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, sub.dest, None) if sub is not None else None
        current = sub.choices.get(chosen) if sub is not None and chosen else None
    return actions


def _display(action: argparse.Action) -> str:
    if action.option_strings:
        return max(action.option_strings, key=len)
    return str(action.metavar) if action.metavar else action.dest.upper()


def _field_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """Config field -> the option it came from: a field is named like its option's dest; a
    repeatable option (`--output`, action "append") fills the field of the plural name."""
    options: dict[str, str] = {}
    for action in _invoked(parser, args):
        if not action.option_strings or action.dest == argparse.SUPPRESS:
            continue
        options[action.dest] = _display(action)
        if isinstance(action, argparse._AppendAction):
            options.setdefault(action.dest + "s", _display(action))
    return options


def _path_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """Option (or positional) -> the text the user gave it. Any of them may be a path;
    `_option_for` keeps the one the failing path is, or is under."""
    given: dict[str, str] = {}
    for action in _invoked(parser, args):
        value = getattr(args, action.dest, None)
        if isinstance(value, str | Path) and str(value) and action.dest != argparse.SUPPRESS:
            given[_display(action)] = str(value)
    return given


def report_bug(exc: BaseException) -> int:
    """Show the traceback of an unexpected exception and ask for a report; exit code 1, as
    Python's own for an uncaught exception."""
    traceback.print_exception(exc)
    print(
        f"lyceum: internal error: {type(exc).__name__}: {exc}\n"
        "This is a bug in Lyceum (or in a library it called), not something you did wrong: "
        "please report it with the command you ran and the traceback above.",
        file=sys.stderr,
    )
    return FAILED


def stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader is gone (`lyceum ... | head`)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except (OSError, ValueError, AttributeError):  # stdout closed, replaced, or not a file
        return False
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events)


def silence_stdout() -> None:
    """Point stdout at /dev/null, as Python's documentation advises after a broken pipe, so the
    flush at exit does not fail again with a second BrokenPipeError on stderr."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
