"""Pruning benchmark on digits: uniform, sensitivity-based and automatic pruning at -50% FLOPs.

For each model (ResNet-style and MobileNet-style): train the unpruned model, then for each
strategy prune a copy to half its FLOPs and fine-tune it with the same budget (same epochs,
learning rate and data order, optionally distilled from the unpruned model); report test
accuracy, MACs, params, safetensors size and the median CPU latency on one thread at batch 1
and batch 256. Auto-pruning uses a deliberately small simulated-annealing budget (see
--sa-iterations) with one fine-tuning epoch per candidate, scored on the validation split.

    .venv/bin/python bench/pruning.py            # ~3-5 min on one core
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from lyceum.compression.analysis import (
    count_flops,
    count_params,
    measure_latency,
    model_size_bytes,
)
from lyceum.compression.pruning import (
    AutoPruning,
    PruningConfig,
    SensitivityPruning,
    UniformPruning,
    finetune,
    prune,
)
from lyceum.compression.search import SAConfig
from lyceum.deploy.examples import digits, mobilenet_cnn, resnet_cnn, train_classifier
from lyceum.proto.evaluation import top1_accuracy

MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet_cnn": resnet_cnn,
    "mobilenet_cnn": mobilenet_cnn,
}


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Soft-label KL divergence (Hinton), scaled by T^2 to keep gradient magnitudes."""
    log_p = nn.functional.log_softmax(student / temperature, dim=-1)
    q = nn.functional.softmax(teacher / temperature, dim=-1)
    return nn.functional.kl_div(log_p, q, reduction="batchmean") * temperature**2


def _row(label: str, model: nn.Module, test: torch.utils.data.Dataset, extra: dict) -> dict:
    x1 = torch.zeros(1, 1, 8, 8)
    return {
        "strategy": label,
        "acc": 100 * top1_accuracy(model, test),
        "macs": count_flops(model, x1),
        "params": count_params(model),
        "size": model_size_bytes(model),
        **extra,
    }


def _latencies(
    models: list[nn.Module],
    batch: int,
    rounds: int,
    runs: int,
    clock: Literal["wall", "thread"] = "wall",
) -> list[float]:
    """Per model, the least over `rounds` of the median of `runs` timed passes (seconds).

    The machine is shared, so the models of one architecture are timed in interleaved rounds
    (each round times every model) and the quietest round counts: a burst of load from another
    process then slows all candidates alike instead of whichever was being timed.
    """
    x = torch.zeros(batch, 1, 8, 8)
    best = [float("inf")] * len(models)
    for _ in range(rounds):
        for i, model in enumerate(models):
            latency = measure_latency(model, x, runs=runs, warmup=max(2, runs // 10), clock=clock)
            best[i] = min(best[i], latency)
    return best


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    train, val, test = digits("train"), digits("val"), digits("test")
    x = torch.zeros(1, 1, 8, 8)
    rows: list[dict] = []
    for name in args.models:
        torch.manual_seed(0)
        start = time.perf_counter()
        base = train_classifier(MODELS[name](), train, epochs=args.train_epochs, seed=0)
        rows.append({"model": name, **_row("unpruned", base, test, {"pre_ft": None})})
        models = [base]
        teacher = copy.deepcopy(base).eval()

        def tune(model: nn.Module, epochs: int, teacher: nn.Module = teacher) -> None:
            finetune(
                model,
                train,
                epochs=epochs,
                lr=args.lr,
                seed=0,
                teacher=teacher if args.distill else None,
                distill_loss=_kl if args.distill else None,
                alpha=0.5,
            )

        configs: list[tuple[str, PruningConfig]] = [
            ("uniform", UniformPruning(flops=-0.5)),
            ("sensitivity", SensitivityPruning(flops=-0.5)),
            (
                "auto (SA)",
                AutoPruning(
                    min_ratio=0.49,
                    max_ratio=0.51,
                    ratio_step=0.05,
                    search=SAConfig(max_iterations=args.sa_iterations, seed=0, reduce_rate=0.85),
                ),
            ),
        ]
        for label, config in configs:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            result = prune(
                model,
                config,
                x,
                evaluate=lambda m: top1_accuracy(m, val),
                candidate_finetune=lambda m: tune(m, 1),
            )
            search_s = time.perf_counter() - t0
            pre_ft = 100 * top1_accuracy(model, test)
            tune(model, args.finetune_epochs)
            models.append(model)
            rows.append(
                {
                    "model": name,
                    **_row(
                        label,
                        model,
                        test,
                        {"pre_ft": pre_ft, "flops_red": result.flops_reduction, "secs": search_s},
                    ),
                }
            )
        lat1 = _latencies(models, 1, rounds=15, runs=50)
        lat256 = _latencies(models, 256, rounds=15, runs=5)
        cpu256 = _latencies(models, 256, rounds=5, runs=5, clock="thread")
        for row, l1, l256, c256 in zip(rows[-len(models) :], lat1, lat256, cpu256, strict=True):
            row["lat1"], row["lat256"], row["cpu256"] = 1e6 * l1, 1e3 * l256, 1e3 * c256
        print(f"# {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| model | strategy | MACs | FLOPs | params | size (KB) | acc. no FT | acc. | "
        "lat. b1 (µs) | lat. b256 (ms) | CPU b256 (ms) | prune time (s) |"
    )
    lines = [head, "|" + "---|" * 12]
    base: dict = {}
    for r in rows:
        if r["strategy"] == "unpruned":
            base = r
        flops = f"{100 * (r['macs'] / base['macs'] - 1):+.1f}%" if r is not base else "—"
        pre = f"{r['pre_ft']:.2f}" if r["pre_ft"] is not None else "—"
        secs = f"{r['secs']:.1f}" if "secs" in r else "—"
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['macs']:,} | {flops} | {r['params']:,} | "
            f"{r['size'] / 1024:.1f} | {pre} | {r['acc']:.2f} | {r['lat1']:.0f} | "
            f"{r['lat256']:.2f} | {r['cpu256']:.2f} | {secs} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sa-iterations", type=int, default=12)
    parser.add_argument("--distill", action="store_true", help="fine-tune with KL to unpruned")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = run(args)
    print(table(rows))
    print(f"\ntotal {time.perf_counter() - start:.0f} s, settings: {vars(args)}")


if __name__ == "__main__":
    main()
