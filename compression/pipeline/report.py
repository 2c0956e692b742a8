"""The pipeline's report: PaddleSlim's "hybrid methods" table for one run, and what a run
produced (`CompressResult`: the final model, the rows, the report).

One row for the model the run starts from (`baseline`) and one per stage, measured when the
stage ends: top-1 accuracy on the test split, size on disk (the stage's file: the float
weights as safetensors, the int8 `torch.export` program), MACs (`analysis.count_flops`; an
int8 model keeps its float model's) and median CPU latency for a batch of one
(`analysis.measure_latency`, one thread: eager for float models, the `torch.compile`d
program for int8 ones, the way `lyceum quantize` times them). Written as `report.json` and
`report.md` into the run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lyceum.compression._io import write_bytes_atomic
from lyceum.proto.display import format_bytes

__all__ = [
    "REPORT_JSON",
    "REPORT_MD",
    "CompressResult",
    "StageRow",
    "format_report",
    "write_report",
]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


class StageRow(BaseModel):
    """One row of the report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str = Field(description="The stage's name (`baseline`: the model as given).")
    kind: str = Field(description="baseline, train, prune or quantize.")
    epochs: str = Field(description="The stage's epochs, e.g. '0-29', or '-' for a point.")
    accuracy: float = Field(description="Top-1 accuracy on the test split.")
    size_bytes: int | None = Field(
        description="Size on disk of the stage's model file; None where the stage wrote none."
    )
    flops: int | None = Field(description="Multiply-accumulates for one input.")
    latency_ms: float | None = Field(description="Median CPU latency, batch 1, one thread.")
    file: str | None = Field(description="The stage's model file, relative to the run dir.")
    note: str = Field(default="", description="What else a reader must know about the row.")


def format_report(rows: list[StageRow], test_split: str) -> str:
    """The rows as a Markdown table."""
    header = f"| stage | kind | epochs | {test_split} accuracy | size on disk | MACs | latency ms |"
    lines = [header, "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        size = format_bytes(r.size_bytes) if r.size_bytes is not None else "-"
        flops = f"{r.flops:,}" if r.flops is not None else "-"
        latency = f"{r.latency_ms:.3f}" if r.latency_ms is not None else "-"
        lines.append(
            f"| {r.stage} | {r.kind} | {r.epochs} | {100 * r.accuracy:.2f}% | {size} | "
            f"{flops} | {latency} |"
        )
    notes = [f"- {r.stage}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def write_report(out_dir: Path, rows: list[StageRow], test_split: str) -> str:
    """Write `report.json` and `report.md` into `out_dir`; returns the Markdown."""
    text = format_report(rows, test_split)
    payload: dict[str, Any] = {"rows": [r.model_dump() for r in rows]}
    write_bytes_atomic(out_dir / REPORT_JSON, (json.dumps(payload, indent=1) + "\n").encode())
    write_bytes_atomic(out_dir / REPORT_MD, (text + "\n").encode())
    return text


@dataclass
class CompressResult:
    """What a pipeline run produced."""

    model: nn.Module  # the final model: float, pruned, or the int8 graph
    rows: list[StageRow]
    report: str  # the Markdown table, also in out_dir/report.md
    epochs: list[dict[str, Any]]  # per epoch: its number, mean loss and open stages
    out_dir: Path
    signum: int | None = None  # the signal that stopped the run (its checkpoint written)

    @property
    def finished(self) -> bool:
        return self.signum is None
