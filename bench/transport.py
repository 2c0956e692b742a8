"""Knowledge throughput over loopback: Lyceum gRPC / ZeroMQ next to raw TCP, bare pyzmq and a
bare grpcio stream moving the same bytes, plus unix:// and ipc:// endpoints.

Three payloads: ~64 KB (16x1000 fp32 logits), ~1 MB (256x1000 fp32 logits) and 16 MiB
(8x2048x256 fp32 features). Every server runs in its own process; the client (this process)
keeps `--window` requests in flight and counts payload bytes received per second. The Lyceum
rows go through everything a student sees: `OnlineTeacher` (the client a trainer uses),
index-mode request, dynamic batcher, engine (a model returning a fixed tensor, so no
compute), Arrow encode, transport, Arrow decode.
Each figure is the median of `--repeats` runs; ratios are taken within this one run.

Two more rows per transport split Lyceum's cost between the two sides: "client share" is the
Lyceum client (request encode, reply decode to tensors, its threads) against a canned server
that answers every request with one precomputed valid reply (gRPC: behind a header with the
request's id) and does nothing else; "server
share" is the Lyceum server against a bare client that sends one precomputed valid request
per reply and never decodes. Each bounds what either side alone can reach.

    .venv/bin/python bench/transport.py                 # ~2 min on two cores
    .venv/bin/python bench/transport.py --cases 16MiB --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from lyceum.proto.codec import to_record_batch
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine

if TYPE_CHECKING:
    import grpc

CASES: dict[str, tuple[int, ...]] = {
    "64KB": (16, 1000),
    "1MB": (256, 1000),
    "16MiB": (8, 2048, 256),
}


def payload_bytes(case: str) -> int:
    n = 4
    for d in CASES[case]:
        n *= d
    return n


class FixedOutput(nn.Module):
    """Returns rows of one preallocated tensor: the engine's cost without any compute."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out = nn.Buffer(torch.randn(shape, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out[: len(x)]


class Ids(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Index-mode samples that cost nothing to load (one shared tensor)."""

    def __init__(self) -> None:
        self.x = torch.zeros(1)

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x, 0


# ---------------------------------------------------------------- servers (child processes)


def _announce(**info: object) -> None:
    print(json.dumps(info), flush=True)


def serve_raw_tcp(case: str) -> None:
    data = os.urandom(payload_bytes(case))
    lsock = socket.create_server(("127.0.0.1", 0))
    _announce(port=lsock.getsockname()[1])
    while True:  # one connection per run
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while conn.recv(1):
                conn.sendall(data)
        except ConnectionError:
            pass
        conn.close()


def serve_bare_zmq(case: str) -> None:
    import zmq

    data = os.urandom(payload_bytes(case))
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    _announce(port=port)
    while True:
        peer, rid = sock.recv_multipart()
        # A finished run's client leaves with requests in flight: its replies are unroutable.
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart([peer, rid, data], copy=False)


def _unlimited_grpc_server() -> grpc.Server:
    import grpc

    return grpc.server(
        ThreadPoolExecutor(4),
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )


def serve_bare_grpc(case: str) -> None:
    import grpc

    data = os.urandom(payload_bytes(case))

    def distill(requests: Iterator[bytes], _context: object) -> Iterator[bytes]:
        for _ in requests:
            yield data

    server = _unlimited_grpc_server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Bare", {"Distill": grpc.stream_stream_rpc_method_handler(distill)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _announce(port=port)
    server.wait_for_termination()


def _engine(case: str) -> TeacherEngine:
    shape = CASES[case]
    output = "features" if len(shape) == 3 else "logits"
    return TeacherEngine(
        FixedOutput(shape),
        EngineConfig(outputs=(OutputSpec(name=output, source="@output"),)),
        torch.zeros(1),
    )


def serve_lyceum(case: str, workdir: str) -> None:
    from lyceum.teacher_server.config import ServerConfig
    from lyceum.teacher_server.server import create_server

    shape = CASES[case]
    engine = _engine(case)
    config = ServerConfig(
        grpc_port=0,
        zmq_port=0,
        grpc_unix=Path(workdir) / "grpc.sock",
        zmq_ipc=Path(workdir) / "zmq.ipc",
        max_batch=shape[0],
        max_delay_ms=0.0,
    )
    server, _ports = create_server(config, [engine], Ids())
    server.start()
    _announce(endpoints=server.endpoints)
    server.wait()


def _canned_knowledge(case: str) -> tuple[TeacherEngine, pa.RecordBatch]:
    shape = CASES[case]
    engine = _engine(case)
    columns = engine.infer(torch.zeros(shape[0], 1))
    ids = np.arange(shape[0], dtype=np.uint64)
    return engine, to_record_batch(engine.schema, ids, columns)


def serve_canned_grpc(case: str) -> None:
    """Answers Describe like a teacher and every Distill request with one fixed reply."""
    import grpc

    from lyceum.proto import wire
    from lyceum.proto.codec import to_ipc
    from lyceum.teacher_server.transport.grpc import SERVICE
    from lyceum.v1 import knowledge_pb2 as pb

    engine, batch = _canned_knowledge(case)
    body = to_ipc(batch).to_pybytes()  # what follows a reply's header
    size = len(body)
    describe = _describe_reply(engine)

    def distill(requests: Iterator[bytes], _context: object) -> Iterator[bytes]:
        # The reply echoes the request's id (the client matches replies by it): one join.
        for raw in requests:
            yield wire.knowledge_header(wire.decode_request(raw).request_id, size) + body

    server = _unlimited_grpc_server()
    handlers = {
        "Distill": grpc.stream_stream_rpc_method_handler(distill),
        "Describe": grpc.unary_unary_rpc_method_handler(
            lambda _r, _c: describe,
            request_deserializer=pb.DescribeRequest.FromString,
            response_serializer=pb.DescribeReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _announce(endpoint=f"grpc://127.0.0.1:{port}")
    server.wait_for_termination()


def serve_canned_zmq(case: str) -> None:
    import zmq

    from lyceum.proto import zmq_frames
    from lyceum.proto.codec import to_ipc

    engine, batch = _canned_knowledge(case)
    knowledge = to_ipc(batch)
    describe = _describe_reply(engine).SerializeToString()
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    _announce(endpoint=f"zmq://127.0.0.1:{port}")
    while True:
        # Frames passed back as received (no copies), the request not parsed: canned.
        peer, rid, kind, _payload = sock.recv_multipart(copy=False)
        if kind.bytes == zmq_frames.KIND_DESCRIBE:
            out = zmq_frames.describe_reply(peer, rid, describe)
        else:
            out = zmq_frames.knowledge_reply(peer, rid, knowledge)
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart(out, copy=False)


def _describe_reply(engine: TeacherEngine) -> object:
    from lyceum.proto.schema import FORMAT_VERSION
    from lyceum.v1 import knowledge_pb2 as pb

    return pb.DescribeReply(
        format_version=FORMAT_VERSION,
        knowledge_schema_json=engine.schema.to_json(),
        input_schema_json=engine.input_schema.to_json(),
        teacher_id="canned",
        accepts_index=True,
        max_request_samples=1 << 16,
        max_message_bytes=1 << 30,
    )


# ---------------------------------------------------------------- clients (this process)


def run_raw_tcp(info: dict, case: str, seconds: float, window: int) -> float:
    size = payload_bytes(case)
    sock = socket.create_connection(("127.0.0.1", info["port"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(size))
    sock.sendall(b"x" * window)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        got = 0
        while got < size:
            got += sock.recv_into(buf[got:], size - got)
        count += 1
        sock.sendall(b"x")
    elapsed = time.perf_counter() - start
    sock.close()
    return count * size / elapsed


def run_bare_zmq(info: dict, case: str, seconds: float, window: int) -> float:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{info['port']}")
    for i in range(window):
        sock.send(i.to_bytes(8, "little"))
    count, nbytes, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        frames = sock.recv_multipart(copy=False)
        nbytes += len(frames[1].buffer)
        count += 1
        sock.send(count.to_bytes(8, "little"))
    elapsed = time.perf_counter() - start
    sock.close(linger=0)
    ctx.term()
    return nbytes / elapsed


def run_bare_grpc(info: dict, case: str, seconds: float, window: int) -> float:
    import grpc

    channel = grpc.insecure_channel(
        f"127.0.0.1:{info['port']}", options=[("grpc.max_receive_message_length", -1)]
    )
    tokens: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    for _ in range(window):
        tokens.put(b"x")

    def requests() -> Iterator[bytes]:
        while (t := tokens.get()) is not None:
            yield t

    call = channel.stream_stream("/bench.Bare/Distill")(requests())
    nbytes, start = 0, time.perf_counter()
    for reply in call:
        nbytes += len(reply)
        if time.perf_counter() - start >= seconds:
            break
        tokens.put(b"x")
    elapsed = time.perf_counter() - start
    tokens.put(None)
    call.cancel()
    channel.close()
    return nbytes / elapsed


def _index_request_ids(case: str) -> np.ndarray:
    return np.arange(CASES[case][0], dtype=np.uint64)


def run_bare_against_grpc(endpoint: str, case: str, seconds: float, window: int) -> float:
    """The bare grpcio client loop sending one valid index request, never decoding."""
    import grpc

    from lyceum.proto import wire
    from lyceum.teacher_server.transport.grpc import SERVICE

    request = wire.encode_request(1, ids=_index_request_ids(case))
    channel = grpc.insecure_channel(
        endpoint.removeprefix("grpc://"), options=[("grpc.max_receive_message_length", -1)]
    )
    tokens: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    for _ in range(window):
        tokens.put(request)
    call = channel.stream_stream(f"/{SERVICE}/Distill")(iter(tokens.get, None))
    nbytes, start = 0, time.perf_counter()
    for reply in call:
        nbytes += len(reply)
        if time.perf_counter() - start >= seconds:
            break
        tokens.put(request)
    elapsed = time.perf_counter() - start
    tokens.put(None)
    call.cancel()
    channel.close()
    return nbytes / elapsed


def run_bare_against_zmq(endpoint: str, case: str, seconds: float, window: int) -> float:
    """The bare pyzmq client loop sending one valid index request, never decoding."""
    import zmq

    from lyceum.proto import zmq_frames

    # Built once: each request differs only in its id frame.
    _rid, *request = zmq_frames.index_request(0, _index_request_ids(case), None)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint.replace("zmq://", "tcp://"))
    for i in range(window):
        sock.send_multipart([zmq_frames.request_id_frame(i), *request])
    count, nbytes, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        frames = sock.recv_multipart(copy=False)
        nbytes += len(frames[-1].buffer)
        count += 1
        sock.send_multipart([zmq_frames.request_id_frame(count), *request])
    elapsed = time.perf_counter() - start
    # Let the requests in flight finish so the next run starts on an idle server.
    while sock.poll(200):
        sock.recv_multipart()
    sock.close(linger=0)
    ctx.term()
    return nbytes / elapsed


def run_lyceum(endpoint: str, case: str, seconds: float, window: int) -> float:
    """The student's client (`OnlineTeacher`, index mode) keeping `window` requests in flight."""
    from lyceum.student_client.sources import OnlineTeacher

    # The same ids every time (the canned servers' one reply holds them); any ids cost the
    # Lyceum server the same.
    ids = torch.arange(CASES[case][0])
    with OnlineTeacher(endpoint, mode="index") as teacher:
        teacher.describe()
        next_id = 0

        def submit() -> None:
            nonlocal next_id
            teacher.submit(next_id, ids)
            next_id += 1

        for _ in range(window):
            submit()
        nbytes, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _rid, batch in teacher.poll(10):
                nbytes += sum(t.numel() * t.element_size() for t in batch.tensors.values())
                submit()
        elapsed = time.perf_counter() - start
        # Let the last requests finish so the next run starts on an idle server.
        end = time.monotonic() + 30
        while time.monotonic() < end and teacher.outstanding():
            teacher.poll(0.2)
    return nbytes / elapsed


# ---------------------------------------------------------------- orchestration


def _start(role: str, case: str, workdir: str) -> tuple[subprocess.Popen[str], dict]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", role, "--case", case, "--workdir", workdir],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{role} server for {case} did not start")
    return proc, json.loads(line)


def measure(case: str, seconds: float, repeats: int, window: int) -> dict[str, float]:
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        servers = {
            role: _start(role, case, workdir)
            for role in ("raw-tcp", "bare-zmq", "bare-grpc", "lyceum", "canned-zmq", "canned-grpc")
        }
        try:
            endpoints = {e.split("://")[0]: e for e in servers["lyceum"][1]["endpoints"]}
            runs: dict[str, Callable[[], float]] = {
                "raw TCP": lambda: run_raw_tcp(servers["raw-tcp"][1], case, seconds, window),
                "bare pyzmq": lambda: run_bare_zmq(servers["bare-zmq"][1], case, seconds, window),
                "bare grpcio": lambda: run_bare_grpc(
                    servers["bare-grpc"][1], case, seconds, window
                ),
                "Lyceum ZMQ tcp": lambda: run_lyceum(endpoints["zmq"], case, seconds, window),
                "Lyceum gRPC tcp": lambda: run_lyceum(endpoints["grpc"], case, seconds, window),
                "Lyceum ZMQ ipc://": lambda: run_lyceum(endpoints["ipc"], case, seconds, window),
                "Lyceum gRPC unix://": lambda: run_lyceum(endpoints["unix"], case, seconds, window),
                "ZMQ client share": lambda: run_lyceum(
                    servers["canned-zmq"][1]["endpoint"], case, seconds, window
                ),
                "ZMQ server share": lambda: run_bare_against_zmq(
                    endpoints["zmq"], case, seconds, window
                ),
                "gRPC client share": lambda: run_lyceum(
                    servers["canned-grpc"][1]["endpoint"], case, seconds, window
                ),
                "gRPC server share": lambda: run_bare_against_grpc(
                    endpoints["grpc"], case, seconds, window
                ),
            }
            # Interleaved, so a slow moment of the machine hits every path alike.
            for _ in range(repeats):
                for name, run in runs.items():
                    results.setdefault(name, []).append(run())
        finally:
            for proc, _info in servers.values():
                proc.kill()
                proc.wait()
    return {name: statistics.median(v) for name, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seconds", type=float, default=1.5, help="length of one run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=4, help="requests in flight")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.serve:
        servers = {
            "raw-tcp": serve_raw_tcp,
            "bare-zmq": serve_bare_zmq,
            "bare-grpc": serve_bare_grpc,
            "canned-zmq": serve_canned_zmq,
            "canned-grpc": serve_canned_grpc,
        }
        if args.serve == "lyceum":
            serve_lyceum(args.case, args.workdir)
        else:
            servers[args.serve](args.case)
        return
    print(
        f"loopback throughput, GB/s (median of {args.repeats} runs of {args.seconds}s, window {args.window})"
    )
    header = f"{'payload':>8} | {'path':<20} | {'GB/s':>6} | {'x raw TCP':>9} | {'x bare':>7}"
    print(header)
    print("-" * len(header))
    for case in args.cases:
        r = measure(case, args.seconds, args.repeats, args.window)
        raw = r["raw TCP"]
        bare = {"ZMQ": r["bare pyzmq"], "gRPC": r["bare grpcio"]}
        for name, value in r.items():
            kind = (
                "ZMQ"
                if "ZMQ" in name or "pyzmq" in name
                else "gRPC"
                if "gRPC" in name or "grpcio" in name
                else ""
            )
            mine = name.startswith("Lyceum") or name.endswith("share")
            vs_bare = f"{value / bare[kind]:7.2f}" if mine else f"{'':>7}"
            print(f"{case:>8} | {name:<20} | {value / 1e9:6.2f} | {value / raw:9.2f} | {vs_bare}")
        print("-" * len(header))


if __name__ == "__main__":
    main()
