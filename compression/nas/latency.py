"""A measured latency table: each distinct op of a space timed once, networks predicted as sums.

PaddleSlim's table times convolutions and activations one by one and ignores what lies between
them; here the unit is the space's own op (a whole inverted-residual block, the stem, the head),
so what a block does between its convs (residual adds, SE gates) is inside the measurement.

An op timed alone, pass after pass, runs with warm caches; inside a network it runs after other
ops, with its weights and code evicted: on the Light-NAS space (8x8 inputs, one thread) a block
took 0.1-0.3 ms more inside a network than alone, 30-60% of the small blocks' time, so sums of
lone timings came out 25-35% short and ranked networks poorly (Spearman 0.6). So the entries
are timed `interleave` ops in turn (`interleaved_latency_samples`), a network's cold start each,
and what remains (module dispatch, context the interleaving does not reproduce) is fitted by
least squares on a few measured networks as `overhead_ms` per network plus `per_op_ms` per op.

A shared machine's speed drifts: on this project's 2-core VM the same network, measured twice
a few seconds apart, differed by up to 40% even on the thread clock (a busy neighbour on the
host's core is counted as our time). A group of ops timed together shares one moment's speed,
so the entries are timed in `sweeps` passes over all ops, each in a fresh order with its share
of the runs, and each entry is the median over all its passes: one slow moment touches a few
of an entry's passes instead of all of them. The networks the overheads are fitted on are
measured round-robin (`measure_networks`) for the same reason. On the Light-NAS space (50
random networks, 30 passes, networks measured round-robin) one sweep ranked them at Spearman
0.86-0.89 and three at 0.88-0.96, MAPE 3.2-10.7% (bench/README.md, "Light-NAS").

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
from lyceum.compression.analysis import interleaved_latency_samples
from lyceum.compression.nas.base import NASSpace, Op
from lyceum.proto.display import Progress

__all__ = [
    "LUT_FORMAT_VERSION",
    "LatencyEntry",
    "LatencyTable",
    "build_latency_table",
    "measure_network",
    "measure_networks",
]

# 2: entries timed interleaved, `per_op_ms` fitted with `overhead_ms` (1: lone timings).
LUT_FORMAT_VERSION = 2


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
    interleave: int = Field(
        default=1, ge=1, description="Ops timed in turn for each entry (1: each op alone)."
    )
    sweeps: int = Field(
        default=1, ge=1, description="Passes over all ops, each with its share of the runs."
    )
    overhead_ms: float = Field(default=0.0, description="Added once per network prediction.")
    per_op_ms: float = Field(default=0.0, description="Added once per op of a prediction.")
    entries: dict[str, LatencyEntry] = Field(description="Op key -> its timing.")

    def entries_sum(self, ops: Sequence[Op]) -> float:
        """The sum of `ops`' entries, in ms: the prediction before the fitted overheads."""
        total = 0.0
        for op in ops:
            entry = self.entries.get(op.key)
            if entry is None:
                raise ValueError(
                    f"latency table: no entry for op {op.key} (input {op.input_shape}); the "
                    "table was built for another space: rebuild it with `lyceum nas lut`"
                )
            total += entry.median_ms
        return total

    def predict(self, ops: Sequence[Op]) -> float:
        """Predicted latency of a network made of `ops`, in ms."""
        return self.overhead_ms + self.per_op_ms * len(ops) + self.entries_sum(ops)

    def fit_overheads(self, networks: Sequence[tuple[Sequence[Op], float]]) -> LatencyTable:
        """This table with `overhead_ms` and `per_op_ms` fitted to measured `(ops, ms)` pairs.

        Least squares of (measured - sum of entries) on the op count. With fewer than two
        networks, or all of one length, a slope cannot be told from the intercept: the
        per-op term stays 0 and the overhead is the median gap.
        """
        counts = [float(len(ops)) for ops, _ in networks]
        gaps = [ms - self.entries_sum(ops) for ops, ms in networks]
        if not gaps:
            return self.model_copy(update={"overhead_ms": 0.0, "per_op_ms": 0.0})
        if len(set(counts)) < 2:
            return self.model_copy(
                update={"overhead_ms": statistics.median(gaps), "per_op_ms": 0.0}
            )
        slope, intercept = statistics.linear_regression(counts, gaps)
        return self.model_copy(update={"overhead_ms": intercept, "per_op_ms": slope})

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
                f"{path}: latency table format_version {found!r} is not {LUT_FORMAT_VERSION} "
                "(version 2 times ops interleaved and fits a per-op overhead); rebuild it with "
                "`lyceum nas lut`"
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
    interleave: int = 16,
    sweeps: int = 3,
    fit_networks: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> LatencyTable:
    """Time every distinct op of `space`, `interleave` at a time in turn, over `sweeps` passes
    that share the `runs` (each op gets at least `runs` timed passes in all), then fit the
    overheads on `fit_networks` random networks of the space measured round-robin."""
    if interleave < 1:
        raise ValueError(f"build_latency_table: interleave must be >= 1, got {interleave}")
    if sweeps < 1:
        raise ValueError(f"build_latency_table: sweeps must be >= 1, got {sweeps}")
    rng = random.Random(seed)
    # One entry per key: a space may list an op once per network it appears in.
    ops = list({op.key: op for op in space.all_ops()}.values())
    per_sweep = -(-runs // sweeps)
    samples: dict[str, list[float]] = {op.key: [] for op in ops}
    with Progress(
        total=len(ops) * sweeps, desc="latency table", unit="op", enabled=progress
    ) as bar:
        for _ in range(sweeps):
            # Shuffled, so that an op's neighbours in turn are of other stages and sizes, as
            # in a network, and other ones in every sweep.
            order = rng.sample(ops, len(ops))
            for start in range(0, len(order), interleave):
                group = order[start : start + interleave]
                pairs = [
                    (op.build().to(device), torch.zeros(batch, *op.input_shape, device=device))
                    for op in group
                ]
                timed = interleaved_latency_samples(
                    pairs, runs=per_sweep, warmup=warmup, threads=threads, clock=clock
                )
                for op, times in zip(group, timed, strict=True):
                    samples[op.key] += times
                bar.update(len(group))
    table = LatencyTable(
        device=device,
        threads=threads,
        batch=batch,
        dtype=str(torch.get_default_dtype()).removeprefix("torch."),
        clock=clock,
        torch_version=torch.__version__,
        interleave=interleave,
        sweeps=sweeps,
        entries={op.key: _entry(samples[op.key]) for op in ops},
    )
    networks = [[rng.randrange(n) for n in space.range_table()] for _ in range(fit_networks)]
    measured = measure_networks(space, networks, table, runs=runs, warmup=warmup, clock=clock)
    return table.fit_overheads(
        [(space.ops(tokens), ms) for tokens, ms in zip(networks, measured, strict=True)]
    )


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
    return measure_networks(space, [tokens], table, runs=runs, warmup=warmup, clock=clock)[0]


def measure_networks(
    space: NASSpace,
    candidates: Sequence[Sequence[int]],
    table: LatencyTable,
    *,
    runs: int = 30,
    warmup: int = 5,
    clock: Literal["wall", "thread"] | None = None,
) -> list[float]:
    """Measured latency of each candidate under `table`'s conditions, in ms: the networks run
    round-robin (each round runs every one once), so a drift of the machine's speed touches
    them alike and their ranking holds; one after another, each would get its own moment."""
    pairs = [
        (
            space.build(tokens).to(table.device),
            torch.zeros(table.batch, *space.ops(tokens)[0].input_shape, device=table.device),
        )
        for tokens in candidates
    ]
    timed = interleaved_latency_samples(
        pairs, runs=runs, warmup=warmup, threads=table.threads, clock=clock or table.clock
    )
    return [1000.0 * statistics.median(times) for times in timed]
