"""Teachers for the student-client integration tests: a slowed-down CNN, checkpoints, dumps.

Servers started by these tests get this directory on PYTHONPATH (`ENV`), so the test-only
model spec `teachers:slow_cnn` resolves in the server process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lyceum.deploy.examples import TeacherCNN
from lyceum.proto.manifest import model_identity
from lyceum.proto.specs import load_model
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

HERE = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
SLOW = "teachers:slow_cnn"
DIGITS = "lyceum.deploy.examples:digits"


class SlowCNN(TeacherCNN):
    """The demo teacher, sleeping `delay_s` per forward: keeps requests in flight for a while."""

    def __init__(self, delay_s: float, width: int, num_classes: int) -> None:
        super().__init__(width, num_classes)
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return super().forward(x)


def slow_cnn(delay_s: float = 0.02, width: int = 8, num_classes: int = 10) -> SlowCNN:
    return SlowCNN(delay_s, width, num_classes)


def save_checkpoint(path: Path, seed: int, width: int = 8, num_classes: int = 10) -> Path:
    """Seeded weights, so every replica (and the in-process reference) is the same teacher."""
    torch.manual_seed(seed)
    save_file(TeacherCNN(width, num_classes).state_dict(), str(path))
    return path


def reference_logits(checkpoint: Path, dataset: torch.utils.data.Dataset) -> torch.Tensor:
    """The teacher's logits for every sample, computed in this process: `[len(dataset), 10]`."""
    model = load_model('lyceum.deploy.examples:teacher_cnn{"width": 8}', checkpoint)
    engine = TeacherEngine(model, EngineConfig(), dataset[0][0])
    inputs = torch.stack([dataset[i][0] for i in range(len(dataset))])  # type: ignore[arg-type]
    out = engine.infer(inputs)["logits"]
    assert isinstance(out, torch.Tensor)
    return out


def make_dump(
    directory: Path, seed: int, dataset: torch.utils.data.Dataset, num_classes: int = 10
) -> Path:
    """An offline dump of a seeded teacher over `dataset`."""
    torch.manual_seed(seed)
    model = TeacherCNN(8, num_classes)
    engine = TeacherEngine(model, EngineConfig(), dataset[0][0])
    config = DumpConfig(shard_rows=256, batch_size=128, workers=0, progress=False)
    dump_knowledge(engine, dataset, directory, config, model_identity("test", model))
    return directory
