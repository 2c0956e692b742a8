"""The search plots draw the search's own numbers: rewards, the SA chain, FLOPs and latency
per trial, the budgets (checked on the plotted series, not on PNG bytes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import optuna
import pytest
import torch

from lyceum.compression.analysis import count_flops
from lyceum.compression.nas import (
    Budget,
    BudgetedSpace,
    LatencyEntry,
    LatencyTable,
    plot_search,
    search_architecture,
    search_plot_data,
)
from lyceum.compression.search import SAChain, SAConfig, run_search
from tests.deploy.test_cli_nas import TinySpace


def _lut(space: TinySpace) -> LatencyTable:
    entries = {
        op.key: LatencyEntry(median_ms=0.1 * (i + 1), p10_ms=0.0, p90_ms=1.0, runs=1)
        for i, op in enumerate(space.all_ops())
    }
    return LatencyTable(
        device="cpu",
        threads=1,
        batch=1,
        dtype="float32",
        clock="wall",
        torch_version=torch.__version__,
        overhead_ms=0.05,
        entries=entries,
    )


def _reward(tokens: Sequence[int]) -> float:
    return 0.1 * tokens[0] + 0.05 * tokens[1] + 0.01 * tokens[2]


def test_plot_data_are_the_trials_rewards_chain_and_figures(tmp_path: Path) -> None:
    space, config = TinySpace(), SAConfig(max_iterations=6, seed=3)
    lut = _lut(space)
    budget = Budget(max_flops=10**6, max_latency_ms=5.0)
    result, budgeted = search_architecture(
        space, _reward, budget=budget, lut=lut, search=config, progress=False
    )
    data = search_plot_data(result, budgeted)
    history = result.history
    assert data.numbers == [h["number"] for h in history]
    assert data.rewards == [h["reward"] for h in history]
    assert data.best == [max(data.rewards[: i + 1]) for i in range(len(history))]
    # The chain's current reward, replayed by an independent chain of the same settings.
    chain = SAChain(
        [2, 2, 2],
        history[0]["tokens"],
        seed=3,
        init_temperature=config.init_temperature,
        reduce_rate=config.reduce_rate,
    )
    expected = []
    for h in history:
        chain.update(h["number"], h["tokens"], h["reward"])
        expected.append(chain.current_reward)
    assert data.chain == expected
    x = torch.zeros(1, 1, 8, 8)
    assert data.flops == [count_flops(space.build(h["tokens"]), x) for h in history]
    assert data.latency_ms == pytest.approx([lut.predict(space.ops(h["tokens"])) for h in history])
    assert (data.max_flops, data.max_latency_ms) == (10**6, 5.0)

    written = plot_search(data, tmp_path / "plots")
    assert [p.name for p in written] == ["rewards.png", "tradeoffs.png"]
    assert all(p.stat().st_size > 0 for p in written)


def test_another_sampler_has_no_chain_and_no_table_no_latency(tmp_path: Path) -> None:
    space = TinySpace()
    result = run_search(
        space,
        _reward,
        SAConfig(max_iterations=3),
        sampler=optuna.samplers.RandomSampler(seed=0),
        progress=False,
    )
    data = search_plot_data(result, BudgetedSpace(space))
    assert data.chain is None and data.latency_ms is None and data.max_flops is None
    assert len(data.rewards) == 4
    assert len(plot_search(data, tmp_path)) == 2
