"""The `lyceum` error boundary as a new user meets it: real `lyceum` processes that fail the
expected ways print `lyceum: error: <what, where, the fix>` with no traceback and exit with
the documented code (2 bad input, 69 teachers unreachable, 141 stdout closed early)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lyceum.deploy.examples import digits, teacher_cnn
from lyceum.proto.manifest import model_identity
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine
from tests._support.servers import ServerProcess

pytestmark = pytest.mark.integration

LYCEUM = [sys.executable, "-m", "lyceum.deploy.cli"]
TESTS = Path(__file__).resolve().parents[1]
MODEL = 'lyceum.deploy.examples:teacher_cnn{"width": 8}'
DATASET = 'lyceum.deploy.examples:digits{"split": "val"}'
TOKEN = "cli-errors-token-0123456789abcdef"
HANG_GUARD_S = 120


def _lyceum(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LYCEUM, *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def _user_error(run: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """Assert an expected failure: exit `code`, one `lyceum: error:` line, no traceback."""
    assert run.returncode == code, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    assert "lyceum: error: " in run.stderr, run.stderr
    return run.stderr.split("lyceum: error: ", 1)[1].strip()


def _dump(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _lyceum(
        "teacher", "dump", "--model", MODEL, "--dataset", DATASET, "--out", str(out),
        "--workers", "0", "--quiet", *extra,
    )  # fmt: skip


@contextlib.contextmanager
def _tmpfs(directory: Path, options: str) -> Iterator[bool]:
    """A tmpfs mounted on `directory` (True), or False where mounting is not allowed (not
    root): tests then fall back to what an unprivileged user can arrange."""
    directory.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted and os.geteuid() == 0:
        pytest.fail(f"cannot mount a tmpfs on {directory} as root: these tests need it")
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(directory)], check=True)


def _free_port() -> int:
    """A port nothing listens on: bound once by the OS's choice, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _student_config(path: Path, teacher: dict[str, object]) -> Path:
    raw = {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": {"train": DATASET.split("{")[0], "train_kwargs": {"split": "val"}},
        "teachers": {"t": {"mode": "index", "timeout_s": 3, "request_timeout_s": 1, **teacher}},
        "losses": {"terms": [{"name": "kd", "kind": "soft_label", "field": "logits"}]},
        "epochs": 1,
        "progress": False,
    }
    path.write_text(yaml.safe_dump(raw))
    return path


# -- students and teachers -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_student_where_no_teacher_listens_exits_69(tmp_path: Path, scheme: str) -> None:
    endpoint = f"{scheme}://127.0.0.1:{_free_port()}"
    config = _student_config(tmp_path / "student.yaml", {"endpoints": [endpoint]})
    message = _user_error(_lyceum("student", "train", str(config)), code=69)
    assert message.startswith("UNAVAILABLE: teacher 't'"), message
    assert endpoint in message


@pytest.fixture(scope="module")
def token_teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A real `lyceum teacher serve` on gRPC and ZeroMQ that requires a bearer token."""
    work = tmp_path_factory.mktemp("token-teacher")
    (work / "token").write_text(TOKEN + "\n")
    (work / "token").chmod(0o600)
    proc = ServerProcess(
        ["--model", MODEL, "--dataset", DATASET, "--grpc-port", "0", "--zmq-port", "0",
         "--token-file", str(work / "token")],
        work,
    )  # fmt: skip
    try:
        yield {"proc": proc, "work": work}
    finally:
        proc.kill()


# One transport each: how each transport refuses is the online tests' business; this is the code.
@pytest.mark.parametrize(("scheme", "token"), [("grpc", "wrong"), ("zmq", None)])
def test_student_with_wrong_or_missing_token_exits_2(
    tmp_path: Path, token_teacher: dict[str, object], scheme: str, token: str | None
) -> None:
    teacher: dict[str, object] = {"endpoints": [token_teacher["proc"].endpoint(scheme)]}  # type: ignore[attr-defined]
    if token is not None:
        (tmp_path / "token").write_text("not-the-token-0123456789abcdef\n")
        (tmp_path / "token").chmod(0o600)
        teacher["token_file"] = str(tmp_path / "token")
    config = _student_config(tmp_path / "student.yaml", teacher)
    message = _user_error(_lyceum("student", "train", str(config)))
    assert message.startswith("UNAUTHENTICATED: teacher 't'"), message
    assert "token" in message


# -- teacher dump: where it writes ------------------------------------------------------------


def test_dump_out_on_a_read_only_file_system(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as mounted:
        if not mounted:
            (tmp_path / "ro").chmod(0o555)
        message = _user_error(_dump(tmp_path / "ro" / "dump"))
    if mounted:
        assert message == (
            f"read-only file system: cannot write {tmp_path}/ro/dump (the file system mounted "
            f"at {tmp_path}/ro): choose another --out on a writable file system"
        )
    else:
        assert message.startswith(f"permission denied: {tmp_path}/ro/dump: ")


def test_dump_out_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a directory\n")
    message = _user_error(_dump(tmp_path / "notes.txt" / "dump"))
    assert message == (
        f"not a directory: {tmp_path}/notes.txt is a file, so {tmp_path}/notes.txt/dump cannot "
        f"be created or read under it: choose another --out, or move that file away"
    )


def test_dump_out_on_a_full_disk(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "full", "size=8k") as mounted:
        if not mounted:
            pytest.skip("no tmpfs without root, and the dump cannot be pointed at /dev/full")
        message = _user_error(_dump(tmp_path / "full" / "dump"))
    # pyarrow's failed write names no file: the dump adds the shard's, so the message names
    # it and its file system, and the fix names the option.
    shard = tmp_path / "full" / "dump" / "shard-00000.arrow.tmp"
    assert message == (
        f"no space left on device while writing {shard} (the file system mounted at "
        f"{tmp_path / 'full'}): free space there, or choose another --out"
    ), message


# -- teacher dump: what it reads ----------------------------------------------------------------


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return teacher_cnn(width=8).state_dict()


def test_corrupt_safetensors_checkpoint(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "teacher.safetensors"
    save_file(state, str(path))
    path.write_bytes(path.read_bytes()[:300])  # truncated mid-copy
    message = _user_error(_dump(tmp_path / "dump", "--checkpoint", str(path)))
    assert message.startswith(f"checkpoint {str(path)!r} is not a readable safetensors file")
    assert f"re-create it with safetensors.torch.save_file(model.state_dict(), {str(path)!r})" in (
        message
    )


def test_pickled_whole_module_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"
    torch.save(teacher_cnn(width=8), path)
    run = _dump(tmp_path / "dump", "--checkpoint", str(path))
    message = _user_error(run)
    assert message.startswith(
        f"checkpoint {str(path)!r} holds pickled Python objects "
        f"(lyceum.deploy.examples.TeacherCNN), not just tensors, and Lyceum never unpickles"
    ), message
    assert "torch.save(obj.state_dict(), 'model.pt')" in message
    assert "In PyTorch 2.6" not in run.stderr and "add_safe_globals" not in run.stderr


def test_model_factory_that_raises(tmp_path: Path) -> None:
    run = _lyceum(
        "teacher", "dump", "--model", "tests._support.broken_factories:model_that_raises", "--model-kwargs",
        '{"width": 5}', "--dataset", DATASET, "--out", str(tmp_path / "dump"), "--quiet",
        env={"PYTHONPATH": str(TESTS / "proto")},
    )  # fmt: skip
    message = _user_error(run)
    assert message.startswith(
        'model spec tests._support.broken_factories:model_that_raises{"width": 5}: calling it raised '
        "RuntimeError: width 5 needs a GPU (at broken_factories.py:"
    ), message


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    for run in (
        _lyceum("--debug", "teacher", "dump", "--model", "nocolon", "--dataset", DATASET,
                "--out", str(tmp_path / "dump")),
        _lyceum("teacher", "dump", "--model", "nocolon", "--dataset", DATASET, "--out",
                str(tmp_path / "dump"), env={"LYCEUM_DEBUG": "1"}),
    ):  # fmt: skip
        assert run.returncode == 1, run.stderr
        assert "Traceback (most recent call last)" in run.stderr
        assert "ValueError: spec 'nocolon': expected 'package.module:callable'" in run.stderr
        assert "lyceum: error:" not in run.stderr


# -- knowledge info: a reader that leaves early -----------------------------------------------


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("knowledge") / "dump"
    dataset = digits("val")
    torch.manual_seed(0)
    model = teacher_cnn(width=8)
    engine = TeacherEngine(model, EngineConfig(), dataset[0][0])
    try:
        config = DumpConfig(shard_rows=64, batch_size=64, workers=0, progress=False)
        dump_knowledge(engine, dataset, out, config, model_identity("test", model))
    finally:
        engine.close()
    return out


def test_knowledge_info_into_head(dump_dir: Path) -> None:
    run = subprocess.run(
        [
            "sh",
            "-c",
            f'"{sys.executable}" -m lyceum.deploy.cli knowledge info "{dump_dir}" | head -1',
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"directory:  {dump_dir}\n"
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr


def test_knowledge_info_into_a_closed_pipe_exits_141(dump_dir: Path) -> None:
    """The reader is gone before the first line is written: every write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        run = subprocess.run(
            [*LYCEUM, "knowledge", "info", str(dump_dir)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=HANG_GUARD_S,
        )
    finally:
        os.close(write_end)
    assert run.returncode == 141, run.stderr
    assert run.stderr == "", run.stderr
