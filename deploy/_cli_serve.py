"""`lyceum teacher serve`: serve a model's knowledge online over gRPC and/or ZeroMQ."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import torch

from lyceum.deploy._engine_args import add_model_args, build_dataset, build_engine, model_spec
from lyceum.proto.codec import TORCH_DTYPES
from lyceum.proto.specs import file_sha256
from lyceum.teacher_server.config import SecurityConfig, ServerConfig
from lyceum.teacher_server.server import serve


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input-shape {text!r}: expected integers like 1,8,8"
        ) from None
    if not shape or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: dimensions must be positive")
    return shape


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="serve knowledge online (gRPC and/or ZeroMQ) with dynamic batching",
        description="Serve a teacher's knowledge to students. Binds 127.0.0.1 unless --host says "
        "otherwise; prints a 'lyceum teacher serving {json}' line with the bound ports.",
    )
    add_model_args(p, dataset_required=False)
    i = p.add_argument_group("inputs (query mode, when there is no --dataset)")
    i.add_argument("--input-shape", type=_shape, metavar="D,D,...", help="per-sample input shape")
    i.add_argument("--input-dtype", choices=sorted(TORCH_DTYPES), default="float32")
    e = p.add_argument_group("endpoints")
    e.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    e.add_argument("--grpc-port", type=int, metavar="P", help="gRPC port (0 = any free port)")
    e.add_argument("--zmq-port", type=int, metavar="Q", help="ZeroMQ port (0 = any free port)")
    e.add_argument(
        "--grpc-unix", type=Path, metavar="PATH", help="also serve gRPC on a unix socket"
    )
    e.add_argument(
        "--zmq-ipc", type=Path, metavar="PATH", help="also serve ZeroMQ on an ipc socket"
    )
    e.add_argument("--metrics-port", type=int, metavar="P", help="Prometheus metrics HTTP port")
    b = p.add_argument_group("batching and limits")
    b.add_argument(
        "--device", action="append", metavar="D", help="repeatable: one engine per device"
    )
    b.add_argument("--max-batch", type=int, default=64, metavar="N")
    b.add_argument("--max-delay-ms", type=float, default=2.0, metavar="T")
    b.add_argument("--max-queue-samples", type=int, metavar="N")
    b.add_argument("--max-message-bytes", type=int, metavar="B")
    b.add_argument(
        "--grpc-max-calls",
        type=int,
        default=1024,
        metavar="N",
        help="gRPC calls open at once (a student's stream is one); more get RESOURCE_EXHAUSTED",
    )
    b.add_argument(
        "--threads", type=int, metavar="N", help="torch intra-op threads of this process"
    )
    s = p.add_argument_group("security")
    s.add_argument("--token-file", type=Path, metavar="PATH", help="require this bearer token")
    s.add_argument("--tls-cert", type=Path, metavar="PEM")
    s.add_argument("--tls-key", type=Path, metavar="PEM")
    s.add_argument(
        "--tls-client-ca", type=Path, metavar="PEM", help="mutual TLS: trusted client CA"
    )
    s.add_argument("--zmq-curve-secret-key", type=Path, metavar="PATH")
    s.add_argument("--zmq-curve-clients", type=Path, metavar="PATH", help="allowed client keys")
    lc = p.add_argument_group("lifecycle")
    lc.add_argument("--grace-s", type=float, default=10.0, help="drain time on SIGTERM")
    lc.add_argument(
        "--exit-after-s", type=float, metavar="S", help="drain and exit after S seconds"
    )
    lc.add_argument("--ready-file", type=Path, metavar="PATH", help="write bound endpoints as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = build_dataset(args)
    if dataset is not None and len(dataset) > 0:  # type: ignore[arg-type]
        example = torch.as_tensor(dataset[0][0])
    elif args.input_shape is not None:
        example = torch.zeros(args.input_shape, dtype=TORCH_DTYPES[args.input_dtype])
    else:
        raise ValueError(
            "the teacher needs an example input to learn its input schema: give --dataset, or "
            "--input-shape (e.g. 1,8,8) and --input-dtype for query mode"
        )
    engines = [build_engine(args, device, example) for device in (args.device or ["cpu"])]
    teacher_id = f"{model_spec(args)} on {socket.gethostname()}"
    if args.checkpoint:
        teacher_id += f" checkpoint sha256:{file_sha256(args.checkpoint)}"
    config = ServerConfig(
        host=args.host,
        grpc_port=args.grpc_port,
        zmq_port=args.zmq_port,
        grpc_unix=args.grpc_unix,
        zmq_ipc=args.zmq_ipc,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        max_queue_samples=args.max_queue_samples,
        max_message_bytes=args.max_message_bytes,
        grpc_max_calls=args.grpc_max_calls,
        security=SecurityConfig(
            token_file=args.token_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            zmq_curve_secret_key=args.zmq_curve_secret_key,
            zmq_curve_clients=args.zmq_curve_clients,
        ),
        metrics_port=args.metrics_port,
        grace_s=args.grace_s,
        exit_after_s=args.exit_after_s,
        ready_file=args.ready_file,
        teacher_id=teacher_id,
    )
    return serve(config, engines, dataset)
