"""A measured latency table: each distinct op of a space timed once, networks predicted as sums.

PaddleSlim's table times convolutions and activations one by one and ignores what lies between
them; here the unit is the space's own op (a whole inverted-residual block, the stem, the head),
so what a block does between its convs (residual adds, SE gates) is inside the measurement, and
the remainder (module dispatch between blocks) is one per-network `overhead_ms`, fitted as the
median of (measured - sum of entries) over a few random networks of the space.

The header names the conditions the figures hold for (device, threads, batch, dtype, clock,
torch version); `check` refuses a table measured under others. A missing op is an error naming
it, never a silent zero.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from lyceum.compression._io import write_json_atomic
from lyceum.compression.analysis import latency_samples, measure_latency
from lyceum.compression.nas.base import NASSpace, Op
from lyceum.proto.display import Progress

__all__ = [
    "LUT_FORMAT_VERSION",
    "LatencyEntry",
    "LatencyTable",
    "build_latency_table",
    "measure_network",
]

LUT_FORMAT_VERSION = 1


class LatencyEntry(BaseModel):
    """One op's timing: median and spread (10th to 90th percentile) of `runs` passes, in ms."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    median_ms: float = Field(description="Median of the timed passes, ms.")
    p10_ms: float = Field(description="10th percentile, ms.")
    p90_ms: float = Field(description="90th percentile, ms.")
    runs: int = Field(description="Timed passes.")


class LatencyTable(BaseModel):
    """Per-op latencies under the conditions of its header, plus a per-network overhead."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(default=LUT_FORMAT_VERSION, description="Version of this layout.")
    device: str = Field(description="Device measured on, e.g. 'cpu' or 'cuda:0'.")
    threads: int = Field(description="Intra-op threads during the measurement.")
    batch: int = Field(description="Batch size of every timed pass.")
    dtype: str = Field(description="Input and weight dtype, e.g. 'float32'.")
    clock: Literal["wall", "thread"] = Field(description="Clock of the measurement.")
    torch_version: str = Field(description="torch.__version__ at measurement.")
    overhead_ms: float = Field(default=0.0, description="Added once per network prediction.")
    entries: dict[str, LatencyEntry] = Field(description="Op key -> its timing.")

    def predict(self, ops: Sequence[Op]) -> float:
        """Predicted latency of a network made of `ops`, in ms."""
        total = self.overhead_ms
        for op in ops:
            entry = self.entries.get(op.key)
            if entry is None:
                raise ValueError(
                    f"latency table: no entry for op {op.key} (input {op.input_shape}); the "
                    "table was built for another space: rebuild it with `lyceum nas lut`"
                )
            total += entry.median_ms
        return total

    def check(self, *, device: str, threads: int, batch: int) -> None:
        """Refuse a table measured under other conditions than the ones asked for."""
        mine = {"device": device, "threads": threads, "batch": batch}
        theirs = {"device": self.device, "threads": self.threads, "batch": self.batch}
        if mine != theirs or self.torch_version != torch.__version__:
            raise ValueError(
                f"latency table measured with {theirs}, torch {self.torch_version}; asked for "
                f"{mine}, torch {torch.__version__}: measure a table for these conditions"
            )

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.model_dump())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict) or raw.get("format_version") != LUT_FORMAT_VERSION:
            found = raw.get("format_version") if isinstance(raw, dict) else None
            raise ValueError(
                f"{path}: latency table format_version {found!r} is not {LUT_FORMAT_VERSION}; "
                "rebuild it with `lyceum nas lut`"
            )
        return cls.model_validate(raw)


def _entry(samples: list[float]) -> LatencyEntry:
    ms = sorted(1000.0 * s for s in samples)
    deciles = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    return LatencyEntry(
        median_ms=statistics.median(ms), p10_ms=deciles[0], p90_ms=deciles[-1], runs=len(ms)
    )


def build_latency_table(
    space: NASSpace,
    *,
    device: str = "cpu",
    threads: int = 1,
    batch: int = 1,
    runs: int = 30,
    warmup: int = 5,
    clock: Literal["wall", "thread"] = "wall",
    fit_networks: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> LatencyTable:
    """Time every distinct op of `space`, then fit the overhead on `fit_networks` networks."""
    ops = space.all_ops()
    entries: dict[str, LatencyEntry] = {}
    with Progress(total=len(ops), desc="latency table", unit="op", enabled=progress) as bar:
        for op in ops:
            module = op.build().to(device)
            example = torch.zeros(batch, *op.input_shape, device=device)
            samples = latency_samples(
                module, example, runs=runs, warmup=warmup, threads=threads, clock=clock
            )
            entries[op.key] = _entry(samples)
            bar.update(1)
    table = LatencyTable(
        device=device,
        threads=threads,
        batch=batch,
        dtype=str(torch.get_default_dtype()).removeprefix("torch."),
        clock=clock,
        torch_version=torch.__version__,
        entries=entries,
    )
    rng = random.Random(seed)
    gaps = []
    for _ in range(fit_networks):
        tokens = [rng.randrange(n) for n in space.range_table()]
        measured = measure_network(space, tokens, table, runs=runs, warmup=warmup, clock=clock)
        gaps.append(measured - table.predict(space.ops(tokens)))
    overhead = statistics.median(gaps) if gaps else 0.0
    return table.model_copy(update={"overhead_ms": overhead})


def measure_network(
    space: NASSpace,
    tokens: Sequence[int],
    table: LatencyTable,
    *,
    runs: int = 30,
    warmup: int = 5,
    clock: Literal["wall", "thread"] | None = None,
) -> float:
    """Measured latency of candidate `tokens` under `table`'s conditions, in ms."""
    model = space.build(tokens).to(table.device)
    example = torch.zeros(table.batch, *space.ops(tokens)[0].input_shape, device=table.device)
    seconds = measure_latency(
        model,
        example,
        runs=runs,
        warmup=warmup,
        threads=table.threads,
        clock=clock or table.clock,
    )
    return 1000.0 * seconds
