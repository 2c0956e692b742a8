"""A pipeline's plan: its stages' windows laid out as one list of steps.

Before epoch `e` trains, the stages whose window starts at `e` start, in listed order (a
point stage ends at once); after it, those whose window ends at `e` end, the quantization
last (it converts the model to int8, so it is the run's last step). The state of a run is
an index in this list (and the batches done of the epoch there), so where a resumed run
stands, which stages are open and what they did before is a function of that index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lyceum.compression.pipeline.schema import PipelineConfig

__all__ = ["Step", "build_plan", "open_stages", "started_stages"]


@dataclass(frozen=True)
class Step:
    """One step: a stage starts or ends, or epoch `epoch` trains."""

    kind: Literal["start", "epoch", "end"]
    epoch: int
    stage: int | None = None  # the stage's index (start and end steps)


def build_plan(config: PipelineConfig) -> list[Step]:
    windows = config.windows()
    total = config.total_epochs()
    last = [i for i, s in enumerate(config.stages) if s.kind == "quantize"]
    plan: list[Step] = []
    for epoch in range(total + 1):
        for i, window in enumerate(windows):
            if window.start == epoch:
                plan.append(Step("start", epoch, i))
                if window.end is None:
                    plan.append(Step("end", epoch, i))
        if epoch == total:
            break
        plan.append(Step("epoch", epoch))
        ends = [i for i, w in enumerate(windows) if w.end == epoch]
        for i in sorted(ends, key=lambda i: i in last):
            plan.append(Step("end", epoch, i))
    return plan


def started_stages(plan: list[Step], step: int) -> list[int]:
    """Stages whose start step lies before `step`, in the order they started."""
    return [s.stage for s in plan[:step] if s.kind == "start" and s.stage is not None]


def open_stages(plan: list[Step], step: int) -> list[int]:
    """Stages started before `step` and not yet ended there, in the order they started."""
    ended = {s.stage for s in plan[:step] if s.kind == "end"}
    return [i for i in started_stages(plan, step) if i not in ended]
