"""Bad options and configs read as sentences that name the option or key, never as a pydantic
dump, and the boundary's own rules: exit codes, bugs shown as bugs, OS errors as sentences."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lyceum.deploy import _cli_knowledge
from lyceum.deploy._cli_errors import describe_os_error
from lyceum.deploy._jobs import load_job_config
from lyceum.deploy.cli import main
from lyceum.student_client.trainer_config import load_config

MODEL = 'lyceum.deploy.examples:teacher_cnn{"width": 8}'
DATASET = 'lyceum.deploy.examples:digits{"split": "val"}'


def _dump(tmp_path: Path, *args: str) -> list[str]:
    return ["teacher", "dump", "--dataset", DATASET, "--out", str(tmp_path / "dump"), *args]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "nocolon"],
            "spec 'nocolon': expected 'package.module:callable' (a colon between the module path "
            "and the callable name), e.g. 'lyceum.deploy.examples:teacher_cnn'",
        ),
        (["--model", MODEL, "--topk", "0"], "option --topk: got 0: Input should be greater than 0"),
        (
            ["--model", MODEL, "--output", "logits=@output", "--output", "logits=@output"],
            "--output names must be unique, got ['logits', 'logits']",
        ),
    ],
)
def test_bad_dump_options_are_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(_dump(tmp_path, *args)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"lyceum: error: {message}"
    assert "validation error" not in err and "errors.pydantic.dev" not in err
    assert not (tmp_path / "dump").exists()


@pytest.mark.integration
def test_serve_without_any_port_says_which_options(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "lyceum.deploy.cli", "teacher", "serve", "--model", MODEL,
         "--dataset", DATASET, "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[-1] == (
        "lyceum: error: no endpoint to serve on: give --grpc-port and/or --zmq-port (0 picks a "
        "free port), or --grpc-unix / --zmq-ipc"
    )
    assert "Traceback" not in run.stderr and "validation error" not in run.stderr


# -- config files ----------------------------------------------------------------------------


def _student(tmp_path: Path) -> dict[str, object]:
    return {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": {"train": "lyceum.deploy.examples:digits"},
        "teachers": {"dump": {"dir": str(tmp_path)}},
        "losses": {"terms": [{"name": "kd", "kind": "soft_label", "field": "logits"}]},
        "epochs": 1,
    }


def _prune(tmp_path: Path) -> dict[str, object]:
    return {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": "lyceum.deploy.examples:digits",
        "strategy": {"kind": "uniform", "flops": -0.5},
        "out_dir": str(tmp_path / "out"),
    }


def _load_student(path: Path) -> object:
    return load_config(path)


def _load_prune(path: Path) -> object:
    from lyceum.compression.pruning import PruneJobConfig

    return load_job_config(path, PruneJobConfig, "prune")


LOADERS = [
    pytest.param(_load_student, _student, "trainer", id="student"),
    pytest.param(_load_prune, _prune, "prune", id="prune"),
]


@pytest.mark.parametrize(("load", "raw", "what"), LOADERS)
def test_yaml_syntax_error_names_the_file_and_line(tmp_path, load, raw, what) -> None:
    path = tmp_path / "job.yaml"
    text = yaml.safe_dump(raw(tmp_path), sort_keys=False)
    path.write_text(text.replace("model: ", "model: [", 1))  # an unclosed flow sequence
    with pytest.raises(ValueError) as err:
        load(path)
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"{path}:2:"), first
    assert "not valid YAML: " in first and "line 1, column 8" in first, first
    assert '"<unicode string>"' not in str(err.value)


@pytest.mark.parametrize(("load", "raw", "what"), LOADERS)
def test_a_nested_typo_is_exactly_one_problem_line(tmp_path, load, raw, what) -> None:
    config = raw(tmp_path)
    if what == "trainer":
        config["losses"] = {"terms": [{"name": "kd", "kind": "soft_lable", "field": "logits"}]}
        expected = "key 'losses.terms.0.kind': Input tag 'soft_lable' found using 'kind' does not match any of the expected tags: 'soft_label', 'topk', 'mse', 'hint', 'fsp'"
    else:
        config["strategy"] = {"kind": "uniform", "flops": -0.5, "ratoi": 0.1}
        expected = "key 'strategy.ratoi': got 0.1: Extra inputs are not permitted"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError) as err:
        load(path)
    assert str(err.value) == f"{path}: invalid {what} config: {expected}"


def test_a_missing_config_file_is_named_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["student", "train", str(missing)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"lyceum: error: no such file or directory: {missing}: check that path"
    )


# -- the boundary's own rules ------------------------------------------------------------------


def test_an_unexpected_exception_is_a_bug_with_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(_cli_knowledge, "run_info", broken)
    assert main(["knowledge", "info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: an invariant broke" in err
    assert "lyceum: internal error: RuntimeError: an invariant broke" in err
    assert "please report it with the command you ran and the traceback above" in err


def test_ctrl_c_exits_130_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(_cli_knowledge, "run_info", interrupted)
    assert main(["knowledge", "info", str(tmp_path)]) == 130
    assert capsys.readouterr().err == ""


def test_debug_lets_the_exception_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LYCEUM_DEBUG", "0")
    assert main(["knowledge", "info", str(tmp_path / "none")]) == 2
    with pytest.raises(ValueError):
        main(["--debug", "knowledge", "info", str(tmp_path / "none")])
    monkeypatch.setenv("LYCEUM_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["knowledge", "info", str(tmp_path / "none")])


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            errno.EACCES,
            "permission denied: {p}/out/x.arrow: fix its permissions, or choose another --out",
        ),
        (
            errno.ENOSPC,
            "no space left on device while writing {p}/out/x.arrow (the file system mounted at "
            "{mount}): free space there, or choose another --out",
        ),
        (
            errno.EEXIST,
            "file exists: {p}/out/x.arrow: choose another --out, or remove what is in the way",
        ),
        (errno.ENOENT, "no such file or directory: {p}/out/x.arrow: check that path"),
        (errno.ELOOP, "too many levels of symbolic links: {p}/out/x.arrow"),
    ],
)
def test_os_errors_read_as_sentences_with_the_option(
    tmp_path: Path, code: int, message: str
) -> None:
    path = tmp_path / "out" / "x.arrow"
    mount = next(p for p in (tmp_path, *tmp_path.parents) if p.is_mount())
    exc = OSError(code, os.strerror(code), str(path))
    options = {"--out": str(tmp_path / "out"), "--checkpoint": str(tmp_path / "t.pt")}
    assert describe_os_error(exc, options) == message.format(p=tmp_path, mount=mount)


def test_os_error_without_a_path_keeps_its_detail() -> None:
    exc = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left")
    assert describe_os_error(exc, {"--out": "/data/dump"}) == (
        "no space left on device (Error writing bytes to file. Detail: [errno 28] No space left): "
        "check the file systems this command writes to (free space, permissions), or write "
        "elsewhere"
    )
