"""Dynamic batching on real compute: 8 concurrent students vs the engine in-process.

1. The engine alone (resnet_cnn on digits, one thread): samples/s at each batch size.
2. A teacher server process (one torch thread) with the best batch size as --max-batch;
   8 student threads in this process (`OnlineTeacher`, as a trainer's) each keep `--window`
   requests of 8 samples in flight (index mode), for each transport. Goal: >= 0.9x the engine's best in-process throughput.
3. Latency of one small request (1 sample) on an idle server, p50 / p99, at two max delays.

Two cores: the server computes on one thread, the students (decode only) use the other.

    .venv/bin/python bench/batching.py          # ~1.5 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lyceum.deploy.examples import digits, resnet_cnn
from lyceum.student_client.sources import OnlineTeacher
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

MODEL = "lyceum.deploy.examples:resnet_cnn"
DATASET = "lyceum.deploy.examples:digits"


def in_process(batch_sizes: list[int], seconds: float, repeats: int) -> dict[int, float]:
    data = digits()
    engine = TeacherEngine(resnet_cnn(), EngineConfig(), data[0][0])
    x_all = torch.stack([data[i][0] for i in range(max(batch_sizes))])
    out = {}
    for bs in batch_sizes:
        x = x_all[:bs]
        engine.infer(x)
        runs = []
        for _ in range(repeats):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                engine.infer(x)
                n += bs
            runs.append(n / (time.perf_counter() - start))
        out[bs] = statistics.median(runs)
    return out


class Server:
    def __init__(self, max_batch: int, max_delay_ms: float, workdir: Path) -> None:
        ready = workdir / f"ready-{max_batch}-{max_delay_ms}.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lyceum.deploy.cli", "teacher", "serve", "--model", MODEL,
             "--dataset", DATASET, "--grpc-port", "0", "--zmq-port", "0", "--threads", "1",
             "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms),
             "--ready-file", str(ready), "--exit-after-s", "600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("teacher server did not start")
            time.sleep(0.05)
        self.endpoints = {e.split("://")[0]: e for e in json.loads(ready.read_text())["endpoints"]}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def students(endpoint: str, clients: int, per_request: int, window: int, seconds: float) -> float:
    """Total samples/s of `clients` students each keeping `window` requests in flight."""
    n_data = len(digits())
    counts = [0] * clients
    stop = threading.Event()
    failures: list[BaseException] = []

    def student(k: int) -> None:
        try:
            with OnlineTeacher(endpoint, mode="index") as teacher:
                nxt, rid = k * 97, 0

                def submit() -> None:
                    nonlocal nxt, rid
                    teacher.submit(rid, torch.arange(nxt, nxt + per_request) % n_data)
                    nxt, rid = nxt + per_request, rid + 1

                for _ in range(window):
                    submit()
                while not stop.is_set():
                    for _rid, batch in teacher.poll(1.0):
                        counts[k] += len(batch)
                        submit()
                # Drain what is still in flight so the next run starts idle.
                end = time.monotonic() + 10
                while time.monotonic() < end and teacher.outstanding():
                    teacher.poll(0.2)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=student, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # warm-up: every student connected and in steady state
    start_counts, start = sum(counts), time.perf_counter()
    time.sleep(seconds)
    total = sum(counts) - start_counts
    elapsed = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return total / elapsed


def latency(endpoint: str, n: int) -> tuple[float, float]:
    with OnlineTeacher(endpoint, mode="index") as teacher:
        for i in range(20):
            teacher.request([i])
        samples = []
        for i in range(n):
            start = time.perf_counter()
            teacher.request([i % 1000])
            samples.append(time.perf_counter() - start)
    q = statistics.quantiles(samples, n=100)
    return q[49] * 1e3, q[98] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=4, help="requests in flight per student")
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--latency-requests", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [8, 16, 32, 64, 128, 256]
    engine = in_process(sizes, 1.0, args.repeats)
    best_bs = max(engine, key=lambda b: engine[b])
    best = engine[best_bs]
    print("engine in-process (resnet_cnn, 1 thread), samples/s")
    print(" | ".join(f"bs {b}: {v:,.0f}" for b, v in engine.items()))
    print(f"best: {best:,.0f} samples/s at batch {best_bs}\n")
    print(f"8 students x 8 samples, {args.window} in flight each, --max-batch {best_bs} "
          f"--max-delay-ms {args.max_delay_ms} (median of {args.repeats})")  # fmt: skip
    print(f"{'transport':<10} | {'samples/s':>10} | {'x engine best':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(best_bs, args.max_delay_ms, Path(tmp))
        try:
            for scheme in ("zmq", "grpc"):
                runs = [
                    students(server.endpoints[scheme], 8, 8, args.window, args.seconds)
                    for _ in range(args.repeats)
                ]
                value = statistics.median(runs)
                print(f"{scheme:<10} | {value:>10,.0f} | {value / best:>13.2f}")
        finally:
            server.close()
        print("\nidle server, one 1-sample request at a time: latency ms")
        print(f"{'transport':<10} | {'max delay':>9} | {'p50':>6} | {'p99':>6}")
        for delay in (0.0, 2.0):
            server = Server(best_bs, delay, Path(tmp))
            try:
                for scheme in ("zmq", "grpc"):
                    p50, p99 = latency(server.endpoints[scheme], args.latency_requests)
                    print(f"{scheme:<10} | {delay:>7.1f}ms | {p50:6.2f} | {p99:6.2f}")
            finally:
                server.close()


if __name__ == "__main__":
    main()
