"""Offline knowledge: dump throughput next to pure inference, bytes per sample, read GB/s.

Three tables, every figure the median of `--repeats` runs, ratios taken within this one run:

Runs of the two sides of a ratio alternate, and the ratio is the median of per-pair ratios,
so that background load on the two shared cores hits both sides alike.

1. Dump throughput (rows/s) of `dump_knowledge` vs the same engine's pure in-process inference
   on pre-collated batches of the same data: how much of reading, encoding, writing, hashing
   and fsync the pipeline hides behind compute (goal >= 0.9). Model: `resnet_cnn` with a
   1000-class head on digits upsampled to 16x16 (real compute), plus the 8x8 originals as
   a light-compute case. Inference runs on one thread; the other core has the loader worker
   and the writer thread.
2. Bytes per sample on disk of a 1000-class head: fp32, fp16, top-k.
3. `OfflineKnowledge.get` throughput in GB/s of logits, batches of 256 ids, sequential and
   shuffled, from the page cache, on a ~1 GiB dump of synthetic 1000-class fp32 logits
   written with `KnowledgeWriter` (goal: shuffled >= 2 GB/s and >= 0.4x sequential).
4. What shard checksums cost a student: seconds from `OfflineKnowledge(DIR)` to the first
   batch of 256 ids (shuffled: it touches every shard; sequential: one shard), with
   `verify="off"`, on a first run (cold record of verified shards) and on a second run (the
   record says every shard was verified), on a ~384 MiB dump in shards of 32 MiB, from the
   page cache (hashing is CPU-bound here; on shared storage it is bound by reads).

    .venv/bin/python bench/offline.py               # ~2-3 min on two cores
    .venv/bin/python bench/offline.py --repeats 5 --read-gib 2
    .venv/bin/python bench/offline.py --only verify # table 4 alone
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lyceum.deploy.examples import digits, resnet_cnn
from lyceum.proto.manifest import DatasetFingerprint, Manifest, model_identity
from lyceum.proto.schema import KnowledgeSchema, dense
from lyceum.student_client.offline import OfflineKnowledge
from lyceum.teacher_server.dump import DumpConfig, KnowledgeWriter, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

CLASSES = 1000
ROW_BYTES = 4 * CLASSES


class Upsampled(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Digits repeated `repeat` times, upsampled to `size` x `size` (more compute per sample)."""

    def __init__(self, size: int, repeat: int) -> None:
        base = digits("all")
        images = base.images
        if size != images.shape[-1]:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear")
        self.images = images.repeat(repeat, 1, 1, 1).contiguous()
        self.labels = base.labels.repeat(repeat)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(
    a: Callable[[], object], b: Callable[[], object], work: float, repeats: int
) -> tuple[float, float, float]:
    """Median rates of `a` and `b` (work / s) and median of the per-pair ratios b / a.

    Runs alternate a, b, a, b, ... so that both see the same background load (two shared
    cores): the per-pair ratio is steadier than a ratio of medians.
    """
    rates = [(work / _timed(a), work / _timed(b)) for _ in range(repeats)]
    ra, rb = zip(*rates, strict=True)
    return (
        statistics.median(ra),
        statistics.median(rb),
        statistics.median(y / x for x, y in rates),
    )


def bench_dump(
    size: int, repeat: int, repeats: int, workdir: Path
) -> tuple[int, float, float, float]:
    data = Upsampled(size, repeat)
    torch.manual_seed(0)
    model = resnet_cnn(width=16, num_classes=CLASSES)
    engine = TeacherEngine(model, EngineConfig(), data[0][0])
    identity = model_identity("bench", model)
    config = DumpConfig(batch_size=256, shard_rows=4096, workers=1, progress=False)
    batches = [
        torch.stack([data[i][0] for i in range(lo, min(lo + 256, len(data)))])
        for lo in range(0, len(data), 256)
    ]
    engine.infer(batches[0])  # warm-up

    def infer_all() -> None:
        for b in batches:
            engine.infer(b)

    def dump_all() -> None:
        out = workdir / "dump"
        shutil.rmtree(out, ignore_errors=True)
        dump_knowledge(engine, data, out, config, identity)

    return len(data), *_interleaved(infer_all, dump_all, len(data), repeats)


def bench_bytes(workdir: Path) -> list[tuple[str, float]]:
    data = Upsampled(8, 1)
    torch.manual_seed(0)
    model = resnet_cnn(width=16, num_classes=CLASSES)
    identity = model_identity("bench", model)
    rows = []
    for name, cfg in [
        ("fp32 dense", EngineConfig()),
        ("fp16 dense", EngineConfig(precision="fp16")),
        ("fp16 top-10", EngineConfig(precision="fp16", topk=10)),
        ("fp32 top-10", EngineConfig(topk=10)),
    ]:
        engine = TeacherEngine(model, cfg, data[0][0])
        out = workdir / "bytes"
        shutil.rmtree(out, ignore_errors=True)
        m = dump_knowledge(
            engine, data, out, DumpConfig(workers=0, progress=False, shard_rows=1024), identity
        )
        rows.append((name, m.bytes / m.rows))
    return rows


def write_synthetic(out: Path, rows: int, shard_rows: int = 65536) -> None:
    schema = KnowledgeSchema(fields=(dense("logits", "float32", (CLASSES,), "logits"),))
    manifest = Manifest(
        knowledge_schema=schema,
        model=model_identity("synthetic", torch.nn.Identity()),
        dataset=DatasetFingerprint(length=rows, samples=0, sha256="0" * 64),
        shard_rows=shard_rows,
    )
    g = torch.Generator().manual_seed(0)
    with KnowledgeWriter(out, manifest) as writer:
        for lo in range(0, rows, 8192):
            n = min(8192, rows - lo)
            writer.write(np.arange(lo, lo + n), {"logits": torch.randn(n, CLASSES, generator=g)})
        writer.close()


def bench_read(out: Path, repeats: int) -> tuple[int, float, float, float]:
    # Checksums off: the steady state of a dump whose shards are already recorded as
    # verified (table 4 measures what checking costs).
    knowledge = OfflineKnowledge(out, verify="off")
    n = len(knowledge)
    sequential = [np.arange(lo, min(lo + 256, n)) for lo in range(0, n, 256)]
    perm = np.random.default_rng(0).permutation(n)
    shuffled = [perm[lo : lo + 256] for lo in range(0, n, 256)]
    # Check before timing: a shuffled batch holds exactly what sequential reads hold.
    probe = knowledge.get(shuffled[0]).tensors["logits"]
    for j in (0, 255):
        row = knowledge.get([int(shuffled[0][j])]).tensors["logits"][0]
        assert torch.equal(probe[j], row)

    def read(batches: list[np.ndarray]) -> Callable[[], None]:
        def run() -> None:
            for ids in batches:
                knowledge.get(ids)

        return run

    read(sequential)()  # into the page cache
    seq, shuf, ratio = _interleaved(read(sequential), read(shuffled), n * ROW_BYTES / 1e9, repeats)
    knowledge.close()
    return n, seq, shuf, ratio


def bench_memory(rows: int, repeats: int) -> tuple[float, float, float]:
    """The machine's own ratio: the same row gathers (256 rows of 4000 bytes, in id order
    vs shuffled) with plain numpy fancy indexing on an anonymous in-memory array."""
    memory = np.random.default_rng(0).random((rows, CLASSES), dtype=np.float32)
    perm = np.random.default_rng(1).permutation(rows)

    def gather(order: np.ndarray) -> Callable[[], None]:
        def run() -> None:
            for lo in range(0, rows, 256):
                memory[order[lo : lo + 256]]

        return run

    gb = rows * ROW_BYTES / 1e9
    return _interleaved(gather(np.arange(rows)), gather(perm), gb, repeats)


def bench_verify(workdir: Path, mib: int, repeats: int) -> list[tuple[str, float, float, float]]:
    """Rows of table 4: (case, open + first shuffled batch s, open + first sequential batch
    s, open until every shard is verified s), medians over `repeats`. Each timed open gets a
    record directory of its own: empty (a first run), or filled by an untimed first run."""
    out = workdir / "verify"
    rows = mib * (1 << 20) // ROW_BYTES
    write_synthetic(out, rows, shard_rows=8192)
    orders = {
        "shuffled": np.random.default_rng(0).permutation(rows)[:256],
        "sequential": np.arange(256),
    }
    records = iter(range(1 << 30))

    def timed(ids: np.ndarray, verify: str, warm: bool) -> tuple[float, float]:
        os.environ["LYCEUM_CACHE_DIR"] = str(workdir / f"record-{next(records)}")
        if warm:
            with OfflineKnowledge(out) as first:
                first.wait_verified()
        start = time.perf_counter()
        with OfflineKnowledge(out, verify=verify) as knowledge:  # type: ignore[arg-type]
            knowledge.get(ids)
            batch = time.perf_counter() - start
            knowledge.wait_verified()
            return batch, time.perf_counter() - start

    cases = [
        ("verify=off", "off", False),
        ("background, first run", "background", False),
        ("first_touch, first run", "first_touch", False),
        ("background, second run", "background", True),
    ]
    result = []
    for name, verify, warm in cases:
        shuffled = [timed(orders["shuffled"], verify, warm) for _ in range(repeats)]
        sequential = [timed(orders["sequential"], verify, warm)[0] for _ in range(repeats)]
        result.append(
            (
                name,
                statistics.median(t[0] for t in shuffled),
                statistics.median(sequential),
                statistics.median(t[1] for t in shuffled),
            )
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--read-gib", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--verify-mib", type=int, default=384, help="dump size of table 4")
    parser.add_argument("--only", choices=("verify",), help="run one table alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="lyceum-bench-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        if args.only != "verify":
            run_tables_1_to_3(workdir, args)
        print(
            f"\n4. open + first batch of 256 ids, {args.verify_mib} MiB of fp32 logits in "
            f"shards of 8192 rows (32 MiB), page cache, median of {args.repeats}"
        )
        print(f"   {'case':<24} {'shuffled s':>11} {'sequential s':>13} {'all verified s':>15}")
        for name, shuf, seq, verified in bench_verify(workdir, args.verify_mib, args.repeats):
            print(f"   {name:<24} {shuf:>11.3f} {seq:>13.3f} {verified:>15.3f}")


def run_tables_1_to_3(workdir: Path, args: argparse.Namespace) -> None:
    print("1. dump throughput vs pure inference (resnet_cnn width 16, 1000 classes, fp32)")
    print(f"   {'input':<16} {'samples':>8} {'infer rows/s':>13} {'dump rows/s':>12} {'ratio':>6}")
    for size, repeat in [(16, 8), (8, 32)]:
        n, pure, dumped, ratio = bench_dump(size, repeat, args.repeats, workdir)
        print(
            f"   {f'{size}x{size} digits':<16} {n:>8} {pure:>13.0f} {dumped:>12.0f} {ratio:>6.2f}"
        )
    print("\n2. bytes per sample on disk, 1000-class head (ids, Arrow framing included)")
    for name, per_sample in bench_bytes(workdir):
        print(f"   {name:<12} {per_sample:>9.1f} B")
    rows = int(args.read_gib * (1 << 30) / ROW_BYTES)
    out = workdir / "read"
    start = time.perf_counter()
    write_synthetic(out, rows)
    written = time.perf_counter() - start
    n, seq, shuf, ratio = bench_read(out, 2 * args.repeats + 1)
    gb = n * ROW_BYTES / 1e9
    print(
        f"\n3. OfflineKnowledge.get, batches of 256 x 1000 fp32 logits, {gb:.2f} GB in "
        f"{Manifest.read(out).num_shards} shards (written at {gb / written:.2f} GB/s), page cache"
    )
    print(f"   {'order':<12} {'GB/s':>6} {'vs sequential':>14}")
    print(f"   {'sequential':<12} {seq:>6.2f} {1.0:>14.2f}")
    print(f"   {'shuffled':<12} {shuf:>6.2f} {ratio:>14.2f}")
    mseq, mshuf, mratio = bench_memory(n, 2 * args.repeats + 1)
    print("   the same gathers with numpy on an anonymous in-memory array (no Lyceum, no mmap):")
    print(f"   {'sequential':<12} {mseq:>6.2f} {1.0:>14.2f}")
    print(f"   {'shuffled':<12} {mshuf:>6.2f} {mratio:>14.2f}")


if __name__ == "__main__":
    main()
