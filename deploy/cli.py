"""The `lyceum` command line. Thin: parse, build, run, close; the logic lives in the library.

Each command module exposes `add_parser(subparsers)` and sets `func(args) -> exit code`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from lyceum.deploy import (
    _cli_demo,
    _cli_dump,
    _cli_knowledge,
    _cli_prune,
    _cli_quantize,
    _cli_serve,
    _cli_student,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lyceum",
        description="Lyceum: distributed knowledge distillation for PyTorch. Teachers serve or "
        "dump knowledge; students merge it into training; compression runs on the student.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    teacher = sub.add_parser("teacher", help="run a teacher: dump knowledge or serve it")
    teacher_sub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")
    _cli_dump.add_parser(teacher_sub)
    _cli_serve.add_parser(teacher_sub)

    student = sub.add_parser("student", help="train a student distilled from teachers")
    _cli_student.add_parser(
        student.add_subparsers(dest="student_command", required=True, metavar="ACTION")
    )

    _cli_knowledge.add_parser(sub)
    _cli_prune.add_parser(sub)
    _cli_quantize.add_parser(sub)
    _cli_demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return int(args.func(args))
    except ValueError as exc:
        # User errors (bad specs, configs, knowledge) carry their own explanation.
        print(f"lyceum: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
