"""Automatic pruning: SA over per-group ratios under FLOPs and latency constraints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lyceum.compression.analysis import count_flops, count_params
from lyceum.compression.pruning import AutoPruning, prune
from lyceum.compression.search import SAConfig, StudyConfig
from lyceum.deploy.examples import mobilenet_cnn

X = torch.zeros(1, 1, 8, 8)


class _Metric:
    """Rewards keeping parameters; records the FLOPs of every model it scores."""

    def __init__(self, base_flops: int, base_params: int) -> None:
        self.base_flops, self.base_params = base_flops, base_params
        self.reductions: list[float] = []

    def __call__(self, model: nn.Module) -> float:
        self.reductions.append(1 - count_flops(model, X) / self.base_flops)
        return count_params(model) / self.base_params


def _setup() -> tuple[nn.Module, _Metric]:
    torch.manual_seed(0)
    model = mobilenet_cnn().eval()
    return model, _Metric(count_flops(model, X), count_params(model))


@pytest.mark.slow
def test_auto_pruning_meets_flops_window_and_evaluates_only_feasible(tmp_path: Path) -> None:
    model, metric = _setup()
    finetuned: list[nn.Module] = []
    config = AutoPruning(
        min_ratio=0.48,
        max_ratio=0.52,
        search=SAConfig(max_iterations=25, seed=1),
        study=StudyConfig(storage=str(tmp_path / "search.db"), study="auto"),
    )
    result = prune(model, config, X, evaluate=metric, candidate_finetune=finetuned.append)
    assert 0.48 <= result.flops_reduction <= 0.52
    assert result.search is not None
    assert len(result.search.history) == 26
    # A candidate the chain revisits is not fine-tuned again: its reward is copied.
    trained = [h for h in result.search.history if h["cached_from"] is None]
    assert len({tuple(h["tokens"]) for h in trained}) == len(trained)
    assert len(metric.reductions) == len(trained) == len(finetuned)
    assert all(0.48 <= r <= 0.52 for r in metric.reductions)
    rewards = [h["reward"] for h in result.search.history]
    assert result.search.best_reward == max(rewards)
    # The search improves on its (greedy uniform) start.
    assert result.search.best_reward > rewards[0]
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)

    # Best tokens go back in as init_tokens: with no further iterations, the same plan.
    again, metric2 = _setup()
    replay = AutoPruning(
        min_ratio=0.48,
        max_ratio=0.52,
        search=SAConfig(max_iterations=0, seed=1),
        init_tokens=result.search.best_tokens,
    )
    same = prune(again, replay, X, evaluate=metric2)
    assert same.ratios == result.ratios
    assert same.plan == result.plan


def test_auto_pruning_latency_constraint() -> None:
    model, metric = _setup()
    config = AutoPruning(
        min_ratio=0.3, max_ratio=0.7, max_latency_ms=1e-6, search=SAConfig(max_iterations=2)
    )
    with pytest.raises(ValueError, match=r"no feasible start .* \(latency bound 1e-06 ms\)"):
        prune(model, config, X, evaluate=metric)
    assert metric.reductions == []
    relaxed = config.model_copy(update={"max_latency_ms": 1e4})
    result = prune(model, relaxed, X, evaluate=metric)
    assert 0.3 <= result.flops_reduction <= 0.7


def test_auto_pruning_needs_evaluate_and_valid_window() -> None:
    with pytest.raises(ValueError, match="pass evaluate="):
        prune(mobilenet_cnn(), AutoPruning(), X)
    with pytest.raises(ValueError, match=r"min_ratio 0\.6 exceeds max_ratio 0\.5"):
        AutoPruning(min_ratio=0.6, max_ratio=0.5)
