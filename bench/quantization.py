"""Quantization bench on digits: fp32 vs PaddleSlim's QAT / PTQ schemes, int8 via torchao PT2E.

For student_cnn and mobilenet_cnn: train fp32, then for each weight x activation scheme pair
run QAT (fine-tune with fake quantization) and PTQ (calibrate, minmax observer), plus PTQ with
the percentile and mse observers on the default pair. Each int8 model is exported as a
torch.export program, reloaded, compiled for x86 CPU (freezing) and timed.

Columns: test accuracy; size of the .pt2 archive on disk and of its tensors alone (the archive
also holds the graph as JSON, which dominates for models this small); median latency of a
batch of 64 for eager fp32, compiled fp32 and compiled int8 (one thread); how many conv/linear
layers inductor lowered to oneDNN int8 kernels.

Run: .venv/bin/python bench/quantization.py   (about 5 minutes on two idle cores, 8 when busy)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lyceum.compression.analysis import measure_latency
from lyceum.compression.quantization import (
    ACTIVATION_SCHEMES,
    PTQ,
    QAT,
    WEIGHT_SCHEMES,
    calibrate,
    compile_int8,
    convert,
    load_int8,
    quantize,
    save_program,
    train_qat,
)
from lyceum.compression.quantization.workflow import tensor_bytes
from lyceum.deploy.examples import digits, mobilenet_cnn, student_cnn, train_classifier
from lyceum.proto.evaluation import top1_accuracy

MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    # name: (factory, fp32 training epochs)
    "student_cnn": (student_cnn, 15),
    "mobilenet_cnn": (mobilenet_cnn, 15),
    # Only to show how the on-disk ratio approaches the tensor ratio once weights outweigh the
    # archive's fixed graph overhead: fp32 and one PTQ run.
    "student_cnn_w64": (lambda: student_cnn(width=64), 8),
}
SIZE_ONLY = {"student_cnn_w64"}
SHORT = {
    "abs_max": "abs_max",
    "channel_wise_abs_max": "channel_wise",
    "moving_average_abs_max": "moving_avg",
}


def _compiled_latency(program: torch.export.ExportedProgram, x: torch.Tensor) -> tuple[float, int]:
    """Median latency of the compiled program and the number of layers fused into oneDNN int8."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # The kernels' speed, forced: on a CPU without VNNI (this bench's) compile_int8 would fall
    # back to dequantize + float, since there oneDNN's int8 products saturate.
    fn = compile_int8(program, int8_kernels=True)
    ms = 1e3 * measure_latency(fn, x, runs=30, warmup=3, threads=torch.get_num_threads())
    inductor = counters["inductor"]
    fused = (
        inductor["qconv_weight_prepack_matcher_count"]
        + inductor["qlinear_weight_prepack_matcher_count"]
    )
    return ms, int(fused)


def bench_model(name: str, qat_epochs: int, out: Path) -> list[dict[str, object]]:
    factory, epochs = MODELS[name]
    train, test = digits("train"), digits("test")
    torch.manual_seed(0)
    model = train_classifier(factory(), train, epochs=epochs, lr=1e-2, seed=0).eval()
    example = torch.stack([train[i][0] for i in range(64)])
    x = torch.stack([test[i][0] for i in range(64)])

    fp32_path = out / f"{name}_fp32.pt2"
    fp32_bytes = save_program(model, example, fp32_path)
    fp32_program = load_int8(fp32_path)
    fp32_tensors = tensor_bytes(fp32_program)
    eager_ms = 1e3 * measure_latency(model, x, runs=30, warmup=3, threads=torch.get_num_threads())
    compiled_ms, _ = _compiled_latency(fp32_program, x)
    rows: list[dict[str, object]] = [
        {
            "model": name,
            "method": "fp32",
            "weights": "-",
            "activations": "-",
            "acc": top1_accuracy(model, test),
            "bytes": fp32_bytes,
            "ratio": 1.0,
            "tensor_ratio": 1.0,
            "eager_ms": eager_ms,
            "compiled_ms": compiled_ms,
            "int8_ms": None,
            "fused": None,
            "seconds": 0.0,
        }
    ]
    runs: list[tuple[str, QAT | PTQ]] = []
    if name in SIZE_ONLY:
        runs.append(("PTQ minmax", PTQ()))
    for w in WEIGHT_SCHEMES if name not in SIZE_ONLY else ():
        for a in ACTIVATION_SCHEMES:
            runs.append(("QAT", QAT(weights=w, activations=a)))
    for w in WEIGHT_SCHEMES if name not in SIZE_ONLY else ():
        for a in ACTIVATION_SCHEMES:
            runs.append(("PTQ minmax", PTQ(weights=w, activations=a)))
    for observer in ("percentile", "mse") if name not in SIZE_ONLY else ():
        runs.append((f"PTQ {observer}", PTQ(observer=observer)))  # type: ignore[arg-type]

    for method, config in runs:
        start = time.perf_counter()
        prepared = quantize(model, config, example)
        if isinstance(config, QAT):
            train_qat(prepared, train, epochs=qat_epochs, lr=1e-3)
        else:
            calibrate(prepared, torch.utils.data.DataLoader(train, batch_size=64), num_batches=8)
        int8 = convert(prepared)
        path = out / f"{name}_{method.replace(' ', '_')}_{config.weights}_{config.activations}.pt2"
        int8_bytes = save_program(int8, example, path)
        program = load_int8(path)
        int8_ms, fused = _compiled_latency(program, x)
        rows.append(
            {
                "model": name,
                "method": method,
                "weights": SHORT[config.weights],
                "activations": SHORT[config.activations],
                "acc": top1_accuracy(int8, test),
                "bytes": int8_bytes,
                "ratio": int8_bytes / fp32_bytes,
                "tensor_ratio": tensor_bytes(program) / fp32_tensors,
                "eager_ms": None,
                "compiled_ms": None,
                "int8_ms": int8_ms,
                "fused": f"{fused}/{len(int8.meta['lyceum_quant_layers'])}",
                "seconds": time.perf_counter() - start,
            }
        )
        print(
            f"  {name} {method} {config.weights}/{config.activations}: {rows[-1]['seconds']:.1f}s",
            file=sys.stderr,
        )
    return rows


def _fmt(value: object, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def table(rows: list[dict[str, object]]) -> str:
    header = (
        "| model | method | weights | activations | top-1 | .pt2 bytes | size vs fp32 | tensors vs fp32 "
        "| eager fp32 ms | compiled fp32 ms | compiled int8 ms | oneDNN int8 layers |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['weights']} | {r['activations']} "
            f"| {100 * float(r['acc']):.2f}% | {r['bytes']:,} | {float(r['ratio']):.2f}x "  # type: ignore[arg-type]
            f"| {float(r['tensor_ratio']):.2f}x | {_fmt(r['eager_ms'], '.3f')} "  # type: ignore[arg-type]
            f"| {_fmt(r['compiled_ms'], '.3f')} | {_fmt(r['int8_ms'], '.3f')} | {_fmt(r['fused'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows: list[dict[str, object]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args.qat_epochs, Path(tmp))
    print(table(rows))
    print(
        f"\n{torch.__version__=} threads={args.threads} batch=64 qat_epochs={args.qat_epochs} "
        f"total {time.perf_counter() - start:.0f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
