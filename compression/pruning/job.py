"""A whole pruning job from one config: measure, prune, fine-tune, measure again, save.

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
from lyceum.compression.job_config import JobConfig
from lyceum.compression.pruning.api import prune
from lyceum.compression.pruning.config import AutoPruning, SensitivityPruning, UniformPruning
from lyceum.compression.pruning.finetune import evaluate_accuracy, finetune
from lyceum.compression.pruning.plan import save_pruned
from lyceum.compression.pruning.sensitivity import plot_sensitivity

__all__ = ["ModelFigures", "PruneJobConfig", "PruneReport", "run_prune_job"]

REPORT_FILE = "report.json"


class PruneJobConfig(JobConfig):
    """Everything `lyceum prune CONFIG.yaml` needs; unknown keys are rejected."""

    val_split: str = Field(
        default="val", description="Split scoring sensitivity/search candidates."
    )
    strategy: Annotated[
        UniformPruning | SensitivityPruning | AutoPruning, Field(discriminator="kind")
    ] = Field(description="Pruning strategy, selected by its 'kind' key.")
    finetune_epochs: int = Field(default=10, ge=0, description="Fine-tuning epochs after pruning.")
    candidate_finetune_epochs: int = Field(
        default=1, ge=0, description="Fine-tuning epochs of each auto-pruning candidate."
    )
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate of fine-tuning.")
    batch_size: int = Field(default=64, ge=1, description="Fine-tuning batch size.")
    seed: int = Field(default=0, description="Seed of the fine-tuning data order.")
    latency_runs: int = Field(default=50, ge=1, description="Timed runs of the latency median.")
    distill: Distillation | None = Field(
        default=None,
        description="Fine-tune distilled from the unpruned model (the caller passes the loss).",
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
    before: ModelFigures = Field(description="The unpruned model.")
    after: ModelFigures = Field(description="The pruned, fine-tuned model.")
    flops_reduction: float = Field(description="Fraction of FLOPs removed.")
    best_tokens: list[int] | None = Field(
        default=None,
        description="Auto pruning: best tokens, reusable as AutoPruning(init_tokens=...).",
    )
    out_dir: str = Field(description="Where the plan, weights and report were written.")


def _figures(model: nn.Module, x: Any, test: Dataset, runs: int) -> ModelFigures:
    return ModelFigures(
        flops=count_flops(model, x),
        params=count_params(model),
        size_bytes=model_size_bytes(model),
        latency_ms=1000.0 * measure_latency(model, x, runs=runs),
        accuracy=evaluate_accuracy(model, test),
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

    Writes `prune_plan.json` + `model.safetensors` (reload with `load_pruned`), `report.json`
    and, for sensitivity pruning, `sensitivity.json` and `sensitivity.png` into `out_dir`.
    """
    if (config.distill is None) != (distill_loss is None):
        raise ValueError(
            "run_prune_job: pass distill_loss exactly when the config has a 'distill' section "
            "(the CLI passes lyceum.student_client.losses.soft_label_kd)"
        )
    model.eval()
    # The unpruned model teaches its pruned self during the final fine-tuning.
    teacher = copy.deepcopy(model) if config.distill is not None else None
    example = train_data[0][0].unsqueeze(0)
    before = _figures(model, example, test_data, config.latency_runs)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    strategy = config.strategy
    if isinstance(strategy, SensitivityPruning) and strategy.sensitivity_file is None:
        strategy = strategy.model_copy(update={"sensitivity_file": out / "sensitivity.json"})
    if isinstance(strategy, AutoPruning) and strategy.state_file is None:
        strategy = strategy.model_copy(update={"state_file": out / "search_state.json"})

    def candidate_finetune(candidate: nn.Module) -> None:
        finetune(
            candidate,
            train_data,
            epochs=config.candidate_finetune_epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
        )

    result = prune(
        model,
        strategy,
        example,
        evaluate=lambda m: evaluate_accuracy(m, val_data),
        candidate_finetune=candidate_finetune,
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
