"""`lyceum teacher dump`: run a teacher over a dataset once and write its knowledge to shards.

Thin: builds the dataset and engines (one per --device) from specs, then calls
`lyceum.teacher_server.dump.dump_knowledge`, its Python equivalent. Under torchrun (or any
launcher that sets RANK and WORLD_SIZE, e.g. a Kubernetes Indexed Job) each process dumps its
rank's shards into the same --out; a bare `--device cuda` there means cuda:LOCAL_RANK.
"""

from __future__ import annotations

import argparse
import os
import typing

import torch

from lyceum.deploy import _exit_codes
from lyceum.deploy._engine_args import (
    add_model_args,
    build_dataset,
    build_engine,
    engine_config,
    model_spec,
)
from lyceum.proto.checksum import file_sha256
from lyceum.proto.display import format_bytes, plural
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import FINGERPRINT_SAMPLES, Coverage, model_identity
from lyceum.teacher_server.dump import DumpConfig, check_not_empty, dump_knowledge


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    defaults = DumpConfig()
    p = subparsers.add_parser(
        "dump",
        help="dump a teacher's knowledge for a whole dataset to Arrow shards (resumable)",
        description="Run the teacher over every sample of the dataset and write its knowledge "
        "to DIR as Arrow IPC shards plus manifest.json. Rerun the same command after an "
        "interruption to continue; a different model, schema or dataset is refused.",
    )
    add_model_args(p, dataset_required=True)
    g = p.add_argument_group("dump")
    g.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="Directory to write the shards and manifest.json to; created if missing. Rerun "
        "with the same DIR to resume an interrupted dump (required)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        metavar="B",
        help="Samples per inference batch (default: %(default)s)",
    )
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        metavar="T",
        help="Token-budget batching: at most T padded tokens (samples x longest) per batch, "
        "sequences of similar length together, at most --batch-size samples (default: "
        "--batch-size consecutive samples).",
    )
    g.add_argument(
        "--compression",
        choices=("none", "zstd"),
        default=defaults.compression,
        help="Arrow IPC body compression of the shards: zstd makes them smaller, and each "
        "shard is decompressed into memory when a student opens it; none keeps them "
        "zero-copy memory-mapped (default: %(default)s).",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        metavar="W",
        help="DataLoader worker processes that read and collate samples; 0 reads them in "
        "this process (default: %(default)s)",
    )
    g.add_argument(
        "--shard-rows",
        type=int,
        default=defaults.shard_rows,
        metavar="N",
        help="Samples per shard file: the unit of resuming and of checksum checks (default: "
        "%(default)s)",
    )
    g.add_argument(
        "--shard-tokens",
        type=int,
        metavar="T",
        help="Size shards of sequence inputs in tokens: each shard at most T positions (a "
        "longer sample alone) and at most --shard-rows samples, so shards of long and short "
        "sequences hold alike amounts of knowledge; reads every sample's length before the "
        "dump starts (default: --shard-rows samples each).",
    )
    g.add_argument(
        "--store-inputs",
        action="store_true",
        help="Keep each sample's inputs in the dump (its tokens at the real positions, and its "
        "other named inputs but the attention mask), so a student reads them back with the "
        "knowledge and needs no dataset (default: knowledge only).",
    )
    g.add_argument(
        "--device",
        action="append",
        metavar="D",
        help="Run one engine (a copy of the model) on device D: 'cpu', 'cuda' or 'cuda:N'; "
        "repeat for several devices, which split this process's shards. Under torchrun a "
        "bare 'cuda' is cuda:LOCAL_RANK (default: cpu)",
    )
    g.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="Threads torch uses inside one operation (intra-op) in this process (default: "
        "torch's choice, about one per core; torchrun sets OMP_NUM_THREADS=1)",
    )
    r = p.add_argument_group(
        "ranks (torchrun, Indexed Jobs)",
        "Processes dumping into one --out split its shards: rank R dumps every W-th shard "
        "from shard R, and the last rank to finish completes manifest.json (or run `lyceum "
        "knowledge merge DIR`). Rerun a killed rank with the same RANK and WORLD_SIZE to "
        "resume its part.",
    )
    r.add_argument(
        "--rank",
        type=int,
        default=_env_int("RANK", 0),
        metavar="R",
        help="This process's rank, 0..W-1 (default: $RANK, set by torchrun, else 0)",
    )
    r.add_argument(
        "--world-size",
        type=int,
        default=_env_int("WORLD_SIZE", 1),
        metavar="W",
        help="Processes dumping together (default: $WORLD_SIZE, set by torchrun, else 1)",
    )
    g.add_argument(
        "--fingerprint",
        choices=typing.get_args(Coverage),
        default=defaults.fingerprint,
        help=f"How much of the dataset the fingerprint in manifest.json hashes, which is what "
        f"students compare their dataset against: 'sampled' hashes {FINGERPRINT_SAMPLES} "
        f"evenly spaced samples (cheap, catches another split, order or preprocessing, but "
        f"accepts a dataset that differs only in samples between them); 'full' hashes every "
        f"sample (one extra pass over the data now and whenever a student opens the knowledge "
        f"with its dataset; any difference is refused) (default: %(default)s)",
    )
    g.add_argument(
        "--quiet",
        action="store_true",
        help="No progress: neither the bar on a terminal nor the periodic log lines elsewhere "
        "(default: show progress)",
    )
    p.set_defaults(func=run)


def _env_int(name: str, default: int) -> int | str:
    """An integer from the environment for an option's default; argparse converts (and
    refuses, naming the option) what is not a number."""
    return os.environ.get(name, default)


def _devices(args: argparse.Namespace) -> list[str]:
    devices = args.device or ["cpu"]
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and local_rank.isdigit():
        # One process per GPU under torchrun: its own, not everyone's cuda:0.
        devices = [f"cuda:{local_rank}" if d == "cuda" else d for d in devices]
    return devices


def run(args: argparse.Namespace) -> int:
    config = DumpConfig(
        shard_rows=args.shard_rows,
        shard_tokens=args.shard_tokens,
        store_inputs=args.store_inputs,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        compression=args.compression,
        workers=args.workers,
        progress=not args.quiet,
        fingerprint=args.fingerprint,
        rank=args.rank,
        world_size=args.world_size,
    )
    # Options are checked before anything is loaded: a mistake costs no model build.
    configs = [engine_config(args, device) for device in _devices(args)]
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = build_dataset(args)
    assert dataset is not None  # --dataset is required for a dump
    check_not_empty(dataset, f"dataset {args.dataset!r}")
    engines = [build_engine(args, c.device, item_inputs(dataset[0]), c) for c in configs]
    try:
        identity = model_identity(
            str(model_spec(args)),
            engines[0].model,
            file_sha256(args.checkpoint) if args.checkpoint else None,
        )
        manifest = dump_knowledge(engines, dataset, args.out, config, identity)
    finally:
        for engine in engines:
            engine.close()
    summary = (
        f"{plural(manifest.rows, 'sample')} in {plural(len(manifest.shards), 'shard')}, "
        f"{format_bytes(manifest.bytes)}"
    )
    if config.world_size == 1:
        print(f"{args.out}: {summary}")
    elif manifest.complete:
        print(f"{args.out}: rank {config.rank} of {config.world_size} done; complete: {summary}")
    else:
        print(
            f"{args.out}: rank {config.rank} of {config.world_size} done; the other ranks "
            f"still owe {manifest.describe_missing()} (the last one completes manifest.json; "
            f"`lyceum knowledge merge {args.out}` if it was killed after its shards)"
        )
    return _exit_codes.OK
