"""The `lyceum` command line. Thin: parse, build, run, close; the logic lives in the library.

Each command module exposes `add_parser(subparsers)` and sets `func(args) -> exit code`.
`main` is the one error boundary of every command (see `lyceum.deploy._cli_errors`): expected
failures print `lyceum: error: ...` and exit with a code of `lyceum.deploy._exit_codes`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from lyceum.deploy import (
    _cli_compress,
    _cli_demo,
    _cli_dump,
    _cli_knowledge,
    _cli_nas,
    _cli_prune,
    _cli_quantize,
    _cli_serve,
    _cli_student,
)
from lyceum.deploy._cli_errors import explain, report_bug, silence_stdout, stdout_closed
from lyceum.deploy._exit_codes import signal_exit

DEBUG_ENV = "LYCEUM_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lyceum",
        description="Lyceum: distributed knowledge distillation for PyTorch. Teachers serve or "
        "dump knowledge; students merge it into training; compression runs on the student.",
        epilog="Exit codes: 0 done; 1 a check failed (or a bug, shown with its traceback); 2 "
        "bad input (the message says how to fix it); 69 teachers stayed unreachable; 130/143 "
        "stopped by SIGINT/SIGTERM; 141 stdout closed early (`lyceum ... | head`).",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="Log at DEBUG level (default: INFO)"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"Show the full traceback of an error instead of the one-line message (also "
        f"{DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    teacher = sub.add_parser(
        "teacher",
        help="run a teacher: dump knowledge or serve it",
        description="Run a teacher model: dump its knowledge of a dataset to files once, or "
        "serve it online to students.",
    )
    teacher_sub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")
    _cli_dump.add_parser(teacher_sub)
    _cli_serve.add_parser(teacher_sub)

    student = sub.add_parser(
        "student",
        help="train a student distilled from teachers",
        description="Train a student model from the knowledge of online and offline teachers.",
    )
    _cli_student.add_parser(
        student.add_subparsers(dest="student_command", required=True, metavar="ACTION")
    )

    _cli_knowledge.add_parser(sub)
    _cli_prune.add_parser(sub)
    _cli_quantize.add_parser(sub)
    _cli_compress.add_parser(sub)
    _cli_nas.add_parser(sub)
    _cli_demo.add_parser(sub)
    return parser


def _debug(args: argparse.Namespace) -> bool:
    return bool(args.debug) or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def _run(args: argparse.Namespace) -> int:
    code = int(args.func(args))
    sys.stdout.flush()  # here, not at exit: a reader that left early is handled like any write
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if _debug(args):
        return _run(args)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return signal_exit(signal.SIGINT)
    except BrokenPipeError as exc:
        if not stdout_closed():
            return _explained(exc, parser, args)
        # The reader of stdout left (`lyceum knowledge info DIR | head -1`): nothing to say,
        # and nobody to say it to. Exit as a program killed by SIGPIPE would (141).
        silence_stdout()
        return signal_exit(signal.SIGPIPE)
    except Exception as exc:
        return _explained(exc, parser, args)


def _explained(exc: Exception, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    explained = explain(exc, parser, args)
    if explained is None:
        return report_bug(exc)
    message, code = explained
    print(f"lyceum: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
