"""Dump scaling: 2 ranks x 1 thread (torchrun) vs 1 rank x 1 thread, and 2 engines in 1 process.

Each run is the real command, `lyceum teacher dump`, alone or under `torchrun --standalone
--nproc-per-node 2`, into a fresh directory, with one intra-op thread per process
(`--threads 1`), samples read in the dump's own process (`--workers 0`), and a model with real
compute: `resnet_cnn(width=48)` on the 1,797 digits upsampled to `--size` x `--size` (32:
16x the compute of the 8x8 originals), the dataset of `bench/offline.py` (`offline:Upsampled`).

Two figures per run:

- dump rows/s: the dump phase alone (reading, inference, writing, hashing; after the
  interpreter, torch and the model have loaded), from each process's own closing progress
  line (`... N/N samples (100%), R samples/s`): the rows of all ranks over the longest rank's
  time. This is what more devices buy on a long dump, where start-up is paid once.
- end-to-end rows/s: rows over the whole command's wall time, start-up included.

Runs of the three setups alternate, and each ratio is the median of per-round ratios, so that
background load on the two shared cores hits all sides alike (goal: 2 ranks >= 1.8x 1 rank).

    .venv/bin/python bench/dump_scale.py              # ~3 min on two cores
    .venv/bin/python bench/dump_scale.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lyceum.deploy.examples import resnet_cnn
from lyceum.proto.manifest import Manifest

MODEL = "lyceum.deploy.examples:resnet_cnn"
HERE = Path(__file__).resolve().parent
_RATE = re.compile(r": ([\d,]+)/([\d,]+) samples \(100%\), ([\d.]+) samples/s")


def _dump_args(out: Path, checkpoint: Path, width: int, size: int, devices: int) -> list[str]:
    args = ["-m", "lyceum.deploy.cli", "teacher", "dump", "--model", MODEL]
    args += ["--model-kwargs", f'{{"width": {width}}}', "--checkpoint", str(checkpoint)]
    args += ["--dataset", f'offline:Upsampled{{"size": {size}, "repeat": 1}}']
    args += ["--out", str(out), "--shard-rows", "128"]
    args += ["--batch-size", "64", "--workers", "0", "--threads", "1"]
    return args + ["--device", "cpu"] * devices


def _run(cmd: list[str]) -> tuple[float, float, int]:
    """(dump rows/s, end-to-end rows/s, rows) of one command."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rates = [
        (int(m.group(1).replace(",", "")), float(m.group(3)))
        for m in _RATE.finditer(done.stderr + done.stdout)
    ]
    if not rates:
        raise SystemExit(f"no closing progress line in:\n{done.stderr[-3000:]}")
    rows = sum(n for n, _ in rates)
    longest = max(n / r for n, r in rates)
    return rows / longest, rows / wall, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each setup")
    parser.add_argument("--width", type=int, default=48, help="resnet_cnn width")
    parser.add_argument("--size", type=int, default=32, help="image side, upsampled from 8")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="lyceum-dump-scale-") as tmp:
        root = Path(tmp)
        checkpoint = root / "resnet.pt"
        torch.save(resnet_cnn(width=args.width).state_dict(), checkpoint)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        setups = {
            "1 rank x 1 thread": lambda out: [
                sys.executable,
                *_dump_args(out, checkpoint, args.width, args.size, 1),
            ],
            "2 ranks x 1 thread (torchrun)": lambda out: [
                *torchrun,
                "--nproc-per-node",
                "2",
                *_dump_args(out, checkpoint, args.width, args.size, 1),
            ],
            "1 process, 2 engines x 1 thread": lambda out: [
                sys.executable,
                *_dump_args(out, checkpoint, args.width, args.size, 2),
            ],
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
        shards: set[tuple[str, ...]] = set()
        for r in range(args.rounds):
            for i, (name, command) in enumerate(setups.items()):
                out = root / f"r{r}-{i}"
                dump, end_to_end, rows = _run(command(out))
                manifest = Manifest.read(out)
                if not manifest.complete or rows != manifest.dataset.length:
                    raise SystemExit(f"{name}: incomplete dump in {out}")
                shards.add(tuple(s.sha256 for s in manifest.shards))
                results[name].append((dump, end_to_end))
                print(f"round {r + 1} {name}: {dump:,.0f} rows/s dump, {end_to_end:,.0f} e2e")
        same = "yes" if len(shards) == 1 else f"NO ({len(shards)} different)"
        base = results["1 rank x 1 thread"]
        print()
        print(
            f"resnet_cnn(width={args.width}), 1,797 digits at {args.size}x{args.size}, medians "
            f"of {args.rounds} rounds"
        )
        print(f"every run wrote the same shards (sha256): {same}")
        print(f"{'setup':<34} {'dump rows/s':>12} {'x 1 rank':>9} {'e2e rows/s':>11} {'x':>6}")
        for name, runs in results.items():
            ratio = statistics.median(a[0] / b[0] for a, b in zip(runs, base, strict=True))
            e2e = statistics.median(a[1] / b[1] for a, b in zip(runs, base, strict=True))
            print(
                f"{name:<34} {statistics.median(x[0] for x in runs):>12,.0f} {ratio:>8.2f}x "
                f"{statistics.median(x[1] for x in runs):>11,.0f} {e2e:>5.2f}x"
            )
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
