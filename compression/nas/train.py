"""Full training of a found architecture: `train_architecture(arch, FinalTraining(...), ...)`.

The search scores candidates after a few epochs; the architecture it found is then trained
for real, like any model, and saved as `model.safetensors` + `tokens.json`
(`lyceum.compression.nas.files`), which every command rebuilds without pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from lyceum.compression._io import write_json_atomic
from lyceum.compression.analysis import count_flops, count_params, measure_latency
from lyceum.compression.job_config import REPORT_FILE
from lyceum.compression.nas.distill import TeacherKnowledge, train_candidate
from lyceum.compression.nas.files import Architecture, save_architecture
from lyceum.proto.evaluation import top1_accuracy

__all__ = ["FinalTraining", "TrainReport", "train_architecture"]


class FinalTraining(BaseModel):
    """How `lyceum nas train` trains the architecture the search found."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=30, ge=1, description="Training epochs.")
    batch_size: int = Field(default=64, ge=1, description="Training batch size.")
    lr: float = Field(default=3e-3, gt=0, description="Adam learning rate.")
    seed: int = Field(default=0, description="Seed of the initial weights and the shuffle.")
    test_split: str = Field(default="test", description="Split of the reported accuracy.")
    latency_runs: int = Field(
        default=50, ge=1, description="Timed passes of the measured latency (batch 1, 1 thread)."
    )
    out_dir: Path = Field(
        default=Path("runs/nas"), description="Where model.safetensors, tokens.json go."
    )
    distill: bool = Field(
        default=False,
        description="Distil this training too from the search config's `distill` teacher.",
    )
    progress: bool = Field(default=True, description="Show the training's progress.")


class TrainReport(BaseModel):
    """What `train_architecture` wrote, with the trained network's figures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Architecture = Field(description="Space and tokens of the network.")
    flops: int = Field(description="MACs per sample.")
    params: int = Field(description="Parameters.")
    latency_ms: float = Field(description="Measured median latency, batch 1, 1 thread, ms.")
    accuracy: float = Field(description="Top-1 on the test data.")
    epochs: int = Field(description="Epochs trained.")
    seed: int = Field(description="Seed of the run.")
    out_dir: Path = Field(description="Directory of model.safetensors, tokens.json, report.json.")


def train_architecture(
    architecture: Architecture,
    config: FinalTraining,
    *,
    train_data: Dataset,
    test_data: Dataset,
    teacher: TeacherKnowledge | None = None,
) -> TrainReport:
    """Build `architecture` (seeded), train it with `config`, score it on `test_data`, and
    write `model.safetensors`, `tokens.json` and `report.json` into `config.out_dir`.

    With `teacher`, the training is distilled from its knowledge of `train_data`."""
    torch.manual_seed(config.seed)
    model = architecture.build()
    train_candidate(
        model,
        train_data,
        epochs=config.epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        seed=config.seed,
        teacher=teacher,
        progress=config.progress,
        desc="nas train",
    )
    example = test_data[0][0].unsqueeze(0)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_architecture(model, out)
    report = TrainReport(
        architecture=architecture,
        flops=count_flops(model, example),
        params=count_params(model),
        latency_ms=1000.0 * measure_latency(model, example, runs=config.latency_runs),
        accuracy=top1_accuracy(model, test_data),
        epochs=config.epochs,
        seed=config.seed,
        out_dir=out,
    )
    write_json_atomic(out / REPORT_FILE, report.model_dump(mode="json"))
    return report
