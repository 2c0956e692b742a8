"""Students' data and configs for the trainer's tests (the models are in `models`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["MLP", "empty_digits", "supervised_config", "trainer_config"]

MLP = "lyceum.deploy.examples:student_mlp"


def empty_digits() -> torch.utils.data.TensorDataset:
    """A dataset of the digits' item types with no item at all."""
    return torch.utils.data.TensorDataset(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long))


def trainer_config(dump_dir: Path, checkpoint_dir: Path, **extra: object) -> dict[str, object]:
    """A trainer config: `student_mlp` on the digits' training split, distilled from the
    offline dump in `dump_dir`, two epochs of 20 batches, no progress output."""
    return {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": {
            "train": "lyceum.deploy.examples:digits",
            "validation": "lyceum.deploy.examples:digits",
            "validation_kwargs": {"split": "val"},
        },
        "teachers": {"dump": {"dir": str(dump_dir)}},
        "losses": {
            "terms": [{"name": "kd", "kind": "soft_label", "field": "logits", "temperature": 4.0}]
        },
        "epochs": 2,
        "batch_size": 64,
        "seed": 3,
        "checkpoint_dir": str(checkpoint_dir),
        "progress": False,
        **extra,
    }


def supervised_config(checkpoint_dir: Path, **extra: Any) -> dict[str, Any]:
    """The demo's student MLP trained on every label of the digits' training split: no
    teachers, no losses, two epochs of 20 batches."""
    return {
        "model": MLP,
        "model_kwargs": {"hidden": 32},
        "dataset": {
            "train": "lyceum.deploy.examples:digits",
            "validation": "lyceum.deploy.examples:digits",
            "validation_kwargs": {"split": "val"},
        },
        "epochs": 2,
        "batch_size": 64,
        "seed": 3,
        "checkpoint_dir": str(checkpoint_dir),
        "progress": False,
        **extra,
    }
