"""Lyceum student client: knowledge sources, merger, DistillLoader, losses and trainer."""

from lyceum.student_client._connections import TeacherError
from lyceum.student_client._credentials import CredentialOptions
from lyceum.student_client._lm_collate import IGNORE_INDEX, LMCollate
from lyceum.student_client._lm_task import CausalLMTask, LMValidation
from lyceum.student_client._rollouts import Rollout
from lyceum.student_client._teacher_checks import TeacherInfo
from lyceum.student_client.export import ExportResult, export_knowledge
from lyceum.student_client.inprocess import InProcessTeacher
from lyceum.student_client.loader import DistillLoader, LoaderStats
from lyceum.student_client.losses import (
    DIVERGENCES,
    DistillObjective,
    DistillOutput,
    DistillTerm,
    Divergence,
    FeatureMSE,
    FSPLoss,
    HintLoss,
    SoftLabelKD,
    TopKKD,
    fsp_matrix,
    soft_label_kd,
    teacher_log_probs,
    topk_kd,
)
from lyceum.student_client.merger import (
    STRATEGIES,
    CallableStrategy,
    First,
    LogSumExp,
    Max,
    Mean,
    MergedField,
    MergedSchema,
    Merger,
    MergeStrategy,
    Stack,
    Sum,
    Weighted,
    register_strategy,
)
from lyceum.student_client.offline import (
    DumpInputs,
    FieldStats,
    OfflineKnowledge,
    VerifyMode,
    verify_knowledge,
)
from lyceum.student_client.on_policy import (
    Estimator,
    OnPolicyConfig,
    OnPolicyDistiller,
    OnPolicyLoss,
    OnPolicyStep,
)
from lyceum.student_client.online import TeacherTimeouts
from lyceum.student_client.sources import (
    KnowledgeSource,
    OfflineTeacher,
    OnlineTeacher,
    TeacherUnavailableError,
)
from lyceum.student_client.trainer import EpochResult, StepInfo, TrainResult, build_sources, train
from lyceum.student_client.trainer_config import (
    DatasetConfig,
    InProcessTeacherConfig,
    LMConfig,
    LossesConfig,
    LossTermConfig,
    OptimizerConfig,
    ScheduleConfig,
    TeacherConfig,
    TrainConfig,
    VocabConfig,
    load_config,
    validate_config,
)

__all__ = [
    # train a student: the verb, its config and its results
    "train",
    "load_config",
    "validate_config",
    "TrainConfig",
    "DatasetConfig",
    "TeacherConfig",
    "InProcessTeacherConfig",
    "LossesConfig",
    "LossTermConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "LMConfig",
    "VocabConfig",
    "TrainResult",
    "EpochResult",
    "StepInfo",
    "build_sources",
    # knowledge sources: online teachers (replicas, failover), offline dumps, in-process
    "KnowledgeSource",
    "OnlineTeacher",
    "CredentialOptions",
    "TeacherTimeouts",
    "TeacherInfo",
    "TeacherError",
    "TeacherUnavailableError",
    "OfflineTeacher",
    "OfflineKnowledge",
    "DumpInputs",
    "VerifyMode",
    "verify_knowledge",
    "FieldStats",
    "export_knowledge",
    "ExportResult",
    "InProcessTeacher",
    # batches: the merger joins teachers by sample id, the loader feeds the student
    "DistillLoader",
    "LoaderStats",
    "Merger",
    "MergedSchema",
    "MergedField",
    "MergeStrategy",
    "STRATEGIES",
    "register_strategy",
    "CallableStrategy",
    "First",
    "Mean",
    "Weighted",
    "Sum",
    "Max",
    "LogSumExp",
    "Stack",
    # losses: the objective and its terms
    "DistillObjective",
    "DistillOutput",
    "DistillTerm",
    "SoftLabelKD",
    "TopKKD",
    "FeatureMSE",
    "HintLoss",
    "FSPLoss",
    "soft_label_kd",
    "topk_kd",
    "teacher_log_probs",
    "fsp_matrix",
    "DIVERGENCES",
    "Divergence",
    # language-model students: the batches of token items, the task's loss and validation
    "LMCollate",
    "IGNORE_INDEX",
    "CausalLMTask",
    "LMValidation",
    # on-policy distillation of language models: the student's samples, scored by a teacher
    "OnPolicyDistiller",
    "OnPolicyConfig",
    "OnPolicyStep",
    "OnPolicyLoss",
    "Estimator",
    "Rollout",
]
