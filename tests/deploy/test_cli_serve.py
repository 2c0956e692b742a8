"""`lyceum teacher serve` (and the engine options it shares with `teacher dump`) as a user
meets them: every option explained with its default, mistakes refused with exit code 2
before anything is loaded, a wider --host only with credentials or --insecure."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from lyceum.deploy.cli import build_parser
from lyceum.deploy.launcher import start_teacher
from lyceum.student_client import OnlineTeacher

LYCEUM = [sys.executable, "-m", "lyceum.deploy.cli"]
MODEL = 'lyceum.deploy.examples:teacher_cnn{"width": 8}'
QUERY_ONLY = ["--model", MODEL, "--input-shape", "1,8,8", "--grpc-port", "0"]


def _command(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("command", [("teacher", "serve"), ("teacher", "dump")])
def test_every_option_has_a_sentence_and_its_default(command: tuple[str, ...]) -> None:
    parser = _command(*command)
    formatter = parser._get_formatter()
    owned = {
        "--out",
        "--batch-size",
        "--workers",
        "--shard-rows",
        "--device",
        "--quiet",
        "--fingerprint",
        "--threads",
        "--rank",
        "--world-size",
    }
    checked = []
    for action in parser._actions:
        flag = max(action.option_strings, key=len, default="")
        if flag in ("", "--help") or (command[1] == "dump" and flag in owned):
            continue  # dump's own options belong to its engineer's test
        text = formatter._expand_help(action) if action.help else ""
        assert len(text.split()) >= 4 and text[0].isupper(), (flag, text)
        assert text.rstrip().endswith("."), (flag, text)
        if action.required:
            assert "Required." in text, flag
        else:
            assert "(default: " in text, (flag, text)
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default}" in text, (flag, text)
        checked.append(flag)
    assert len(checked) >= (31 if command[1] == "serve" else 10), checked


def test_the_computed_defaults_say_their_rule() -> None:
    text = _command("teacher", "serve").format_help()
    assert "(default: 8 x --max-batch x devices)" in text
    assert "at least 64 MiB" in text
    assert "the token travels in clear" in text  # --token-file without TLS/CURVE


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LYCEUM, *args], capture_output=True, text=True, timeout=120)


def test_a_temperature_without_log_probs_is_refused_by_both_teacher_commands(
    tmp_path: Path,
) -> None:
    serve = _run("teacher", "serve", *QUERY_ONLY, "--temperature", "3")
    out = tmp_path / "dump"
    dump = _run(
        "teacher", "dump", "--model", MODEL, "--dataset", "lyceum.deploy.examples:digits",
        "--out", str(out), "--temperature", "3", "--quiet",
    )  # fmt: skip
    for done in (serve, dump):
        assert done.returncode == 2, done.stderr
        assert "lyceum: error:" in done.stderr
        assert "--temperature 3 applies only to log-probabilities" in done.stderr
        assert "add --values log_probs" in done.stderr and "drop --temperature" in done.stderr
    assert not out.exists()  # refused before anything was written
    assert "lyceum teacher serving" not in serve.stdout


def test_a_wider_host_without_credentials_is_refused_naming_every_option() -> None:
    done = _run("teacher", "serve", *QUERY_ONLY, "--zmq-port", "0", "--host", "0.0.0.0")
    assert done.returncode == 2, done.stderr
    assert "--host 0.0.0.0 is not a loopback address" in done.stderr
    for option in ("--token-file", "--tls-cert/--tls-key", "--zmq-curve-secret-key", "--insecure"):
        assert option in done.stderr
    assert "lyceum teacher serving" not in done.stdout


@pytest.mark.integration
def test_insecure_serves_a_wider_host() -> None:
    with start_teacher(
        MODEL, extra_args=["--input-shape", "1,8,8", "--host", "0.0.0.0", "--insecure"]
    ) as teacher:
        assert teacher.endpoint("grpc").startswith("grpc://0.0.0.0:")
        with OnlineTeacher(f"grpc://127.0.0.1:{teacher.port('grpc')}") as client:
            assert client.describe().input_schema is not None
