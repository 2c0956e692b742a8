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
from lyceum.compression.pruning.finetune import DistillLoss, evaluate_accuracy, finetune
from lyceum.compression.pruning.job import (
    ModelFigures,
    PruneJobConfig,
    PruneReport,
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
    "AutoPruning",
    "Criterion",
    "DistillLoss",
    "ModelFigures",
    "PlanStep",
    "PruneJobConfig",
    "PrunePlan",
    "PruneReport",
    "PruneResult",
    "PruningConfig",
    "SensitivityPruning",
    "SensitivityResult",
    "UniformPruning",
    "analyze_sensitivity",
    "evaluate_accuracy",
    "finetune",
    "load_pruned",
    "plot_sensitivity",
    "prune",
    "prune_to_flops",
    "read_plan",
    "run_prune_job",
    "save_pruned",
]
