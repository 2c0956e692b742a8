"""End-to-end helpers: QAT training loop, one-call `qat_int8` / `ptq_int8`, and the report.

These take already-built objects (a model, map-style datasets of `(input, label)`), never spec
strings, so the library stays independent of how the CLI or a demo builds them.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader, Dataset

from lyceum.compression._train import LossFn, cross_entropy, train_epochs

from .api import as_tuple, calibrate, convert, quantize, quantized_layers
from .config import PTQ, QAT
from .export import compile_int8, load_int8, save_program


class QuantReport(BaseModel):
    """What one quantization run produced: accuracy, size on disk and CPU latency, fp32 vs int8."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["qat", "ptq"] = Field(description="Quantization-aware training or post-training.")
    weights: str = Field(description="Model-wide weight scheme.")
    activations: str = Field(description="Model-wide activation scheme.")
    observer: str | None = Field(description="PTQ calibration observer; None for QAT.")
    layers: dict[str, tuple[str, str]] = Field(
        description="Quantized layers: module path -> (weight scheme, activation scheme)."
    )
    fp32_accuracy: float | None = Field(description="Top-1 of the float model on the eval set.")
    int8_accuracy: float | None = Field(description="Top-1 of the converted int8 model.")
    fp32_bytes: int = Field(description="Size on disk of the fp32 torch.export program.")
    int8_bytes: int = Field(description="Size on disk of the int8 torch.export program.")
    size_ratio: float = Field(description="int8_bytes / fp32_bytes (archive overhead included).")
    fp32_tensor_bytes: int = Field(description="Bytes of the fp32 program's tensors.")
    int8_tensor_bytes: int = Field(description="Bytes of the int8 program's tensors.")
    latency_batch: int = Field(description="Batch size of the latency measurements.")
    threads: int = Field(description="torch intra-op threads during the latency measurements.")
    fp32_eager_ms: float | None = Field(description="Median latency, fp32 eager.")
    fp32_compiled_ms: float | None = Field(description="Median latency, fp32 torch.compile.")
    int8_compiled_ms: float | None = Field(description="Median latency, int8 torch.compile.")
    program_path: str | None = Field(description="Where the int8 program was saved, if kept.")


def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int = 512
) -> float:
    """Top-1 accuracy of `model` on a map-style dataset of `(input, label)` pairs, in [0, 1]."""
    if isinstance(model, nn.Module):
        # A module from `ExportedProgram.module()` refuses .eval(); it is fixed in the mode it
        # was exported in (programs from save_program are exported in eval mode).
        with contextlib.suppress(NotImplementedError):
            model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    if total == 0:
        raise ValueError("evaluate: the dataset is empty")
    return correct / total


def median_latency_ms(
    fn: Callable[[torch.Tensor], Any], x: torch.Tensor, runs: int = 30, warmup: int = 5
) -> float:
    """Median wall time of `fn(x)` over `runs` calls after `warmup` calls (compilation included there)."""
    times: list[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        for _ in range(runs):
            start = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def tensor_bytes(program: torch.export.ExportedProgram) -> int:
    """Bytes of every tensor a program stores (parameters, buffers, constants)."""
    tensors = list(program.state_dict.values()) + list(program.constants.values())
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def train_qat(
    prepared: GraphModule,
    dataset: Dataset,
    epochs: int,
    loss_fn: LossFn | None = None,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> GraphModule:
    """Train a QAT-prepared model with Adam; `loss_fn(outputs, inputs, labels)` defaults to CE."""
    if epochs <= 0:
        raise ValueError(f"train_qat: epochs must be positive, got {epochs}")
    train_epochs(
        prepared,
        dataset,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        loss_fn=loss_fn or cross_entropy,
    )
    return prepared


def report(
    config: QAT | PTQ,
    fp32_model: nn.Module,
    int8_model: GraphModule,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    eval_dataset: Dataset | None = None,
    out_dir: str | Path | None = None,
    latency_batch: int = 64,
    measure_latency: bool = True,
) -> QuantReport:
    """Save both programs (to `out_dir`, or a temporary folder) and measure them."""
    fp32_model = fp32_model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        fp32_path, int8_path = folder / "model_fp32.pt2", folder / "model_int8.pt2"
        fp32_bytes = save_program(fp32_model, example_inputs, fp32_path)
        int8_bytes = save_program(int8_model, example_inputs, int8_path)
        fp32_program, int8_program = load_int8(fp32_path), load_int8(int8_path)
        fp32_tensor_bytes, int8_tensor_bytes = (
            tensor_bytes(fp32_program),
            tensor_bytes(int8_program),
        )
        eager = compiled = compiled_int8 = None
        if measure_latency:
            if eval_dataset is not None:
                n = min(latency_batch, len(eval_dataset))  # type: ignore[arg-type]
                x = torch.stack([eval_dataset[i][0] for i in range(n)])
            else:
                x = as_tuple(example_inputs)[0]
            eager = median_latency_ms(fp32_model, x)
            # A fresh dynamo state per program, so neither measurement sees the other's
            # compiled code or recompilation limits.
            torch._dynamo.reset()
            compiled = median_latency_ms(compile_int8(fp32_program), x)
            torch._dynamo.reset()
            compiled_int8 = median_latency_ms(compile_int8(int8_program), x)
            latency_batch = len(x)
    fp32_acc = evaluate(fp32_model, eval_dataset) if eval_dataset is not None else None
    int8_acc = evaluate(int8_model, eval_dataset) if eval_dataset is not None else None
    return QuantReport(
        mode=config.kind,
        weights=config.weights,
        activations=config.activations,
        observer=config.observer if isinstance(config, PTQ) else None,
        layers=quantized_layers(int8_model),
        fp32_accuracy=fp32_acc,
        int8_accuracy=int8_acc,
        fp32_bytes=fp32_bytes,
        int8_bytes=int8_bytes,
        size_ratio=int8_bytes / fp32_bytes,
        fp32_tensor_bytes=fp32_tensor_bytes,
        int8_tensor_bytes=int8_tensor_bytes,
        latency_batch=latency_batch,
        threads=torch.get_num_threads(),
        fp32_eager_ms=eager,
        fp32_compiled_ms=compiled,
        int8_compiled_ms=compiled_int8,
        program_path=str(int8_path) if out_dir is not None else None,
    )


def qat_int8(
    model: nn.Module,
    train_dataset: Dataset,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    epochs: int = 3,
    scheme: QAT | None = None,
    eval_dataset: Dataset | None = None,
    loss_fn: LossFn | None = None,
    lr: float = 1e-3,
    batch_size: int = 64,
    out_dir: str | Path | None = None,
    measure_latency: bool = True,
) -> tuple[GraphModule, QuantReport]:
    """Fine-tune an already-trained float model with fake quantization and convert it to int8.

    The input model is left untouched (it is the fp32 reference of the report). `loss_fn`
    can be a distillation loss; `scheme` defaults to PaddleSlim's usual pair
    (`channel_wise_abs_max` weights, `moving_average_abs_max` activations).
    """
    scheme = scheme or QAT()
    prepared = quantize(model, scheme, example_input)
    train_qat(prepared, train_dataset, epochs, loss_fn=loss_fn, lr=lr, batch_size=batch_size)
    int8_model = convert(prepared)
    return int8_model, report(
        scheme,
        model,
        int8_model,
        example_input,
        eval_dataset,
        out_dir,
        measure_latency=measure_latency,
    )


def ptq_int8(
    model: nn.Module,
    calibration_dataset: Dataset,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    num_batches: int = 8,
    scheme: PTQ | None = None,
    eval_dataset: Dataset | None = None,
    batch_size: int = 64,
    out_dir: str | Path | None = None,
    measure_latency: bool = True,
) -> tuple[GraphModule, QuantReport]:
    """Calibrate a trained float model on `num_batches` batches and convert it to int8 (no training)."""
    scheme = scheme or PTQ()
    prepared = quantize(model, scheme, example_input)
    calibrate(prepared, DataLoader(calibration_dataset, batch_size=batch_size), num_batches)
    int8_model = convert(prepared)
    return int8_model, report(
        scheme,
        model,
        int8_model,
        example_input,
        eval_dataset,
        out_dir,
        measure_latency=measure_latency,
    )
