"""A whole pruning job from one config: (train float,) measure, prune, fine-tune, measure, save.

The config names the model and data set by `module:callable` spec strings, but this module does
not resolve them: the caller (the `lyceum prune` CLI, or a script) builds the model and data
sets and passes them in, so the library stays independent of how specs are loaded.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Dataset

from lyceum.compression.analysis import (
    count_flops,
    count_params,
    measure_latency,
    model_size_bytes,
)
from lyceum.compression.distillation import Distillation, DistillLoss
from lyceum.compression.job_config import REPORT_FILE, JobConfig, train_float_first
from lyceum.compression.pruning.api import prune
from lyceum.compression.pruning.config import (
    PruningConfig,
    SensitivityPruning,
    UniformPruning,
    with_state_in,
)
from lyceum.compression.pruning.finetune import candidate_finetune, finetune
from lyceum.compression.pruning.plan import save_pruned
from lyceum.compression.pruning.sensitivity import plot_sensitivity
from lyceum.proto.display import plural
from lyceum.proto.evaluation import top1_accuracy
from lyceum.proto.specs import weights_format

__all__ = ["ModelFigures", "PruneJobConfig", "PruneReport", "describe_prune_job", "run_prune_job"]


class PruneJobConfig(JobConfig):
    """Everything `lyceum prune CONFIG.yaml` needs; unknown keys are rejected."""

    val_split: str = Field(
        default="val", description="Split scoring sensitivity/search candidates."
    )
    strategy: Annotated[PruningConfig, Field(discriminator="kind")] = Field(
        description="Pruning strategy, selected by its 'kind' key."
    )
    finetune_epochs: int = Field(default=10, ge=0, description="Fine-tuning epochs after pruning.")
    candidate_finetune_epochs: int = Field(
        default=1, ge=0, description="Fine-tuning epochs of each auto-pruning candidate."
    )
    lr: float = Field(
        default=1e-3,
        gt=0,
        description="Adam learning rate of fine-tuning (float training uses float_lr).",
    )
    batch_size: int = Field(
        default=64, ge=1, description="Batch size of float training and fine-tuning."
    )
    seed: int = Field(
        default=0, description="Seed of the training data order (float training, fine-tuning)."
    )
    latency_runs: int = Field(default=50, ge=1, description="Timed runs of the latency median.")
    distill: Distillation | None = Field(
        default=None,
        description="Fine-tune distilled from the unpruned model (`lyceum prune` passes "
        "lyceum.student_client.losses.soft_label_kd; a Python caller passes its own loss).",
    )
    out_dir: Path = Field(description="Directory for the pruned model, plan and report.")


class ModelFigures(BaseModel):
    """Cost and quality of one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flops: int = Field(description="Multiply-accumulates for one example input.")
    params: int = Field(description="Number of parameters.")
    size_bytes: int = Field(description="safetensors state-dict size.")
    latency_ms: float = Field(description="Median CPU latency, 1 thread, batch of 1.")
    accuracy: float = Field(description="Top-1 accuracy on the test split.")


class PruneReport(BaseModel):
    """What `run_prune_job` did and measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = Field(description="Strategy kind.")
    ratios: dict[str, float] = Field(description="Fraction of channels removed per group.")
    before: ModelFigures = Field(
        description="The unpruned model as given (its checkpoint, then float_epochs if any)."
    )
    after: ModelFigures = Field(description="The pruned, fine-tuned model.")
    flops_reduction: float = Field(description="Fraction of FLOPs removed.")
    best_tokens: list[int] | None = Field(
        default=None,
        description="Auto pruning: best tokens, reusable as AutoPruning(init_tokens=...).",
    )
    out_dir: str = Field(description="Where the plan, weights and report were written.")


def _strategy(config: PruneJobConfig) -> str:
    s = config.strategy
    if isinstance(s, UniformPruning):
        # The validator makes exactly one of flops and ratio set.
        target = f"to {s.flops:+.0%} FLOPs" if s.flops is not None else f"{s.ratio:.0%} of channels"
        return f"uniform {target} (criterion {s.criterion})"
    if isinstance(s, SensitivityPruning):
        return (
            f"sensitivity: each group alone at {plural(len(s.ratios), 'ratio')} scored on "
            f"{config.val_split}, then {s.flops:+.0%} FLOPs (criterion {s.criterion})"
        )
    return (
        f"auto: simulated annealing over {plural(s.search.max_iterations + 1, 'trial')}, each "
        f"fine-tuned {plural(config.candidate_finetune_epochs, 'epoch')} and scored on "
        f"{config.val_split}, {s.min_ratio:.0%}-{s.max_ratio:.0%} of the FLOPs removed "
        f"(criterion {s.criterion})"
    )


def describe_prune_job(
    config: PruneJobConfig, *, train_data: Dataset, val_data: Dataset, test_data: Dataset
) -> str:
    """One line saying what `run_prune_job` will run: model, strategy, epochs, data, output."""
    tune = "no fine-tuning"
    if config.finetune_epochs:
        tune = f"fine-tune {plural(config.finetune_epochs, 'epoch')}"
        if config.distill is not None:
            d = config.distill
            tune += f" distilled from the unpruned model (T={d.temperature:g}, alpha={d.alpha:g})"
    sizes = [len(d) for d in (train_data, val_data, test_data)]  # type: ignore[arg-type]
    return (
        f"plan: prune {config.model_origin()}; {_strategy(config)}; {tune}; "
        f"data {sizes[0]:,} train / {sizes[1]:,} val / {sizes[2]:,} test samples; "
        f"out {config.out_dir}"
    )


def _figures(model: nn.Module, x: Any, test: Dataset, runs: int) -> ModelFigures:
    return ModelFigures(
        flops=count_flops(model, x),
        params=count_params(model),
        size_bytes=model_size_bytes(model),
        latency_ms=1000.0 * measure_latency(model, x, runs=runs),
        accuracy=top1_accuracy(model, test),
    )


def run_prune_job(
    config: PruneJobConfig,
    *,
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    test_data: Dataset,
    distill_loss: DistillLoss | None = None,
) -> PruneReport:
    """Prune `model` (built from `config.model`) and write plan, weights and report.

    `before` is measured on `model` as passed, after the config's `float_epochs` (if any):
    the model that is pruned and that teaches the fine-tuning. The unpruned model is not
    fine-tuned again for comparison: from a trained model, the same fine-tuning moved its test
    accuracy by at most one sample of 360 on digits (resnet_cnn, two seeds), and it would cost
    a fine-tune of the larger model. An untrained model shows as such in the plan line.

    Writes `prune_plan.json` + `model.safetensors` (reload with `load_pruned`, or give the
    weights file as a checkpoint: `lyceum.proto.specs.load_model` reads the plan beside it),
    `report.json` and, for sensitivity pruning, `sensitivity.json` and `sensitivity.png`.
    """
    if config.checkpoint is not None and weights_format(config.checkpoint) is not None:
        # A plan is replayed on a fresh instance from the factory: a second plan, numbered in
        # the pruned model's channels, would not compose with the first.
        raise ValueError(
            f"checkpoint {str(config.checkpoint)!r} is already a pruned model, and a pruned "
            f"model is not pruned again: prune the unpruned model to the combined target "
            f"(e.g. flops: -0.75 instead of -0.5 twice), from the weights it was pruned from"
        )
    if (config.distill is None) != (distill_loss is None):
        raise ValueError(
            "run_prune_job: pass distill_loss exactly when the config has a 'distill' section "
            "(the CLI passes lyceum.student_client.losses.soft_label_kd)"
        )
    train_float_first(config, model, train_data, batch_size=config.batch_size, seed=config.seed)
    model.eval()
    # The unpruned model teaches its pruned self during the final fine-tuning.
    teacher = copy.deepcopy(model) if config.distill is not None else None
    example = train_data[0][0].unsqueeze(0)
    before = _figures(model, example, test_data, config.latency_runs)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    strategy = with_state_in(config.strategy, out)

    result = prune(
        model,
        strategy,
        example,
        evaluate=lambda m: top1_accuracy(m, val_data),
        candidate_finetune=candidate_finetune(
            train_data,
            epochs=config.candidate_finetune_epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
        ),
        progress=config.progress,
    )
    if result.sensitivity is not None:
        # The plot is optional (matplotlib is an extra); the JSON beside it has the numbers.
        with contextlib.suppress(ImportError):
            plot_sensitivity(result.sensitivity, out / "sensitivity.png")
    finetune(
        model,
        train_data,
        epochs=config.finetune_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        teacher=teacher,
        distill_loss=distill_loss,
        alpha=config.distill.alpha if config.distill is not None else 0.5,
        progress=config.progress,
    )
    after = _figures(model, example, test_data, config.latency_runs)
    save_pruned(model, result.plan, out)
    report = PruneReport(
        strategy=strategy.kind,
        ratios=result.ratios,
        before=before,
        after=after,
        flops_reduction=result.flops_reduction,
        best_tokens=result.search.best_tokens if result.search is not None else None,
        out_dir=str(out),
    )
    (out / REPORT_FILE).write_text(json.dumps(report.model_dump(), indent=1))
    return report
