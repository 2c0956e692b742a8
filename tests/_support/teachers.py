"""Teachers for integration tests: names of the specs, seeded checkpoints, the same teacher
run in-process (what every server reply must equal), offline dumps."""

from __future__ import annotations

import os
from collections.abc import Sized
from pathlib import Path

import torch
from safetensors.torch import save_file

from lyceum.deploy.examples import TeacherCNN
from lyceum.proto.manifest import model_identity
from lyceum.proto.specs import load_model
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

__all__ = [
    "DIGITS",
    "ENV",
    "MODEL",
    "REPO",
    "SLOW",
    "make_dump",
    "reference_engine",
    "reference_logits",
    "save_checkpoint",
]

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
"""Added to a subprocess's environment, it resolves the `tests._support.*` specs."""
MODEL = "lyceum.deploy.examples:teacher_cnn"
SLOW = 'tests._support.models:slow_cnn{"width": 8}'
"""The width-8 teacher of `save_checkpoint`'s default, slowed down (`models.SlowCNN`)."""
DIGITS = "lyceum.deploy.examples:digits"


def save_checkpoint(path: Path, seed: int = 0, width: int = 8, num_classes: int = 10) -> Path:
    """Seeded `teacher_cnn` weights as safetensors, so every replica (and the in-process
    reference) is the same teacher."""
    torch.manual_seed(seed)
    save_file(TeacherCNN(width, num_classes).state_dict(), str(path))
    return path


def reference_engine(checkpoint: Path, width: int = 8) -> TeacherEngine:
    """The checkpoint's teacher run in this process, on digits-shaped inputs."""
    from lyceum.deploy.examples import digits

    model = load_model(f'{MODEL}{{"width": {width}}}', checkpoint)
    return TeacherEngine(model, EngineConfig(), digits()[0][0])


def reference_logits(
    checkpoint: Path, dataset: torch.utils.data.Dataset[tuple[torch.Tensor, int]], width: int = 8
) -> torch.Tensor:
    """The teacher's logits for every sample, computed in this process: `[len(dataset), 10]`."""
    assert isinstance(dataset, Sized), f"{dataset!r} has no length"
    engine = reference_engine(checkpoint, width)
    inputs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    out = engine.infer(inputs)["logits"]
    assert isinstance(out, torch.Tensor)
    return out


def make_dump(
    directory: Path,
    seed: int,
    dataset: torch.utils.data.Dataset[tuple[torch.Tensor, int]],
    num_classes: int = 10,
) -> Path:
    """An offline dump of a seeded width-8 teacher over `dataset`."""
    torch.manual_seed(seed)
    model = TeacherCNN(8, num_classes)
    engine = TeacherEngine(model, EngineConfig(), dataset[0][0])
    config = DumpConfig(shard_rows=256, batch_size=128, workers=0, progress=False)
    dump_knowledge(engine, dataset, directory, config, model_identity("test", model))
    return directory
