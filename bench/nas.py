"""Light-NAS benchmark: the latency table's accuracy, samplers at equal trials, the search's
per-trial overhead as the study grows, and 2 workers against 1.

    .venv/bin/python bench/nas.py                       # every section (~10-20 min loaded)
    .venv/bin/python bench/nas.py --only lut overhead   # some of them

Sections (each prints one table and the machine's load average next to it):

- lut: build the Light-NAS latency table (every distinct block of the 30-token space on 8x8
  inputs, batch 1, one thread) once per `--interleave` x `--sweeps` setting, then predict
  `--networks` random architectures, measured round-robin twice: mean absolute percentage
  error and Spearman rank correlation against each measurement (goal: <= 5%, >= 0.95), the
  time each table took, the last table with its overheads refitted on 10 of the networks, and
  the two measurements against each other (the noise floor). `--clock thread` times CPU time
  of the calling thread (what a loaded machine can measure); `wall` is the latency a user
  sees, noisy under load.
- samplers: simulated annealing vs random search vs Optuna's TPE at the same number of trials,
  `--seeds` search seeds, the reward a short training's validation accuracy on digits under a
  -30% FLOPs budget: best reward reached, median over seeds.
- overhead: seconds per trial spent outside the objective (sampler + storage: the chain
  replayed from the study, the heartbeat, ask/tell) when the SQLite study already holds 10,
  100 and 1,000 finished trials; median of `--repeats` trials at each size, with the
  process's CPU time and the SQL statements sent per trial (which the load does not move).
- workers: trials per hour of one worker process against two on one SQLite study (same
  reward, same number of trials).
- kdrank: whether distilled short-training rewards rank architectures more like full
  training does: `--archs` random subnets of bench/ofa.py's small space, `--epochs` rewards
  with and without KD from a teacher, Spearman against `--final-epochs` training
  (`--final-seeds` seeds; not in the default sections).
- table: the Light-NAS table on digits. The space's initial architecture (MobileNetV2) against
  the best found by SA under a -30% FLOPs budget and under a -20% latency budget (the latency
  table's prediction, built first on this CPU), each trained `--final-epochs` on the train
  split with `--final-seeds` seeds: MACs, parameters, predicted and measured latency (thread
  clock, batch 1, one thread) and test accuracy per seed. `--rows` and `--lut` split it
  over processes that share one latency table.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch

from lyceum.compression.nas import (
    Architecture,
    Budget,
    BudgetedSpace,
    FinalTraining,
    LatencyTable,
    TrainingReward,
    build_latency_table,
    lightnas_space,
    measure_network,
    measure_networks,
    search_architecture,
    train_architecture,
)
from lyceum.compression.search import SAConfig, StudyConfig, run_search
from lyceum.deploy.examples import digits


def _load() -> str:
    return "load {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank)."""
    return statistics.correlation(_ranks(a), _ranks(b))


def _accuracy(predicted: Sequence[float], measured: Sequence[float]) -> str:
    errors = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    return (
        f"{100 * statistics.mean(errors):.1f}% | {100 * statistics.median(errors):.1f}% | "
        f"{100 * max(errors):.1f}% | {spearman(predicted, measured):.3f}"
    )


def bench_lut(
    networks: int, runs: int, clock: str, interleaves: Sequence[int], sweeps: Sequence[int]
) -> None:
    space = lightnas_space(input_size=8)
    rows = []
    for interleave, sweep in itertools.product(interleaves, sweeps):
        start = time.perf_counter()
        table = build_latency_table(
            space,
            runs=runs,
            warmup=3,
            clock=clock,  # type: ignore[arg-type]
            interleave=interleave,
            sweeps=sweep,
            progress=False,
        )
        rows.append((f"{interleave} / {sweep}", time.perf_counter() - start, table))
    rng = random.Random(1)
    candidates = [[rng.randrange(n) for n in space.range_table()] for _ in range(networks)]
    measure = rows[-1][2]
    # Round-robin, as the tables' own fit networks: one after another, each network would be
    # measured at its own moment of the shared machine's speed.
    first = measure_networks(space, candidates, measure, runs=runs, warmup=3)
    again = measure_networks(space, candidates, measure, runs=runs, warmup=3)
    # The last table's overheads refitted on 10 of the networks measured in the same rounds,
    # predicting the others: what the table does when no drift lies between fit and use.
    refit = measure.fit_overheads(
        [(space.ops(t), ms) for t, ms in zip(candidates[:10], first[:10], strict=True)]
    )
    print(f"\n## latency table ({clock} clock, batch 1, 1 thread, {runs} runs; {_load()})")
    print(
        "| interleave / sweeps | ops | build s | overhead ms/network | ms/op | networks | "
        "MAPE | median APE | max APE | Spearman | against the second measurement |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, built_s, table in rows:
        predicted = [table.predict(space.ops(t)) for t in candidates]
        print(
            f"| {name} | {len(table.entries)} | {built_s:.0f} | {table.overhead_ms:.3f} | "
            f"{table.per_op_ms:.4f} | {networks} | {_accuracy(predicted, first)} | "
            f"{_accuracy(predicted, again)} |"
        )
    held_out = [refit.predict(space.ops(t)) for t in candidates[10:]]
    print(
        f"| {rows[-1][0]}, overheads refitted on 10 of the networks | | | "
        f"{refit.overhead_ms:.3f} | {refit.per_op_ms:.4f} | {networks - 10} held out | "
        f"{_accuracy(held_out, first[10:])} | {_accuracy(held_out, again[10:])} |"
    )
    print(
        f"| second measurement against the first | | | | | {networks} | {_accuracy(again, first)} | |"
    )
    print(
        f"measured latency: median {statistics.median(first):.2f} ms, "
        f"range {min(first):.2f}-{max(first):.2f} ms ({_load()})"
    )


def _reward(train_limit: int, epochs: int) -> tuple[TrainingReward, BudgetedSpace]:
    space = lightnas_space(input_size=8)
    budgeted = BudgetedSpace(space)
    budget = Budget(max_flops=int(0.7 * budgeted.figures(space.init_tokens()).flops))
    reward = TrainingReward(
        space,
        digits("train", limit=train_limit),
        digits("val"),
        epochs=epochs,
        batch_size=64,
        lr=3e-3,
    )
    return reward, BudgetedSpace(space, budget)


def bench_samplers(trials: int, seeds: int, train_limit: int, epochs: int) -> None:
    reward, budgeted = _reward(train_limit, epochs)
    results: dict[str, list[float]] = {"SA": [], "random": [], "TPE": []}
    for seed in range(seeds):
        config = SAConfig(max_iterations=trials - 1, seed=seed)
        sa, _ = search_architecture(
            budgeted.space, reward, budget=budgeted.budget, search=config, progress=False
        )
        results["SA"].append(sa.best_reward)
        for name, sampler in (
            ("random", optuna.samplers.RandomSampler(seed=seed)),
            ("TPE", optuna.samplers.TPESampler(seed=seed)),
        ):
            found = run_search(budgeted, reward, config, sampler=sampler, progress=False)
            results[name].append(found.best_reward)
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in results.items()))
    print(
        f"\n## samplers at {trials} trials, {seeds} seeds (reward: val accuracy after {epochs} "
        f"epoch(s) on {train_limit} train digits, -30% FLOPs budget; {_load()})"
    )
    print("| sampler | best reward per seed | median |")
    print("|---|---|---|")
    for name, values in results.items():
        listed = " / ".join(f"{v:.4f}" for v in values)
        print(f"| {name} | {listed} | {statistics.median(values):.4f} |")


class _Toy:
    def range_table(self) -> list[int]:
        return [4, 3, 3, 2, 2, 2] * 5

    def init_tokens(self) -> list[int]:
        return [3, 1, 1, 0, 1, 0] * 5

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        return True


def bench_overhead(sizes: Sequence[int], repeats: int) -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    statements = [0]

    def count(*_: object) -> None:
        statements[0] += 1

    # Every SQL statement any storage engine sends: the figure the load does not move.
    event.listen(Engine, "before_cursor_execute", count)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        study = StudyConfig(storage=str(Path(tmp) / "overhead.db"), study="overhead")
        for size in sizes:
            # Fill the study to `size` finished trials, then time `repeats` more in one worker:
            # the objective is instant, so the time between two finished trials is the
            # sampler's and the storage's (chain replay, ask, heartbeat, twin check, tell).
            run_search(
                _Toy(), lambda t: -float(sum(t)), SAConfig(max_iterations=size - 1),
                study=study, progress=False,
            )  # fmt: skip
            stamps: list[tuple[float, float, int]] = []

            def stamp(_: object, s: list[tuple[float, float, int]] = stamps) -> None:
                s.append((time.perf_counter(), time.process_time(), statements[0]))

            run_search(
                _Toy(), lambda t: -float(sum(t)), SAConfig(max_iterations=size + repeats),
                study=study, progress=False, on_trial=stamp,
            )  # fmt: skip
            gaps = [[b[k] - a[k] for a, b in itertools.pairwise(stamps)] for k in range(3)]
            rows.append((size, *(statistics.median(g) for g in gaps), min(gaps[0]), max(gaps[0])))
    event.remove(Engine, "before_cursor_execute", count)
    print(f"\n## sampler + storage overhead per trial, SQLite ({_load()})")
    print("| finished trials | median ms/trial | min | max | CPU ms/trial | SQL statements/trial |")
    print("|---|---|---|---|---|---|")
    for size, wall, cpu, sql, lo, hi in rows:
        print(
            f"| {size:,} | {1000 * wall:.1f} | {1000 * lo:.1f} | {1000 * hi:.1f} | "
            f"{1000 * cpu:.1f} | {sql:.0f} |"
        )


_WORKER = """
import sys
from lyceum.compression.search import SAConfig, StudyConfig
sys.path.insert(0, sys.argv[4])
from nas import _reward
from lyceum.compression.nas import search_architecture
reward, budgeted = _reward(int(sys.argv[2]), int(sys.argv[5]))
search_architecture(budgeted.space, reward, budget=budgeted.budget,
    search=SAConfig(max_iterations=int(sys.argv[3]) - 1, seed=0),
    study=StudyConfig(storage=sys.argv[1], study="workers"), progress=False)
"""


def bench_workers(trials: int, train_limit: int, epochs: int) -> None:
    rows = []
    here = str(Path(__file__).resolve().parent)
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            storage = str(Path(tmp) / "w.db")
            # The study exists before the workers start (one creates the schema).
            optuna.create_study(storage=f"sqlite:///{storage}", study_name="workers")
            command = [sys.executable, "-c", _WORKER, storage, str(train_limit), str(trials), here]
            command.append(str(epochs))
            start = time.perf_counter()
            procs = [subprocess.Popen(command) for _ in range(workers)]
            codes = [p.wait() for p in procs]
            elapsed = time.perf_counter() - start
            if any(codes):
                raise SystemExit(f"a worker failed: exit codes {codes}")
            rows.append((workers, elapsed, trials / elapsed * 3600))
    print(
        f"\n## workers on one SQLite study: {trials} trials, reward {epochs} epochs on {train_limit} "
        f"digits ({_load()}; 2 cores shared with other jobs)"
    )
    print("| workers | wall s (incl. start-up) | trials/hour | vs 1 worker |")
    print("|---|---|---|---|")
    for workers, elapsed, rate in rows:
        print(f"| {workers} | {elapsed:.0f} | {rate:.0f} | {rate / rows[0][2]:.2f}x |")


def _final(
    tokens: list[int], seeds: int, epochs: int, table: LatencyTable, out: Path
) -> tuple[list[float], float]:
    """Test accuracies of `tokens` trained with each seed, and its measured latency in ms."""
    space = lightnas_space(input_size=8)
    accuracies = []
    for seed in range(seeds):
        config = FinalTraining(
            epochs=epochs, seed=seed, out_dir=out / f"seed{seed}", progress=False, latency_runs=1
        )
        report = train_architecture(
            Architecture(tokens=tokens),
            config,
            train_data=digits("train"),
            test_data=digits("test"),
        )
        accuracies.append(report.accuracy)
        print(f"  seed {seed}: test accuracy {report.accuracy:.4f} ({_load()})", flush=True)
    return accuracies, measure_network(space, tokens, table, runs=30, warmup=5)


def bench_kdrank(archs: int, epochs: int, final_epochs: int, final_seeds: int) -> None:
    """Do distilled short-training rewards rank architectures more like full training does?

    On the small once-for-all space of bench/ofa.py (a Light-NAS-style MobileNetV2 space whose
    candidates train in seconds here; on the 30-token Light-NAS space a 1-epoch candidate is
    at chance on digits): `archs` random distinct subnets, each rewarded after `epochs` of
    training on cross-entropy and distilled from a teacher (the space's largest subnet trained
    `final_epochs`, alpha 0.5, T=4), against its test top-1 after `final_epochs` (mean of
    `final_seeds` seeds). Spearman of each reward with that, and of two full-training seeds with
    each other (how well the reference ranks itself).
    """
    from ofa import SPACE, _teacher

    from lyceum.compression.nas import OFASpace
    from lyceum.compression.training import train_epochs
    from lyceum.proto.evaluation import top1_accuracy
    from lyceum.student_client.losses import soft_label_kd

    space = OFASpace(SPACE)
    train, val, test = digits("train"), digits("val"), digits("test")
    kd = functools.partial(soft_label_kd, temperature=4.0)
    teacher = _teacher(space, train, test, final_epochs, kd)
    rng = random.Random(7)
    candidates: list[list[int]] = []
    while len(candidates) < archs:
        tokens = space.canonical([rng.randrange(n) for n in space.range_table()])
        if tokens not in candidates:
            candidates.append(tokens)
    plain = TrainingReward(space, train, val, epochs=epochs, batch_size=64, lr=3e-3)
    taught = TrainingReward(
        space, train, val, epochs=epochs, batch_size=64, lr=3e-3, teacher=teacher
    )
    short_ce, short_kd, full = [], [], []
    per_seed: list[list[float]] = [[] for _ in range(final_seeds)]
    for i, tokens in enumerate(candidates):
        short_ce.append(plain(tokens))
        short_kd.append(taught(tokens))
        for seed in range(final_seeds):
            torch.manual_seed(seed)
            model = space.build(tokens)
            train_epochs(
                model, train, epochs=final_epochs, lr=3e-3, batch_size=64, seed=seed, progress=False
            )
            per_seed[seed].append(top1_accuracy(model, test))
        full.append(statistics.mean(s[-1] for s in per_seed))
        print(
            f"  arch {i + 1}/{archs}: {epochs}-epoch CE {short_ce[-1]:.4f}, KD {short_kd[-1]:.4f}; "
            f"full {full[-1]:.4f}",
            flush=True,
        )
    print(
        f"\n## Short rewards against full training ({archs} archs, {epochs} vs {final_epochs} "
        f"epochs, {final_seeds} seeds; {_load()})"
    )
    print("| reward | mean | Spearman with full training |")
    print("|---|---|---|")
    print(
        f"| {epochs}-epoch CE | {statistics.mean(short_ce):.4f} | {spearman(short_ce, full):.3f} |"
    )
    print(
        f"| {epochs}-epoch KD | {statistics.mean(short_kd):.4f} | {spearman(short_kd, full):.3f} |"
    )
    if final_seeds > 1:
        print(
            f"| full training, seed 0 against seed 1 | {statistics.mean(per_seed[0]):.4f} | "
            f"{spearman(per_seed[0], per_seed[1]):.3f} |"
        )


_ROWS = {
    "initial": "initial (MobileNetV2 tokens)",
    "flops": "best under -30% FLOPs",
    "latency": "best under -20% latency",
}


def _latency_table(path: Path | None, runs: int) -> LatencyTable:
    """The table at `path` if it exists (one build shared by the processes of a split table
    run), else a fresh build, saved there."""
    if path is not None and path.exists():
        return LatencyTable.load(path)
    space = lightnas_space(input_size=8)
    table = build_latency_table(space, runs=runs, warmup=3, clock="thread", progress=False)
    if path is not None:
        table.save(path)
    return table


def bench_table(
    rows: Sequence[str],
    lut: Path | None,
    trials: int,
    train_limit: int,
    epochs: int,
    final_epochs: int,
    final_seeds: int,
    runs: int,
) -> None:
    space = lightnas_space(input_size=8)
    table = _latency_table(lut, runs)
    budgeted = BudgetedSpace(space, lut=table)
    init = space.init_tokens()
    start = budgeted.figures(init)
    assert start.latency_ms is not None  # the space has a latency table
    init_ms = measure_network(space, init, table, runs=30, warmup=5)
    print(f"latency table ready ({_load()}); initial: {start}, {init_ms:.2f} ms", flush=True)
    reward = TrainingReward(
        space, digits("train", limit=train_limit), digits("val"), epochs=epochs,
        batch_size=64, lr=3e-3,
    )  # fmt: skip
    budgets = {
        "initial": None,
        "flops": Budget(max_flops=int(0.7 * start.flops)),
        "latency": Budget(max_latency_ms=0.8 * start.latency_ms),
    }
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            tokens, found = init, None
            budget = budgets[row]
            if budget is not None:
                result, _ = search_architecture(
                    space, reward, budget=budget, lut=table,
                    search=SAConfig(max_iterations=trials - 1, seed=0), progress=False,
                )  # fmt: skip
                tokens, found = result.best_tokens, result.best_reward
            print(f"{_ROWS[row]}: tokens {tokens}, search reward {found} ({_load()})", flush=True)
            accuracies, measured = _final(tokens, final_seeds, final_epochs, table, Path(tmp) / row)
            done.append((_ROWS[row], budgeted.figures(tokens), measured, found, accuracies))
    print(
        f"\n## Light-NAS on digits: search {trials} trials (reward: val accuracy after {epochs} "
        f"epochs on {train_limit} train digits), final training {final_epochs} epochs on the "
        f"1,257 train digits, test accuracy on 360, {final_seeds} seeds ({_load()})"
    )
    print(
        "| architecture | MACs | params | predicted ms | measured ms | search reward "
        "| test accuracy per seed | mean |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, f, measured, found, accuracies in done:
        listed = " / ".join(f"{a:.4f}" for a in accuracies)
        shown = "-" if found is None else f"{found:.4f}"
        print(
            f"| {name} | {f.flops:,} ({f.flops / start.flops - 1:+.0%}) | {f.params:,} | "
            f"{f.latency_ms:.2f} | {measured:.2f} ({measured / init_ms - 1:+.0%}) | {shown} | "
            f"{listed} | {statistics.mean(accuracies):.4f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="*", default=["lut", "samplers", "overhead", "workers", "table"],
        choices=["lut", "samplers", "overhead", "workers", "table", "kdrank"],
    )  # fmt: skip
    parser.add_argument("--networks", type=int, default=50, help="LUT: random networks")
    parser.add_argument("--runs", type=int, default=20, help="LUT: timed passes per op/network")
    parser.add_argument("--clock", choices=["wall", "thread"], default="thread")
    parser.add_argument(
        "--interleave", type=int, nargs="+", default=[16],
        help="LUT: ops timed in turn per entry, one table each (1: each op alone, the old way)",
    )  # fmt: skip
    parser.add_argument(
        "--sweeps", type=int, nargs="+", default=[1, 3],
        help="LUT: passes over all ops sharing the runs, one table per interleave x sweeps",
    )  # fmt: skip
    parser.add_argument("--trials", type=int, default=15, help="samplers/workers: trials")
    parser.add_argument("--seeds", type=int, default=3, help="samplers: search seeds")
    parser.add_argument("--train-limit", type=int, default=1257, help="reward: train digits")
    parser.add_argument("--epochs", type=int, default=2, help="reward: training epochs")
    parser.add_argument("--repeats", type=int, default=5, help="overhead: trials timed")
    parser.add_argument("--archs", type=int, default=20, help="kdrank: random architectures")
    parser.add_argument("--final-epochs", type=int, default=30, help="table: final training")
    parser.add_argument("--final-seeds", type=int, default=3, help="table: final trainings")
    parser.add_argument(
        "--rows", nargs="*", default=list(_ROWS), choices=list(_ROWS),
        help="table: which rows (run several processes on some rows each, one --lut)",
    )  # fmt: skip
    parser.add_argument(
        "--lut", type=Path, default=None,
        help="table: latency table file, built and saved there when absent",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "lut" in args.only:
        bench_lut(args.networks, args.runs, args.clock, args.interleave, args.sweeps)
    if "overhead" in args.only:
        bench_overhead([10, 100, 1000], args.repeats)
    if "samplers" in args.only:
        bench_samplers(args.trials, args.seeds, args.train_limit, args.epochs)
    if "workers" in args.only:
        bench_workers(args.trials, args.train_limit, args.epochs)
    if "kdrank" in args.only:
        bench_kdrank(args.archs, args.epochs, args.final_epochs, args.final_seeds)
    if "table" in args.only:
        bench_table(
            args.rows, args.lut, args.trials, args.train_limit, args.epochs, args.final_epochs,
            args.final_seeds, args.runs,
        )  # fmt: skip


if __name__ == "__main__":
    main()
