"""Sensitivity analysis: resumable JSON, plots, and ratio selection at least predicted loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lyceum.compression.analysis import count_params
from lyceum.compression.pruning import (
    SensitivityPruning,
    analyze_sensitivity,
    plot_sensitivity,
    prune,
)
from lyceum.compression.pruning.sensitivity import ratio_for_loss
from lyceum.deploy.examples import mobilenet_cnn, resnet_cnn

X = torch.zeros(1, 1, 8, 8)
PROBE = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class _Interrupt(Exception):
    pass


class _Metric:
    """Deterministic, cheap stand-in for validation accuracy; counts its calls."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        if self.calls == self.fail_at:
            raise _Interrupt
        with torch.no_grad():
            return float(model.eval()(PROBE).softmax(-1).max(-1).values.mean())


def test_analysis_resumes_without_recomputing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mobilenet_cnn().eval()
    ratios = (0.25, 0.5, 0.75)
    path = tmp_path / "sens.json"
    total = 1 + 5 * len(ratios)  # baseline + 5 groups x 3 ratios

    with pytest.raises(_Interrupt):
        analyze_sensitivity(model, X, _Metric(fail_at=8), ratios=ratios, path=path)
    saved = json.loads(path.read_text())
    assert sum(len(v) for v in saved["metrics"].values()) == 6  # baseline + 6 done before call 8

    resumed_metric = _Metric()
    resumed = analyze_sensitivity(model, X, resumed_metric, ratios=ratios, path=path)
    assert resumed_metric.calls == total - 7
    fresh = analyze_sensitivity(model, X, _Metric(), ratios=ratios)
    assert resumed == fresh
    assert json.loads(path.read_text())["metrics"] == fresh.metrics
    assert not list(tmp_path.glob(".*.tmp"))

    again = _Metric()
    analyze_sensitivity(model, X, again, ratios=ratios, path=path)
    assert again.calls == 0
    with pytest.raises(ValueError, match=r"criterion 'l1', this run wants 1 and 'fpgm'"):
        analyze_sensitivity(model, X, again, ratios=ratios, path=path, criterion="fpgm")


def test_progress_counts_trials_read_back_from_the_file(tmp_path: Path, progress_lines) -> None:
    model, ratios, path = mobilenet_cnn().eval(), (0.25, 0.5, 0.75), tmp_path / "sens.json"
    with pytest.raises(_Interrupt):
        analyze_sensitivity(model, X, _Metric(fail_at=5), ratios=ratios, path=path)
    # The baseline, then 3 of the 15 trials (5 groups x 3 ratios) before call 5 failed.
    assert progress_lines()[-1].startswith("sensitivity: 3/15 trial (20%), ")
    analyze_sensitivity(model, X, _Metric(), ratios=ratios, path=path)
    assert progress_lines()[-1].startswith("sensitivity: 15/15 trial (100%), ")
    analyze_sensitivity(model, X, _Metric(), ratios=ratios, progress=False)
    assert len(progress_lines()) == 2


def test_ratio_for_loss_interpolates_monotone_curve() -> None:
    curve = [(0.2, 0.01), (0.4, 0.03), (0.6, 0.02), (0.8, 0.10)]
    assert ratio_for_loss(curve, 0.0, 0.9) == 0.0
    assert ratio_for_loss(curve, 0.005, 0.9) == pytest.approx(0.1, abs=1e-3)
    # 0.6's dip to 0.02 is not trusted: the curve is held at 0.03 until 0.6 (plus the tiny
    # tie-breaking slope), so a budget just above 0.03 reaches 0.6 and no further.
    assert ratio_for_loss(curve, 0.0301, 0.9) == pytest.approx(0.6, abs=1e-3)
    assert ratio_for_loss(curve, 0.065, 0.9) == pytest.approx(0.7, abs=1e-3)
    assert ratio_for_loss(curve, 1.0, 0.9) == pytest.approx(0.8)
    assert ratio_for_loss(curve, 1.0, 0.5) == pytest.approx(0.5)
    # Flat curves (quantised metrics) still give ratios that grow continuously with the budget.
    flat = [(0.2, 0.0), (0.4, 0.0), (0.6, 0.05)]
    assert 0.0 < ratio_for_loss(flat, 1e-5, 0.9) < ratio_for_loss(flat, 3e-5, 0.9) < 0.4


def test_sensitivity_pruning_spares_the_sensitive_group() -> None:
    torch.manual_seed(0)
    model = resnet_cnn().eval()
    base_params = count_params(model)

    def metric(m: nn.Module) -> float:
        # Pruning the stem group costs 40x more per channel than anything else.
        stem = m.get_submodule("stem.0")
        assert isinstance(stem, nn.Conv2d)
        stem_lost = 1 - stem.out_channels / 16
        return 1.0 - 0.4 * stem_lost - 0.01 * (1 - count_params(m) / base_params)

    result = prune(model, SensitivityPruning(flops=-0.5), X, evaluate=metric)
    assert abs(result.flops_reduction - 0.5) <= 0.01
    assert result.ratios["stem.0"] < 0.1
    # The others share the loss budget: the group holding the fewest parameters goes furthest.
    others = {n: r for n, r in result.ratios.items() if n != "stem.0"}
    assert min(others.values()) > result.ratios["stem.0"]
    assert max(others, key=lambda n: others[n]) in {"layers.0.conv1", "layers.1.conv1"}
    assert result.sensitivity is not None and set(result.sensitivity.metrics) == set(result.ratios)
    with pytest.raises(ValueError, match="pass evaluate="):
        prune(resnet_cnn(), SensitivityPruning(flops=-0.5), X)


def test_plot_draws_each_groups_losses_to_a_png(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.pyplot as plt

    closed: list[Any] = []  # the figure, caught as plot_sensitivity closes it
    close = plt.close

    def catch(fig: Any) -> None:
        closed.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", catch)
    result = analyze_sensitivity(mobilenet_cnn().eval(), X, _Metric(), ratios=(0.25, 0.5))
    out = plot_sensitivity(result, tmp_path / "s.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = closed[0].axes[0].get_lines()
    assert len(lines) == len(result.metrics) > 1
    assert [line.get_label() for line in lines] == list(result.metrics)
    for line in lines:  # each curve starts at (0, 0), then the group's measured losses
        want = [(0.0, 0.0), *result.losses(line.get_label())]
        assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == want
