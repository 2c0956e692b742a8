"""Training the supernet once: progressive shrinking, the sandwich rule, in-place distillation
or distillation from a teacher's knowledge.

Progressive shrinking (once-for-all) trains the largest subnet first, then lets one dimension
shrink at a time, the newest one first from its largest values only: kernel, then depth (the
two largest values, then all), then expansion (likewise), each phase keeping the earlier
dimensions elastic. `progressive_shrinking(space)` is that schedule; any list of `Phase`s can
replace it.

Each step follows the sandwich rule: the largest subnet of the phase learns from the labels,
and its logits (detached) teach the phase's smallest subnet and `random_subnets` random ones
(in-place distillation; `(1 - alpha) * CE + alpha * distill_loss`). Their gradients add up to
one optimizer step. With a teacher's knowledge of the training set (`TeacherKnowledge`, e.g. a
Lyceum teacher's dump), every subnet of the sandwich, the largest included, learns
`(1 - alpha) * CE + alpha * teacher.loss(logits, teacher rows)` instead, as once-for-all does
with its pretrained teacher: the teacher's alpha and loss apply to all, in-place distillation
(`OFATrainConfig.distill`) is off. Before a phase that lets the expansion shrink, every block's
hidden channels are re-sorted by importance. Each phase starts a fresh Adam (the sort re-orders
the channels its moments belong to), at a constant rate or, with `lr_schedule: cosine`
(once-for-all's), one decaying to ~0 by the phase's last step.

Every random draw is seeded by (seed, epoch, step), and every epoch's shuffle by (seed, epoch),
so a run resumed from its last checkpoint (state dicts and JSON, `_ofa_checkpoint`) takes the
same steps as one that never stopped; a teacher changes neither (its batches carry their sample
indices, the shuffles are the same), and a checkpoint records whether it had one.

A subnet's BN statistics are shared with every other subnet during training: `evaluate_subnet`
extracts it and re-calibrates its BN on a few training batches (`recalibrate_bn`) first.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lyceum.compression.distillation import Distillation, DistillLoss
from lyceum.compression.nas._ofa_checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from lyceum.compression.nas.distill import TeacherKnowledge, _Indexed
from lyceum.compression.nas.extract import extract
from lyceum.compression.nas.ofa_space import OFASpace, SubnetConfig
from lyceum.compression.nas.supernet import Allowed, Supernet
from lyceum.proto.display import Progress
from lyceum.proto.evaluation import top1_accuracy

__all__ = [
    "EpochRecord",
    "OFATrainConfig",
    "Phase",
    "StepHook",
    "calibration_batches",
    "evaluate_subnet",
    "phase_allowed",
    "progressive_shrinking",
    "recalibrate_bn",
    "train_supernet",
]

StepHook = Callable[[int, list[SubnetConfig]], None]
"""`hook(phase_index, configs)`: called after every step with the subnets it trained."""


class Phase(BaseModel):
    """One phase of the schedule: the values each dimension may take (None: the largest only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Shown in the progress bar and the log.")
    epochs: int = Field(ge=1, description="Epochs of this phase.")
    kernels: tuple[int, ...] | None = Field(
        default=None, description="Kernel sizes subnets may have; None: the largest only."
    )
    depths: tuple[int, ...] | None = Field(
        default=None, description="Stage depths subnets may have; None: the largest only."
    )
    expands: tuple[int, ...] | None = Field(
        default=None, description="Expansion ratios subnets may have; None: the largest only."
    )
    lr: float | None = Field(default=None, gt=0, description="Adam LR; None: the config's.")


class OFATrainConfig(BaseModel):
    """How the supernet is trained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    phases: tuple[Phase, ...] | None = Field(
        default=None,
        description="The schedule; None: progressive_shrinking(space, epochs_per_phase).",
    )
    epochs_per_phase: int = Field(
        default=2, ge=1, description="Epochs of each default phase (when `phases` is None)."
    )
    batch_size: int = Field(default=64, ge=1, description="Training batch size.")
    lr: float = Field(default=3e-3, gt=0, description="Adam learning rate.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="constant: each phase at its start value throughout; cosine: each phase's "
        "rate decays to ~0 by its last step (once-for-all's). On digits (bench/README.md, 3 "
        "supernets each) "
        "cosine helped in-place distillation (subnets 0.3-1.9 points below their from-scratch "
        "twins instead of 0.6-4.6) and hurt distillation from a teacher (up to 3.0 below "
        "instead of 0.2).",
    )
    random_subnets: int = Field(
        default=2, ge=0, description="Random subnets per step besides the largest and smallest."
    )
    distill: Distillation = Field(
        default_factory=Distillation,
        description="In-place distillation from the largest subnet (alpha, temperature); "
        "not used when a teacher teaches every subnet.",
    )
    seed: int = Field(default=0, description="Seeds the shuffles and the subnets drawn.")


def progressive_shrinking(space: OFASpace, epochs: int = 2) -> tuple[Phase, ...]:
    """once-for-all's schedule for `space`: the largest subnet, then kernel, then depth and
    expansion each from their two largest values, then three, ... then all."""
    c = space.config
    phases = [Phase(name="largest", epochs=epochs)]
    kernels = c.kernels if len(c.kernels) > 1 else None
    if kernels:
        phases.append(Phase(name="kernel", epochs=epochs, kernels=kernels))
    depths: tuple[int, ...] | None = None
    for n in range(2, len(c.depths) + 1):
        depths = c.depths[-n:]
        phases.append(Phase(name=f"depth-{n - 1}", epochs=epochs, kernels=kernels, depths=depths))
    for n in range(2, len(c.expands) + 1):
        phases.append(
            Phase(
                name=f"expand-{n - 1}",
                epochs=epochs,
                kernels=kernels,
                depths=depths,
                expands=c.expands[-n:],
            )
        )
    return tuple(phases)


def phase_allowed(space: OFASpace, phase: Phase) -> Allowed:
    """The sets a phase samples from (each must hold the space's largest value: the largest
    subnet is the teacher of every phase)."""
    c = space.config
    allowed = Allowed(
        space,
        kernels=phase.kernels or (c.kernels[-1],),
        depths=phase.depths or (c.depths[-1],),
        expands=phase.expands or (c.expands[-1],),
    )
    if allowed.largest() != space.largest():
        raise ValueError(
            f"phase {phase.name!r}: every set must include the space's largest value (the "
            f"largest subnet teaches the others), got kernels {list(allowed.kernels)}, depths "
            f"{list(allowed.depths)}, expands {list(allowed.expands)}"
        )
    return allowed


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: its phase, number (over the whole schedule, from 1), mean loss of a step."""

    phase: str
    epoch: int
    loss: float


def _loader(data: Dataset, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def _sandwich(allowed: Allowed, rng: random.Random, random_subnets: int) -> list[SubnetConfig]:
    """The largest, the smallest and `random_subnets` random subnets, duplicates dropped."""
    configs = [allowed.largest(), allowed.smallest()]
    configs += [allowed.sample(rng) for _ in range(random_subnets)]
    unique: list[SubnetConfig] = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    return unique


def train_supernet(
    supernet: Supernet,
    train_data: Dataset,
    config: OFATrainConfig,
    distill_loss: DistillLoss,
    *,
    teacher: TeacherKnowledge | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: StepHook | None = None,
) -> list[EpochRecord]:
    """Train `supernet` in place through the schedule; returns the epochs run (this call's).

    `distill_loss(student_logits, teacher_logits)` is the in-place distillation term
    (`functools.partial(lyceum.student_client.losses.soft_label_kd, temperature=...)`). With
    `teacher` (its outputs for every sample of `train_data`, row i = sample i) every subnet
    learns `teacher.mixed_loss` instead and neither `distill_loss` nor `config.distill` is
    used. With `checkpoint_dir`, a checkpoint is written after every epoch; `resume`
    continues from it (refused if it was written with another schedule or config, without
    this teacher or with another one: its alpha and a digest of its outputs are recorded; its
    loss's temperature is not, the loss being a callable)."""
    space = supernet.space
    phases = config.phases or progressive_shrinking(space, config.epochs_per_phase)
    allowed = [phase_allowed(space, p) for p in phases]
    if teacher is not None:
        teacher.check(train_data)
    schedule: dict[str, object] = {
        "phases": [p.model_dump(mode="json") for p in phases],
        "config": config.model_dump(mode="json", exclude={"phases", "epochs_per_phase"}),
    }
    if teacher is not None:
        # Only when there is one: checkpoints written before teachers existed still resume.
        # The outputs' digest tells another teacher (or another dump of it) from this one.
        digest = hashlib.sha256(teacher.outputs.detach().cpu().contiguous().numpy().tobytes())
        schedule["teacher"] = {"alpha": teacher.alpha, "outputs_sha256": digest.hexdigest()}
    starts = [sum(p.epochs for p in phases[:i]) for i in range(len(phases))]
    total = sum(p.epochs for p in phases)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    done, optim_state = 0, None
    if resume:
        if directory is None or not has_checkpoint(directory):
            raise ValueError(
                f"train_supernet: resume needs a checkpoint in checkpoint_dir, and "
                f"{str(directory)!r} has none: start without resume"
            )
        checkpoint, optim_state = load_checkpoint(directory, supernet, schedule)
        done = checkpoint.epochs_done
    records: list[EpochRecord] = []
    alpha = config.distill.alpha
    source = train_data if teacher is None else _Indexed(train_data)
    steps_per_epoch = len(_loader(source, config.batch_size, 0))
    with Progress(
        total=(total - done) * steps_per_epoch,
        desc="supernet",
        unit="step",
        enabled=progress and total > done,
    ) as bar:
        optimizer: torch.optim.Optimizer | None = None
        for epoch in range(done, total):
            index = max(i for i, start in enumerate(starts) if start <= epoch)
            phase, sets = phases[index], allowed[index]
            if optimizer is None or epoch == starts[index]:
                if epoch == starts[index] and len(sets.expands) > 1:
                    supernet.sort_channels()
                optimizer = torch.optim.Adam(supernet.parameters(), lr=phase.lr or config.lr)
                if optim_state is not None and epoch != starts[index]:
                    optimizer.load_state_dict(optim_state)
                optim_state = None
            supernet.train()
            losses: list[float] = []
            loader = _loader(source, config.batch_size, config.seed * 1_000_003 + epoch)
            for step, batch in enumerate(loader):
                inputs, labels = batch[0], batch[1]
                rng = random.Random(f"lyceum-ofa:{config.seed}:{epoch}:{step}")
                configs = _sandwich(sets, rng, config.random_subnets)
                optimizer.zero_grad(set_to_none=True)
                total_loss = 0.0
                largest: torch.Tensor | None = None
                for subnet in configs:
                    supernet.set_active(subnet)
                    out = supernet(inputs)
                    if teacher is not None:
                        loss = teacher.mixed_loss(out, labels, batch[2])
                    elif largest is None:  # configs[0], the largest: the labels alone
                        loss = nn.functional.cross_entropy(out, labels)
                        largest = out.detach()
                    else:
                        hard = nn.functional.cross_entropy(out, labels)
                        loss = (1 - alpha) * hard + alpha * distill_loss(out, largest)
                    loss.backward()
                    total_loss += loss.item()
                if config.lr_schedule == "cosine":
                    done_steps = (epoch - starts[index]) * steps_per_epoch + step
                    share = done_steps / (phase.epochs * steps_per_epoch)
                    for group in optimizer.param_groups:
                        group["lr"] = (
                            (phase.lr or config.lr) * 0.5 * (1 + math.cos(math.pi * share))
                        )
                optimizer.step()
                losses.append(total_loss / len(configs))
                if on_step is not None:
                    on_step(index, configs)
                bar.update(
                    1, phase=phase.name, epoch=f"{epoch + 1}/{total}", loss=f"{losses[-1]:.4f}"
                )
            records.append(EpochRecord(phase.name, epoch + 1, sum(losses) / max(1, len(losses))))
            if directory is not None:
                save_checkpoint(directory, supernet, optimizer, epoch + 1, schedule)
    supernet.set_active(space.largest())
    supernet.eval()
    return records


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every BN layer's running statistics of `model` as the average over `batches`
    (inputs only), in place; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
    model.train()
    seen = 0
    for inputs in batches:
        model(inputs)
        seen += 1
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    if seen == 0:
        raise ValueError("recalibrate_bn: no batches given; pass a few batches of training inputs")
    return model.eval()


def calibration_batches(
    data: Dataset, batches: int, batch_size: int, seed: int
) -> list[torch.Tensor]:
    """The first `batches` shuffled input batches of `data` (the same ones for every subnet)."""
    out: list[torch.Tensor] = []
    for inputs, _ in _loader(data, batch_size, seed):
        if len(out) == batches:
            break
        out.append(inputs)
    return out


def evaluate_subnet(
    supernet: Supernet,
    config: SubnetConfig,
    calibration: Dataset | list[torch.Tensor],
    val_data: Dataset,
    *,
    batches: int = 4,
    batch_size: int = 64,
    seed: int = 0,
) -> float:
    """Validation top-1 of subnet `config`, extracted and BN re-calibrated on `batches` batches
    of `calibration` (a dataset, or the batches themselves): no training."""
    inputs = (
        calibration
        if isinstance(calibration, list)
        else calibration_batches(calibration, batches, batch_size, seed)
    )
    model = recalibrate_bn(extract(supernet, config), inputs)
    return float(top1_accuracy(model, val_data))
