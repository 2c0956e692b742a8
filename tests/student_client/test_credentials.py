"""Student credentials: CURVE keys and TLS options checked against the endpoints (with errors
naming the option), read from key files or zmq certificates, and a real teacher with a CURVE
allow-list reached through `OnlineTeacher` and through a trainer config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
import zmq
import zmq.auth
from pydantic import ValidationError

from lyceum.deploy.examples import digits
from lyceum.deploy.launcher import TeacherProcess, start_teacher
from lyceum.proto.errors import UNAUTHENTICATED, UNAVAILABLE
from lyceum.student_client import CredentialOptions, TeacherError, TeacherTimeouts
from lyceum.student_client.sources import OnlineTeacher
from lyceum.student_client.trainer import build_sources
from lyceum.student_client.trainer_config import load_config, validate_config
from tests._support.teachers import DIGITS, ENV, SLOW, reference_logits, save_checkpoint

TOKEN = "curve-test-token-0123456789"
ZMQ = "zmq://127.0.0.1:1"  # nothing listens: building a teacher only opens a socket


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Certificates of the teacher and of the one allowed student (zmq.auth format), the
    allow-list, a token file, and the same keys as bare z85 text."""
    work = tmp_path_factory.mktemp("keys")
    teacher_cert, teacher_secret_cert = zmq.auth.create_certificates(work, "teacher")
    _, student_cert = zmq.auth.create_certificates(work, "student")
    student_public, student_secret = zmq.auth.load_certificate(student_cert)
    assert student_secret is not None
    (work / "allowed.txt").write_bytes(student_public + b"\n")
    (work / "token").write_text(TOKEN + "\n")
    (work / "student.z85").write_bytes(student_secret + b"\n")
    return {
        "dir": work,
        "teacher_cert": Path(teacher_cert),
        "teacher_secret_cert": Path(teacher_secret_cert),
        "teacher_public": zmq.auth.load_certificate(teacher_cert)[0].decode(),
        "student_cert": Path(student_cert),
        "student_public": student_public.decode(),
        "student_secret": student_secret.decode(),
        "student_bare": work / "student.z85",
    }


# -- checks without a teacher -------------------------------------------------------------

SERVER_KEY = zmq.curve_keypair()[0].decode()
PUBLIC, SECRET = (k.decode() for k in zmq.curve_keypair())


@pytest.mark.parametrize(
    ("endpoints", "options", "message"),
    [
        (["grpc://h:1"], {"curve_server_key": SERVER_KEY}, "secure ZeroMQ (CURVE), but no endpoint"),
        ([ZMQ], {"curve_secret_key": SECRET}, "need the teacher's public key: give 'curve_server_key'"),
        (
            [ZMQ],
            {"curve_server_key": SERVER_KEY, "curve_public_key": PUBLIC},
            "'curve_public_key' is half of the student's CURVE key pair",
        ),
        ([ZMQ], {"curve_server_key": "short"}, "'curve_server_key': expected a 40-character z85"),
        (
            [ZMQ],
            {"curve_server_key": SERVER_KEY, "curve_secret_key": "\\" * 40},
            "'curve_secret_key': expected a 40-character z85 CURVE key, got 40 characters outside",
        ),
        (
            [ZMQ],
            {"curve_server_key": SERVER_KEY, "curve_secret_key": SECRET, "curve_public_key": SERVER_KEY},
            "'curve_public_key' is not the public key of the given CURVE secret key",
        ),
        (
            [ZMQ],
            {"curve_server_key": SERVER_KEY, "curve_server_key_file": "k"},
            "give 'curve_server_key' or 'curve_server_key_file', not both",
        ),
        (
            [ZMQ],
            {"curve_server_key": SERVER_KEY, "curve_secret_key_file": "/no/such/key"},
            "'curve_secret_key_file': cannot read CURVE key file '/no/such/key'",
        ),
        ([ZMQ], {"tls_server_name": "teacher.local"}, "secure gRPC (TLS), but no endpoint"),
        (["grpc://h:1"], {"tls_cert": "c.pem"}, "'tls_cert' (a client certificate) needs its private key"),
        (["grpc://h:1"], {"token": "t", "token_file": "f"}, "give 'token' or 'token_file', not both"),
    ],
)  # fmt: skip
def test_bad_credentials_name_the_option(
    endpoints: list[str], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as err:
        OnlineTeacher(endpoints, credentials=CredentialOptions(**options))
    assert message in str(err.value) and str(endpoints) in str(err.value), err.value


def test_options_are_configs_that_name_a_wrong_key_and_keep_secrets_out_of_repr() -> None:
    with pytest.raises(ValidationError, match="tokn"):
        CredentialOptions(tokn="x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="greater than 0"):
        TeacherTimeouts(request_timeout_s=0)
    options = CredentialOptions(token=b"t", tls_ca=Path("ca.pem"))
    with pytest.raises(ValidationError, match="frozen"):
        options.token = "other"  # refused at run time: the options are frozen
    assert options.token == b"t" and options.tls_ca == Path("ca.pem")  # kept as given
    secret = CredentialOptions(token="s3cret-token", curve_secret_key=SECRET)
    assert "s3cret-token" not in repr(secret) and SECRET not in repr(secret)


def test_a_certificate_without_its_secret_is_refused(keys: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"holds no secret key; give the \*\.key_secret file"):
        OnlineTeacher(
            ZMQ,
            credentials=CredentialOptions(
                curve_server_key=SERVER_KEY, curve_secret_key_file=keys["dir"] / "student.key"
            ),
        )


@pytest.mark.parametrize("source", ["certificate", "bare", "inline"])
def test_student_keys_from_a_file_or_inline(keys: dict[str, Any], source: str) -> None:
    secret: dict[str, Any] = {
        "certificate": {"curve_secret_key_file": keys["student_cert"]},
        "bare": {"curve_secret_key_file": keys["student_bare"]},
        "inline": {"curve_secret_key": keys["student_secret"]},
    }[source]
    # Replicas on both transports: CURVE applies to the ZeroMQ one, TLS to the gRPC one.
    options = CredentialOptions(
        tls_server_name="teacher.local",
        curve_server_key_file=keys["teacher_cert"],
        curve_public_key=keys["student_public"],
        **secret,
    )
    with OnlineTeacher(["grpc://127.0.0.1:1", ZMQ], credentials=options) as teacher:
        assert teacher.credentials == options
    c = options.build(["grpc://127.0.0.1:1", ZMQ])
    assert c.curve_server_key == keys["teacher_public"].encode()
    assert c.curve_public_key == keys["student_public"].encode()
    assert c.curve_secret_key == keys["student_secret"].encode()
    assert c.tls_server_name == "teacher.local"


def _config(teacher: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": {"train": DIGITS},
        "teachers": {"secure": teacher},
        "losses": {"terms": [{"name": "kd", "kind": "soft_label", "field": "logits"}]},
        "epochs": 1,
        "progress": False,
    }


@pytest.mark.parametrize(
    ("teacher", "key", "message"),
    [
        (
            {"endpoints": ["grpc://h:1"], "curve_server_key": SERVER_KEY},
            "teachers.secure",
            "['curve_server_key'] secure ZeroMQ (CURVE), but no endpoint is zmq://",
        ),
        (
            {"endpoints": [ZMQ], "curve_secret_key_file": "student.key_secret"},
            "teachers.secure",
            "give 'curve_server_key' (40-character z85) or 'curve_server_key_file'",
        ),
        (
            {"endpoints": [ZMQ], "curve_server_key": "tooshort"},
            "teachers.secure",
            "'curve_server_key': expected a 40-character z85 CURVE key, got 8 characters",
        ),
        (
            {"endpoints": [ZMQ], "tls_server_name": "teacher.local"},
            "teachers.secure",
            "['tls_server_name'] secure gRPC (TLS)",
        ),
        (  # secrets only from files: an inline secret key is not a key of the config
            {"endpoints": [ZMQ], "curve_server_key": SERVER_KEY, "curve_secret_key": SECRET},
            "teachers.secure.curve_secret_key",
            "Extra inputs are not permitted",
        ),
    ],
)
def test_teacher_config_errors_name_the_key(
    teacher: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(ValueError) as err:
        validate_config(_config(teacher), "cfg.yaml")
    assert f"key '{key}'" in str(err.value) and message in str(err.value), err.value


# -- a real teacher with a CURVE allow-list -----------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "teacher.safetensors", seed=7)


@pytest.fixture(scope="module")
def secure_teacher(keys: dict[str, Any], checkpoint: Path) -> Any:
    """A ZeroMQ-only teacher: token, CURVE, and only the student's key allowed in."""
    with start_teacher(
        SLOW,
        dataset=DIGITS,
        checkpoint=checkpoint,
        env=ENV,
        grpc=False,
        zmq=True,
        exit_after_s=120,
        extra_args=[
            "--model-kwargs", '{"delay_s": 0.0}',
            "--token-file", str(keys["dir"] / "token"),
            "--zmq-curve-secret-key", str(keys["teacher_secret_cert"]),
            "--zmq-curve-clients", str(keys["dir"] / "allowed.txt"),
        ],
    ) as server:  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> torch.Tensor:
    return reference_logits(checkpoint, digits("train"))  # the server's --dataset split


@pytest.mark.integration
def test_allowed_student_keys_reach_the_teacher(
    keys: dict[str, Any], secure_teacher: TeacherProcess, reference: torch.Tensor
) -> None:
    with OnlineTeacher(
        secure_teacher.endpoint("zmq"),
        mode="index",
        credentials=CredentialOptions(
            token=TOKEN,
            curve_server_key=keys["teacher_public"],
            curve_public_key=keys["student_public"],
            curve_secret_key=keys["student_secret"],
        ),
        timeouts=TeacherTimeouts(timeout_s=20),
    ) as teacher:
        batch = teacher.request([3, 1, 4])
    assert batch.sample_ids.tolist() == [3, 1, 4]
    torch.testing.assert_close(batch.tensors["logits"], reference[[3, 1, 4]])


@pytest.mark.integration
@pytest.mark.parametrize("student", ["stranger", "no key pair"])
def test_keys_outside_the_allow_list_are_refused(
    keys: dict[str, Any], secure_teacher: TeacherProcess, student: str
) -> None:
    """A stranger's key pair, or none (a fresh pair per connection): the teacher refuses the
    handshake, and the student says so at once instead of waiting for its timeout."""
    options: dict[str, Any] = {}
    if student == "stranger":
        public, secret = zmq.curve_keypair()
        options = {"curve_public_key": public, "curve_secret_key": secret}
    endpoint = secure_teacher.endpoint("zmq")
    with (
        OnlineTeacher(
            endpoint,
            mode="index",
            credentials=CredentialOptions(
                token=TOKEN, curve_server_key=keys["teacher_public"], **options
            ),
            timeouts=TeacherTimeouts(timeout_s=60, connect_timeout_s=30),
        ) as teacher,
        pytest.raises(TeacherError) as err,
    ):  # fmt: skip
        teacher.request([1])
    assert err.value.code == UNAUTHENTICATED
    assert endpoint in err.value.message and "CURVE" in err.value.message


@pytest.mark.integration
def test_a_yaml_teacher_config_builds_the_secure_teacher(
    tmp_path: Path, keys: dict[str, Any], secure_teacher: TeacherProcess, reference: torch.Tensor
) -> None:
    """The trainer's path: YAML -> TeacherConfig -> build_sources -> OnlineTeacher; the
    teacher's public key inline (quoted by the YAML writer), the student's in a file."""
    teacher = {
        "endpoints": [secure_teacher.endpoint("zmq")],
        "mode": "index",
        "token_file": str(keys["dir"] / "token"),
        "curve_server_key": keys["teacher_public"],
        "curve_secret_key_file": str(keys["student_cert"]),
        "timeout_s": 20,
    }
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(_config(teacher)))
    sources = build_sources(load_config(path))
    try:
        batch = sources["secure"].request([0, 9])  # type: ignore[attr-defined]
    finally:
        sources["secure"].close()
    torch.testing.assert_close(batch.tensors["logits"], reference[[0, 9]])


def test_a_teacher_closing_every_handshake_is_reported_with_the_curve_fix() -> None:
    """libzmq sometimes tells a CURVE mismatch only as handshakes "failed with no detail" (the
    teacher closed the connection first): a listener that reads each greeting and hangs up
    reproduces that on every connection. Three in a row fail the request at once, retryable
    (a TCP proxy whose teacher is down looks the same) and naming both causes, long before the
    30 s a silent teacher would take."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def hang_up() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(64)

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    endpoint = f"zmq://127.0.0.1:{listener.getsockname()[1]}"
    patient = TeacherTimeouts(timeout_s=30, connect_timeout_s=30)
    try:
        with (
            OnlineTeacher(endpoint, mode="index", timeouts=patient) as teacher,
            pytest.raises(TeacherError) as err,
        ):
            teacher.describe()
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()
    assert err.value.code == UNAVAILABLE, err.value.message
    message = err.value.message
    assert "closed 3 ZeroMQ handshakes in a row without a reason (E" in message  # EPIPE...
    assert "pass its public key as curve_server_key" in message
    assert "a TCP proxy whose teacher is down" in message


def _monitor_event(event: int, value: int) -> list[bytes]:
    """A socket monitor's message as libzmq sends it: event id and value, then the endpoint."""
    import struct

    return [struct.pack("=HI", event, value), b"tcp://127.0.0.1:1"]


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # A streak that a successful handshake then ends is no failure (the teacher is back).
        ([zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL] * 3 + [zmq.EVENT_HANDSHAKE_SUCCEEDED], None),
        ([zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL] * 2, None),
        ([zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL] * 3, UNAVAILABLE),
        # A refusal outranks what follows it, a success included.
        ([zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL], UNAUTHENTICATED),
        ([zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_SUCCEEDED], UNAUTHENTICATED),
    ],
)
def test_monitor_events_read_in_order_amount_to_one_failure(
    events: list[int], expected: int | None
) -> None:
    from lyceum.student_client._connections import Credentials
    from lyceum.student_client._zmq_connection import ZmqConnection

    connection = ZmqConnection("tcp://127.0.0.1:1", Credentials())
    sender = connection._ctx.socket(zmq.PAIR)
    receiver = connection._ctx.socket(zmq.PAIR)
    sender.bind("inproc://fake-monitor")
    receiver.connect("inproc://fake-monitor")
    real, connection._monitor = connection._monitor, receiver
    try:
        for event in events:
            sender.send_multipart(_monitor_event(event, 32))
        found = connection._monitor_events()
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
        connection._monitor = real
        connection.close()
    assert (None if found is None else found[0]) == expected, found
