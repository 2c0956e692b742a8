"""Neural architecture search: Light-NAS spaces, budgets, a measured latency table.

space = lightnas_space(input_size=8)
result, budgeted = search_architecture(space, TrainingReward(space, train, val, epochs=2, ...),
                                       budget=Budget(max_flops=9_000_000),
                                       study=StudyConfig(storage="nas.db", study="lightnas"))
report = train_architecture(Architecture(tokens=result.best_tokens), FinalTraining(epochs=30),
                            train_data=train, test_data=test)   # model.safetensors + tokens.json
model = load_architecture(report.out_dir)      # or load_model("lyceum.compression.nas:nas_model",
                                               #               "runs/nas/model.safetensors")

Once-for-all: train one supernet, then search and extract subnets without training them.

supernet = Supernet(OFASpace(OFASpaceConfig()))
train_supernet(supernet, train, OFATrainConfig(), partial(soft_label_kd, temperature=4.0))
result, budgeted = search_subnet(SubnetReward(supernet, train, val), budget=Budget(...))
save_subnet(extract(supernet, supernet.space.subnet(result.best_tokens)), ...)
"""

from lyceum.compression.nas.base import NASSpace, Op, op_key
from lyceum.compression.nas.budget import Budget, BudgetedSpace, Figures
from lyceum.compression.nas.distill import NASDistillation, TeacherKnowledge, train_candidate
from lyceum.compression.nas.extract import (
    SUBNET_FILE,
    SUBNET_FORMAT,
    SUBNET_WEIGHTS,
    SubnetFile,
    extract,
    load_subnet,
    ofa_subnet,
    read_subnet,
    save_subnet,
)
from lyceum.compression.nas.files import (
    NAS_FORMAT,
    NAS_WEIGHTS,
    TOKENS_FILE,
    Architecture,
    NASNetwork,
    load_architecture,
    nas_model,
    read_architecture,
    save_architecture,
)
from lyceum.compression.nas.job import (
    NASConfig,
    NASSearchConfig,
    TrainingReward,
    read_search,
    search_architecture,
)
from lyceum.compression.nas.latency import (
    LUT_FORMAT_VERSION,
    LatencyEntry,
    LatencyTable,
    build_latency_table,
    measure_network,
    measure_networks,
)
from lyceum.compression.nas.lightnas import LightNASSpace, lightnas_space
from lyceum.compression.nas.ofa_job import (
    SUPERNET_FILE,
    SupernetJobConfig,
    load_trained,
    run_supernet_extract,
    run_supernet_search,
    run_supernet_train,
    supernet_spec,
)
from lyceum.compression.nas.ofa_search import SubnetReward, search_subnet
from lyceum.compression.nas.ofa_space import OFASpace, OFASpaceConfig, SubnetConfig, ofa_space
from lyceum.compression.nas.ofa_train import (
    EpochRecord,
    OFATrainConfig,
    Phase,
    StepHook,
    calibration_batches,
    evaluate_subnet,
    phase_allowed,
    progressive_shrinking,
    recalibrate_bn,
    train_supernet,
)
from lyceum.compression.nas.plots import (
    SearchPlotData,
    plot_rewards,
    plot_search,
    plot_tradeoffs,
    search_plot_data,
)
from lyceum.compression.nas.supernet import Allowed, Supernet, ofa_supernet
from lyceum.compression.nas.train import FinalTraining, TrainReport, train_architecture

__all__ = [
    # the verb and its settings
    "search_architecture",
    "read_search",
    "NASConfig",
    "NASSearchConfig",
    "Budget",
    "TrainingReward",
    "NASDistillation",
    "TeacherKnowledge",
    "train_candidate",
    # full training of the found architecture, and its files
    "train_architecture",
    "FinalTraining",
    "TrainReport",
    "Architecture",
    "NASNetwork",
    "nas_model",
    "save_architecture",
    "load_architecture",
    "read_architecture",
    "TOKENS_FILE",
    "NAS_FORMAT",
    "NAS_WEIGHTS",
    # spaces: the protocol, its ops, PaddleSlim's Light-NAS space
    "NASSpace",
    "Op",
    "op_key",
    "LightNASSpace",
    "lightnas_space",
    "BudgetedSpace",
    "Figures",
    # plots: reward over trials, accuracy against FLOPs and latency
    "search_plot_data",
    "SearchPlotData",
    "plot_search",
    "plot_rewards",
    "plot_tradeoffs",
    # the latency table
    "LatencyTable",
    "LatencyEntry",
    "build_latency_table",
    "measure_network",
    "measure_networks",
    "LUT_FORMAT_VERSION",
    # once-for-all: the space of subnets, the supernet, extracted subnets and their files
    "OFASpace",
    "OFASpaceConfig",
    "SubnetConfig",
    "ofa_space",
    "Supernet",
    "Allowed",
    "ofa_supernet",
    "extract",
    "save_subnet",
    "load_subnet",
    "read_subnet",
    "ofa_subnet",
    "SubnetFile",
    "SUBNET_FILE",
    "SUBNET_FORMAT",
    "SUBNET_WEIGHTS",
    # training it once: progressive shrinking, the sandwich rule, BN re-calibration
    "train_supernet",
    "OFATrainConfig",
    "Phase",
    "progressive_shrinking",
    "phase_allowed",
    "StepHook",
    "EpochRecord",
    "recalibrate_bn",
    "calibration_batches",
    "evaluate_subnet",
    # searching it: the Light-NAS engine, a reward without training
    "search_subnet",
    "SubnetReward",
    # the `lyceum nas supernet` job
    "SupernetJobConfig",
    "run_supernet_train",
    "run_supernet_search",
    "run_supernet_extract",
    "load_trained",
    "supernet_spec",
    "SUPERNET_FILE",
]
