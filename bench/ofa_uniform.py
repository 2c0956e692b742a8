"""Searched subnets against uniformly shrunk ones at equal predicted latency (issue 18's second
goal), on digits made hard enough to tell architectures apart.

On clean digits every subnet near the budget scores 98-99% on 360 test images, so a searched and
a uniform subnet differ by one image or none (bench/README: 0.9593 vs 0.9583). Here the images
get Gaussian noise (`--noise`, one fixed draw per image and split, pixel values in [0, 1]), and
each comparison is repeated over `--levels` uniform subnets (every block the same kernel, depth
and expansion) between the smallest and the largest, and over `--supernet-seeds` supernets.

Each supernet is trained by progressive shrinking, every subnet distilled from a teacher (the
largest subnet trained from scratch, as `bench/ofa.py --teacher`). For each level, the search
runs under the uniform subnet's own predicted latency (`--iterations` trials, SA with
`--warmup`), once per reward: validation top-1 (`SubnetReward`, what `lyceum nas supernet
search` uses) and minus the validation cross-entropy (no ties). Both subnets are then scored on
the test split straight from the supernet (BN re-calibrated on the same 4 training batches):
top-1 and cross-entropy.

    .venv/bin/python -u bench/ofa_uniform.py --noise 0 0.5 --supernet-seeds 3 --levels 5
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ofa import SPACE, _teacher, latency_table  # bench/ is the script's directory
from torch.utils.data import Dataset

from lyceum.compression.nas import (
    Budget,
    BudgetedSpace,
    OFASpace,
    OFATrainConfig,
    SubnetConfig,
    SubnetReward,
    Supernet,
    calibration_batches,
    extract,
    progressive_shrinking,
    recalibrate_bn,
    search_architecture,
    train_supernet,
)
from lyceum.compression.search import SAConfig, StudyConfig
from lyceum.deploy.examples import digits
from lyceum.student_client.losses import soft_label_kd


class _Noisy(Dataset[tuple[torch.Tensor, int]]):
    """A split's images with Gaussian noise of `sigma`, drawn once from `seed`."""

    def __init__(self, data: Dataset, sigma: float, seed: int) -> None:
        n = len(data)  # type: ignore[arg-type]
        images = torch.stack([data[i][0] for i in range(n)])
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        self.images = images + sigma * noise
        self.labels = torch.tensor([int(data[i][1]) for i in range(n)])

    def split(self, count: int) -> tuple[_Noisy, _Noisy]:
        """The first items but `count`, and the last `count`."""
        head, tail = copy.copy(self), copy.copy(self)
        head.images, head.labels = self.images[:-count], self.labels[:-count]
        tail.images, tail.labels = self.images[-count:], self.labels[-count:]
        return head, tail

    def join(self, other: _Noisy) -> _Noisy:
        """These items, then `other`'s."""
        joined = copy.copy(self)
        joined.images = torch.cat([self.images, other.images])
        joined.labels = torch.cat([self.labels, other.labels])
        return joined

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _scores(
    supernet: Supernet, config: SubnetConfig, batches: list[torch.Tensor], data: _Noisy
) -> tuple[float, float]:
    """Top-1 and cross-entropy on `data` of subnet `config`, straight from the supernet."""
    model = recalibrate_bn(extract(supernet, config), batches)
    with torch.no_grad():
        logits = model(data.images)
    top1 = float((logits.argmax(1) == data.labels).float().mean())
    return top1, float(torch.nn.functional.cross_entropy(logits, data.labels))


def _minus_ce(
    supernet: Supernet, batches: list[torch.Tensor], data: _Noisy, tokens: Sequence[int]
) -> float:
    """The search reward without ties: minus the cross-entropy on `data`."""
    return -_scores(supernet, supernet.space.subnet(tokens), batches, data)[1]


def _distance(cost: Callable[[SubnetConfig], float], target: float, config: SubnetConfig) -> float:
    return abs(cost(config) - target)


def _levels(
    space: OFASpace, cost: Callable[[SubnetConfig], float], count: int
) -> list[SubnetConfig]:
    """Up to `count` uniform subnets, the nearest to costs evenly spread between the smallest
    subnet's and the largest's (both left out: under the largest's cost a search can only find
    it, under the smallest's nothing else)."""
    c = space.config
    low, high = cost(space.smallest()), cost(space.largest())
    uniform = {space.uniform(d, k, e) for d in c.depths for k in c.kernels for e in c.expands} - {
        space.largest(),
        space.smallest(),
    }
    targets = [low + (high - low) * (i + 1) / (count + 1) for i in range(count)]
    picked = {min(uniform, key=functools.partial(_distance, cost, t)) for t in targets}
    return sorted(picked, key=cost)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    space = OFASpace(SPACE)
    phases = progressive_shrinking(space, args.epochs)
    epochs = sum(p.epochs for p in phases)
    kd = functools.partial(soft_label_kd, temperature=4.0)
    lut = latency_table(space, args.lut)
    figures = BudgetedSpace(space, lut=lut).figures

    def cost(config: SubnetConfig) -> float:
        return float(figures(space.tokens(config)).latency_ms or 0.0)

    levels = _levels(space, cost, args.levels)
    print(
        f"{len(lut.entries)} ops in the latency table; levels (depth, kernel, expand of every "
        f"block; ms predicted): "
        + ", ".join(f"{_uniform_name(u)} {cost(u):.3f}" for u in levels)
        + f"; largest {cost(space.largest()):.3f}"
    )
    for sigma in args.noise:
        train, val, test = (
            _Noisy(digits(split), sigma, seed)
            for seed, split in enumerate(("train", "val", "test"))
        )
        if args.val_extra:
            train, moved = train.split(args.val_extra)
            val = val.join(moved)
        teacher = _teacher(space, train, test, epochs, kd)
        # (level, reward) -> per supernet seed: (searched top-1, CE), uniform's (top-1, CE)
        rows: dict[tuple[int, str], list[tuple[float, float, float, float]]] = {}
        start = time.process_time()
        for seed in range(args.supernet_seeds):
            torch.manual_seed(seed)
            supernet = Supernet(space)
            train_supernet(
                supernet, train, OFATrainConfig(phases=phases, seed=seed), kd, teacher=teacher,
                progress=False,
            )  # fmt: skip
            batches = calibration_batches(train, 4, 64, seed)
            rewards: dict[str, Callable[[Sequence[int]], float]] = {
                "val top-1": SubnetReward(supernet, train, val, seed=seed),
                "-val CE": functools.partial(_minus_ce, supernet, batches, val),
            }
            for i, uniform in enumerate(levels):
                baseline = _scores(supernet, uniform, batches, test)
                for name, reward in rewards.items():
                    found, _ = search_architecture(
                        space,
                        reward,
                        budget=Budget(max_latency_ms=cost(uniform)),
                        lut=lut,
                        search=SAConfig(
                            max_iterations=args.iterations, seed=seed, warmup=args.warmup
                        ),
                        study=StudyConfig(storage=None, study=f"{seed}-{i}-{name}"),
                        progress=False,
                    )
                    searched = _scores(supernet, space.subnet(found.best_tokens), batches, test)
                    rows.setdefault((i, name), []).append((*searched, *baseline))
        print(
            f"\n## noise {sigma}, {len(train)} train / {len(val)} val images: teacher + "
            f"{args.supernet_seeds} supernets + searches in {time.process_time() - start:.0f} "
            "CPU s; test top-1 and CE straight from the supernet, means over the supernets"
        )
        print(
            "| uniform subnet | ms | reward | uniform top-1 | searched top-1 | "
            "searched - uniform, points (per supernet) | uniform CE | searched CE |"
        )
        print("| --- | ---: | --- | ---: | ---: | --- | ---: | ---: |")
        totals: dict[str, list[float]] = {}
        for (i, name), values in rows.items():
            gaps = [100 * (v[0] - v[2]) for v in values]
            totals.setdefault(name, []).extend(gaps)
            mean = [statistics.mean(v[k] for v in values) for k in range(4)]
            print(
                f"| {_uniform_name(levels[i])} | {cost(levels[i]):.3f} | {name} | "
                f"{mean[2]:.4f} | {mean[0]:.4f} | "
                f"{statistics.mean(gaps):+.2f} ({' / '.join(f'{g:+.1f}' for g in gaps)}) | "
                f"{mean[3]:.4f} | {mean[1]:.4f} |"
            )
        for name, gaps in totals.items():
            print(
                f"- reward {name}: searched - uniform {statistics.mean(gaps):+.2f} points over "
                f"{len(gaps)} comparisons; searched ahead in {sum(g > 0 for g in gaps)}, tied in "
                f"{sum(g == 0 for g in gaps)}, behind in {sum(g < 0 for g in gaps)}"
            )


def _uniform_name(config: SubnetConfig) -> str:
    return f"d{config.depths[0]} k{config.kernels[0][0]} e{config.expands[0][0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--noise",
        type=float,
        nargs="+",
        default=[0.0, 0.5],
        help="Standard deviations of the Gaussian noise on the images, a table each "
        "(default 0 0.5).",
    )
    parser.add_argument(
        "--epochs", type=int, default=2, help="Epochs per shrinking phase (default 2)."
    )
    parser.add_argument(
        "--supernet-seeds", type=int, default=3, help="Supernets per noise level (default 3)."
    )
    parser.add_argument(
        "--levels", type=int, default=5, help="Uniform subnets compared against (default 5)."
    )
    parser.add_argument(
        "--iterations", type=int, default=100, help="Search trials after the first (default 100)."
    )
    parser.add_argument(
        "--warmup", type=int, default=5, help="SA warm-up trials of each search (default 5)."
    )
    parser.add_argument(
        "--val-extra",
        type=int,
        default=0,
        help="Training images moved to the validation split the search scores on (default 0: "
        "1,257 train, 180 val).",
    )
    parser.add_argument(
        "--lut",
        type=Path,
        help="Read the latency table from this file if it exists, else build it and write it.",
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
