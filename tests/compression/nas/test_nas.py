"""Light-NAS's space, budgets checked before training, and the latency table."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from lyceum.compression.analysis import count_flops, count_params
from lyceum.compression.nas import (
    Budget,
    BudgetedSpace,
    LatencyEntry,
    LatencyTable,
    LightNASSpace,
    NASSpace,
    Op,
    build_latency_table,
    measure_network,
    measure_networks,
    op_key,
    search_architecture,
)
from lyceum.compression.search import SAConfig


def test_lightnas_has_30_tokens_and_builds_mobilenetv2_at_its_start() -> None:
    space = LightNASSpace(input_size=8)
    assert space.range_table() == [4, 3, 3, 2, 2, 2] * 5
    assert isinstance(space, NASSpace)
    model = space.build(space.init_tokens())
    x = torch.zeros(2, 1, 8, 8)
    assert model(x).shape == (2, 10)
    # MobileNetV2's 2+3+4+3+3 searched blocks, the fixed first and last blocks, stem, head.
    assert len(list(model.children())) == 15 + 4
    # The budget's figures are the network's own, summed over its ops.
    figures = BudgetedSpace(space).figures(space.init_tokens())
    assert figures.flops == count_flops(model, x[:1]) and figures.params == count_params(model)


def test_every_op_of_random_networks_is_in_all_ops() -> None:
    space = LightNASSpace(input_size=8)
    keys = {op.key for op in space.all_ops()}
    rng = random.Random(0)
    for _ in range(20):
        tokens = [rng.randrange(n) for n in space.range_table()]
        assert {op.key for op in space.ops(tokens)} <= keys


class _Two:
    """A hand-made space: one token picks the width of a conv, then a ReLU."""

    widths = (4, 8)

    def __init__(self) -> None:
        self.built = 0

    def range_table(self) -> list[int]:
        return [2, 2]

    def init_tokens(self) -> list[int]:
        return [0, 0]

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        return True

    def ops(self, tokens: Sequence[int]) -> list[Op]:
        w = self.widths[tokens[0]]
        conv = Op(op_key("conv", cout=w), lambda: nn.Conv2d(1, w, 3, padding=1), (1, 8, 8))
        act = Op(
            op_key("act", c=w, relu=tokens[1]),
            lambda: nn.ReLU() if tokens[1] else nn.Tanh(),
            (w, 8, 8),
        )
        return [conv, act]

    def all_ops(self) -> list[Op]:
        return [op for a in range(2) for b in range(2) for op in self.ops([a, b])]

    def build(self, tokens: Sequence[int]) -> nn.Module:
        self.built += 1
        return nn.Sequential(*(op.build() for op in self.ops(tokens)))


def test_prediction_of_a_two_op_network_is_its_two_entries_plus_the_overhead(
    tmp_path: Path,
) -> None:
    space = _Two()
    table = build_latency_table(space, runs=5, warmup=1, fit_networks=2, progress=False)
    assert set(table.entries) == {op.key for op in space.all_ops()}
    ops = space.ops([1, 0])
    expected = table.entries[ops[0].key].median_ms + table.entries[ops[1].key].median_ms
    overheads = table.overhead_ms + 2 * table.per_op_ms
    assert table.predict(ops) == pytest.approx(expected + overheads, rel=1e-12)
    table.save(tmp_path / "lut.json")
    assert LatencyTable.load(tmp_path / "lut.json") == table
    missing = table.model_copy(update={"entries": {}})
    with pytest.raises(ValueError, match=r"no entry for op conv\(cout=8\)"):
        missing.predict(ops)


def test_entries_are_timed_over_sweeps_that_share_the_runs() -> None:
    space = _Two()
    table = build_latency_table(space, runs=5, warmup=0, sweeps=2, fit_networks=2, progress=False)
    # Each of 2 sweeps times every op ceil(5 / 2) = 3 times; the entry holds all 6 passes.
    assert table.sweeps == 2
    assert {e.runs for e in table.entries.values()} == {6}
    with pytest.raises(ValueError, match="sweeps must be >= 1"):
        build_latency_table(space, runs=5, sweeps=0, progress=False)


class _Logged(_Two):
    """`_Two` whose networks log their index at every pass."""

    def __init__(self) -> None:
        super().__init__()
        self.passes: list[int] = []

    def build(self, tokens: Sequence[int]) -> nn.Module:
        network, index, passes = super().build(tokens), self.built - 1, self.passes
        network.register_forward_pre_hook(lambda *_: passes.append(index))
        return network


def test_networks_are_measured_round_robin_one_figure_each() -> None:
    space = _Logged()
    table = _table({op.key: 1.0 for op in space.all_ops()})
    figures = measure_networks(space, [[0, 0], [1, 1], [0, 1]], table, runs=3, warmup=1)
    assert len(figures) == 3 and all(ms > 0 for ms in figures)
    # One network built per candidate, and every round runs each once, in turn.
    assert space.built == 3 and space.passes == [0, 1, 2] * 4
    assert measure_network(space, [1, 1], table, runs=3, warmup=0) > 0


def _table(entries: dict[str, float]) -> LatencyTable:
    return LatencyTable(
        device="cpu",
        threads=1,
        batch=1,
        dtype="float32",
        clock="thread",
        torch_version=torch.__version__,
        entries={
            k: LatencyEntry(median_ms=v, p10_ms=v, p90_ms=v, runs=1) for k, v in entries.items()
        },
    )


def test_overheads_fitted_per_network_and_per_op() -> None:
    space = _Two()
    table = _table({op.key: 1.0 + i for i, op in enumerate(space.all_ops())})
    one, two = space.ops([0, 0]), space.ops([1, 1])
    # Measured = entries + 0.5 per network + 0.25 per op, on networks of 1, 2 and 4 ops.
    networks = [
        (ops, table.entries_sum(ops) + 0.5 + 0.25 * len(ops)) for ops in (one[:1], one, one + two)
    ]
    fitted = table.fit_overheads(networks)
    assert fitted.overhead_ms == pytest.approx(0.5) and fitted.per_op_ms == pytest.approx(0.25)
    assert fitted.predict(two) == pytest.approx(table.entries_sum(two) + 0.5 + 0.5)
    # All networks of one length: no slope to fit, the median gap is the overhead.
    same = table.fit_overheads([(one, table.entries_sum(one) + g) for g in (0.1, 0.3, 0.2)])
    assert (same.overhead_ms, same.per_op_ms) == (pytest.approx(0.2), 0.0)


def test_a_version_1_table_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "lut.json"
    raw = _table({"conv(cout=4)": 1.0}).model_dump()
    raw["format_version"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(
        ValueError, match=r"format_version 1 is not 2 .*rebuild it with `lyceum nas lut`"
    ):
        LatencyTable.load(path)


def test_no_candidate_over_budget_is_ever_built_for_training() -> None:
    space = _Two()
    entry = LatencyEntry(median_ms=1.0, p10_ms=1.0, p90_ms=1.0, runs=1)
    lut = LatencyTable(
        device="cpu",
        threads=1,
        batch=1,
        dtype="float32",
        clock="wall",
        torch_version=torch.__version__,
        entries={op.key: entry for op in space.all_ops()},
    )
    budget = Budget(max_flops=count_flops(nn.Conv2d(1, 4, 3, padding=1), torch.zeros(1, 1, 8, 8)))
    trained: list[list[int]] = []

    def reward(tokens: Sequence[int]) -> float:
        trained.append(list(tokens))
        space.build(tokens)
        return float(tokens[1])

    result, _ = search_architecture(
        space, reward, budget=budget, lut=lut, search=SAConfig(max_iterations=3), progress=False
    )
    # Only the 4-wide conv meets the FLOPs budget: the 8-wide one is never built for training.
    assert trained and all(t[0] == 0 for t in trained)
    assert space.built == len(trained)
    assert result.best_tokens == [0, 1]
    assert result.redraws > 0
    with pytest.raises(ValueError, match="needs a latency table"):
        BudgetedSpace(space, Budget(max_latency_ms=1.0))
    with pytest.raises(ValueError, match=r"no architecture within the budget"):
        search_architecture(space, reward, budget=Budget(max_flops=1), progress=False)


def test_a_budget_few_random_draws_meet_starts_from_the_first_value_of_every_token() -> None:
    from lyceum.compression.nas.job import _feasible_start

    class OnlyTheSmallest:
        """Eight tokens of ten values; only all zeros fits (1 in 10^8 random draws)."""

        def init_tokens(self) -> list[int]:
            return [9] * 8

        def range_table(self) -> list[int]:
            return [10] * 8

        def is_feasible(self, tokens: Sequence[int]) -> bool:
            return not any(tokens)

    start = _feasible_start(OnlyTheSmallest(), SAConfig())  # type: ignore[arg-type]
    assert start == [0] * 8


def test_architecture_searches_warm_up_by_default_and_pruning_does_not() -> None:
    from lyceum.compression.nas import NASConfig, SupernetJobConfig
    from lyceum.compression.pruning import AutoPruning

    # A YAML search section that names other keys keeps the NAS default warm-up.
    for job in (NASConfig, SupernetJobConfig):
        config = job.model_validate({"search": {"max_iterations": 3}})
        assert config.search.warmup == 5 and config.search.max_iterations == 3
        assert job.model_validate({"search": {"warmup": 0}}).search.warmup == 0
    assert SAConfig().warmup == 0
    assert AutoPruning().search.warmup == 0


def test_a_job_takes_an_sa_config_built_by_hand_with_its_values() -> None:
    from lyceum.compression.nas import NASConfig, NASSearchConfig, SupernetJobConfig

    for job in (NASConfig, SupernetJobConfig):
        # model_validate: typed, the field wants a NASSearchConfig; at run time either works.
        config = job.model_validate({"search": SAConfig(max_iterations=7, method="evolution")})
        assert isinstance(config.search, NASSearchConfig)
        assert (config.search.max_iterations, config.search.method) == (7, "evolution")
        assert config.search.warmup == 0  # SAConfig's own default, as built
