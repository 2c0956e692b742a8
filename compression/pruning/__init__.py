"""Structured filter pruning: channels really removed, dependencies followed by Torch-Pruning.

result = prune(model, UniformPruning(flops=-0.5), example_input)
finetune(result.model, train_set, epochs=10)
save_pruned(result.model, result.plan, "out/")
rebuilt = load_pruned(resnet_cnn(), "out/")   # identical outputs, no pickle
"""

from lyceum.compression.pruning.api import PruneResult, prune, prune_to_flops
from lyceum.compression.pruning.config import (
    AutoPruning,
    Criterion,
    PruningConfig,
    SensitivityPruning,
    UniformPruning,
)
from lyceum.compression.pruning.finetune import DistillLoss, candidate_finetune, finetune
from lyceum.compression.pruning.job import (
    ModelFigures,
    PruneJobConfig,
    PruneReport,
    describe_prune_job,
    run_prune_job,
)
from lyceum.compression.pruning.plan import (
    PlanStep,
    PrunePlan,
    load_pruned,
    read_plan,
    save_pruned,
)
from lyceum.compression.pruning.sensitivity import (
    SensitivityResult,
    analyze_sensitivity,
    plot_sensitivity,
)

__all__ = [
    # the verb and its configs: prune(model, UniformPruning(flops=-0.5), example_input)
    "prune",
    "PruneResult",
    "PruningConfig",
    "UniformPruning",
    "SensitivityPruning",
    "AutoPruning",
    "Criterion",
    # the whole job: `lyceum prune CONFIG.yaml`
    "run_prune_job",
    "describe_prune_job",
    "PruneJobConfig",
    "PruneReport",
    "ModelFigures",
    # a pruned model on disk: its plan and weights, reloaded without pickle
    "save_pruned",
    "load_pruned",
    "read_plan",
    "PrunePlan",
    "PlanStep",
    # building blocks: fine-tuning, sensitivity analysis, the one-line uniform prune
    "finetune",
    "candidate_finetune",
    "DistillLoss",
    "analyze_sensitivity",
    "SensitivityResult",
    "plot_sensitivity",
    "prune_to_flops",
]
