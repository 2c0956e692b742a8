"""What a search looked like, as PNG: reward over trials, accuracy against FLOPs and latency.

`search_plot_data` reads everything a plot draws from a `SearchResult` (and the budgeted
space that gives each candidate's figures) into `SearchPlotData`; the plot functions draw
that and nothing else, so a test checks the numbers without reading a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lyceum.compression.nas.budget import BudgetedSpace
from lyceum.compression.search import SearchResult

__all__ = ["SearchPlotData", "plot_rewards", "plot_search", "plot_tradeoffs", "search_plot_data"]


class SearchPlotData(BaseModel):
    """The series of the search plots, one entry per completed trial in number order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    numbers: list[int] = Field(description="Trial numbers.")
    rewards: list[float] = Field(description="Each trial's reward.")
    best: list[float] = Field(description="Best reward up to and including each trial.")
    chain: list[float] | None = Field(
        description="The SA chain's current reward after each trial (None: not an SA search)."
    )
    flops: list[int] = Field(description="Each trial's MACs.")
    latency_ms: list[float] | None = Field(
        description="Each trial's predicted latency (None without a latency table)."
    )
    max_flops: int | None = Field(description="The FLOPs budget, if any.")
    max_latency_ms: float | None = Field(description="The latency budget, if any.")


def search_plot_data(result: SearchResult, space: BudgetedSpace) -> SearchPlotData:
    """The plots' series: `result.history` (its `accepted` gives the chain) and the figures
    `space` counts for each trial's tokens."""
    history = result.history
    rewards = [float(h["reward"]) for h in history]
    best: list[float] = []
    for r in rewards:
        best.append(max(r, best[-1]) if best else r)
    chain: list[float] | None = None
    if history and all(h["accepted"] is not None for h in history):
        chain = []
        for h, r in zip(history, rewards, strict=True):
            chain.append(r if h["accepted"] or not chain else chain[-1])
    figures = [space.figures(h["tokens"]) for h in history]
    latencies = [f.latency_ms for f in figures]
    return SearchPlotData(
        numbers=[int(h["number"]) for h in history],
        rewards=rewards,
        best=best,
        chain=chain,
        flops=[f.flops for f in figures],
        latency_ms=None
        if any(x is None for x in latencies)
        else [float(x or 0) for x in latencies],
        max_flops=space.budget.max_flops,
        max_latency_ms=space.budget.max_latency_ms,
    )


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the NAS plots need matplotlib: pip install 'lyceum-kd[plot]'") from e
    return plt


def plot_rewards(data: SearchPlotData, path: str | Path) -> Path:
    """Reward of every trial, the best so far and (SA) the chain's current point, to a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(data.numbers, data.rewards, s=14, alpha=0.6, label="all trials")
    ax.step(data.numbers, data.best, where="post", label="best so far")
    if data.chain is not None:
        ax.step(data.numbers, data.chain, where="post", label="SA chain (current)")
    ax.set_xlabel("trial")
    ax.set_ylabel("reward")
    ax.set_title("Reward over trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_tradeoffs(data: SearchPlotData, path: str | Path) -> Path:
    """Accuracy (reward) against MACs and, with a latency table, against predicted latency;
    the budgets drawn as vertical lines."""
    plt = _pyplot()
    panels = 1 if data.latency_ms is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    series: list[tuple[str, list[Any], float | None]] = [("MACs", list(data.flops), data.max_flops)]
    if data.latency_ms is not None:
        series.append(("predicted latency (ms)", list(data.latency_ms), data.max_latency_ms))
    for ax, (label, xs, bound) in zip(axes[0], series, strict=True):
        ax.scatter(xs, data.rewards, s=14, alpha=0.7)
        if bound is not None:
            ax.axvline(bound, color="red", linestyle="--", label=f"budget {bound:,}")
            ax.legend(fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("reward (validation accuracy)")
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy against cost")
    return _save(plt, fig, path)


def plot_search(data: SearchPlotData, directory: str | Path) -> list[Path]:
    """`rewards.png` and `tradeoffs.png` in `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_rewards(data, out / "rewards.png"), plot_tradeoffs(data, out / "tradeoffs.png")]


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    out = Path(path)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
