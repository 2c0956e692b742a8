"""Coverage of pruning and quantization across architectures: does each structure work, how
close does it land to the target, and what accuracy is left after a short fine-tune on digits.

For every structure of `lyceum.deploy.architectures` (tiny versions of VGG, ResNet,
MobileNetV2, ResNeXt, GoogLeNet, a concat flattened into a linear, ShuffleNetV2, ViT with
`nn.MultiheadAttention` and with qkv heads, Swin, MNASNet): train it on digits, then

- prune a copy to each of --targets (FLOPs removed, the project's counter) with uniform,
  sensitivity and auto (simulated annealing) pruning, fine-tune it --finetune-epochs epochs,
  and report the FLOPs removed and the test accuracy: `-49.6% 97.2%` per target, marked ✗
  when more than 0.02 from the target or more than --max-drop points below the unpruned;
- quantize all trained models to int8 side by side (`SideBySide`: one capture, one convert)
  with PTQ (min-max calibration on 8 batches) and QAT (--qat-epochs epochs), and report each
  model's int8 test accuracy and its logits' relative error (PTQ: from fp32; QAT: from its
  own fake-quantized model).

A cell that raises shows `fails: <error>`. Nothing is timed but the whole run (one figure, so
no median): ~4 minutes on one thread of the shared 2-core VM.

    .venv/bin/python bench/coverage.py
    .venv/bin/python bench/coverage.py --structures shufflenetv2 vit_qkv --skip-qat
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from lyceum.compression.pruning import (
    AutoPruning,
    PruningConfig,
    SensitivityPruning,
    UniformPruning,
    finetune,
    prune,
)
from lyceum.compression.quantization import PTQ, QAT, calibrate, convert, quantize, train_qat
from lyceum.compression.search import SAConfig
from lyceum.deploy.architectures import ARCHITECTURES, SideBySide
from lyceum.deploy.examples import Digits, digits, train_classifier
from lyceum.proto.evaluation import top1_accuracy

TRANSFORMERS = ("vit_mha", "vit_qkv", "swin")
# The FLOPs configs' default tolerance; auto pruning searches within target ± TOLERANCE.
TOLERANCE = 0.02
COLUMNS = ["structure", "fp32", "uniform", "sensitivity", "auto", "ptq", "qat"]


def _failure(exc: Exception) -> str:
    return f"fails: {type(exc).__name__}: {str(exc)[:80]}"


def _accuracy(logits: torch.Tensor, data: Digits) -> float:
    return float((logits.argmax(-1) == data.labels).float().mean())


def _strategies(target: float, args: argparse.Namespace) -> dict[str, PruningConfig]:
    return {
        "uniform": UniformPruning(flops=-target),
        "sensitivity": SensitivityPruning(flops=-target, ratios=(0.2, 0.4, 0.6, 0.8)),
        "auto": AutoPruning(
            min_ratio=target - TOLERANCE,
            max_ratio=target + TOLERANCE,
            ratio_step=0.05,
            search=SAConfig(max_iterations=args.sa_iterations, seed=0, reduce_rate=0.85),
        ),
    }


def _pruned(
    base: nn.Module,
    config: PruningConfig,
    target: float,
    fp32: float,
    args: argparse.Namespace,
    splits: dict[str, Digits],
) -> str:
    """`-FLOPs% accuracy%`, with ✗ when off target by more than the tolerance or more than
    --max-drop points below the unpruned model."""
    model = copy.deepcopy(base)
    try:
        result = prune(
            model,
            config,
            splits["test"].images[:1],
            evaluate=lambda m: top1_accuracy(m, splits["val"]),
            progress=False,
        )
        finetune(model, splits["train"], epochs=args.finetune_epochs, lr=args.lr, progress=False)
    except Exception as exc:  # a cell that fails is a result, not the end of the table
        return _failure(exc)
    with torch.no_grad():
        accuracy = _accuracy(model(splits["test"].images), splits["test"])
    missed = abs(result.flops_reduction - target) > TOLERANCE + 1e-9
    missed = missed or 100 * (fp32 - accuracy) > args.max_drop
    return f"-{result.flops_reduction:.1%} {100 * accuracy:.1f}%{' ✗' if missed else ''}"


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _quantized(
    bases: dict[str, nn.Module], args: argparse.Namespace, splits: dict[str, Digits]
) -> dict[str, dict[str, str]]:
    """PTQ and QAT cells of every structure, all quantized side by side."""
    x = splits["test"].images
    cells: dict[str, dict[str, str]] = {name: {} for name in bases}
    both = SideBySide(bases).eval()
    try:
        prepared = quantize(both, PTQ(), x[:8])
        calibrate(prepared, DataLoader(splits["train"], batch_size=64), 8, progress=False)
        int8 = convert(prepared)
        with torch.no_grad():
            fp32, q = both(x), int8(x)
        for i, name in enumerate(bases):
            accuracy = _accuracy(q[i], splits["test"])
            cells[name]["ptq"] = f"{100 * accuracy:.1f}% (err {_error(q[i], fp32[i]):.1%})"
    except Exception as exc:
        for name in bases:
            cells[name]["ptq"] = _failure(exc)
    if args.skip_qat:
        return {name: {**c, "qat": "—"} for name, c in cells.items()}
    copies = SideBySide({k: copy.deepcopy(v) for k, v in bases.items()})
    try:
        prepared = quantize(copies, QAT(), x[:8])
        train_qat(
            prepared,
            splits["train"],
            args.qat_epochs,
            loss_fn=SideBySide.loss,
            lr=args.qat_lr,
            progress=False,
        )
        with torch.no_grad():
            fake = prepared(x)
        int8 = convert(prepared)
        with torch.no_grad():
            q = int8(x)
        for i, name in enumerate(bases):
            accuracy = _accuracy(q[i], splits["test"])
            cells[name]["qat"] = f"{100 * accuracy:.1f}% (err {_error(q[i], fake[i]):.2%})"
    except Exception as exc:
        for name in bases:
            cells[name]["qat"] = _failure(exc)
    return cells


def run(args: argparse.Namespace) -> list[dict[str, str]]:
    torch.set_num_threads(args.threads)
    splits = {name: digits(name) for name in ("train", "val", "test")}
    bases: dict[str, nn.Module] = {}
    rows = []
    for name in args.structures:
        torch.manual_seed(0)
        epochs = args.train_epochs * (2 if name in TRANSFORMERS else 1)
        base = train_classifier(ARCHITECTURES[name](), splits["train"], epochs=epochs, lr=3e-3)
        bases[name] = base
        with torch.no_grad():
            fp32 = _accuracy(base(splits["test"].images), splits["test"])
        row = {"structure": name, "fp32": f"{100 * fp32:.1f}%"}
        cells: dict[str, list[str]] = {}
        for target in args.targets:
            for label, config in _strategies(target, args).items():
                cell = _pruned(base, config, target, fp32, args, splits)
                cells.setdefault(label, []).append(cell)
        row.update({label: " · ".join(c) for label, c in cells.items()})
        rows.append(row)
        print(f"# {name} pruned", flush=True)
    quantized = _quantized(bases, args, splits)
    return [{**row, **quantized[row["structure"]]} for row in rows]


def table(rows: list[dict[str, str]], targets: list[float]) -> str:
    at = " · ".join(f"-{t:.0%}" for t in targets)
    head = (
        f"| structure | fp32 acc. | uniform {at} | sensitivity {at} | auto (SA) {at} | "
        "PTQ int8 acc. (err) | QAT int8 acc. (err) |"
    )
    lines = [head, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--structures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES)
    )
    parser.add_argument(
        "--targets", nargs="+", type=float, default=[0.3, 0.5], help="FLOPs fractions to remove"
    )
    parser.add_argument("--train-epochs", type=int, default=5, help="doubled for transformers")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--sa-iterations", type=int, default=8)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--skip-qat", action="store_true", help="its convert takes ~25-50 s")
    parser.add_argument(
        "--max-drop", type=float, default=1.0, help="accuracy points a pruned cell may lose"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared VM)")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = run(args)
    print(table(rows, args.targets))
    print(f"\ntotal {time.perf_counter() - start:.0f} s, settings: {vars(args)}")


if __name__ == "__main__":
    main()
