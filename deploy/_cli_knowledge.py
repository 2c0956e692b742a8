"""`lyceum knowledge info DIR` and `lyceum knowledge verify DIR`: inspect an offline dump.

Python equivalents: `lyceum.proto.manifest.Manifest.read`, `OfflineKnowledge(DIR).stats()`
and `lyceum.student_client.offline.verify_knowledge`.
"""

from __future__ import annotations

import argparse

from lyceum.proto.manifest import Manifest
from lyceum.student_client.offline import OfflineKnowledge, verify_knowledge


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("knowledge", help="inspect or verify an offline knowledge dump")
    sub = p.add_subparsers(dest="knowledge_command", required=True, metavar="ACTION")
    info = sub.add_parser("info", help="schema, rows, bytes and per-field min/mean/max")
    info.add_argument("dir", metavar="DIR")
    info.set_defaults(func=run_info)
    verify = sub.add_parser("verify", help="re-hash every shard; exit 1 naming any bad one")
    verify.add_argument("dir", metavar="DIR")
    verify.set_defaults(func=run_verify)


def run_info(args: argparse.Namespace) -> int:
    m = Manifest.read(args.dir)
    per_sample = m.bytes / m.rows if m.rows else 0.0
    print(f"directory:  {args.dir}")
    print(f"format:     {m.format_version}")
    print(
        f"samples:    {m.rows} of {m.dataset.length} ({'complete' if m.complete else 'INCOMPLETE'})"
    )
    print(f"shards:     {len(m.shards)} of {m.num_shards}, {m.shard_rows} samples each")
    print(f"bytes:      {m.bytes} ({per_sample:.1f} per sample)")
    print(f"teacher:    {m.model.spec}")
    print(f"checkpoint: {m.model.checkpoint_sha256 or '-'}")
    print(f"weights:    {m.model.weights_sha256}")
    print(f"dataset:    {m.dataset.length} samples, fingerprint {m.dataset.sha256}")
    print("schema:")
    for f in m.knowledge_schema.fields:
        print(f"  {f.describe()} (T={f.temperature:g})")
    if not m.complete:
        print("stats:      unavailable until the dump is complete (rerun the dump command)")
        return 0
    with OfflineKnowledge(args.dir) as knowledge:
        stats = knowledge.stats()
    width = max(len(name) for name in stats)
    print(f"  {'column':<{width}} {'min':>12} {'mean':>12} {'max':>12} {'values':>12}")
    for name, s in stats.items():
        print(f"  {name:<{width}} {s.min:>12.5g} {s.mean:>12.5g} {s.max:>12.5g} {s.count:>12}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    problems = verify_knowledge(args.dir)
    for problem in problems:
        print(f"bad shard: {problem}")
    if problems:
        return 1
    print("ok")
    return 0
