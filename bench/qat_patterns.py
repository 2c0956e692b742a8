"""QAT prepare / train-eval switch / convert: torchao as it ships vs Lyceum's pattern cache.

Each run is a fresh process (a user's `lyceum quantize` or `lyceum compress`) that QATs a
small conv-BN CNN (`deploy.examples:student_cnn`-sized: conv-BN-ReLU x2 + linear) and times
`quantize`, one `.eval()` + `.train()`, and `convert`; "cached, again" repeats all three in the
same process (what a pipeline, a search or the test suite does after its first model). Runs of
both modes alternate; medians of `--rounds`. Every run's converted graph and outputs are
compared with the first torchao run's.

    .venv/bin/python bench/qat_patterns.py             # ~3-6 min on two cores
    .venv/bin/python bench/qat_patterns.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from torch import nn
    from lyceum.compression.quantization import QAT, convert, quantize
    from lyceum.compression.quantization import _pattern_cache

    if sys.argv[1] == "torchao":
        _pattern_cache.install = lambda: True  # torchao exactly as it ships
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 64, 10),
    )
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def once():
        t0 = time.perf_counter()
        prepared = quantize(model, QAT(), x)
        t1 = time.perf_counter()
        prepared.eval()
        prepared.train()
        t2 = time.perf_counter()
        prepared(x)
        converted = convert(prepared)
        t3 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2], converted

    first, converted = once()
    again, _ = once() if sys.argv[1] == "cached" else (None, None)
    print(json.dumps({"first": first, "again": again, "code": converted.code,
                      "out": converted(x).flatten().tolist()}))
    """
)


def _run(mode: str) -> dict[str, object]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode")
    args = parser.parse_args()
    times: dict[str, list[list[float]]] = {"torchao": [], "cached": [], "cached, again": []}
    reference: dict[str, object] | None = None
    same = True
    for r in range(args.rounds):
        for mode in ("torchao", "cached"):
            result = _run(mode)
            reference = reference or result
            same &= result["code"] == reference["code"] and result["out"] == reference["out"]
            times[mode].append(result["first"])  # type: ignore[arg-type]
            if result["again"] is not None:
                times["cached, again"].append(result["again"])  # type: ignore[arg-type]
            print(f"round {r + 1} {mode}: {[round(t, 2) for t in result['first']]}", flush=True)
    print(f"\nmedians of {args.rounds} rounds, seconds; same graph and outputs: {same}")
    print(f"{'run':16} {'quantize':>9} {'eval+train':>11} {'convert':>9} {'total':>7} {'x':>6}")
    base = statistics.median(sum(t) for t in times["torchao"])
    for name, runs in times.items():
        cols = [statistics.median(t[i] for t in runs) for i in range(3)]
        total = statistics.median(sum(t) for t in runs)
        print(
            f"{name:16} {cols[0]:9.2f} {cols[1]:11.2f} {cols[2]:9.2f} {total:7.2f} "
            f"{base / total:5.1f}x"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
