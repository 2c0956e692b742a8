"""Sensitivity analysis: each group pruned alone at several ratios, resumable JSON, plots.

Results are written after every evaluation (temp file + rename, so an interruption never leaves
a truncated file) and an analysis started again with the same file skips what is recorded.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lyceum.compression._io import write_json_atomic
from lyceum.compression.pruning._graph import ChannelGraph, Criterion, prune_by_ratios
from lyceum.proto.display import Progress

__all__ = ["SensitivityResult", "analyze_sensitivity", "plot_sensitivity"]

_VERSION = 1
_TIE_SLOPE = 1e-4


class SensitivityResult(BaseModel):
    """Metric of the unpruned model and of each group pruned alone at each ratio."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(default=_VERSION, description="File format version.")
    criterion: Criterion = Field(description="Channel importance used to pick channels.")
    baseline: float = Field(description="Metric of the unpruned model.")
    metrics: dict[str, dict[str, float]] = Field(
        description="group name -> ratio (as '%.4g') -> metric with that group pruned alone."
    )

    def losses(self, group: str) -> list[tuple[float, float]]:
        """(ratio, baseline - metric) for `group`, sorted by ratio."""
        if group not in self.metrics:
            raise ValueError(f"no sensitivity for group {group!r}; have {sorted(self.metrics)}")
        return sorted((float(r), self.baseline - m) for r, m in self.metrics[group].items())


def _key(ratio: float) -> str:
    return f"{ratio:.4g}"


def analyze_sensitivity(
    model: nn.Module,
    example_input: torch.Tensor,
    evaluate: Callable[[nn.Module], float],
    *,
    ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    criterion: Criterion = "l1",
    include: str | None = None,
    exclude: str | None = None,
    path: str | Path | None = None,
    progress: bool = True,
) -> SensitivityResult:
    """Prune each selected group alone at each ratio (on a copy) and evaluate the metric.

    `evaluate` returns a metric where higher is better (validation accuracy). With `path`,
    results already in the file are reused and each new one is saved as soon as it is known.
    `progress` counts the (group, ratio) trials, those read back from `path` included.
    """
    file = Path(path) if path is not None else None
    baseline: float | None = None
    metrics: dict[str, dict[str, float]] = {}
    if file is not None and file.exists():
        saved = json.loads(file.read_text())
        if saved.get("format_version") != _VERSION or saved.get("criterion") != criterion:
            raise ValueError(
                f"{file}: saved analysis has format_version {saved.get('format_version')!r} and "
                f"criterion {saved.get('criterion')!r}, this run wants {_VERSION} and "
                f"{criterion!r}; use another file or delete it"
            )
        baseline = saved.get("baseline")
        metrics = {g: dict(v) for g, v in saved.get("metrics", {}).items()}

    def save() -> None:
        if file is not None:
            write_json_atomic(
                file,
                {
                    "format_version": _VERSION,
                    "criterion": criterion,
                    "baseline": baseline,
                    "metrics": metrics,
                },
            )

    if baseline is None:
        baseline = float(evaluate(copy.deepcopy(model)))
        save()
    graph = ChannelGraph(model, example_input, include=include, exclude=exclude)
    groups = graph.groups
    resumed = sum(_key(r) in metrics.get(g.name, {}) for g in groups for r in ratios)
    with Progress(
        total=len(groups) * len(ratios),
        desc="sensitivity",
        unit="trial",
        initial=resumed,
        enabled=progress,
    ) as bar:
        for group in groups:
            done = metrics.setdefault(group.name, {})
            for ratio in ratios:
                if _key(ratio) in done:
                    continue
                candidate = copy.deepcopy(model)
                prune_by_ratios(
                    candidate, example_input, {group.name: ratio}, criterion, graph=graph
                )
                done[_key(ratio)] = float(evaluate(candidate))
                save()
                bar.update(
                    1, group=group.name, ratio=_key(ratio), metric=f"{done[_key(ratio)]:.4f}"
                )
    return SensitivityResult(criterion=criterion, baseline=baseline, metrics=metrics)


def plot_sensitivity(result: SensitivityResult, path: str | Path) -> Path:
    """Plot metric loss against pruned ratio, one curve per group, to a PNG file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_sensitivity needs matplotlib: pip install 'lyceum-kd[plot]'") from e
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in result.metrics:
        points = [(0.0, 0.0), *result.losses(group)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=group)
    ax.set_xlabel("fraction of the group's channels removed")
    ax.set_ylabel("metric loss (baseline - metric)")
    ax.set_title(f"Sensitivity ({result.criterion}), baseline {result.baseline:.4f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out = Path(path)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def ratio_for_loss(losses: list[tuple[float, float]], threshold: float, max_ratio: float) -> float:
    """Largest ratio whose predicted loss is <= `threshold`, interpolating linearly.

    The curve starts at (0, 0) and is made non-decreasing (running max): a noisy measurement
    where pruning more *raised* the metric is not trusted to predict a free lunch. A tiny slope
    (`_TIE_SLOPE` per unit ratio, far below one validation sample) is then added so the curve is
    strictly increasing: metrics such as accuracy are quantised, many groups share the same
    flat loss levels, and without it every group would jump together at one threshold, making
    FLOPs targets between those jumps unreachable.
    """
    points = [(0.0, 0.0)]
    level = 0.0
    for ratio, loss in losses:
        level = max(level, loss)
        points.append((ratio, level + _TIE_SLOPE * ratio))
    best = 0.0
    for (r0, l0), (r1, l1) in itertools.pairwise(points):
        if l1 <= threshold:
            best = r1
            continue
        if l0 <= threshold < l1:
            best = r0 + (r1 - r0) * (threshold - l0) / (l1 - l0)
        break
    return min(best, max_ratio)
