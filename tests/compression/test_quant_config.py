"""Scheme configs, observers' scales against hand computations, and error messages."""

# nn.Module's __getattr__ is typed `Tensor | Module`: reaching a submodule by attribute or
# index (model.layer2, model[1].weight) needs a cast on every line; these are modules.
# mypy: disable-error-code="index"

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torchao.quantization.pt2e.fake_quantize import FakeQuantize

from lyceum.compression.quantization import (
    PTQ,
    QAT,
    AbsMaxObserver,
    HistogramAbsMaxObserver,
    LayerOverride,
    MovingAverageAbsMaxObserver,
    calibrate,
    convert,
    quantize,
    quantized_layers,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10)).eval()


def _weight_scales(converted: torch.fx.GraphModule) -> list[torch.Tensor]:
    """Per-channel weight scales of the converted graph, in graph order."""
    scales = []
    for node in converted.graph.nodes:
        if node.target == torch.ops.quantized_decomposed.dequantize_per_channel.default:
            scales.append(getattr(converted, node.args[1].target))
    return scales


def test_bad_scheme_names_are_named_in_the_error() -> None:
    with pytest.raises(ValidationError, match="abs_maxx"):
        QAT(weights="abs_maxx")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="moving_avg"):
        PTQ(activations="moving_avg")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="kl"):
        PTQ(observer="kl")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="wieghts"):
        QAT.model_validate({"wieghts": "abs_max"})


def test_observer_with_dynamic_activations_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"observer='mse'.*dynamic"):
        PTQ(activations="abs_max", observer="mse")


def test_invalid_regex_is_named() -> None:
    with pytest.raises(ValidationError, match=r"features\[0"):
        QAT(skip=("features[0",))


def test_pattern_matching_no_layer_is_named() -> None:
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"'classifer.*matches no conv/linear layer.*\['1', '3'\]"):
        quantize(_mlp(), PTQ(skip=(r"classifer\.1",)), x)
    with pytest.raises(ValueError, match="'head'"):
        quantize(_mlp(), QAT(overrides=(LayerOverride(pattern="head", weights="abs_max"),)), x)


def test_skip_and_overrides_choose_schemes_per_layer() -> None:
    x = torch.rand(4, 1, 8, 8)
    config = PTQ(
        weights="channel_wise_abs_max",
        overrides=(LayerOverride(pattern="3", weights="abs_max"),),
    )
    prepared = quantize(_mlp(), config, x)
    assert quantized_layers(prepared) == {
        "1": ("channel_wise_abs_max", "moving_average_abs_max"),
        "3": ("abs_max", "moving_average_abs_max"),
    }
    skipped = quantize(_mlp(), PTQ(skip=("3",)), x)
    assert quantized_layers(skipped) == {"1": ("channel_wise_abs_max", "moving_average_abs_max")}
    calibrate(skipped, [x])
    converted = convert(skipped)
    # Only layer 1's weight is stored as int8; layer 3 keeps its float weight.
    int8 = [t for t in converted.state_dict().values() if t.dtype == torch.int8]
    assert [tuple(t.shape) for t in int8] == [(12, 64)]


def test_channel_wise_abs_max_scales_are_per_output_channel() -> None:
    model = _mlp()
    x = torch.rand(8, 1, 8, 8)
    prepared = quantize(model, PTQ(weights="channel_wise_abs_max"), x)
    calibrate(prepared, [x])
    scales = _weight_scales(convert(prepared))
    for scale, linear in zip(scales, (model[1], model[3]), strict=True):
        expected = linear.weight.detach().abs().amax(dim=1) / 127
        assert scale.shape == (linear.out_features,)
        torch.testing.assert_close(scale.float(), expected, rtol=1e-6, atol=0)
        assert len(set(scale.tolist())) > 1


def test_abs_max_weights_share_one_scale_per_tensor() -> None:
    model = _mlp()
    x = torch.rand(8, 1, 8, 8)
    prepared = quantize(model, PTQ(weights="abs_max"), x)
    calibrate(prepared, [x])
    converted = convert(prepared)
    for scale, linear in zip(_weight_scales(converted), (model[1], model[3]), strict=True):
        expected = float(linear.weight.detach().abs().max()) / 127
        torch.testing.assert_close(scale.float(), torch.full_like(scale.float(), expected))
    # The stored int8 weight is round(w / scale), clamped to [-127, 127].
    int8 = next(t for t in converted.state_dict().values() if t.dtype == torch.int8)
    w = model[1].weight.detach()
    step = float(w.abs().max()) / 127
    torch.testing.assert_close(int8, torch.round(w / step).to(torch.int8))


def test_abs_max_observer_accumulates_or_follows_the_current_batch() -> None:
    running = AbsMaxObserver(granularity="tensor", accumulate=True, dtype=torch.uint8)
    current = AbsMaxObserver(granularity="channel", accumulate=False)
    running(torch.tensor([0.5, -2.0]))
    running(torch.tensor([1.0, -1.0]))
    scale, zero_point = running.calculate_qparams()
    torch.testing.assert_close(scale, torch.tensor([2.0 / 127]))
    assert zero_point.tolist() == [128]  # uint8 codes 1..255 hold PaddleSlim's grid
    current(torch.tensor([[1.0, -3.0], [0.5, 0.25]]))
    current(torch.tensor([[1.0, -0.5], [0.5, 0.25]]))
    scale, zero_point = current.calculate_qparams()
    torch.testing.assert_close(scale, torch.tensor([1.0, 0.5]) / 127)
    assert zero_point.tolist() == [0, 0]


def test_moving_average_abs_max_follows_paddleslim_ema() -> None:
    observer = MovingAverageAbsMaxObserver(moving_rate=0.9, dtype=torch.uint8)
    accum = state = 0.0
    for batch_max in (1.0, 2.0, 3.0, 0.5):
        observer(torch.tensor([-batch_max, batch_max / 2]))
        accum = 0.9 * accum + batch_max
        state = 0.9 * state + 1.0
    # By hand: accum = 0.9*(0.9*(0.9*1 + 2) + 3) + 0.5 = 5.549, state = 3.439.
    assert accum == pytest.approx(5.549) and state == pytest.approx(3.439)
    scale, _ = observer.calculate_qparams()
    assert float(scale) == pytest.approx(5.549 / 3.439 / 127, rel=1e-6)


def test_moving_average_abs_max_inside_a_qat_model() -> None:
    prepared = quantize(_mlp(), QAT(activations="moving_average_abs_max"), torch.rand(4, 1, 8, 8))
    for value in (1.0, 2.0, 4.0):
        prepared(torch.full((4, 1, 8, 8), value))
    accum = (1.0 * 0.9 + 2.0) * 0.9 + 4.0
    state = (1.0 * 0.9 + 1.0) * 0.9 + 1.0
    fake_quants = [
        m
        for m in prepared.modules()
        if isinstance(m, FakeQuantize)
        and isinstance(m.activation_post_process, MovingAverageAbsMaxObserver)
    ]
    assert len(fake_quants) == 2  # the inputs of the two linear layers
    # The first linear's input is the flattened batch itself, so its max|x| is `value`.
    first = [
        fq for fq in fake_quants if float(fq.activation_post_process.accum) == pytest.approx(accum)
    ]
    assert len(first) == 1
    assert float(first[0].activation_post_process.state) == pytest.approx(state)
    assert float(first[0].scale) == pytest.approx(accum / state / 127, rel=1e-6)
    assert int(first[0].zero_point) == 128


def _true_mse(data: torch.Tensor, clip: float) -> float:
    scale = clip / 127
    return float(((data - torch.clamp(torch.round(data / scale), -127, 127) * scale) ** 2).sum())


def test_percentile_observer_matches_the_exact_percentile() -> None:
    torch.manual_seed(0)
    data = torch.randn(100_000)
    data[0] = 40.0  # one far outlier
    observer = HistogramAbsMaxObserver(method="percentile", percentile=99.9, dtype=torch.uint8)
    # Two batches, the second widening the range, exercise the re-binning.
    observer(data[50_000:])
    observer(data[:50_000])
    scale, zero_point = observer.calculate_qparams()
    exact = float(torch.quantile(data.abs(), 0.999))
    # Within two histogram bins (40 / 2048 each) of the exact percentile, far below max|x|.
    assert float(scale) * 127 == pytest.approx(exact, abs=2 * 40 / 2048)
    assert int(zero_point) == 128


def test_mse_observer_picks_a_near_optimal_clip() -> None:
    torch.manual_seed(0)
    # Heavy tails: the best clip is well inside the range.
    data = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    observer = HistogramAbsMaxObserver(method="mse", dtype=torch.uint8)
    observer(data[:100_000])
    observer(data[100_000:])
    scale, _ = observer.calculate_qparams()
    chosen = float(scale) * 127
    top = float(data.abs().max())
    # Brute force on the raw data (independent of the histogram): the chosen clip's error is
    # within 2% of the best of 400 candidate clips, and clipping beats no clipping.
    best = min(_true_mse(data, top * k / 400) for k in range(20, 401))
    assert _true_mse(data, chosen) <= 1.02 * best
    assert _true_mse(data, chosen) < 0.95 * _true_mse(data, top)
