"""One real teacher server process on every transport: exact knowledge, concurrency, bad input.

The server serves the seeded teacher_cnn on gRPC (TCP and unix socket) and ZeroMQ (TCP and
ipc), with the digits train split for index mode. Its replies are compared bit for bit with
the same engine run in this process on the same ids. Students reach it the way a trainer
does, through `OnlineTeacher`; malformed input goes through raw clients.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from lyceum.deploy.examples import digits
from lyceum.proto import wire, zmq_frames
from lyceum.proto.codec import KnowledgeBatch, encode
from lyceum.proto.errors import FAILED_PRECONDITION, INVALID_ARGUMENT
from lyceum.proto.schema import KnowledgeSchema, dense
from lyceum.student_client import OnlineTeacher, TeacherError, TeacherTimeouts
from lyceum.student_client.online import Mode
from tests._support.servers import RawGrpc, RawZmq, ServerProcess
from tests._support.teachers import DIGITS, MODEL, reference_engine, save_checkpoint

pytestmark = pytest.mark.integration

MAX_MESSAGE = 1 << 20
TIMEOUTS = TeacherTimeouts(timeout_s=30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "teacher.safetensors", width=32)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return reference_engine(checkpoint, width=32)


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    work = tmp_path_factory.mktemp("server")
    proc = ServerProcess(
        [
            "--model", MODEL, "--checkpoint", str(checkpoint), "--dataset", DIGITS,
            "--grpc-port", "0", "--zmq-port", "0", "--metrics-port", "0",
            "--grpc-unix", str(work / "grpc.sock"), "--zmq-ipc", str(work / "zmq.ipc"),
            "--max-batch", "32", "--max-delay-ms", "2", "--max-message-bytes", str(MAX_MESSAGE),
        ],
        work,
    )  # fmt: skip
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def query_server(tmp_path_factory, checkpoint):
    """A teacher without a dataset: query mode only."""
    work = tmp_path_factory.mktemp("query")
    proc = ServerProcess(
        ["--model", MODEL, "--checkpoint", str(checkpoint), "--input-shape", "1,8,8",
         "--grpc-port", "0", "--zmq-port", "0"],
        work,
    )  # fmt: skip
    yield proc
    assert proc.terminate() == 0, proc.log()


SCHEMES = ["grpc", "unix", "zmq", "ipc"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", ["query", "index"])
def test_knowledge_equals_in_process_engine(server, engine, scheme, mode: Mode):
    data = digits()
    ids = [5, 0, 1256, 17, 3]
    x = torch.stack([data[i][0] for i in ids])
    want = engine.infer(x)["logits"]
    with OnlineTeacher(server.endpoint(scheme), mode=mode, timeouts=TIMEOUTS) as teacher:
        info = teacher.describe()
        assert info.schema == engine.schema and info.input_schema == engine.input_schema
        assert info.accepts_index and info.max_request_samples == 32
        got = teacher.request(ids, inputs=x if mode == "query" else None)
    assert got.sample_ids.tolist() == ids
    assert got.tensors["logits"].dtype == torch.float32
    assert torch.equal(got.tensors["logits"], want)  # bit for bit
    # Zero-copy views of the received message, aligned (gRPC pads its header for that).
    assert got.tensors["logits"].data_ptr() % 8 == 0


def test_eight_concurrent_clients_get_their_own_replies(server, engine):
    data = digits()
    everything = engine.infer(torch.stack([data[i][0] for i in range(len(data))]))["logits"]
    errors: list[str] = []

    def student(k: int) -> None:
        rng = random.Random(k)
        scheme = SCHEMES[k % len(SCHEMES)]
        mode: Mode = "index" if k < 4 else "query"  # both modes on every endpoint
        timeouts = TeacherTimeouts(timeout_s=60)
        with OnlineTeacher(server.endpoint(scheme), mode=mode, timeouts=timeouts) as teacher:
            sent: dict[int, list[int]] = {}
            todo, done = 12, 0
            while done < 12:
                # Three requests in flight per student: 8 x 3 x 8 samples fit the queue.
                while todo and len(sent) - done < 3:
                    ids = rng.sample(range(len(data)), 8)
                    inputs = torch.stack([data[i][0] for i in ids]) if mode == "query" else None
                    rid = len(sent)
                    sent[rid] = ids
                    teacher.submit(rid, torch.tensor(ids), inputs)
                    todo -= 1
                try:
                    replies = teacher.poll(30)
                except TeacherError as exc:
                    errors.append(f"client {k}: {exc}")
                    return
                if not replies:
                    errors.append(f"client {k}: {done} of 12 replies, then none in 30 s")
                    return
                for rid, batch in replies:
                    done += 1
                    ids = sent[rid]
                    if batch.sample_ids.tolist() != ids:
                        errors.append(f"client {k} request {rid}: ids {batch.sample_ids} != {ids}")
                    # Other students' samples share the device batch: allow float rounding.
                    elif not torch.allclose(batch.tensors["logits"], everything[ids], atol=1e-5):
                        errors.append(f"client {k} request {rid}: wrong knowledge for {ids}")

    before = server.metrics()
    threads = [threading.Thread(target=student, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    after = server.metrics()
    # The module's server is shared: count what this test sent, not what it has seen.
    samples = after["lyceum_teacher_batch_size_sum"] - before["lyceum_teacher_batch_size_sum"]
    batches = after["lyceum_teacher_batch_size_count"] - before["lyceum_teacher_batch_size_count"]
    assert samples == 8 * 12 * 8  # every sample went through one device batch, once
    # Concurrent requests share device batches of at most --max-batch 32 samples.
    assert 8 * 12 * 8 / 32 <= batches < 8 * 12


def test_two_engines_answer_both_transports(tmp_path, checkpoint, engine):
    # Two --device values: the batcher's worker threads run every batch (a transport thread
    # must keep receiving for the other engine) and hand replies back across threads.
    proc = ServerProcess(
        ["--model", MODEL, "--checkpoint", str(checkpoint), "--dataset", DIGITS,
         "--device", "cpu", "--device", "cpu", "--grpc-port", "0", "--zmq-port", "0",
         "--max-batch", "8", "--max-delay-ms", "0"],
        tmp_path,
    )  # fmt: skip
    data = digits()
    try:
        for scheme in ("grpc", "zmq"):
            with OnlineTeacher(proc.endpoint(scheme), mode="index", timeouts=TIMEOUTS) as teacher:
                for k in range(12):
                    teacher.submit(k, torch.arange(4 * k, 4 * k + 4))
                got: dict[int, KnowledgeBatch] = {}
                while len(got) < 12:
                    replies = teacher.poll(30)
                    assert replies, f"{scheme}: {len(got)} of 12 replies in 30 s"
                    got.update(replies)
            for k in range(12):
                batch = got[k]
                ids = list(range(4 * k, 4 * k + 4))
                want = engine.infer(torch.stack([data[i][0] for i in ids]))["logits"]
                assert batch.sample_ids.tolist() == ids
                assert torch.allclose(batch.tensors["logits"], want, atol=1e-5)
    finally:
        assert proc.terminate() == 0, proc.log()


def _inputs(schema: KnowledgeSchema, ids: list[int], x: torch.Tensor) -> bytes:
    return encode(schema, ids, {schema.fields[0].name: x}).to_pybytes()


def bad_inputs(engine) -> dict[str, tuple[bytes, str]]:
    """Query payloads that must be refused, with a phrase the error must contain."""
    good_schema = engine.input_schema
    fp16 = KnowledgeSchema(fields=(dense("input", "float16", (1, 8, 8)),))
    wide = KnowledgeSchema(fields=(dense("input", "float32", (1, 8, 9)),))
    other = KnowledgeSchema(fields=(dense("pixels", "float32", (1, 8, 8)),))
    valid = _inputs(good_schema, [0], torch.zeros(1, 1, 8, 8))
    return {
        "wrong dtype": (
            _inputs(fp16, [0], torch.zeros(1, 1, 8, 8, dtype=torch.float16)),
            "float16",
        ),
        "wrong shape": (_inputs(wide, [0], torch.zeros(1, 1, 8, 9)), "[1, 8, 9]"),
        "missing column": (_inputs(other, [0], torch.zeros(1, 1, 8, 8)), "missing ['input']"),
        "garbage": (bytes(range(256)) * 4, "not a valid Arrow IPC stream"),
        "truncated": (valid[: len(valid) // 2], "Arrow"),
        "oversized": (b"\0" * (MAX_MESSAGE + 1), f"exceed the limit of {MAX_MESSAGE}"),
        "too many samples": (
            _inputs(good_schema, list(range(40)), torch.zeros(40, 1, 8, 8)),
            "limit of 32",
        ),
    }


@pytest.mark.parametrize("transport", ["grpc", "zmq"])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(server, engine, transport):
    cases = bad_inputs(engine)
    names = list(cases)
    got: dict[int | bytes, tuple[int, str]]  # b"short" (below): no request id to read
    if transport == "grpc":
        raw = RawGrpc(server.endpoint("grpc"))
        messages = [wire.encode_request(i + 1, inputs=cases[n][0]) for i, n in enumerate(names)]
        messages += [
            wire.encode_request(100, ids=[5000]),  # out of range
            b"\x08\x65",  # request 101 with neither inputs nor ids
            b"\xff\xff\xff",  # not protobuf at all
        ]
        replies = {r.request_id: r for r in map(wire.decode_reply, raw.exchange(messages))}
        raw.close()
        got = {rid: (r.error_code, r.error_message) for rid, r in replies.items()}
    else:
        raw_z = RawZmq(server.endpoint("zmq"))
        rid = zmq_frames.request_id_frame
        query, index = zmq_frames.KIND_QUERY, zmq_frames.KIND_INDEX
        frames_out = [[rid(i + 1), query, cases[n][0]] for i, n in enumerate(names)]
        frames_out += [
            [rid(100), index, np.array([5000], "<u8").tobytes()],
            [rid(101), b"bogus", b""],
            [rid(102), index, b"\x01\x02\x03"],
            [b"short", index, b""],
            [rid(104)],
        ]
        out = raw_z.exchange(frames_out)
        raw_z.close()
        got = {}
        for frames in out:
            assert frames[1] == zmq_frames.KIND_ERROR, frames[:2]
            key = int.from_bytes(frames[0], "little") if len(frames[0]) == 8 else frames[0]
            got[key] = (int(frames[2]), frames[3].decode())
        assert got[102] == (INVALID_ARGUMENT, got[102][1]) and "uint64" in got[102][1]
        assert got[b"short"][0] == INVALID_ARGUMENT and "8 bytes" in got[b"short"][1]
        assert got[104][0] == INVALID_ARGUMENT and "frames" in got[104][1]
    for i, name in enumerate(names):
        code, message = got[i + 1]
        assert code == INVALID_ARGUMENT, (name, message)
        assert cases[name][1] in message, (name, message)
    assert got[100][0] == INVALID_ARGUMENT and "out of range" in got[100][1]
    assert got[101][0] == INVALID_ARGUMENT
    assert ("neither" if transport == "grpc" else "unknown request kind") in got[101][1]
    # ... and the teacher still answers a valid request.
    with OnlineTeacher(server.endpoint(transport), mode="index", timeouts=TIMEOUTS) as teacher:
        assert teacher.request([7]).sample_ids.tolist() == [7]


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_index_mode_without_dataset_is_failed_precondition(query_server, engine, scheme):
    endpoint = query_server.endpoint(scheme)
    # A student in index mode learns it from Describe, before it asks anything.
    with (
        OnlineTeacher(endpoint, mode="index", timeouts=TIMEOUTS) as teacher,
        pytest.raises(ValueError, match="has no dataset, so it cannot serve mode='index'"),
    ):
        teacher.describe()
    # Asked by ids anyway, the teacher refuses.
    with OnlineTeacher(endpoint, mode="query", timeouts=TIMEOUTS) as teacher:
        assert not teacher.describe().accepts_index
        with pytest.raises(TeacherError) as err:
            teacher.request([1, 2])
        assert err.value.code == FAILED_PRECONDITION and "--dataset" in err.value.message
        x = torch.rand(2, 1, 8, 8)
        assert torch.equal(
            teacher.request([1, 2], inputs=x).tensors["logits"], engine.infer(x)["logits"]
        )


def _mutations(valid: bytes, rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        data = bytearray(valid)
        op = rng.randrange(4)
        if op == 0:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:  # truncate
            data = data[: rng.randrange(len(data))]
        elif op == 2:  # insert junk
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 64))
        else:  # random bytes
            data = bytearray(rng.randbytes(rng.randint(0, 2048)))
        out.append(bytes(data))
    return out


@pytest.mark.parametrize("transport", ["grpc", "zmq"])
def test_fuzz_does_not_crash_or_leak(server, engine, transport):
    rng = random.Random(1234 if transport == "grpc" else 4321)
    arrow = _inputs(engine.input_schema, [1, 2, 3], torch.rand(3, 1, 8, 8))
    n = 2200
    rss_before = None
    for round_ in range(2):
        payloads = _mutations(arrow, rng, n // 2)
        if transport == "grpc":
            envelope = wire.encode_request(9, inputs=arrow)
            messages = [wire.encode_request(i, inputs=p) for i, p in enumerate(payloads)]
            messages += _mutations(envelope, rng, n // 2 - len(messages) + len(payloads))
            raw = RawGrpc(server.endpoint("grpc"))
            replies = raw.exchange(messages)
            raw.close()
            assert len(replies) == len(messages)  # one reply per message, none dropped
        else:
            kinds = [
                zmq_frames.KIND_QUERY,
                zmq_frames.KIND_INDEX,
                zmq_frames.KIND_DESCRIBE,
                b"bogus",
                b"",
            ]
            messages_z = []
            for i, p in enumerate(payloads):
                frames = [zmq_frames.request_id_frame(i), rng.choice(kinds), p]
                if rng.random() < 0.1:
                    frames = frames[: rng.randint(1, 3)] + [
                        rng.randbytes(rng.randint(0, 9))
                    ] * rng.randint(0, 3)
                messages_z.append(frames)
            raw_z = RawZmq(server.endpoint("zmq"))
            assert len(raw_z.exchange(messages_z)) == len(messages_z)
            raw_z.close()
        if round_ == 0:
            rss_before = server.rss_kb()
    assert server.proc.poll() is None, server.log()
    # The second half of the fuzzing must not have grown the server by more than 64 MiB.
    assert server.rss_kb() - rss_before < 64 * 1024
    with OnlineTeacher(server.endpoint(transport), timeouts=TIMEOUTS) as teacher:
        x = torch.rand(2, 1, 8, 8)
        got = teacher.request([1, 2], inputs=x)
    assert torch.equal(got.tensors["logits"], engine.infer(x)["logits"])


def test_metrics_count_requests_samples_and_errors(server):
    index_grpc = 'lyceum_teacher_samples_total{mode="index",transport="grpc"}'
    invalid_zmq = 'lyceum_teacher_errors_total{code="INVALID_ARGUMENT",transport="zmq"}'
    latency = "lyceum_teacher_request_latency_seconds_count"
    # The module's server is shared: a series this test is the first to touch is absent.
    before = server.metrics()
    with OnlineTeacher(server.endpoint("grpc"), mode="index", timeouts=TIMEOUTS) as teacher:
        assert teacher.request([3, 1, 4, 5, 9]).sample_ids.tolist() == [3, 1, 4, 5, 9]
    raw = RawZmq(server.endpoint("zmq"))
    rid, index = zmq_frames.request_id_frame, zmq_frames.KIND_INDEX
    out = raw.exchange([[rid(i), index, b"\x01\x02\x03"] for i in range(10)])
    raw.close()
    assert [f[1] for f in out] == [zmq_frames.KIND_ERROR] * 10
    metrics = server.metrics()
    assert metrics[index_grpc] - before.get(index_grpc, 0) == 5
    assert metrics[invalid_zmq] - before.get(invalid_zmq, 0) == 10
    assert metrics[latency] - before.get(latency, 0) == 1  # refused requests reach no engine
    assert metrics["lyceum_teacher_queue_samples"] == 0  # nothing left waiting


def test_health_and_reflection_are_served(server):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.endpoint("grpc").removeprefix("grpc://")) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="lyceum.v1.Teacher"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
    assert {"lyceum.v1.Teacher", "grpc.health.v1.Health"} <= names
