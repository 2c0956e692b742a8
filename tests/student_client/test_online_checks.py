"""What a student checks about an online teacher before it trusts it, with real teachers.

`Describe` carries the teacher's dataset fingerprint and model identity; in index mode the
student refuses a teacher of another dataset (here: the digits in another order, same length,
which trained to 24% instead of 89% without a word) and replicas that are not one teacher.
Errors name the teacher, the endpoint and the fix: a teacher not listening, a wrong or a
missing token, negative sample ids.

The teachers run `lyceum teacher serve` with the repository root on PYTHONPATH (`ENV`), so
the server imports `shuffled_digits` from the fixtures package.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lyceum.deploy.demo import demo_student_config
from lyceum.deploy.examples import digits
from lyceum.deploy.launcher import TeacherProcess, start_teacher
from lyceum.proto.checksum import file_sha256
from lyceum.proto.errors import UNAUTHENTICATED, UNAVAILABLE
from lyceum.proto.manifest import (
    ModelIdentity,
    dataset_fingerprint,
    state_dict_sha256,
)
from lyceum.proto.schema import KnowledgeSchema, dense
from lyceum.proto.specs import load_model, parse_spec
from lyceum.student_client import (
    CredentialOptions,
    OnlineTeacher,
    TeacherError,
    TeacherInfo,
    TeacherTimeouts,
    TeacherUnavailableError,
)
from lyceum.student_client._teacher_checks import check_dataset
from lyceum.student_client.trainer import build_sources
from tests._support.dump_datasets import shuffled_digits
from tests._support.teachers import DIGITS, ENV, reference_logits, save_checkpoint

MODEL = 'lyceum.deploy.examples:teacher_cnn{"width": 8}'
SHUFFLED = "tests._support.dump_datasets:shuffled_digits"
TOKEN = "online-checks-token-0123456789"
AUTH = CredentialOptions(token=TOKEN)


def _free_port() -> int:
    """A port nothing listens on (bound and released; nobody else here binds it meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checks")
    token = root / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    return {
        "root": root,
        "token": token,
        "ckpt": save_checkpoint(root / "teacher.safetensors", seed=3),
        "other_ckpt": save_checkpoint(root / "other.safetensors", seed=4),
    }


@pytest.fixture(scope="module")
def teachers(work: dict[str, Path]) -> Iterator[dict[str, TeacherProcess]]:
    """`right`: the student's digits (gRPC and ZeroMQ); `shuffled`: the digits in another
    order; `other`: another checkpoint. All need the token."""

    def serve(dataset: str, ckpt: Path, zmq: bool = False) -> Any:
        return start_teacher(
            MODEL, dataset=dataset, checkpoint=ckpt, zmq=zmq, env=ENV, exit_after_s=300,
            extra_args=["--token-file", str(work["token"])],
        )  # fmt: skip

    with ExitStack() as stack:
        yield {
            "right": stack.enter_context(serve(DIGITS, work["ckpt"], zmq=True)),
            "shuffled": stack.enter_context(serve(SHUFFLED, work["ckpt"])),
            "other": stack.enter_context(serve(DIGITS, work["other_ckpt"])),
        }


@pytest.fixture(scope="module")
def reference(work: dict[str, Path]) -> torch.Tensor:
    return reference_logits(work["ckpt"], digits("train"))


def _student_config(endpoint: str, work: dict[str, Path]) -> Any:
    teacher = {"endpoints": [endpoint], "mode": "index", "token_file": str(work["token"])}
    return demo_student_config({"cnn": teacher}, epochs=1)


# -- Describe -----------------------------------------------------------------------------


@pytest.mark.integration
def test_describe_reports_the_dataset_fingerprint_and_the_model_identity(
    teachers: dict[str, TeacherProcess], work: dict[str, Path]
) -> None:
    model = load_model(MODEL, work["ckpt"])
    want_model = ModelIdentity(
        spec=str(parse_spec(MODEL)),
        checkpoint_sha256=file_sha256(work["ckpt"]),
        weights_sha256=state_dict_sha256(model),
    )
    for name, dataset in (("right", digits("train")), ("shuffled", shuffled_digits())):
        with OnlineTeacher(teachers[name].endpoint("grpc"), credentials=AUTH) as client:
            info = client.describe()
        assert info.dataset == dataset_fingerprint(dataset), name
        assert info.model == want_model, name
    assert dataset_fingerprint(digits("train")) != dataset_fingerprint(shuffled_digits())


# -- index mode: the student's dataset ----------------------------------------------------


@pytest.mark.integration
def test_index_mode_refuses_a_teacher_of_the_same_digits_in_another_order(
    teachers: dict[str, TeacherProcess], work: dict[str, Path], reference: torch.Tensor
) -> None:
    endpoint = teachers["shuffled"].endpoint("grpc")
    student = dataset_fingerprint(digits("train")).sha256[:16]
    teacher = dataset_fingerprint(shuffled_digits()).sha256[:16]
    # The trainer's path: build_sources passes the training set to the online teacher.
    sources = build_sources(_student_config(endpoint, work), digits("train"))
    try:
        with pytest.raises(ValueError) as err:
            _ = sources["cnn"].schema  # what the loader asks first
    finally:
        sources["cnn"].close()
    message = str(err.value)
    assert f"teacher 'cnn' at {endpoint}" in message
    assert f"fingerprint {teacher}" in message and f"fingerprint {student}" in message
    assert "Start the teacher with the student's dataset spec and arguments" in message
    # In query mode the student sends its own inputs: the teacher's dataset does not matter.
    data = digits("train")
    x = torch.stack([data[i][0] for i in (4, 2)])
    with OnlineTeacher(endpoint, mode="query", credentials=AUTH, dataset=data) as query:
        got = query.request([4, 2], inputs=x)
    torch.testing.assert_close(got.tensors["logits"], reference[[4, 2]])


@pytest.mark.integration
def test_student_train_refuses_it_with_exit_code_2(
    teachers: dict[str, TeacherProcess], work: dict[str, Path], tmp_path: Path
) -> None:
    """The issue's run: `lyceum student train` with mode: index against that teacher."""
    endpoint = teachers["shuffled"].endpoint("grpc")
    config = tmp_path / "student.yaml"
    config.write_text(
        yaml.safe_dump(
            _student_config(endpoint, work).model_dump(mode="json", exclude_defaults=True)
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "lyceum.deploy.cli", "student", "train", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **ENV},
    )
    assert done.returncode == 2, done.stderr
    assert "lyceum: error:" in done.stderr and endpoint in done.stderr
    assert dataset_fingerprint(shuffled_digits()).sha256[:16] in done.stderr
    assert "Start the teacher with the student's dataset spec" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_index_mode_accepts_the_teacher_of_the_students_dataset(
    teachers: dict[str, TeacherProcess], reference: torch.Tensor, scheme: str
) -> None:
    endpoint = teachers["right"].endpoint(scheme)
    with OnlineTeacher(endpoint, mode="index", credentials=AUTH, dataset=digits("train")) as t:
        got = t.request([5, 0, 1000])
    assert got.sample_ids.tolist() == [5, 0, 1000]
    torch.testing.assert_close(got.tensors["logits"], reference[[5, 0, 1000]])


def test_index_mode_refuses_a_teacher_that_reports_no_fingerprint() -> None:
    """A server older than the field: its ids cannot be checked, so index mode refuses."""
    schema = KnowledgeSchema(fields=(dense("logits", "float32", (10,)),))
    old = TeacherInfo(schema, None, "old", "1.0", True, 64, 1 << 26)
    with pytest.raises(ValueError, match="does not report its dataset's fingerprint") as err:
        check_dataset(old, digits("train"), "teacher 'cnn' at grpc://h:1")
    assert "Upgrade Lyceum on the teacher, or use mode='query'" in str(err.value)
    fresh = TeacherInfo(
        schema, None, "new", "1.0", True, 64, 1 << 26, dataset_fingerprint(digits("train"))
    )
    check_dataset(fresh, digits("train"), "teacher 'cnn' at grpc://h:1")  # the same: accepted


# -- replicas -----------------------------------------------------------------------------


@pytest.mark.integration
def test_replicas_with_different_checkpoints_are_refused(
    teachers: dict[str, TeacherProcess], work: dict[str, Path]
) -> None:
    a, b = teachers["right"].endpoint("grpc"), teachers["other"].endpoint("grpc")
    with (
        OnlineTeacher([a, b], mode="index", credentials=AUTH, name="cnn") as t,
        pytest.raises(ValueError) as err,
    ):
        t.describe()
    message = str(err.value)
    assert f"replica {b} is not the same teacher as replica {a}" in message
    assert f"{a} has {file_sha256(work['ckpt'])!r}" in message
    assert f"{b} has {file_sha256(work['other_ckpt'])!r}" in message
    assert "model checkpoint_sha256" in message


@pytest.mark.integration
def test_replicas_of_different_datasets_are_refused_in_index_mode_only(
    teachers: dict[str, TeacherProcess], reference: torch.Tensor
) -> None:
    a, b = teachers["right"].endpoint("grpc"), teachers["shuffled"].endpoint("grpc")
    with (
        OnlineTeacher([a, b], mode="index", credentials=AUTH) as t,
        pytest.raises(ValueError) as err,
    ):
        t.describe()
    right, shuffled = dataset_fingerprint(digits("train")), dataset_fingerprint(shuffled_digits())
    assert f"dataset: {a} has 1257 samples with fingerprint {right.sha256[:16]}" in str(err.value)
    assert f"{b} has 1257 samples with fingerprint {shuffled.sha256[:16]}" in str(err.value)
    # The same model asked by inputs: both replicas answer alike, whatever their datasets.
    data = digits("train")
    x = torch.stack([data[i][0] for i in range(8)])
    with OnlineTeacher([a, b], mode="query", credentials=AUTH) as t:
        got = t.request(list(range(8)), inputs=x)
    torch.testing.assert_close(got.tensors["logits"], reference[:8])


# -- errors that name the teacher, the endpoint and the fix ---------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_a_missing_or_wrong_token_names_the_teacher_and_the_token_file(
    teachers: dict[str, TeacherProcess], scheme: str
) -> None:
    endpoint = teachers["right"].endpoint(scheme)
    for token, phrase, fix in (
        (None, "none was sent", "Give the student the teacher's token: token_file"),
        ("wrong", "invalid bearer token", "Check the student's token_file (or token)"),
    ):
        with (
            OnlineTeacher(
                endpoint, mode="index", credentials=CredentialOptions(token=token), name="cnn"
            ) as t,
            pytest.raises(TeacherError) as err,
        ):
            t.request([1])
        assert err.value.code == UNAUTHENTICATED
        message = err.value.message
        assert message.startswith(f"teacher 'cnn' at {endpoint} refused: "), message
        assert phrase in message and fix in message and "--token-file" in message
        assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_a_teacher_not_listening_names_the_endpoint_once_and_the_fix(scheme: str) -> None:
    endpoint = f"{scheme}://127.0.0.1:{_free_port()}"
    quick = TeacherTimeouts(connect_timeout_s=1)
    with (
        OnlineTeacher(endpoint, mode="index", timeouts=quick) as t,
        pytest.raises(TeacherUnavailableError) as err,
    ):
        t.request([1])
    message = err.value.message
    assert message.startswith("online teacher: could not describe it; endpoints tried: ")
    assert message.count(endpoint) == 1, message  # the default name is not repeated
    assert "Check that the teacher is running (`lyceum teacher serve`)" in message
    assert err.value.code == UNAVAILABLE and err.value.__context__ is None
    with (
        OnlineTeacher(endpoint, mode="index", timeouts=quick, name="cnn") as t,
        pytest.raises(TeacherUnavailableError) as err,
    ):
        t.describe()
    assert err.value.message.startswith(
        f"teacher 'cnn': could not describe it; endpoints tried: {endpoint} ("
    )
    assert "Check that the teacher is running" in err.value.message


def test_negative_or_fractional_sample_ids_are_refused_before_sending() -> None:
    """The wire carries uint64: -1 became 18446744073709551615 in the teacher's reply."""
    with OnlineTeacher("grpc://127.0.0.1:1", mode="index", name="cnn") as t:
        with pytest.raises(
            ValueError, match=r"teacher 'cnn': sample ids must be non-negative .*\[-1, -7\]"
        ):
            t.submit(1, torch.tensor([3, -1, 5, -7]))
        with pytest.raises(ValueError, match="must be integers"):
            t.request([0.5, 1.0])  # type: ignore[list-item]  # the wrong type on purpose
    with (
        OnlineTeacher("zmq://127.0.0.1:1", mode="index") as unnamed,
        pytest.raises(
            ValueError, match=r"^online teacher: sample ids must be non-negative .*\[-1\]"
        ),
    ):
        unnamed.request([-1])


@pytest.mark.integration
def test_server_messages_show_ids_as_the_student_sent_them(
    teachers: dict[str, TeacherProcess],
) -> None:
    with (
        OnlineTeacher(teachers["right"].endpoint("grpc"), mode="index", credentials=AUTH) as t,
        pytest.raises(TeacherError) as err,
    ):
        t.request([3, 5000, 9000])
    assert "sample ids [5000, 9000] are out of range" in err.value.message
    assert "(ids 0..1256)" in err.value.message
