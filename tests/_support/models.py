"""Test-only models, named by spec in the servers and trainers that tests start
(`tests._support.models:slow_cnn`, `tests._support.models:gated_mlp`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from lyceum.deploy.examples import TeacherCNN, student_mlp

from .waiting import wait_until

__all__ = [
    "GO",
    "REACHED",
    "FeatureCNN",
    "GatedMLP",
    "SlowCNN",
    "feature_cnn",
    "gated_mlp",
    "slow_cnn",
]

REACHED = "reached"  # written by the gated forward when it stops
GO = "go"  # the test writes it to let the forward go on


class SlowCNN(TeacherCNN):
    """The demo teacher, `delay_s` slower per forward: keeps requests in flight and queues
    full for a while, so draining, failover and back-pressure are observable."""

    def __init__(self, delay_s: float, width: int = 32, num_classes: int = 10) -> None:
        super().__init__(width, num_classes)
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)  # slowness on purpose (the model's cost), not a synchronisation
        return super().forward(x)


def slow_cnn(delay_s: float = 0.02, width: int = 32, num_classes: int = 10) -> SlowCNN:
    return SlowCNN(delay_s, width, num_classes)


class GatedMLP(nn.Sequential):
    """`student_mlp`: the same layers, created in the same order, so the same seed gives the
    same weights. Its `at`-th training forward writes `gate/reached` and waits for
    `gate/go`, so a test acts (signals the trainer, kills a teacher) at a known step, in a
    training subprocess it only observes."""

    def __init__(self, gate: str, at: int, hidden: int = 32) -> None:
        super().__init__(*student_mlp(hidden))
        self.gate, self.at, self.calls = Path(gate), at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                (self.gate / REACHED).write_text(str(self.calls))
                wait_until((self.gate / GO).exists, f"{self.gate / GO} to appear")
        return super().forward(x)


def gated_mlp(gate: str, at: int, hidden: int = 32) -> GatedMLP:
    return GatedMLP(gate, at, hidden)


class FeatureCNN(nn.Module):
    """A student with feature maps for the feature losses: its forward returns `logits` and
    `s1` [width, 4, 4], `s2` and `s3` [2 * width, 4, 4], the sizes of the maps of
    `teacher_cnn(width=width)`'s layer2 and layer3 on the digits."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.s1 = nn.Sequential(nn.Conv2d(1, width, 3, stride=2, padding=1), nn.ReLU())
        self.s2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.s3 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s1 = self.s1(x)
        s2 = self.s2(s1)
        s3 = self.s3(s2)
        return {"logits": self.head(s3.mean(dim=(2, 3))), "s1": s1, "s2": s2, "s3": s3}


def feature_cnn(width: int = 8, num_classes: int = 10) -> FeatureCNN:
    return FeatureCNN(width, num_classes)
