"""FLOPs, params, size and latency, checked against hand-computed values and what ran."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lyceum.compression.analysis import (
    count_flops,
    count_params,
    format_table,
    interleaved_latency_samples,
    layer_stats,
    measure_latency,
    model_size_bytes,
)


def _tiny() -> nn.Sequential:
    # conv: 2 -> 4 channels, 3x3, padding 1 on 5x5 -> [4, 5, 5]; flatten 100 -> linear 3.
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))


def test_flops_match_hand_computed_values() -> None:
    model = _tiny()
    x = torch.zeros(1, 2, 5, 5)
    stats = layer_stats(model, x)
    # Conv: Cout * H * W * Cin * kh * kw = 4 * 5 * 5 * 2 * 9 = 1800. Linear: 100 * 3 = 300.
    assert [(s.name, s.flops) for s in stats] == [("0", 1800), ("3", 300)]
    assert count_flops(model, x) == 2100
    # A batch of two doubles every count.
    assert count_flops(model, torch.zeros(2, 2, 5, 5)) == 4200
    assert [s.output_shape for s in stats] == [(1, 4, 5, 5), (1, 3)]


def test_grouped_and_depthwise_conv_flops() -> None:
    x = torch.zeros(1, 4, 5, 5)
    # groups=2: each output channel sees 4 / 2 = 2 inputs; output 3x3 -> 4 * 9 * 2 * 9 = 648.
    assert count_flops(nn.Conv2d(4, 4, 3, groups=2), x) == 648
    # depthwise: one input per output -> 4 * 9 * 1 * 9 = 324.
    assert count_flops(nn.Conv2d(4, 4, 3, groups=4), x) == 324


def test_params_and_size() -> None:
    model = _tiny()
    # conv 2 * 4 * 9 + 4 bias = 76; linear 100 * 3 + 3 = 303.
    assert count_params(model) == 379
    assert [s.params for s in layer_stats(model, torch.zeros(1, 2, 5, 5))] == [76, 303]
    size = model_size_bytes(model)
    # float32 payload plus a small safetensors JSON header.
    assert 379 * 4 < size < 379 * 4 + 1024


def test_latency_times_warmup_then_runs_in_eval_and_inference_mode() -> None:
    seen: list[tuple[bool, bool, int]] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((self.training, torch.is_inference_mode_enabled(), torch.get_num_threads()))
            return x

    model = Probe()
    before = torch.get_num_threads()
    latency = measure_latency(model, torch.zeros(1, 2, 5, 5), runs=5, warmup=2, threads=2)
    assert latency > 0
    assert seen == [(False, True, 2)] * 7  # 2 untimed, 5 timed passes
    assert model.training and torch.get_num_threads() == before  # both restored
    cpu = measure_latency(_tiny(), torch.zeros(1, 2, 5, 5), runs=5, warmup=1, clock="thread")
    assert cpu > 0


def test_latency_of_a_plain_callable() -> None:
    # A compiled program is a function, not a module: timed the same way, no mode to set.
    calls: list[torch.Size] = []
    x = torch.zeros(3, 4)
    assert measure_latency(lambda t: calls.append(t.shape), x, runs=4, warmup=3) > 0
    assert calls == [x.shape] * 7


def test_interleaved_latency_runs_the_models_in_turn() -> None:
    # One pass of each model per round, warm-up rounds included, so each model's timed passes
    # have the others' passes between them.
    calls: list[str] = []
    x = torch.zeros(2)
    models = [(lambda t, name=name: calls.append(name), x) for name in "abc"]
    samples = interleaved_latency_samples(models, runs=3, warmup=1, clock="thread")
    assert calls == list("abc") * 4
    assert [len(s) for s in samples] == [3, 3, 3]
    assert all(t >= 0 for s in samples for t in s)


def test_latency_refuses_settings_it_cannot_measure() -> None:
    x = torch.zeros(1, 2, 5, 5)
    with pytest.raises(ValueError, match=r"clock='thread' needs a CPU input and threads=1"):
        measure_latency(_tiny(), x, threads=2, clock="thread")
    with pytest.raises(ValueError, match="runs must be >= 1, got 0"):
        measure_latency(_tiny(), x, runs=0)


def test_table_lists_layers_and_totals() -> None:
    table = format_table(_tiny(), torch.zeros(1, 2, 5, 5))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["layer", "type", "MACs"]
    assert any(line.split()[:3] == ["0", "Conv2d", "1,800"] for line in lines)
    assert any(line.split()[:2] == ["total", "2,100"] for line in lines)
    assert "parameters: 379" in lines[-1]


def test_transposed_conv_is_refused() -> None:
    with pytest.raises(ValueError, match="ConvTranspose2d"):
        count_flops(nn.ConvTranspose2d(2, 2, 3), torch.zeros(1, 2, 4, 4))
