"""`lyceum teacher serve`: serve a model's knowledge online over gRPC and/or ZeroMQ.

Thin: builds the dataset, engines and config from the options, then calls
`lyceum.teacher_server.serve`, its Python equivalent.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

import torch

from lyceum.deploy._engine_args import (
    add_model_args,
    build_dataset,
    build_engine,
    engine_config,
    model_spec,
)
from lyceum.proto.checksum import file_sha256
from lyceum.proto.codec import TORCH_DTYPES
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import model_identity
from lyceum.teacher_server.config import LOOPBACK, SecurityConfig, ServerConfig
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


def _default(name: str) -> Any:
    """ServerConfig's default for a field: the help shows the library's own value."""
    return ServerConfig.model_fields[name].default


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="serve knowledge online (gRPC and/or ZeroMQ) with dynamic batching",
        description="Serve a teacher's knowledge to students. Binds 127.0.0.1 unless --host says "
        "otherwise; prints a 'lyceum teacher serving {json}' line with the bound ports.",
    )
    add_model_args(p, dataset_required=False)
    i = p.add_argument_group("inputs (query mode, when there is no --dataset)")
    i.add_argument(
        "--input-shape",
        type=_shape,
        metavar="D,D,...",
        help="Shape of one input sample, e.g. 1,8,8; needed without --dataset, whose first "
        "item gives it otherwise (default: none).",
    )
    i.add_argument(
        "--input-dtype",
        choices=sorted(TORCH_DTYPES),
        default="float32",
        help="The dtype of the inputs students send with --input-shape (default: %(default)s).",
    )
    e = p.add_argument_group("endpoints")
    e.add_argument(
        "--host",
        default=LOOPBACK,
        help="Address the TCP ports bind, e.g. 0.0.0.0 for every interface; a non-loopback "
        "host needs credentials (see security) or --insecure (default: %(default)s, this "
        "machine only).",
    )
    e.add_argument(
        "--grpc-port",
        type=int,
        metavar="P",
        help="Serve gRPC on TCP port P; 0 picks a free port (default: no gRPC on TCP).",
    )
    e.add_argument(
        "--zmq-port",
        type=int,
        metavar="Q",
        help="Serve ZeroMQ on TCP port Q; 0 picks a free port (default: no ZeroMQ on TCP).",
    )
    e.add_argument(
        "--grpc-unix",
        type=Path,
        metavar="PATH",
        help="Also serve gRPC on a unix socket at PATH, for students on this machine "
        "(default: none).",
    )
    e.add_argument(
        "--zmq-ipc",
        type=Path,
        metavar="PATH",
        help="Also serve ZeroMQ on an ipc socket at PATH, for students on this machine "
        "(default: none).",
    )
    e.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="Serve Prometheus metrics at http://HOST:P/metrics; 0 picks a free port "
        "(default: no metrics endpoint).",
    )
    b = p.add_argument_group("batching and limits")
    b.add_argument(
        "--device",
        action="append",
        metavar="D",
        help="Run one engine (a copy of the model) on device D: cpu, cuda or cuda:N; repeat "
        "for several devices (default: cpu).",
    )
    b.add_argument(
        "--max-batch",
        type=int,
        default=_default("max_batch"),
        metavar="N",
        help="Most samples in one forward pass, and in one request (students split larger "
        "ones) (default: %(default)s).",
    )
    b.add_argument(
        "--max-batch-tokens",
        type=int,
        metavar="T",
        help="Most padded tokens (samples x longest) in one forward pass of sequence inputs; "
        "requests that would overflow it wait, so similar lengths gather (default: samples "
        "only).",
    )
    b.add_argument(
        "--max-delay-ms",
        type=float,
        default=_default("max_delay_ms"),
        metavar="T",
        help="Longest a request waits for others to fill a batch, in milliseconds "
        "(default: %(default)s).",
    )
    b.add_argument(
        "--max-queue-samples",
        type=int,
        metavar="N",
        help="Samples that may wait for a device; requests beyond it are refused with "
        "RESOURCE_EXHAUSTED and asked again later (default: 8 x --max-batch x devices).",
    )
    b.add_argument(
        "--max-message-bytes",
        type=int,
        metavar="B",
        help="Largest request or reply in bytes; larger requests are refused with "
        "INVALID_ARGUMENT, and so are requests whose reply would be larger (default: room "
        "for a full batch of inputs or knowledge, at least 64 MiB).",
    )
    b.add_argument(
        "--compression",
        choices=("none", "zstd"),
        default="none",
        help="Arrow IPC body compression of knowledge replies: zstd sends fewer bytes for "
        "more CPU on both sides (slow links); none sends them as they are (default: %(default)s).",
    )
    b.add_argument(
        "--grpc-max-calls",
        type=int,
        default=_default("grpc_max_calls"),
        metavar="N",
        help="Most gRPC calls open at once (each student's stream is one); more are refused "
        "with RESOURCE_EXHAUSTED (default: %(default)s).",
    )
    b.add_argument(
        "--max-connection-age-s",
        type=float,
        metavar="S",
        help="Close each gRPC connection after about S seconds, so that students of a "
        "dns:/// name (replicas behind a Kubernetes headless Service) resolve it again and "
        "spread over replicas added since (default: connections live on).",
    )
    b.add_argument(
        "--max-connection-age-grace-s",
        type=float,
        default=_default("max_connection_age_grace_s"),
        metavar="S",
        help="Calls a connection past its age may finish before it is closed; students "
        "re-ask what was cut off (default: %(default)s).",
    )
    b.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="Threads torch uses inside one operation (intra-op) in this process (default: "
        "torch's choice, about one per core).",
    )
    s = p.add_argument_group("security (needed on a non-loopback --host)")
    s.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="Require the bearer token in PATH on every request, on both transports. Without "
        "TLS (gRPC) or CURVE (ZeroMQ) the token travels in clear: anyone on the path can "
        "read and reuse it. Keep the file private (chmod 600) (default: no token).",
    )
    s.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="Server certificate chain (PEM): serve gRPC over TLS; needs --tls-key "
        "(default: plaintext gRPC).",
    )
    s.add_argument(
        "--tls-key",
        type=Path,
        metavar="PEM",
        help="Private key (PEM) of --tls-cert (default: none).",
    )
    s.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="Mutual TLS: accept only gRPC clients whose certificate this CA bundle signed "
        "(default: any client with the token, if one is required).",
    )
    s.add_argument(
        "--zmq-curve-secret-key",
        type=Path,
        metavar="PATH",
        help="The server's CURVE secret key (a z85 key file or a zmq secret certificate): "
        "encrypt ZeroMQ; students need the matching public key (default: plaintext ZeroMQ).",
    )
    s.add_argument(
        "--zmq-curve-clients",
        type=Path,
        metavar="PATH",
        help="Allowed CURVE client public keys: a file of z85 keys, one per line, or a "
        "directory of zmq public certificates (default: any CURVE client).",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="Serve a TCP port on a non-loopback --host with no credential at all (no "
        "--token-file, TLS or CURVE): anyone who reaches it can run the model on what they "
        "send and read its knowledge; only for a network you trust. A --token-file without "
        "TLS/CURVE is accepted instead, but travels in clear (default: refuse).",
    )
    lc = p.add_argument_group("lifecycle")
    lc.add_argument(
        "--grace-s",
        type=float,
        default=_default("grace_s"),
        metavar="S",
        help="On SIGTERM/SIGINT, refuse new requests and give those in flight S seconds to "
        "finish (default: %(default)s).",
    )
    lc.add_argument(
        "--exit-after-s",
        type=float,
        metavar="S",
        help="Drain and exit after S seconds, as on SIGTERM (default: run until a signal).",
    )
    lc.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="Once serving, write the bound endpoints and ports to PATH as JSON, atomically "
        "(default: only the stdout line).",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    devices = args.device or ["cpu"]
    # Options are checked before anything is loaded: a mistake costs no model build.
    configs = [engine_config(args, device) for device in devices]
    server_config = _server_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = build_dataset(args)
    if dataset is not None and len(dataset) > 0:  # type: ignore[arg-type]
        example = item_inputs(dataset[0])
    elif args.input_shape is not None:
        example = torch.zeros(args.input_shape, dtype=TORCH_DTYPES[args.input_dtype])
    else:
        raise ValueError(
            "the teacher needs an example input to learn its input schema: give --dataset, or "
            "--input-shape (e.g. 1,8,8) and --input-dtype for query mode"
        )
    engines = [build_engine(args, c.device, example, c) for c in configs]
    checkpoint_sha256 = file_sha256(args.checkpoint) if args.checkpoint else None
    # What replicas are compared by: the spec, the checkpoint's hash and the weights' hash.
    # Hashing the weights is one pass over them, once per process (not per device): ~0.4
    # GiB/s here (1 ms for the demo teacher), on top of the checkpoint file's ~1.5 GiB/s,
    # worth it for the weights no checkpoint names (see server._default_identity).
    identity = model_identity(str(model_spec(args)), engines[0].model, checkpoint_sha256)
    teacher_id = f"{model_spec(args)} on {socket.gethostname()}"
    if checkpoint_sha256:
        teacher_id += f" checkpoint sha256:{checkpoint_sha256}"
    config = server_config.model_copy(update={"teacher_id": teacher_id})
    return serve(config, engines, dataset, identity)


def _server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        insecure=args.insecure,
        grpc_port=args.grpc_port,
        zmq_port=args.zmq_port,
        grpc_unix=args.grpc_unix,
        zmq_ipc=args.zmq_ipc,
        max_batch=args.max_batch,
        max_batch_tokens=args.max_batch_tokens,
        max_delay_ms=args.max_delay_ms,
        max_queue_samples=args.max_queue_samples,
        max_message_bytes=args.max_message_bytes,
        compression=args.compression,
        grpc_max_calls=args.grpc_max_calls,
        max_connection_age_s=args.max_connection_age_s,
        max_connection_age_grace_s=args.max_connection_age_grace_s,
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
    )
