"""Once-for-all on digits: subnets straight from the supernet against their from-scratch twins,
and the subnet searched under a FLOPs budget against the uniformly shrunk one.

Trains the supernet once by progressive shrinking (centre-cropped kernels, and with
`--transform` also with once-for-all's kernel-transform matrices), then for the largest and
smallest subnets and the best one found under `--budget` (relative FLOPs, default -40%): test
top-1 straight from the supernet (BN re-calibrated), after a `--finetune`-epoch fine-tune, and
the same architecture trained from scratch for as many epochs as the supernet had, over
`--seeds` seeds. Also the search cost (subnets evaluated per minute) and the supernet's
training time.

With `--teacher`, the space's largest subnet is first trained from scratch (seed 0, as many
epochs as the supernet gets) as a teacher, and each supernet is trained twice: distilled in
place from its largest subnet, and with every subnet distilled from that teacher's outputs on
the training set (`TeacherKnowledge`, alpha 0.5, temperature 4, as `lyceum nas supernet
train` with a `teacher:` section does from a dump); the same table for each.

    .venv/bin/python bench/ofa.py --epochs 2 --seeds 3     # a small space, minutes on one core
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch.utils.data import Dataset

from lyceum.compression.distillation import DistillLoss
from lyceum.compression.nas import (
    Budget,
    BudgetedSpace,
    OFASpace,
    OFASpaceConfig,
    OFATrainConfig,
    SubnetConfig,
    SubnetReward,
    Supernet,
    TeacherKnowledge,
    evaluate_subnet,
    extract,
    progressive_shrinking,
    recalibrate_bn,
    search_subnet,
    train_supernet,
)
from lyceum.compression.search import SAConfig, StudyConfig
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


def _uniform_under(space: OFASpace, limit: int) -> SubnetConfig:
    """The largest-FLOPs subnet with every block alike (one kernel, ratio, depth) in budget."""
    figures = BudgetedSpace(space).figures
    c = space.config
    best: tuple[int, SubnetConfig] | None = None
    for d in c.depths:
        for k in c.kernels:
            for e in c.expands:
                config = space.uniform(d, k, e)
                flops = figures(space.tokens(config)).flops
                if flops <= limit and (best is None or flops > best[0]):
                    best = (flops, config)
    assert best is not None, "no uniform subnet within the budget"
    return best[1]


def _teacher(
    space: OFASpace, train: Dataset, test: Dataset, epochs: int, kd: DistillLoss
) -> TeacherKnowledge:
    """The largest subnet trained from scratch, and its logits on every training sample."""
    torch.manual_seed(0)
    model = space.build_subnet(space.largest())
    start = time.perf_counter()
    train_epochs(model, train, epochs=epochs, lr=3e-3, batch_size=64, seed=0, progress=False)
    model.eval()
    with torch.no_grad():
        inputs = torch.stack([train[i][0] for i in range(len(train))])  # type: ignore[arg-type]
        outputs = torch.cat([model(chunk) for chunk in inputs.split(256)])
    print(
        f"teacher: the largest subnet from scratch, {epochs} epochs in "
        f"{time.perf_counter() - start:.0f} s, test top-1 {top1_accuracy(model, test):.4f}"
    )
    return TeacherKnowledge(outputs=outputs, loss=kd, alpha=0.5)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    train, val, test = digits("train"), digits("val"), digits("test")
    space = OFASpace(SPACE)
    figures = BudgetedSpace(space).figures
    phases = progressive_shrinking(space, args.epochs)
    supernet_epochs = sum(p.epochs for p in phases)
    kd = functools.partial(soft_label_kd, temperature=4.0)
    limit = int(figures(space.init_tokens()).flops * (1 + args.budget))
    print(
        f"space: {len(space.range_table())} tokens; largest {figures(space.init_tokens()).flops:,} "
        f"MACs, smallest {figures(space.tokens(space.smallest())).flops:,}, budget {limit:,}; "
        f"{len(phases)} phases x {args.epochs} epochs = {supernet_epochs}"
    )
    teachers: list[TeacherKnowledge | None] = [None]
    if args.teacher:
        teachers.append(_teacher(space, train, test, supernet_epochs, kd))
    # The from-scratch twins do not depend on how the supernet was trained: trained once each.
    scratch: dict[SubnetConfig, list[float]] = {}
    for transform, teacher in (
        (t, k) for t in ([False, True] if args.transform else [False]) for k in teachers
    ):
        torch.manual_seed(0)
        supernet = Supernet(space, kernel_transform=transform)
        start = time.perf_counter()
        train_supernet(
            supernet, train, OFATrainConfig(phases=phases), kd, teacher=teacher, progress=False
        )
        trained_s = time.perf_counter() - start
        reward = SubnetReward(supernet, train, val)
        start = time.perf_counter()
        result, _ = search_subnet(
            reward,
            budget=Budget(max_flops=limit),
            search=SAConfig(max_iterations=args.iterations, seed=0),
            study=StudyConfig(storage=None, study="ofa"),
            progress=False,
        )
        search_s = time.perf_counter() - start
        print(
            f"\nkernel {'transform' if transform else 'crop'}, "
            f"{'in-place distillation' if teacher is None else 'distilled from the teacher'}: "
            f"supernet trained in "
            f"{trained_s:.0f} s; search {len(reward.evaluated)} subnets in {search_s:.0f} s "
            f"({60 * len(reward.evaluated) / search_s:.0f} per minute)"
        )
        subnets = {
            "largest": space.largest(),
            "smallest": space.smallest(),
            "searched": space.subnet(result.best_tokens),
            "uniform": _uniform_under(space, limit),
        }
        print("| subnet | MACs | supernet | +fine-tune | from scratch (mean of seeds) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, config in subnets.items():
            direct = evaluate_subnet(supernet, config, train, test)
            calibrated = evaluate_subnet(supernet, config, train, val)
            # Fine-tuned from the re-calibrated subnet, as it is exported.
            tuned = recalibrate_bn(extract(supernet, config), reward.batches)
            train_epochs(tuned, train, epochs=args.finetune, lr=1e-3, batch_size=64, progress=False)
            if config not in scratch:
                scratch[config] = []
                for seed in range(args.seeds):
                    torch.manual_seed(seed)
                    fresh = space.build_subnet(config)
                    train_epochs(
                        fresh,
                        train,
                        epochs=supernet_epochs,
                        lr=3e-3,
                        batch_size=64,
                        seed=seed,
                        progress=False,
                    )
                    scratch[config].append(top1_accuracy(fresh, test))
            scores = scratch[config]
            spread = statistics.pstdev(scores) if len(scores) > 1 else 0.0
            print(
                f"| {name} | {figures(space.tokens(config)).flops:,} | {direct:.4f} "
                f"(val {calibrated:.4f}) | {top1_accuracy(tuned, test):.4f} | "
                f"{statistics.mean(scores):.4f} +- {spread:.4f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per phase (default 2).")
    parser.add_argument("--seeds", type=int, default=3, help="From-scratch seeds (default 3).")
    parser.add_argument("--finetune", type=int, default=2, help="Fine-tune epochs (default 2).")
    parser.add_argument("--iterations", type=int, default=40, help="SA candidates (default 40).")
    parser.add_argument(
        "--budget", type=float, default=-0.4, help="Relative FLOPs budget (default -0.4)."
    )
    parser.add_argument(
        "--transform", action="store_true", help="Also train with kernel-transform matrices."
    )
    parser.add_argument(
        "--teacher",
        action="store_true",
        help="Also train the supernet distilled from a teacher (the largest subnet trained "
        "from scratch) instead of in place.",
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
