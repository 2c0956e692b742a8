"""The trainer's optimizer and LR schedule builders: what each config name gives, and the
schedule's lengths counted in optimizer steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lyceum.student_client._train_optim import build_optimizer, build_scheduler
from lyceum.student_client.trainer_config import OptimizerConfig, ScheduleConfig


def _params() -> list[nn.Parameter]:
    return list(nn.Linear(3, 2).parameters())


@pytest.mark.parametrize(
    ("config", "kind", "group"),
    [
        (
            OptimizerConfig(name="sgd", lr=0.5, momentum=0.8, weight_decay=0.01),
            torch.optim.SGD,
            {"lr": 0.5, "momentum": 0.8, "weight_decay": 0.01},
        ),
        (
            OptimizerConfig(name="adam", lr=0.02, weight_decay=0.1),
            torch.optim.Adam,
            {"lr": 0.02, "weight_decay": 0.1},
        ),
        (
            OptimizerConfig(name="adamw", lr=0.03, weight_decay=0.2),
            torch.optim.AdamW,
            {"lr": 0.03, "weight_decay": 0.2},
        ),
    ],
)
def test_each_optimizer_name_builds_that_optimizer_with_its_settings(
    config: OptimizerConfig, kind: type[torch.optim.Optimizer], group: dict[str, float]
) -> None:
    params = _params()
    optimizer = build_optimizer(config, iter(params))  # any iterable: the trainer chains two
    assert type(optimizer) is kind
    (built,) = optimizer.param_groups
    assert {k: built[k] for k in group} == group
    assert [id(p) for p in built["params"]] == [id(p) for p in params]


def _lrs(schedule: ScheduleConfig, epochs: int, steps: int) -> list[float]:
    optimizer = torch.optim.SGD(_params(), lr=1.0)
    scheduler = build_scheduler(schedule, optimizer, epochs=epochs, steps_per_epoch=steps)
    assert scheduler is not None
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return [*lrs, optimizer.param_groups[0]["lr"]]


def test_a_constant_rate_has_no_scheduler() -> None:
    optimizer = torch.optim.SGD(_params(), lr=1.0)
    assert build_scheduler(ScheduleConfig(), optimizer, epochs=3, steps_per_epoch=4) is None


def test_cosine_goes_to_zero_over_every_step_of_the_run() -> None:
    lrs = _lrs(ScheduleConfig(name="cosine"), epochs=3, steps=4)
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[6] == pytest.approx(0.5)  # half-way through the 12 steps
    assert lrs[3] == pytest.approx((1 + math.cos(math.pi * 3 / 12)) / 2)


def test_step_decays_by_gamma_every_step_epochs() -> None:
    lrs = _lrs(ScheduleConfig(name="step", step_epochs=2, gamma=0.5), epochs=5, steps=3)
    # 3 steps an epoch: the rate halves after steps 6 and 12, not before.
    assert lrs[:6] == [1.0] * 6
    assert lrs[6:12] == pytest.approx([0.5] * 6)
    assert lrs[12:] == pytest.approx([0.25] * 4)
