"""`lyceum teacher dump`: run a teacher over a dataset once and write its knowledge to shards.

Thin: builds the dataset and engine from specs, then calls
`lyceum.teacher_server.dump.dump_knowledge`, its Python equivalent.
"""

from __future__ import annotations

import argparse

from lyceum.deploy._engine_args import add_model_args, build_dataset, build_engine, model_spec
from lyceum.proto.manifest import model_identity
from lyceum.proto.specs import file_sha256
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge


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
    p.add_argument("--out", required=True, metavar="DIR", help="dump directory")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="B")
    p.add_argument(
        "--workers", type=int, default=defaults.workers, metavar="W", help="DataLoader workers"
    )
    p.add_argument(
        "--shard-rows", type=int, default=defaults.shard_rows, metavar="N", help="samples per shard"
    )
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dataset = build_dataset(args)
    if dataset is None or len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"dataset {args.dataset!r} is empty: nothing to dump")
    config = DumpConfig(
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.quiet,
    )
    engine = build_engine(args, args.device, dataset[0][0])
    try:
        identity = model_identity(
            str(model_spec(args)),
            engine.model,
            file_sha256(args.checkpoint) if args.checkpoint else None,
        )
        manifest = dump_knowledge(engine, dataset, args.out, config, identity)
    finally:
        engine.close()
    print(
        f"{args.out}: {manifest.rows} samples in {len(manifest.shards)} shards, "
        f"{manifest.bytes} bytes"
    )
    return 0
