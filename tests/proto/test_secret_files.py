"""Token files: one reader for the teacher's --token-file and the student's token_file, which
warns (names the file, its mode and the chmod) when group or others may read or write it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lyceum.proto.secret_files import read_token_file, warn_if_exposed
from lyceum.student_client._credentials import CredentialOptions
from lyceum.teacher_server.security import read_token

TOKEN = "0123456789abcdef"


def _token(tmp_path: Path, mode: int, text: str = TOKEN + "\n") -> Path:
    path = tmp_path / f"token-{mode:o}"
    path.write_text(text)
    path.chmod(mode)
    return path


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lyceum.secrets"]


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o644, "group and others"), (0o640, "group"), (0o604, "others"), (0o620, "group")],
)
def test_a_token_file_others_may_read_is_named_with_its_mode_and_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, who: str
) -> None:
    path = _token(tmp_path, mode)
    with caplog.at_level(logging.WARNING, logger="lyceum.secrets"):
        assert read_token_file(path, "--token-file") == TOKEN.encode()
    (message,) = _warnings(caplog)
    assert message.startswith(
        f"--token-file {str(path)!r} holds a secret but is accessible by {who}"
    )
    assert f"(mode {mode:04o})" in message and f"`chmod 600 {path}`" in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_token_file_reads_without_a_word(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    path = _token(tmp_path, mode)
    with caplog.at_level(logging.WARNING, logger="lyceum.secrets"):
        assert read_token_file(path, "token_file") == TOKEN.encode()
        assert not warn_if_exposed(path, "token_file")
    assert _warnings(caplog) == []


def test_teacher_and_student_read_token_files_the_same_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _token(tmp_path, 0o644)
    with caplog.at_level(logging.WARNING, logger="lyceum.secrets"):
        assert read_token(path) == TOKEN.encode()
        built = CredentialOptions(token_file=path).build(["grpc://127.0.0.1:1"])
    assert built.token == TOKEN.encode()
    teacher, student = _warnings(caplog)
    assert teacher.startswith(f"--token-file {str(path)!r}") and "chmod 600" in teacher
    assert student.startswith(f"token_file {str(path)!r}") and "chmod 600" in student
    bad = _token(tmp_path, 0o600, "two words\n")
    for read in (read_token, lambda p: CredentialOptions(token_file=p).build(["zmq://h:1"])):
        with pytest.raises(ValueError, match="printable ASCII without spaces"):
            read(bad)


def test_an_empty_or_missing_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is empty; put a random secret in it"):
        read_token_file(_token(tmp_path, 0o600, " \n"), "--token-file")
    with pytest.raises(FileNotFoundError) as err:
        read_token_file(tmp_path / "nope", "token_file")
    assert err.value.filename == str(tmp_path / "nope")
