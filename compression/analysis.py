"""Model analysis: FLOPs, parameters, size on disk and latency, per layer and in total.

FLOPs here are multiply-accumulates (MACs) of the layers that dominate a CNN's cost: convolutions
(any dimensionality, grouped and depthwise included) and linear layers. Batch norm, activations,
pooling and additions are counted as zero: they are memory-bound, a few percent of the MACs of
the surrounding convolutions, and leaving them out keeps the counts easy to check by hand
(`Conv2d`: N * Cout * Hout * Wout * (Cin / groups) * kh * kw; `Linear`: rows * in * out). Biases
are not counted either, as in thop/fvcore. Counts are for the batch size of `example_input`.
`nn.MultiheadAttention` counts as its four projections (query, key, value, output), the linear
layers it holds; products of two activations (attention scores, scores times values) are not
counted, in it or in a hand-written attention, where they are plain matmuls.

Model size is the byte length of the model's state dict serialised with safetensors, which is
what `lyceum.compression.pruning.save_pruned` writes (no pickle).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any, Literal

import torch
from torch import nn

from lyceum.proto.evaluation import eval_mode

__all__ = [
    "LayerStats",
    "count_flops",
    "count_params",
    "format_table",
    "interleaved_latency_samples",
    "latency_samples",
    "layer_stats",
    "measure_latency",
    "model_size_bytes",
]

_COUNTED = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)


@dataclass(frozen=True)
class LayerStats:
    """One counted layer: its qualified name, type, MACs for the example input and own params."""

    name: str
    kind: str
    flops: int
    params: int
    output_shape: tuple[int, ...]


def _attention_flops(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> int:
    query, key, value = (
        args[i] if len(args) > i else kwargs[name]
        for i, name in enumerate(("query", "key", "value"))
    )
    e = module.embed_dim
    rows = query.numel() // e
    return 2 * rows * e * e + (key.numel() + value.numel()) * e


def _layer_flops(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            # A transposed conv scatters every input element through the whole kernel.
            raise ValueError(
                f"count_flops: transposed convolution {type(module).__name__} is not supported; "
                "exclude it or count it separately"
            )
        kernel = prod(module.kernel_size)
        return output.numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def layer_stats(model: nn.Module, example_input: torch.Tensor) -> list[LayerStats]:
    """Per-layer MACs and parameters of every conv/linear layer, in execution order.

    Runs one forward pass of `example_input` (in eval mode, without gradients) with hooks; a
    layer called several times (weight sharing) is listed once per call.
    """
    names = {module: name for name, module in model.named_modules()}
    stats: list[LayerStats] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        flops = None
        if isinstance(module, nn.MultiheadAttention):
            flops = _attention_flops(module, args, kwargs)
            output = output[0] if isinstance(output, tuple) else output
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"layer_stats: layer {names[module]!r} returned {type(output).__name__}, "
                "expected a tensor"
            )
        stats.append(
            LayerStats(
                name=names[module],
                kind=type(module).__name__,
                flops=flops if flops is not None else _layer_flops(module, output),
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                output_shape=tuple(output.shape),
            )
        )

    handles = [
        m.register_forward_hook(hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, _COUNTED)
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """Total multiply-accumulates of the conv and linear layers for `example_input`."""
    return sum(s.flops for s in layer_stats(model, example_input))


def count_params(model: nn.Module) -> int:
    """Number of parameters (every parameter tensor, counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict (parameters and buffers) serialised with safetensors."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return len(save(state))


def measure_latency(
    model: Callable[[torch.Tensor], Any],
    example_input: torch.Tensor,
    *,
    runs: int = 50,
    warmup: int = 10,
    threads: int = 1,
    clock: Literal["wall", "thread"] = "wall",
) -> float:
    """Median wall-clock seconds of one forward pass on the current device.

    `model` is a module or any callable (a compiled program). Eval mode (`eval_mode`),
    inference mode, `warmup` untimed passes first (a compiled program compiles there), then
    the median of `runs` timed passes (the median, not the mean, so that a scheduler hiccup
    on a shared machine does not move the figure). The intra-op thread count is fixed to
    `threads` for the measurement and restored afterwards, since latency depends on it more
    than on anything else on CPU.

    `clock="thread"` times with the calling thread's CPU clock instead of the wall clock. With
    `threads=1` every op runs on that thread, so this is the forward's compute time without
    the time spent descheduled: the figure to compare models by on a shared, loaded machine
    (it is not a latency a user would see). CPU tensors only.
    """
    samples = latency_samples(
        model, example_input, runs=runs, warmup=warmup, threads=threads, clock=clock
    )
    return statistics.median(samples)


def latency_samples(
    model: Callable[[torch.Tensor], Any],
    example_input: torch.Tensor,
    *,
    runs: int = 50,
    warmup: int = 10,
    threads: int = 1,
    clock: Literal["wall", "thread"] = "wall",
) -> list[float]:
    """The `runs` timed passes of `measure_latency`, in seconds, in the order they ran."""
    return interleaved_latency_samples(
        [(model, example_input)], runs=runs, warmup=warmup, threads=threads, clock=clock
    )[0]


def interleaved_latency_samples(
    models: Sequence[tuple[Callable[[torch.Tensor], Any], torch.Tensor]],
    *,
    runs: int = 50,
    warmup: int = 10,
    threads: int = 1,
    clock: Literal["wall", "thread"] = "wall",
) -> list[list[float]]:
    """Timed passes, in seconds, of several `(model, input)` pairs run in turn: each round runs
    every pair once, so each model's list holds `runs` passes.

    Why in turn: a model timed alone, pass after pass, finds its weights, activations and code
    in the caches its previous pass left warm; one op of a network does not, since the ops
    before it ran in between. Timing a few ops round-robin gives each the cold start it has in
    a network. Same conditions as `measure_latency` otherwise (eval and inference mode,
    `warmup` untimed rounds, `threads` fixed then restored, the same two clocks).
    """
    if runs < 1:
        raise ValueError(f"measure_latency: runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"measure_latency: warmup must be >= 0, got {warmup}")
    if threads < 1:
        raise ValueError(f"measure_latency: threads must be >= 1, got {threads}")
    if clock not in ("wall", "thread"):
        raise ValueError(f"measure_latency: clock must be 'wall' or 'thread', got {clock!r}")
    for _, example_input in models:
        if clock == "thread" and (example_input.is_cuda or threads != 1):
            raise ValueError(
                "measure_latency: clock='thread' needs a CPU input and threads=1 (other "
                "threads' work would not be counted); got device "
                f"{example_input.device}, threads={threads}"
            )
    now = time.perf_counter if clock == "wall" else time.thread_time
    previous_threads = torch.get_num_threads()
    times: list[list[float]] = [[] for _ in models]
    try:
        torch.set_num_threads(threads)
        with contextlib.ExitStack() as stack:
            for model, _ in models:
                stack.enter_context(eval_mode(model))
            stack.enter_context(torch.inference_mode())
            for i in range(warmup + runs):
                for (model, example_input), samples in zip(models, times, strict=True):
                    cuda = example_input.is_cuda
                    if cuda:
                        torch.cuda.synchronize()
                    start = now()
                    model(example_input)
                    if cuda:
                        torch.cuda.synchronize()
                    if i >= warmup:
                        samples.append(now() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return times


def format_table(model: nn.Module, example_input: torch.Tensor) -> str:
    """A plain-text table of per-layer MACs, params and output shapes, with totals.

    The total parameter line counts every parameter of the model (batch norm included), so it
    can exceed the sum of the conv/linear rows.
    """
    stats = layer_stats(model, example_input)
    total_flops = sum(s.flops for s in stats) or 1
    rows = [("layer", "type", "MACs", "%", "params", "output")]
    for s in stats:
        rows.append(
            (
                s.name,
                s.kind,
                f"{s.flops:,}",
                f"{100 * s.flops / total_flops:.1f}",
                f"{s.params:,}",
                "x".join(map(str, s.output_shape)),
            )
        )
    rows.append(("total", "", f"{sum(s.flops for s in stats):,}", "100.0", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"parameters: {count_params(model):,}  size: {model_size_bytes(model):,} bytes")
    return "\n".join(line.rstrip() for line in lines)
