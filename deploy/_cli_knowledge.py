"""`lyceum knowledge info|verify|export|merge DIR`: inspect, check, convert or complete a dump.

Python equivalents: `lyceum.proto.manifest.Manifest.read` and `OfflineKnowledge(DIR).stats()`
(info), `lyceum.student_client.verify_knowledge` (verify),
`lyceum.student_client.export_knowledge` (export) and `lyceum.teacher_server.merge_knowledge`
(merge).
"""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path

from lyceum.deploy import _exit_codes
from lyceum.proto.display import format_bytes, plural
from lyceum.proto.manifest import Manifest
from lyceum.proto.schema import FieldSpec, TopK
from lyceum.student_client.export import ExportDType, ExportFormat, export_knowledge
from lyceum.student_client.offline import OfflineKnowledge, verify_knowledge
from lyceum.teacher_server.dump import merge_knowledge, owed_by_ranks

_DIR_HELP = "A directory written by `lyceum teacher dump`"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "knowledge", help="inspect, verify or export an offline knowledge dump"
    )
    sub = p.add_subparsers(dest="knowledge_command", required=True, metavar="ACTION")
    info = sub.add_parser(
        "info",
        help="manifest (teacher, dataset fingerprint, creation), schema, size and per-column "
        "min/mean/max",
        description="Print what a dump holds: when and by which Lyceum it was made, its "
        "teacher, the dataset fingerprint and what it covers, the schema, and per-column "
        "min/mean/max (which reads every shard, and checks its checksum).",
    )
    info.add_argument("dir", metavar="DIR", help=_DIR_HELP)
    info.set_defaults(func=run_info)
    verify = sub.add_parser(
        "verify",
        help="check the dump is complete and re-hash every shard; exit 1 naming what is wrong",
        description="Check that the dump is complete and that every shard's sha256 matches "
        "the manifest (re-hashing all of them). Exit 0 if so; else exit 1, with the missing "
        "sample ids or the bad shard files and how to fix them.",
    )
    verify.add_argument("dir", metavar="DIR", help=_DIR_HELP)
    verify.set_defaults(func=run_verify)
    export = sub.add_parser(
        "export",
        help="convert a dump to Parquet or CSV, float fields as float32",
        description="Write a dump's knowledge to one Parquet or CSV file for tools that cannot "
        "read its shards (bfloat16 shows as uint16 integers elsewhere, and DuckDB refuses "
        "float16). Streams record batch by record batch; each shard's checksum is checked "
        "first. Parquet keeps per-sample lists and sequences; CSV gets one column per value "
        "(NAME[i]) and refuses sequence fields.",
    )
    export.add_argument("dir", metavar="DIR", help=_DIR_HELP)
    export.add_argument(
        "--to",
        choices=typing.get_args(ExportFormat),
        default="parquet",
        help="Output format (default: %(default)s)",
    )
    export.add_argument(
        "--dtype",
        choices=typing.get_args(ExportDType),
        default="float32",
        help="Type of every float field in the output; float16 and bfloat16 widen to it "
        "exactly, integer fields (top-k indices) are kept (default: %(default)s)",
    )
    export.add_argument(
        "--out",
        metavar="FILE",
        help="File to write, replaced if it exists (default: DIR with the format's suffix, "
        "e.g. knowledge.parquet beside knowledge/)",
    )
    export.add_argument(
        "--quiet", action="store_true", help="No progress output (default: show progress)"
    )
    export.set_defaults(func=run_export)
    merge = sub.add_parser(
        "merge",
        help="complete the manifest of a dump written by several ranks",
        description="Fold the records of the ranks that dumped into DIR (DIR/ranks/) into "
        "DIR/manifest.json. The last rank to finish does this by itself; run it when that "
        "rank was killed after its shards, or after copying the directories that ranks "
        "wrote on machines without shared storage into one. Exit 0 once the dump is "
        "complete (DIR/ranks/ is removed); else exit 1, naming the ranks that owe shards.",
    )
    merge.add_argument("dir", metavar="DIR", help=_DIR_HELP + " with --world-size > 1")
    merge.set_defaults(func=run_merge)


def run_info(args: argparse.Namespace) -> int:
    m = Manifest.read(args.dir)
    per_sample = m.bytes / m.rows if m.rows else 0.0
    created = m.created_at.strftime("%Y-%m-%d %H:%M:%S UTC") if m.created_at else "-"
    print(f"directory:  {args.dir}")
    print(f"format:     {m.format_version}")
    print(f"created:    {created}, by Lyceum {m.lyceum_version or '-'}")
    state = "complete" if m.complete else f"INCOMPLETE, missing {m.describe_missing()}"
    print(f"samples:    {m.rows:,} of {m.dataset.length:,} ({state})")
    if m.shard_tokens is not None:
        each = (
            f"at most {m.shard_tokens:,} tokens and {plural(m.shard_rows, 'sample')} each "
            f"(--shard-tokens)"
        )
    else:
        each = f"{plural(m.shard_rows, 'sample')} each"
    print(f"shards:     {len(m.shards):,} of {m.num_shards:,}, {each}")
    print(f"size:       {format_bytes(m.bytes)} ({per_sample:,.1f} bytes per sample)")
    compression = m.compression or "none (shards memory-mapped, zero-copy)"
    print(f"compression: {compression}")
    print(f"teacher:    {m.model.spec}")
    print(f"checkpoint: {m.model.checkpoint_sha256 or '-'}")
    print(f"weights:    {m.model.weights_sha256}")
    print(f"dataset:    {m.dataset.length:,} samples, fingerprint sha256 {m.dataset.sha256}")
    print(f"            over {m.dataset.describe_coverage()}")
    if m.stored_inputs:
        print(f"inputs:     {', '.join(m.stored_inputs)} (stored with the knowledge)")
    print(f"schema:     format {m.knowledge_schema.format_version}")
    for f in m.knowledge_schema.fields:
        print(f"  {f.describe()} (T={f.temperature:g})")
        if isinstance(f.encoding, TopK):
            print(f"    {_topk_storage(f)}")
    if not m.complete:
        print("stats:      unavailable until the dump is complete (rerun the dump command)")
        return _exit_codes.OK
    with OfflineKnowledge(args.dir) as knowledge:
        stats = knowledge.stats()
    width = max(len(name) for name in stats)
    print(f"  {'column':<{width}} {'min':>12} {'mean':>12} {'max':>12} {'values':>12}")
    for name, s in stats.items():
        print(f"  {name:<{width}} {s.min:>12.5g} {s.mean:>12.5g} {s.max:>12.5g} {s.count:>12}")
    return _exit_codes.OK


def _topk_storage(f: FieldSpec) -> str:
    """How a top-k field's indices and values are stored, in words, with the bytes of a row
    (the k entries of one position of a sequence, or of one sample)."""
    vocab = f.shape[-1]
    index_bytes = f.stored_row_bytes(f"{f.name}.indices")
    if f.index_code == "elias_fano":
        indices = f"indices Elias-Fano coded (sorted ascending), {index_bytes} B a row"
    else:
        indices = f"indices {f.index_bits}-bit ({vocab:,} ids), {index_bytes} B a row"
    value_bytes = f.stored_row_bytes(f"{f.name}.values")
    if f.value_bits is not None:
        values = f"values {f.value_bits}-bit codes (read as {f.dtype}), {value_bytes} B a row"
    else:
        values = f"values {f.dtype}, {value_bytes} B a row"
    return f"{indices}; {values}"


def run_verify(args: argparse.Namespace) -> int:
    problems = verify_knowledge(args.dir)
    for problem in problems:
        print(f"{args.dir}: {problem}")
    if problems:
        return _exit_codes.FAILED
    m = Manifest.read(args.dir)
    print(
        f"ok: {plural(m.rows, 'sample')} in {plural(len(m.shards), 'shard')} "
        f"({format_bytes(m.bytes)}), every checksum matches"
    )
    return _exit_codes.OK


def run_export(args: argparse.Namespace) -> int:
    directory = Path(os.path.abspath(args.dir))  # not resolve(): a symlink keeps its name
    out = args.out or directory.with_name(f"{directory.name}.{args.to}")
    result = export_knowledge(args.dir, out, args.to, args.dtype, progress=not args.quiet)
    print(
        f"{result.path}: {plural(result.rows, 'sample')}, "
        f"{plural(len(result.columns), 'column')}, {format_bytes(result.bytes)}"
    )
    return _exit_codes.OK


def run_merge(args: argparse.Namespace) -> int:
    owed = owed_by_ranks(args.dir, Manifest.read(args.dir))
    m = merge_knowledge(args.dir)
    summary = f"{plural(m.rows, 'sample')} in {plural(len(m.shards), 'shard')}"
    if m.complete:
        print(f"{args.dir}: complete: {summary} ({format_bytes(m.bytes)})")
        return _exit_codes.OK
    print(f"{args.dir}: incomplete: {summary} of {m.dataset.length:,}")
    if not owed:
        print(f"{args.dir}: {m.incomplete_reason()}")
    missing = set(m.missing_shards())
    for rank, world, shards in owed:
        still = [k for k in shards if k in missing]
        if still:
            print(
                f"{args.dir}: rank {rank} of {world} owes {plural(len(still), 'shard')} "
                f"({', '.join(map(str, still[:8]))}{', ...' if len(still) > 8 else ''}): rerun "
                f"its dump command with RANK={rank} WORLD_SIZE={world}"
            )
    return _exit_codes.FAILED
