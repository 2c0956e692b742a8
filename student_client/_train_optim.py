"""The trainer's optimizer and learning-rate schedule, built from their config sections.

The optimizer takes the student's parameters and the losses' learned adapters (`FeatureMSE`
adapters, hint regressors) together. The schedule is stepped after every optimizer step
(every `accumulate` batches), so its lengths are in optimizer steps: `epochs *
steps_per_epoch` for cosine, `step_epochs * steps_per_epoch` between step decays.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lyceum.student_client.trainer_config import OptimizerConfig, ScheduleConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(
    config: OptimizerConfig, params: Iterable[nn.Parameter]
) -> torch.optim.Optimizer:
    """The optimizer `config` names, over `params`."""
    params = list(params)
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(
    config: ScheduleConfig,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The schedule `config` names for a run of `epochs`; None for a constant rate."""
    if config.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    if config.name == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.step_epochs * steps_per_epoch, gamma=config.gamma
        )
    return None
