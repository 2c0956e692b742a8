"""Once-for-all on digits: subnets straight from the supernet against their from-scratch twins,
the subnet searched under a budget against the uniformly shrunk one, and the search's cost
against Light-NAS's train-every-candidate search.

Trains `--supernet-seeds` supernets by progressive shrinking (`--kernels`: centre-cropped
kernels, once-for-all's kernel-transform matrices, or both), then for the largest and smallest
subnets, the best one found under `--budget` (relative to the largest subnet: its predicted
latency with `--latency`, from a latency table built here on the thread clock, else its MACs),
the uniformly shrunk one (every block alike, the most costly within the budget) and the best
one found under the uniform one's own cost (the two at equal cost): test top-1 straight
from the supernet (BN re-calibrated), after a `--finetune`-epoch fine-tune, and the same
architecture trained from scratch for as many epochs as the supernet had, over `--seeds` seeds. A summary averages over the supernet seeds: each subnet's gap to its twins,
in points. Costs are CPU seconds of this process (one thread, so the load does not inflate
them): supernet training, search, candidates per CPU minute.

With `--teacher`, the space's largest subnet is first trained from scratch (seed 0, as many
epochs as the supernet gets) as a teacher, and each supernet is trained twice: distilled in
place from its largest subnet, and with every subnet distilled from that teacher's outputs on
the training set (`TeacherKnowledge`, alpha 0.5, temperature 4, as `lyceum nas supernet
train` with a `teacher:` section does from a dump); the same table for each.

With `--samplers N`, one supernet is trained and SA (warm-ups `--sa-warmup`), regularized
evolution (populations `--evolution-population`), random search and TPE each search it for N
trials under the budget, `--sampler-seeds` seeds: the best reward each reaches (minus the
validation cross-entropy; top-1 saturates on 180 validation digits).

With `--lightnas`, Light-NAS searches the same space under the same budget and iterations,
each candidate trained `--lightnas-epochs` (its reward), and its best is trained from scratch
like the twins: candidates per CPU minute and total CPU cost (search + the found subnet's
training) against once-for-all's (supernet + search + fine-tune), with the accuracy each ends at.

    .venv/bin/python bench/ofa.py --epochs 2 --seeds 3     # a small space, minutes on one core
    .venv/bin/python bench/ofa.py --epochs 2 --supernet-seeds 3 --latency --teacher --lightnas
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import torch
from torch.utils.data import Dataset

from lyceum.compression.distillation import DistillLoss
from lyceum.compression.nas import (
    Budget,
    BudgetedSpace,
    LatencyTable,
    OFASpace,
    OFASpaceConfig,
    OFATrainConfig,
    SubnetConfig,
    SubnetReward,
    Supernet,
    TeacherKnowledge,
    TrainingReward,
    build_latency_table,
    calibration_batches,
    evaluate_subnet,
    extract,
    progressive_shrinking,
    recalibrate_bn,
    search_architecture,
    search_subnet,
    train_supernet,
)
from lyceum.compression.search import SAConfig, StudyConfig, run_search
from lyceum.compression.training import train_epochs
from lyceum.deploy.examples import digits
from lyceum.proto.evaluation import top1_accuracy
from lyceum.student_client.losses import soft_label_kd

# Small enough for a CPU: three stages at 8x8, 4x4, 4x4.
SPACE = OFASpaceConfig(
    stage_channels=(16, 24, 32),
    strides=(1, 2, 1),
    kernels=(3, 5, 7),
    depths=(1, 2, 3),
    expands=(2, 3, 4),
    stem_channels=16,
    first_channels=8,
    last_channels=64,
    head_channels=128,
)


def latency_table(space: OFASpace, path: Path | None) -> LatencyTable:
    """The space's latency table (thread clock, 30 runs): read from `path` if it exists, else
    built, and written there when `path` is given (runs compared on one table)."""
    if path is not None and path.exists():
        lut = LatencyTable.load(path)
        print(f"latency table: {len(lut.entries)} ops read from {path}")
        return lut
    start = time.perf_counter()
    lut = build_latency_table(space, clock="thread", runs=30, warmup=3, progress=False)
    print(
        f"latency table: {len(lut.entries)} ops in {time.perf_counter() - start:.0f} s "
        f"(thread clock, 1 thread, batch 1, {lut.sweeps} sweeps)"
    )
    if path is not None:
        lut.save(path)
    return lut


def _uniform_under(
    space: OFASpace, cost: Callable[[SubnetConfig], float], limit: float
) -> SubnetConfig:
    """The costliest subnet with every block alike (one kernel, ratio, depth) within `limit`."""
    c = space.config
    best: tuple[float, SubnetConfig] | None = None
    for d in c.depths:
        for k in c.kernels:
            for e in c.expands:
                config = space.uniform(d, k, e)
                value = cost(config)
                if value <= limit and (best is None or value > best[0]):
                    best = (value, config)
    assert best is not None, "no uniform subnet within the budget"
    return best[1]


def _teacher(
    space: OFASpace, train: Dataset, test: Dataset, epochs: int, kd: DistillLoss
) -> TeacherKnowledge:
    """The largest subnet trained from scratch, and its logits on every training sample."""
    torch.manual_seed(0)
    model = space.build_subnet(space.largest())
    start = time.process_time()
    train_epochs(model, train, epochs=epochs, lr=3e-3, batch_size=64, seed=0, progress=False)
    model.eval()
    with torch.no_grad():
        inputs = torch.stack([train[i][0] for i in range(len(train))])  # type: ignore[arg-type]
        outputs = torch.cat([model(chunk) for chunk in inputs.split(256)])
    print(
        f"teacher: the largest subnet from scratch, {epochs} epochs in "
        f"{time.process_time() - start:.0f} CPU s, test top-1 {top1_accuracy(model, test):.4f}"
    )
    return TeacherKnowledge(outputs=outputs, loss=kd, alpha=0.5)


class _Scratch:
    """Each architecture trained from scratch once per seed (the twins do not depend on how a
    supernet was trained), test top-1 kept."""

    def __init__(self, space: OFASpace, train: Dataset, test: Dataset, epochs: int, seeds: int):
        self.space, self.train, self.test, self.epochs, self.seeds = (
            space,
            train,
            test,
            epochs,
            seeds,
        )
        self.scores: dict[SubnetConfig, list[float]] = {}
        self.cpu_s: dict[SubnetConfig, float] = {}

    def __call__(self, config: SubnetConfig) -> list[float]:
        if config not in self.scores:
            start = time.process_time()
            self.scores[config] = []
            for seed in range(self.seeds):
                torch.manual_seed(seed)
                fresh = self.space.build_subnet(config)
                train_epochs(
                    fresh,
                    self.train,
                    epochs=self.epochs,
                    lr=3e-3,
                    batch_size=64,
                    seed=seed,
                    progress=False,
                )
                self.scores[config].append(top1_accuracy(fresh, self.test))
            self.cpu_s[config] = (time.process_time() - start) / self.seeds
        return self.scores[config]


def _mean_spread(values: list[float]) -> str:
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {spread:.4f}"


def _samplers(
    args: argparse.Namespace,
    supernet: Supernet,
    train: Dataset,
    val: Dataset,
    budget: Budget,
    lut: LatencyTable | None,
) -> None:
    """SA against random search and TPE on the trained supernet (no training per candidate,
    so many trials and seeds are affordable): best reward reached at equal trials.

    The reward is minus the validation cross-entropy of the BN re-calibrated subnet, not its
    top-1: on 180 validation digits top-1 saturates (179/180 for most subnets near the budget,
    every sampler tied at it), where the loss still orders them."""
    batches = calibration_batches(train, 4, 64, 0)
    inputs = torch.stack([val[i][0] for i in range(len(val))])  # type: ignore[arg-type]
    labels = torch.tensor([int(val[i][1]) for i in range(len(val))])  # type: ignore[arg-type]

    def reward(tokens: Sequence[int]) -> float:
        model = recalibrate_bn(extract(supernet, supernet.space.subnet(tokens)), batches)
        with torch.no_grad():
            return -float(torch.nn.functional.cross_entropy(model(inputs), labels))

    budgeted = BudgetedSpace(supernet.space, budget, lut)
    results: dict[str, list[float]] = {"random": [], "TPE": [], "TPE, independent": []}
    fallbacks = {"TPE": [0, 0], "TPE, independent": [0, 0]}
    for seed in range(args.sampler_seeds):
        config = SAConfig(max_iterations=args.samplers - 1, seed=seed)
        own = [(f"SA, warm-up {w}", {"warmup": w}) for w in args.sa_warmup] + [
            (
                f"evolution, population {p}",
                {"method": "evolution", "population": p, "tournament": 4},
            )
            for p in args.evolution_population
        ]
        for name, settings in own:
            found, _ = search_architecture(
                supernet.space,
                reward,
                budget=budget,
                lut=lut,
                search=config.model_copy(update=settings),
                study=StudyConfig(storage=None, study=f"{name}-{seed}"),
                progress=False,
            )
            results.setdefault(name, []).append(found.best_reward)
        for name, sampler in (
            ("random", optuna.samplers.RandomSampler(seed=seed)),
            # Optuna 5's TPE is multivariate for one objective: a joint proposal per trial.
            ("TPE", optuna.samplers.TPESampler(seed=seed)),
            ("TPE, independent", optuna.samplers.TPESampler(seed=seed, multivariate=False)),
        ):
            found = run_search(budgeted, reward, config, sampler=sampler, progress=False)
            results[name].append(found.best_reward)
            if name in fallbacks:
                # Past its 10 random startup trials, a trial whose 10 TPE proposals were all
                # over budget is drawn at random (FeasibleSampler's fallback).
                later = found.history[10:]
                fallbacks[name][0] += sum(h["redraws"] >= 10 for h in later)
                fallbacks[name][1] += len(later)
    print(
        f"\n## Samplers on the supernet's reward ({args.samplers} trials, {args.sampler_seeds} "
        "search seeds; reward: minus the validation cross-entropy after BN re-calibration)"
    )
    print("| sampler | best reward per seed | mean | median | seeds ahead of random / tied |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, values in results.items():
        listed = " / ".join(f"{v:.4f}" for v in values)
        pairs = list(zip(values, results["random"], strict=True))
        versus = f"{sum(a > b for a, b in pairs)} / {sum(a == b for a, b in pairs)}"
        print(
            f"| {name} | {listed} | {statistics.mean(values):.4f} | "
            f"{statistics.median(values):.4f} | {'' if name == 'random' else versus} |"
        )
    for name, (fell, later) in fallbacks.items():
        print(
            f"{name}: {fell} of its {later} trials after the 10 startup ones drawn at random, "
            "its 10 proposals all over the budget"
        )


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    train, val, test = digits("train"), digits("val"), digits("test")
    space = OFASpace(SPACE)
    phases = progressive_shrinking(space, args.epochs)
    supernet_epochs = sum(p.epochs for p in phases)
    kd = functools.partial(soft_label_kd, temperature=4.0)
    lut = latency_table(space, args.lut) if args.latency else None
    figures = BudgetedSpace(space, lut=lut).figures
    largest = figures(space.init_tokens())
    smallest = figures(space.tokens(space.smallest()))
    if lut is not None:
        assert largest.latency_ms is not None
        limit: float = largest.latency_ms * (1 + args.budget)
        budget = Budget(max_latency_ms=limit)
        unit = "ms predicted"

        def cost(config: SubnetConfig) -> float:
            return float(figures(space.tokens(config)).latency_ms or 0.0)
    else:
        limit = int(largest.flops * (1 + args.budget))
        budget = Budget(max_flops=int(limit))
        unit = "MACs"

        def cost(config: SubnetConfig) -> float:
            return float(figures(space.tokens(config)).flops)

    print(
        f"space: {len(space.range_table())} tokens; largest {largest.flops:,} MACs"
        f"{'' if lut is None else f' ({largest.latency_ms:.3f} ms)'}, smallest "
        f"{smallest.flops:,}{'' if lut is None else f' ({smallest.latency_ms:.3f} ms)'}; "
        f"budget {limit:,.3f} {unit} ({args.budget:+.0%}); {len(phases)} phases x "
        f"{args.epochs} epochs = {supernet_epochs}; {args.supernet_seeds} supernet seed(s)"
    )
    teachers: list[TeacherKnowledge | None] = [None]
    if args.teacher:
        teachers.append(_teacher(space, train, test, supernet_epochs, kd))
    if args.samplers:
        torch.manual_seed(0)
        supernet = Supernet(space, kernel_transform=args.kernels != "crop")
        train_supernet(
            supernet, train, OFATrainConfig(phases=phases), kd, teacher=teachers[-1], progress=False
        )
        _samplers(args, supernet, train, val, budget, lut)
        return
    scratch = _Scratch(space, train, test, supernet_epochs, args.seeds)
    modes = ["crop", "transform"] if args.kernels == "both" else [args.kernels]
    # (mode, teaching) -> subnet name -> per supernet seed: (direct, tuned, scratch mean, cost)
    summary: dict[tuple[str, str], dict[str, list[tuple[float, float, float, float]]]] = {}
    ofa_costs: list[tuple[float, float, float, int]] = []
    for mode, teacher, seed in itertools.product(modes, teachers, range(args.supernet_seeds)):
        teaching = "in place" if teacher is None else "from the teacher"
        torch.manual_seed(seed)
        supernet = Supernet(space, kernel_transform=mode == "transform")
        start = time.process_time()
        train_supernet(
            supernet,
            train,
            OFATrainConfig(phases=phases, seed=seed),
            kd,
            teacher=teacher,
            progress=False,
        )
        trained_s = time.process_time() - start
        reward = SubnetReward(supernet, train, val, seed=seed)
        start = time.process_time()
        result, _ = search_subnet(
            reward,
            budget=budget,
            lut=lut,
            search=SAConfig(max_iterations=args.iterations, seed=seed),
            study=StudyConfig(storage=None, study="ofa"),
            progress=False,
        )
        search_s = time.process_time() - start
        print(
            f"\nkernel {mode}, distilled {teaching}, supernet seed {seed}: trained in "
            f"{trained_s:.0f} CPU s; search {len(reward.evaluated)} subnets in {search_s:.0f} "
            f"CPU s ({60 * len(reward.evaluated) / search_s:.0f} per CPU minute)"
        )
        uniform = _uniform_under(space, cost, limit)
        # The uniform grid is coarse: its best under the budget can cost well below it. Searched
        # again under the uniform subnet's own cost, the two compare at equal cost.
        level = cost(uniform)
        equal, _ = search_subnet(
            SubnetReward(supernet, train, val, seed=seed),
            budget=Budget(max_latency_ms=level)
            if lut is not None
            else Budget(max_flops=int(level)),
            lut=lut,
            search=SAConfig(max_iterations=args.iterations, seed=seed),
            study=StudyConfig(storage=None, study="ofa-equal"),
            progress=False,
        )
        subnets = {
            "largest": space.largest(),
            "smallest": space.smallest(),
            "searched": space.subnet(result.best_tokens),
            "uniform": uniform,
            "searched at uniform's cost": space.subnet(equal.best_tokens),
        }
        print(f"| subnet | MACs | {unit} | supernet | +fine-tune | from scratch (seeds) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        rows = summary.setdefault((mode, teaching), {})
        tune_s = 0.0
        for name, config in subnets.items():
            direct = evaluate_subnet(supernet, config, train, test)
            # Fine-tuned from the re-calibrated subnet, as it is exported.
            start = time.process_time()
            tuned_model = recalibrate_bn(extract(supernet, config), reward.batches)
            train_epochs(
                tuned_model, train, epochs=args.finetune, lr=1e-3, batch_size=64, progress=False
            )
            if name == "searched":
                tune_s = time.process_time() - start
            tuned = top1_accuracy(tuned_model, test)
            scores = scratch(config)
            f = figures(space.tokens(config))
            shown = f"{f.flops:,}" if lut is None else f"{f.latency_ms:.3f}"
            print(
                f"| {name} | {f.flops:,} | {shown} | {direct:.4f} | {tuned:.4f} | "
                f"{_mean_spread(scores)} |"
            )
            rows.setdefault(name, []).append((direct, tuned, statistics.mean(scores), cost(config)))
        ofa_costs.append((trained_s, search_s, tune_s, len(reward.evaluated)))
    print(f"\n## Summary over {args.supernet_seeds} supernet seed(s) (means; gaps in points)")
    print(
        f"| kernels | distilled | subnet | {unit} | supernet | +fine-tune | from scratch | "
        "gap supernet - scratch | gap fine-tuned - scratch |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (mode, teaching), rows in summary.items():
        for name, values in rows.items():
            direct, tuned, twin, spent = (statistics.mean(v[i] for v in values) for i in range(4))
            gaps = [100 * (v[0] - v[2]) for v in values]
            print(
                f"| {mode} | {teaching} | {name} | {spent:,.3f} | {direct:.4f} | {tuned:.4f} | "
                f"{twin:.4f} | {statistics.mean(gaps):+.1f} ({min(gaps):+.1f} to "
                f"{max(gaps):+.1f}) | {100 * (tuned - twin):+.1f} |"
            )
    if args.lightnas:
        _lightnas(args, space, train, val, budget, lut, scratch, ofa_costs, summary)


def _lightnas(
    args: argparse.Namespace,
    space: OFASpace,
    train: Dataset,
    val: Dataset,
    budget: Budget,
    lut: LatencyTable | None,
    scratch: _Scratch,
    ofa_costs: list[tuple[float, float, float, int]],
    summary: dict[tuple[str, str], dict[str, list[tuple[float, float, float, float]]]],
) -> None:
    """Light-NAS on the same space and budget: every candidate trained for its reward."""
    reward = TrainingReward(space, train, val, epochs=args.lightnas_epochs, batch_size=64, lr=3e-3)
    start = time.process_time()
    result, _ = search_architecture(
        space,
        reward,
        budget=budget,
        lut=lut,
        search=SAConfig(max_iterations=args.iterations, seed=0),
        study=StudyConfig(storage=None, study="lightnas"),
        progress=False,
    )
    search_s = time.process_time() - start
    found = space.subnet(result.best_tokens)
    scores = scratch(found)
    final_s = scratch.cpu_s[found]
    candidates = len(reward.built)
    trained, searched, tuned, evaluated = (
        statistics.mean(c[i] for c in ofa_costs) for i in range(4)
    )
    ofa_searched = [v for (_, _), rows in summary.items() for v in rows["searched"]]
    print(f"\n## Search cost against Light-NAS (same space, budget, {args.iterations} iterations)")
    print(
        "| search | candidates | per CPU minute | CPU s: training | search | final | total | top-1 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| once-for-all (mean of {len(ofa_costs)} runs) | {evaluated:.0f} | "
        f"{60 * evaluated / searched:.0f} | {trained:.0f} (supernet) | {searched:.0f} | "
        f"{tuned:.0f} (fine-tune) | {trained + searched + tuned:.0f} | "
        f"{statistics.mean(v[1] for v in ofa_searched):.4f} (fine-tuned), "
        f"{statistics.mean(v[0] for v in ofa_searched):.4f} (straight) |"
    )
    print(
        f"| Light-NAS ({args.lightnas_epochs}-epoch rewards) | {candidates} | "
        f"{60 * candidates / search_s:.1f} | - | {search_s:.0f} | {final_s:.0f} (from "
        f"scratch, one seed) | {search_s + final_s:.0f} | {statistics.mean(scores):.4f} "
        f"(from scratch, {len(scores)} seeds) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per phase (default 2).")
    parser.add_argument("--seeds", type=int, default=3, help="From-scratch seeds (default 3).")
    parser.add_argument(
        "--supernet-seeds", type=int, default=1, help="Supernets trained (default 1)."
    )
    parser.add_argument("--finetune", type=int, default=2, help="Fine-tune epochs (default 2).")
    parser.add_argument("--iterations", type=int, default=40, help="SA candidates (default 40).")
    parser.add_argument(
        "--budget",
        type=float,
        default=-0.4,
        help="Budget relative to the largest subnet (default -0.4).",
    )
    parser.add_argument(
        "--latency",
        action="store_true",
        help="Budget on predicted latency (a latency table built first) instead of MACs.",
    )
    parser.add_argument(
        "--lut",
        type=Path,
        help="With --latency: read the latency table from this file if it exists, else build "
        "it and write it there (runs compared on one table, hence one budget).",
    )
    parser.add_argument(
        "--kernels",
        choices=["crop", "transform", "both"],
        default="transform",
        help="Smaller kernels as centre crops, through transform matrices, or both "
        "(default transform).",
    )
    parser.add_argument(
        "--teacher",
        action="store_true",
        help="Also train the supernet distilled from a teacher (the largest subnet trained "
        "from scratch) instead of in place.",
    )
    parser.add_argument(
        "--lightnas", action="store_true", help="Also search with Light-NAS's trained rewards."
    )
    parser.add_argument(
        "--samplers",
        type=int,
        default=0,
        help="Instead of the tables: train one supernet (from the teacher with --teacher) and "
        "compare SA, random search and TPE at this many trials on its reward (default 0: off).",
    )
    parser.add_argument(
        "--sampler-seeds", type=int, default=5, help="Search seeds of --samplers (default 5)."
    )
    parser.add_argument(
        "--sa-warmup",
        type=int,
        nargs="+",
        default=[0, 10],
        help="SA's warm-up trials (random draws before annealing) of --samplers, one SA row "
        "each (default 0 10).",
    )
    parser.add_argument(
        "--evolution-population",
        type=int,
        nargs="*",
        default=[10],
        help="Regularized evolution's populations (tournament 4) of --samplers, one row each "
        "(default 10; none: no evolution row).",
    )
    parser.add_argument(
        "--lightnas-epochs", type=int, default=2, help="Light-NAS reward epochs (default 2)."
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
