"""`lyceum nas supernet train|search|extract CONFIG.yaml`: one config for the three steps.

`train` writes into `out_dir`: `supernet.safetensors` (the supernet's plain state dict: the
model spec `supernet_spec(config)` rebuilds it, `lyceum.proto.specs.load_model` loads it) and
`checkpoints/` (resumable). `search` reads that file and searches subnets on the study;
`extract` writes one subnet as `model.safetensors` + `subnet.json` (`save_subnet`).
The library takes built objects; these functions are what the CLI runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import Dataset

from lyceum.compression._io import write_bytes_atomic
from lyceum.compression.distillation import DistillLoss
from lyceum.compression.nas.budget import Budget, BudgetedSpace
from lyceum.compression.nas.distill import NASDistillation, TeacherKnowledge
from lyceum.compression.nas.extract import extract, save_subnet
from lyceum.compression.nas.job import NASSearchConfig
from lyceum.compression.nas.latency import LatencyTable
from lyceum.compression.nas.ofa_search import SubnetReward, search_subnet
from lyceum.compression.nas.ofa_space import OFASpace, OFASpaceConfig
from lyceum.compression.nas.ofa_train import (
    OFATrainConfig,
    calibration_batches,
    evaluate_subnet,
    recalibrate_bn,
    train_supernet,
)
from lyceum.compression.nas.supernet import Supernet
from lyceum.compression.search import SearchResult, StudyConfig
from lyceum.proto.specs import load_model

__all__ = [
    "SUPERNET_FILE",
    "SupernetJobConfig",
    "load_trained",
    "run_supernet_extract",
    "run_supernet_search",
    "run_supernet_train",
    "supernet_spec",
]

SUPERNET_FILE = "supernet.safetensors"


class SupernetJobConfig(BaseModel):
    """A once-for-all run: the space, the data, the training (from the largest subnet or a
    teacher), the search."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: OFASpaceConfig = Field(default_factory=OFASpaceConfig, description="The space.")
    kernel_transform: bool = Field(
        default=False,
        description="Smaller kernels through learned transform matrices (once-for-all's "
        "KERNEL_TRANSFORM_MODE) instead of plain centre crops.",
    )
    dataset: str = Field(
        default="lyceum.deploy.examples:digits",
        description="Dataset factory spec, called with split='train' and split='val'.",
    )
    dataset_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the dataset factory."
    )
    out_dir: Path = Field(default=Path("runs/supernet"), description="Where train writes.")
    train: OFATrainConfig = Field(default_factory=OFATrainConfig, description="Training.")
    teacher: NASDistillation | None = Field(
        default=None,
        description="A Lyceum teacher's knowledge of the training split (knowledge_dir: an "
        "offline dump, or endpoints): every subnet of the sandwich, the largest included, "
        "learns (1 - alpha) * CE + alpha * KD(teacher) with its alpha and temperature, as "
        "once-for-all does with its pretrained teacher, and train.distill is not used. None: "
        "in-place distillation from the largest subnet (train.distill).",
    )
    calibration_batches: int = Field(
        default=4, ge=1, description="Training batches each subnet's BN is re-calibrated on."
    )
    budget: Budget = Field(
        default_factory=Budget, description="Bounds every subnet searched meets."
    )
    lut: Path | None = Field(
        default=None,
        description="Latency table of the space (`lyceum nas lut --space "
        "lyceum.compression.nas:ofa_space{...}`), for latency budgets.",
    )
    search: NASSearchConfig = Field(
        default_factory=NASSearchConfig,
        description="Search settings: annealing (default) or evolution, iterations, seed.",
    )
    study: StudyConfig = Field(
        default_factory=lambda: StudyConfig(storage="supernet.db", study="ofa"),
        description="Where the search is stored (every worker passes the same).",
    )

    @model_validator(mode="after")
    def _one_distillation(self) -> SupernetJobConfig:
        if self.teacher is not None and "distill" in self.train.model_fields_set:
            raise ValueError(
                "train.distill (in-place distillation from the largest subnet) is not used "
                "with a teacher, which teaches every subnet: set teacher.alpha and "
                "teacher.temperature instead, or remove teacher to distil in place"
            )
        return self


def supernet_spec(config: SupernetJobConfig) -> str:
    """The model spec that builds this config's supernet (for `load_model` and the commands)."""
    kwargs = {"kernel_transform": config.kernel_transform, **config.space.model_dump(mode="json")}
    return "lyceum.compression.nas:ofa_supernet" + json.dumps(kwargs)


def run_supernet_train(
    config: SupernetJobConfig,
    train_data: Dataset,
    val_data: Dataset,
    distill_loss: DistillLoss,
    *,
    teacher: TeacherKnowledge | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Train the supernet, write it, and return the largest and smallest subnets' accuracy.

    `teacher`: the outputs of `config.teacher` for every sample of `train_data` (the CLI
    reads the dump or asks the endpoints), which every subnet learns instead of the largest
    subnet's logits (`distill_loss`, in place)."""
    from safetensors.torch import save

    if config.teacher is not None and teacher is None:
        raise ValueError(
            "run_supernet_train: the config names a teacher and no teacher knowledge was "
            "passed; pass teacher=TeacherKnowledge(...) with its outputs on train_data, or "
            "remove config.teacher to distil in place"
        )

    supernet = Supernet(OFASpace(config.space), kernel_transform=config.kernel_transform)
    out = config.out_dir
    train_supernet(
        supernet,
        train_data,
        config.train,
        distill_loss,
        teacher=teacher,
        checkpoint_dir=out / "checkpoints",
        resume=resume,
        progress=progress,
    )
    state = {k: v.detach().contiguous() for k, v in supernet.state_dict().items()}
    write_bytes_atomic(out / SUPERNET_FILE, save(state, metadata={"format": "pt"}))
    space = supernet.space
    return {
        name: evaluate_subnet(
            supernet,
            subnet,
            train_data,
            val_data,
            batches=config.calibration_batches,
            batch_size=config.train.batch_size,
            seed=config.train.seed,
        )
        for name, subnet in (("largest", space.largest()), ("smallest", space.smallest()))
    }


def load_trained(config: SupernetJobConfig) -> Supernet:
    """The supernet `run_supernet_train` wrote into `out_dir`."""
    weights = config.out_dir / SUPERNET_FILE
    if not weights.is_file():
        raise ValueError(
            f"no trained supernet at {str(weights)!r}: run `lyceum nas supernet train` with this "
            f"config first (it writes out_dir/{SUPERNET_FILE})"
        )
    supernet = load_model(supernet_spec(config), weights)
    assert isinstance(supernet, Supernet)
    return supernet.eval()


def run_supernet_search(
    config: SupernetJobConfig,
    train_data: Dataset,
    val_data: Dataset,
    *,
    progress: bool = True,
    worker: str = "supernet",
) -> tuple[SearchResult, BudgetedSpace]:
    """One search worker on the trained supernet under the config's budget."""
    reward = SubnetReward(
        load_trained(config),
        train_data,
        val_data,
        batches=config.calibration_batches,
        batch_size=config.train.batch_size,
        seed=config.train.seed,
    )
    lut = LatencyTable.load(config.lut) if config.lut is not None else None
    return search_subnet(
        reward,
        budget=config.budget,
        lut=lut,
        search=config.search,
        study=config.study,
        progress=progress,
        worker=worker,
    )


def run_supernet_extract(
    config: SupernetJobConfig,
    tokens: Sequence[int],
    out: Path,
    train_data: Dataset,
) -> Path:
    """Write subnet `tokens`, BN re-calibrated on the config's batches, into `out`."""
    supernet = load_trained(config)
    subnet = supernet.space.subnet(tokens)
    batches = calibration_batches(
        train_data, config.calibration_batches, config.train.batch_size, config.train.seed
    )
    model = recalibrate_bn(extract(supernet, subnet), batches)
    return save_subnet(model, supernet.space, subnet, out)
