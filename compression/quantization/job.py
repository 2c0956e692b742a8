"""A whole quantization job from one config: (train float,) quantize, train or calibrate, export, report.

`QuantizeJobConfig` names the model and data set by `module:callable` spec strings, but this
module never resolves them: the caller (the `lyceum quantize` CLI, or a script) builds the
model and data sets and passes them to `quantize_job`, so the library stays spec-agnostic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.utils.data import Dataset

from lyceum.compression.distillation import Distillation, DistillLoss, distilled_loss
from lyceum.compression.job_config import REPORT_FILE, JobConfig, train_float_first
from lyceum.proto.display import plural
from lyceum.proto.specs import check_spec

from .config import PTQ, QAT
from .workflow import QuantReport, ptq_int8, qat_int8

__all__ = ["REPORT_FILE", "QuantizeJobConfig", "describe_quantize_job", "quantize_job"]


class TeacherModel(Distillation):
    """A float teacher for distilled QAT: a model spec, its weights and the KD settings."""

    model: str = Field(description="Teacher model factory spec 'module:callable'.")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the teacher's factory."
    )
    checkpoint: Path | None = Field(default=None, description="The teacher's trained weights.")

    @field_validator("model")
    @classmethod
    def _spec(cls, value: str) -> str:
        return check_spec(value)


class QuantizeJobConfig(JobConfig):
    """Everything `lyceum quantize CONFIG.yaml` needs; unknown keys are rejected."""

    @model_validator(mode="after")
    def _teacher_needs_qat(self) -> QuantizeJobConfig:
        if self.teacher is not None and not isinstance(self.scheme, QAT):
            raise ValueError(
                "teacher: distillation needs training; use scheme.kind 'qat' or drop 'teacher' "
                "(PTQ only calibrates)"
            )
        return self

    scheme: Annotated[QAT | PTQ, Field(discriminator="kind")] = Field(
        description="QAT(...) or PTQ(...) scheme, selected by its 'kind' key ('qat' or 'ptq')."
    )
    epochs: int = Field(default=3, ge=1, description="QAT epochs (ignored by PTQ).")
    calibration_batches: int = Field(default=8, ge=1, description="PTQ calibration batches.")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate of QAT fine-tuning.")
    batch_size: int = Field(default=64, ge=2, description="Training / calibration batch size.")
    seed: int = Field(
        default=0, description="Seed of the training data order (float training and QAT)."
    )
    latency: bool = Field(
        default=True, description="Measure fp32 vs int8 CPU latency (compiles both)."
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch intra-op threads for the whole job (None keeps torch's default); "
        "latency on a shared machine is only stable with few threads.",
    )
    teacher: TeacherModel | None = Field(
        default=None,
        description="Distil QAT from this float teacher (the caller builds it and the loss).",
    )
    out_dir: Path = Field(
        description="Directory for model_int8.pt2, model_fp32.pt2 and report.json."
    )


def describe_quantize_job(
    config: QuantizeJobConfig, *, train_data: Dataset, test_data: Dataset
) -> str:
    """One line saying what `quantize_job` will run: model, scheme, epochs, data, output."""
    scheme = config.scheme
    schemes = f"weights {scheme.weights}, activations {scheme.activations}"
    if isinstance(scheme, QAT):
        method = f"QAT {plural(config.epochs, 'epoch')} ({schemes})"
        if config.teacher is not None:
            t = config.teacher
            method += f", distilled from {t.model} (T={t.temperature:g}, alpha={t.alpha:g})"
    else:
        method = (
            f"PTQ calibrated on {plural(config.calibration_batches, 'batch', 'batches')} of "
            f"{config.batch_size} ({schemes}, observer {scheme.observer})"
        )
    latency = "latency fp32 vs int8 compiled" if config.latency else "no latency"
    n_train, n_test = len(train_data), len(test_data)  # type: ignore[arg-type]
    return (
        f"plan: quantize {config.model_origin()}; {method}; {latency}; "
        f"data {n_train:,} train / {n_test:,} test samples; out {config.out_dir}"
    )


def quantize_job(
    config: QuantizeJobConfig,
    *,
    model: nn.Module,
    train_data: Dataset,
    test_data: Dataset,
    teacher: nn.Module | None = None,
    distill_loss: DistillLoss | None = None,
) -> QuantReport:
    """Run the job on built objects; writes the int8 and fp32 programs and `report.json`.

    With a `teacher` section in the config, pass the built `teacher` and a `distill_loss`:
    QAT then trains on `(1 - alpha) * CE + alpha * distill_loss(student, teacher)`.
    """
    if (config.teacher is None) != (teacher is None) or (teacher is None) != (distill_loss is None):
        raise ValueError(
            "quantize_job: pass teacher and distill_loss exactly when the config has a "
            "'teacher' section (the CLI builds both)"
        )
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, model, train_data, test_data, teacher, distill_loss)
    finally:
        torch.set_num_threads(threads)


def _run(
    config: QuantizeJobConfig,
    model: nn.Module,
    train_data: Dataset,
    test_data: Dataset,
    teacher: nn.Module | None,
    distill_loss: DistillLoss | None,
) -> QuantReport:
    train_float_first(config, model, train_data, batch_size=config.batch_size, seed=config.seed)
    model.eval()
    n = min(config.batch_size, len(train_data))  # type: ignore[arg-type]
    example = torch.stack([train_data[i][0] for i in range(n)])
    config.out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(config.scheme, QAT):
        _, report = qat_int8(
            model,
            train_data,
            example,
            epochs=config.epochs,
            scheme=config.scheme,
            eval_dataset=test_data,
            loss_fn=(
                distilled_loss(teacher, distill_loss, config.teacher.alpha)
                if config.teacher is not None and teacher is not None and distill_loss is not None
                else None
            ),
            lr=config.lr,
            batch_size=config.batch_size,
            out_dir=config.out_dir,
            measure_latency=config.latency,
            progress=config.progress,
            seed=config.seed,
        )
    else:
        _, report = ptq_int8(
            model,
            train_data,
            example,
            num_batches=config.calibration_batches,
            scheme=config.scheme,
            eval_dataset=test_data,
            batch_size=config.batch_size,
            out_dir=config.out_dir,
            measure_latency=config.latency,
            progress=config.progress,
        )
    payload = {
        "config": json.loads(config.model_dump_json()),
        "report": json.loads(report.model_dump_json()),
    }
    (config.out_dir / REPORT_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    return report
