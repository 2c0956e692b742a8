"""What the stages do to the model: a train stage's knowledge and loss, pruning, quantizing,
and measuring a stage's row of the report.

The pipeline is the one place in compression that builds the student client's knowledge
sources itself: a train stage takes the trainer's own sections (`teachers`, `merge`,
`renames`, `losses`), so they are built with the trainer's code (`build_sources`, `Merger`,
`LossesConfig.objective`), not a second copy of it. The core algorithms (pruning,
quantization) still import nothing of the service.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lyceum.compression import analysis
from lyceum.compression._steps import announce
from lyceum.compression.distillation import distilled_loss
from lyceum.compression.pipeline.report import StageRow
from lyceum.compression.pipeline.schema import (
    PipelineConfig,
    PruneStage,
    QuantizeStage,
    TrainStage,
)
from lyceum.compression.pruning.api import prune
from lyceum.compression.pruning.config import with_state_in
from lyceum.compression.pruning.finetune import candidate_finetune
from lyceum.compression.pruning.plan import save_pruned
from lyceum.compression.pruning.sensitivity import plot_sensitivity
from lyceum.proto.display import format_bytes
from lyceum.proto.evaluation import top1_accuracy
from lyceum.proto.specs import load_model
from lyceum.student_client.losses import DistillObjective, soft_label_kd
from lyceum.student_client.merger import Merger, Weighted
from lyceum.student_client.sources import KnowledgeSource
from lyceum.student_client.trainer import build_sources
from lyceum.student_client.trainer_config import DatasetConfig, TrainConfig

__all__ = ["Knowledge", "build_knowledge", "measure", "prune_stage", "to_int8"]


@dataclass
class Knowledge:
    """What a train stage learns from, and its loss."""

    stage: TrainStage
    sources: dict[str, KnowledgeSource] = field(default_factory=dict)
    merger: Merger | None = None
    objective: DistillObjective | None = None
    teacher: nn.Module | None = None  # distill_from: an earlier stage's model, in-process

    def loss(
        self,
        student: dict[str, Tensor],
        inputs: Tensor,
        labels: Tensor,
        task: Tensor,
        knowledge: dict[str, Tensor],
    ) -> Tensor:
        """The stage's loss of a batch, `task` being its task loss (the labelled samples')."""
        if self.objective is not None:
            return self.objective(student, knowledge, task_loss=task).total
        if self.teacher is not None:
            # The schema refuses `labeled` with distill_from: this mix takes every label.
            kd = partial(soft_label_kd, temperature=self.stage.distillation.temperature)
            mixed = distilled_loss(self.teacher, kd, self.stage.distillation.alpha)
            return mixed(student["logits"], inputs, labels)
        return self.stage.losses.task_weight * task

    def parameters(self) -> list[nn.Parameter]:
        """The losses' learned adapters (trained with the model)."""
        return [] if self.objective is None else list(self.objective.parameters())

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        self.sources = {}


def build_knowledge(
    config: PipelineConfig,
    stage: TrainStage,
    train_set: Dataset,
    stage_dir: Path,
    device: torch.device,
) -> Knowledge:
    """The knowledge of a train stage: its teachers (checked against the training split),
    the earlier stage's model it distils from, or nothing (supervised)."""
    if stage.distill_from is not None:
        # The reader starts after that stage ended (checked by the schema): its file exists.
        source = stage_dir.parent / stage.distill_from / "model.safetensors"
        teacher = load_model(config.model_spec(), source).to(device).eval()
        return Knowledge(stage, teacher=teacher)
    if not stage.teachers:
        return Knowledge(stage)
    trainer_config = TrainConfig(
        model=config.model,
        model_kwargs=config.model_kwargs,
        dataset=DatasetConfig(
            train=config.dataset,
            train_kwargs={**config.dataset_kwargs, "split": config.train_split},
        ),
        teachers=stage.teachers,
        merge=stage.merge,
        renames=stage.renames,
        losses=stage.losses,
        epochs=1,
        progress=False,
    )
    strategies: dict[str, Any] = {
        f: Weighted(weights=s) if isinstance(s, dict) else s for f, s in stage.merge.items()
    }
    merger = Merger(strategies, renames=stage.renames)
    sources = build_sources(trainer_config, train_set)
    try:
        merged = merger.check({name: s.schema for name, s in sources.items()})
        objective = stage.losses.objective(merged.knowledge_schema).to(device)
    except BaseException:
        for s in sources.values():
            s.close()
        raise
    return Knowledge(stage, sources=sources, merger=merger, objective=objective)


def prune_stage(
    config: PipelineConfig,
    stage: PruneStage,
    model: nn.Module,
    example: Tensor,
    train_set: Dataset,
    val_set: Dataset,
    out: Path,
) -> None:
    """Prune `model` in place and write the pruned model (plan + weights) to `out`, what a
    resumed run rebuilds the pruned layers from."""
    out.mkdir(parents=True, exist_ok=True)
    strategy = with_state_in(stage.strategy, out)

    # With `labeled`, candidates fine-tune on the labelled samples alone: the rest have none.
    labelled = (
        train_set
        if config.labeled is None
        else Subset(train_set, range(min(config.labeled, len(train_set))))  # type: ignore[arg-type]
    )
    result = prune(
        model,
        strategy,
        example,
        evaluate=lambda m: top1_accuracy(m, val_set),
        candidate_finetune=candidate_finetune(
            labelled,
            epochs=stage.candidate_finetune_epochs,
            batch_size=config.batch_size,
            lr=stage.optimizer.lr,
            seed=config.seed,
        ),
        progress=config.progress,
    )
    if result.sensitivity is not None:
        with contextlib.suppress(ImportError):  # matplotlib is an extra; the JSON has it all
            plot_sensitivity(result.sensitivity, out / "sensitivity.png")
    save_pruned(model, result.plan, out)


def to_int8(
    config: PipelineConfig,
    stage: QuantizeStage,
    prepared: nn.Module,
    train_set: Dataset,
    example: Tensor,
    out: Path,
) -> tuple[nn.Module, Path]:
    """Calibrate (PTQ) a prepared model, convert it and save the int8 program to `out`."""
    from lyceum.compression.quantization.api import calibrate, convert
    from lyceum.compression.quantization.export import save_program

    if stage.scheme.kind == "ptq":
        loader = DataLoader(train_set, batch_size=config.batch_size)
        calibrate(prepared, loader, stage.calibration_batches, progress=config.progress)  # type: ignore[arg-type]
    announce(
        f"stage {stage.name!r}: converting to int8 (torchao's convert_pt2e)",
        enabled=config.progress,
    )
    int8 = convert(prepared)  # type: ignore[arg-type]
    path = out / "model_int8.pt2"
    save_program(int8, example, path)
    return int8, path


def measure(
    config: PipelineConfig,
    *,
    stage: str,
    kind: str,
    epochs: str,
    model: nn.Module,
    test_set: Dataset,
    example: Tensor,
    flops: int | None,
    file: Path | None,
    note: str = "",
) -> StageRow:
    """One row of the report; an int8 `file` is timed as its compiled program."""
    latency = None
    int8 = file if file is not None and file.suffix == ".pt2" else None
    if int8 is not None:
        from lyceum.compression.quantization.export import load_int8
        from lyceum.compression.quantization.workflow import tensor_bytes

        # A small model's archive is mostly the program's code and metadata: say how much of
        # it the int8 tensors are, the figure that shrinks 4x.
        tensors = format_bytes(tensor_bytes(load_int8(int8)))
        note = f"size on disk is the torch.export archive; its tensors take {tensors}"
    if config.latency and (file is not None or kind == "baseline"):
        if int8 is not None:
            from lyceum.compression.quantization.export import compile_int8

            torch._dynamo.reset()
            program: Any = compile_int8(load_int8(int8))
        else:
            program = model
        latency = 1e3 * analysis.measure_latency(program, example[:1], runs=config.latency_runs)
    size = file.stat().st_size if file is not None else None
    if kind == "baseline":
        size = analysis.model_size_bytes(model)
    return StageRow(
        stage=stage,
        kind=kind,
        epochs=epochs,
        accuracy=top1_accuracy(model, test_set),
        size_bytes=size,
        flops=flops,
        latency_ms=latency,
        file=str(file.relative_to(config.out_dir)) if file is not None else None,
        note=note,
    )
