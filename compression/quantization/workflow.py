"""End-to-end helpers: QAT training, one-call `qat_int8` / `ptq_int8`, and the report.

These take already-built objects (a model, map-style datasets of `(input, label)`), never spec
strings, so the library stays independent of how the CLI or a demo builds them. QAT trains in
the one training loop (`lyceum.compression.training`); the report's accuracy and latency are
`lyceum.proto.evaluation.top1_accuracy` and `lyceum.compression.analysis.measure_latency`,
the figures pruning reports too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader, Dataset

from lyceum.compression import analysis
from lyceum.compression._steps import announce
from lyceum.compression.training import LossFn, cross_entropy, train_epochs
from lyceum.proto.display import Progress
from lyceum.proto.evaluation import top1_accuracy

from .api import as_tuple, calibrate, convert, quantize, quantized_layers
from .config import PTQ, QAT
from .export import compile_int8, load_int8, save_program

_PREPARE = "int8: capturing the model with torch.export and inserting the quantizers"
_CONVERT = (
    "int8: converting (torchao's convert_pt2e; with conv-BN layers it traces its fusion "
    "patterns, which takes a while)"
)


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


def _latency_ms(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    """Median ms of `fn(x)` at this process's thread count (the report records it); the
    warm-up calls include a compiled program's compilation."""
    seconds = analysis.measure_latency(fn, x, runs=30, warmup=5, threads=torch.get_num_threads())
    return 1e3 * seconds


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
    progress: bool = True,
) -> GraphModule:
    """Train a QAT-prepared model with Adam; `loss_fn(outputs, inputs, labels)` defaults to CE.

    `progress` shows the batches done (`lyceum.proto.display.Progress`)."""
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
        progress=progress,
        desc="QAT",
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
    progress: bool = True,
) -> QuantReport:
    """Save both programs (to `out_dir`, or a temporary folder) and measure them.

    `progress` says when the latency step starts (compiling takes a while) and counts its
    three measurements."""
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
            announce(
                f"latency: fp32 eager, then torch.compile of the fp32 and int8 programs "
                f"(batch {len(x)}, {torch.get_num_threads()} threads)",
                enabled=progress,
            )
            with Progress(total=3, desc="latency", unit="program", enabled=progress) as bar:
                eager = _latency_ms(fp32_model, x)
                bar.update(1)
                # A fresh dynamo state per program, so neither measurement sees the other's
                # compiled code or recompilation limits.
                torch._dynamo.reset()
                compiled = _latency_ms(compile_int8(fp32_program), x)
                bar.update(1)
                torch._dynamo.reset()
                compiled_int8 = _latency_ms(compile_int8(int8_program), x)
                bar.update(1)
            latency_batch = len(x)
    fp32_acc = top1_accuracy(fp32_model, eval_dataset) if eval_dataset is not None else None
    int8_acc = top1_accuracy(int8_model, eval_dataset) if eval_dataset is not None else None
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
    progress: bool = True,
    seed: int = 0,
) -> tuple[GraphModule, QuantReport]:
    """Fine-tune an already-trained float model with fake quantization and convert it to int8.

    The input model is left untouched (it is the fp32 reference of the report). `loss_fn`
    can be a distillation loss; `scheme` defaults to PaddleSlim's usual pair
    (`channel_wise_abs_max` weights, `moving_average_abs_max` activations); `seed` orders
    the training data. `progress` shows the QAT batches and says what each longer step is.
    """

    def fit(prepared: GraphModule) -> None:
        train_qat(
            prepared,
            train_dataset,
            epochs,
            loss_fn=loss_fn,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )

    return _to_int8(
        model, scheme or QAT(), example_input, fit, eval_dataset, out_dir, measure_latency, progress
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
    progress: bool = True,
) -> tuple[GraphModule, QuantReport]:
    """Calibrate a trained float model on `num_batches` batches and convert it to int8 (no
    training). `progress` shows the calibration batches and says what each longer step is."""

    def fit(prepared: GraphModule) -> None:
        loader = DataLoader(calibration_dataset, batch_size=batch_size)
        calibrate(prepared, loader, num_batches, progress=progress)

    return _to_int8(
        model, scheme or PTQ(), example_input, fit, eval_dataset, out_dir, measure_latency, progress
    )


def _to_int8(
    model: nn.Module,
    scheme: QAT | PTQ,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    fit: Callable[[GraphModule], None],
    eval_dataset: Dataset | None,
    out_dir: str | Path | None,
    measure_latency: bool,
    progress: bool,
) -> tuple[GraphModule, QuantReport]:
    """What QAT and PTQ share: insert the quantizers, `fit` them (train or calibrate),
    convert, and report on the int8 model against `model`."""
    announce(_PREPARE, enabled=progress)
    prepared = quantize(model, scheme, example_input)
    fit(prepared)
    announce(_CONVERT, enabled=progress)
    int8_model = convert(prepared)
    return int8_model, report(
        scheme,
        model,
        int8_model,
        example_input,
        eval_dataset,
        out_dir,
        measure_latency=measure_latency,
        progress=progress,
    )
