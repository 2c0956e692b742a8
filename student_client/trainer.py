"""The config-driven student trainer: `train(config)`, `lyceum student train CONFIG.yaml`.

One loop for one process or many: under `torchrun` (WORLD_SIZE > 1) the model is wrapped in
DDP (gloo on CPU, nccl on CUDA) and each rank draws its own shard of ids from a
`DistributedSampler`; every rank asks the teachers for its own shard's knowledge.

Checkpoints are plain state dicts (`torch.save` of tensors, numbers and strings; read back
with `weights_only=True`): the model, the optimizer, the LR schedule, the losses' learned
adapters and the loader's `{epoch, seed, position}`. One is written after every epoch
(`epoch-NNN.pt` and `last.pt`) and, on SIGTERM, after the batch in progress (`last.pt`, with
the position inside the epoch), so `--resume` continues with the remaining ids of that epoch.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from lyceum.proto.schema import SAMPLE_ID
from lyceum.proto.specs import load_dataset, load_model
from lyceum.student_client.loader import DistillLoader
from lyceum.student_client.losses import (
    DistillObjective,
    DistillTerm,
    FeatureMSE,
    SoftLabelKD,
    TopKKD,
)
from lyceum.student_client.merger import MergedSchema, Merger, Weighted
from lyceum.student_client.sources import KnowledgeSource, OfflineTeacher, OnlineTeacher
from lyceum.student_client.trainer_config import (
    LossTermConfig,
    TeacherConfig,
    TrainConfig,
    load_config,
    validate_config,
)

__all__ = ["EpochResult", "StepInfo", "TrainResult", "build_sources", "train"]

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class StepInfo:
    """What `on_step` callbacks see after each optimizer step."""

    epoch: int
    step: int  # batches done in this epoch, this one included
    sample_ids: Tensor
    loss: float


@dataclass(frozen=True)
class EpochResult:
    """One epoch: `wait_s` is how long the student waited for its next batch (knowledge and
    data), the time the loader's window did not hide."""

    epoch: int
    loss: float
    val_accuracy: float | None
    samples_per_s: float
    wait_s: float
    seconds: float


@dataclass
class TrainResult:
    """The trained model (unwrapped from DDP), per-epoch figures, and how the run ended."""

    model: nn.Module
    epochs: list[EpochResult] = field(default_factory=list)
    checkpoint: Path | None = None
    interrupted: bool = False

    @property
    def val_accuracy(self) -> float | None:
        return self.epochs[-1].val_accuracy if self.epochs else None


def build_sources(
    config: TrainConfig, dataset: torch.utils.data.Dataset | None = None
) -> dict[str, KnowledgeSource]:
    """The teachers of a config as knowledge sources (offline dumps checked against `dataset`)."""
    sources: dict[str, KnowledgeSource] = {}
    try:
        for name, teacher in config.teachers.items():
            sources[name] = _source(name, teacher, dataset)
    except BaseException:
        for source in sources.values():
            source.close()
        raise
    return sources


def _source(
    name: str, teacher: TeacherConfig, dataset: torch.utils.data.Dataset | None
) -> KnowledgeSource:
    if teacher.dir is not None:
        return OfflineTeacher(teacher.dir, dataset)
    assert teacher.endpoints is not None  # TeacherConfig allows exactly one of the two
    return OnlineTeacher(
        teacher.endpoints,
        mode=teacher.mode,
        **vars(teacher.credential_options()),
        name=name,
        timeout_s=teacher.timeout_s,
        request_timeout_s=teacher.request_timeout_s,
    )


def _merger(config: TrainConfig) -> Merger:
    # Any: a strategy is a name, a spec or a MergeStrategy object (the merger resolves all).
    strategies: dict[str, Any] = {
        f: Weighted(weights=s) if isinstance(s, dict) else s for f, s in config.merge.items()
    }
    try:
        return Merger(strategies, renames=config.renames)
    except ValueError as exc:  # e.g. a spec that does not import: say which key
        raise ValueError(f"config key 'merge': {exc}") from None


def _term(term: LossTermConfig, merged: MergedSchema) -> DistillTerm:
    specs = {f.spec.name: f.spec for f in merged.fields}
    if term.field not in specs:
        raise ValueError(
            f"losses.terms '{term.name}': field {term.field!r} is not in the merged knowledge; "
            f"the teachers send {sorted(specs)}"
        )
    spec = specs[term.field]
    loss: nn.Module
    if term.kind == "soft_label":
        loss = SoftLabelKD.for_field(spec, term.temperature)
    elif term.kind == "topk":
        loss = TopKKD.for_field(spec, term.temperature)
    else:
        loss = FeatureMSE()
    return DistillTerm(
        name=term.name, weight=term.weight, loss=loss, student=term.student, teacher=term.field
    )


class _Distributed:
    """Rank, world size and device of this process; DDP set up when WORLD_SIZE > 1."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda") and self.world > 1 and ":" not in device:
            device = f"cuda:{local}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # nccl binds each rank to its current device
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def any(self, flag: bool) -> bool:
        """True if `flag` is set on any rank (so every rank stops at the same batch)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


class _StopFlag:
    """Set by SIGTERM; the loop checkpoints after the batch in progress and returns."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        self.set = True

    def __exit__(self, *_exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _accuracy(model: nn.Module, dataset: torch.utils.data.Dataset, device: torch.device) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=512)
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            out = model(x.to(device))
            logits = out["logits"] if isinstance(out, Mapping) else out
            correct += int((logits.argmax(dim=1).cpu() == y).sum())
            total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def _task_loss(logits: Tensor, labels: Tensor, ids: Tensor, labeled: int | None) -> Tensor:
    """Cross-entropy over the batch's labelled samples (all of them unless `labeled`)."""
    if labeled is None:
        return nn.functional.cross_entropy(logits, labels)
    keep = ids.to(logits.device) < labeled
    if not bool(keep.any()):
        return logits.sum() * 0.0  # no label in this batch: a zero that keeps the graph
    return nn.functional.cross_entropy(logits[keep], labels[keep])


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves half a checkpoint


def _load(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} is not a Lyceum student checkpoint of version "
            f"{CHECKPOINT_VERSION}; start without --resume or point checkpoint_dir elsewhere"
        )
    return state


def train(
    config: TrainConfig | Mapping[str, Any] | str | Path,
    *,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train the student a config describes; the Python form of `lyceum student train`.

    `config`: a `TrainConfig`, a mapping (validated) or a YAML path. `resume`: continue from
    `checkpoint_dir/last.pt` (mid-epoch if it was written on SIGTERM). `on_step` is called
    after every optimizer step (logging, tests).
    """
    if isinstance(config, str | Path):
        config = load_config(config)
    elif not isinstance(config, TrainConfig):
        config = validate_config(config)
    if resume and config.checkpoint_dir is None:
        raise ValueError("--resume needs checkpoint_dir in the config (where last.pt is)")
    env = _Distributed(config.device)
    try:
        return _run(config, env, resume, on_step)
    finally:
        env.close()


def _run(
    config: TrainConfig,
    env: _Distributed,
    resume: bool,
    on_step: Callable[[StepInfo], None] | None,
) -> TrainResult:
    torch.manual_seed(config.seed)
    train_set = load_dataset(config.dataset.train_spec())
    val_spec = config.dataset.validation_spec()
    val_set = load_dataset(val_spec) if val_spec is not None else None
    model = load_model(config.model_spec()).to(env.device)
    sampler: torch.utils.data.Sampler[int] | None = (
        torch.utils.data.DistributedSampler(
            train_set, num_replicas=env.world, rank=env.rank, shuffle=True, seed=config.seed
        )
        if env.enabled
        else None
    )
    merger = _merger(config)  # before the sources: a bad strategy spec fails at once
    sources = build_sources(config, train_set)
    try:
        loader = DistillLoader(
            train_set,
            sources,
            config.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            seed=config.seed,
            window=config.window,
            merger=merger,
            num_workers=config.num_workers,
            pin_memory=env.device.type == "cuda",
            device=env.device,
        )
        objective = DistillObjective(
            [_term(t, loader.merged) for t in config.losses.terms],
            task_weight=config.losses.task_weight,
        ).to(env.device)
        net: nn.Module = model
        if env.enabled:
            cuda = env.device.type == "cuda"
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device.index] if cuda else None
            )
        params = [*model.parameters(), *objective.parameters()]
        opt = config.optimizer
        optimizer: torch.optim.Optimizer
        if opt.name == "sgd":
            optimizer = torch.optim.SGD(
                params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
            )
        elif opt.name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=opt.lr, weight_decay=opt.weight_decay)
        steps = config.epochs * len(loader)
        schedule = config.schedule
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        if schedule.name == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        elif schedule.name == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=schedule.step_epochs * len(loader), gamma=schedule.gamma
            )
        result = TrainResult(model=model)
        ckpt_dir = config.checkpoint_dir
        if resume:
            assert ckpt_dir is not None  # checked in train()
            state = _load(ckpt_dir / "last.pt")
            model.load_state_dict(state["model"])
            objective.load_state_dict(state["objective"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            loader.load_state_dict(state["loader"])
            result.epochs = [EpochResult(**e) for e in state["epochs"]]

        def checkpoint(name: str) -> None:
            if ckpt_dir is None or env.rank != 0:
                return
            state = {
                "version": CHECKPOINT_VERSION,
                "model": model.state_dict(),
                "objective": objective.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "loader": loader.state_dict(),
                "epochs": [asdict(e) for e in result.epochs],
            }
            _save(ckpt_dir / name, state)
            if name != "last.pt":
                _save(ckpt_dir / "last.pt", state)
            result.checkpoint = ckpt_dir / "last.pt"

        with _StopFlag() as stop:
            while loader.epoch < config.epochs:
                epoch = loader.epoch
                started = time.perf_counter()
                wait0, samples0 = loader.stats.wait_s, loader.stats.samples
                total_loss, batches = 0.0, 0
                bar = tqdm(
                    total=len(loader),
                    initial=loader.position,
                    desc=f"epoch {epoch + 1}/{config.epochs}",
                    unit="batch",
                    disable=not config.progress or env.rank != 0,
                    leave=False,
                )
                for inputs, labels, knowledge in loader:
                    ids = knowledge[SAMPLE_ID]
                    out = net(inputs)
                    student = dict(out) if isinstance(out, Mapping) else {"logits": out}
                    task = _task_loss(student["logits"], labels, ids, config.dataset.labeled)
                    losses = objective(student, knowledge, task_loss=task)
                    optimizer.zero_grad(set_to_none=True)
                    losses.total.backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    loss = float(losses.total.detach())
                    total_loss, batches = total_loss + loss, batches + 1
                    elapsed = time.perf_counter() - started
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss:.4f}",
                        samples_s=f"{(loader.stats.samples - samples0) / max(elapsed, 1e-9):.0f}",
                        wait_s=f"{loader.stats.wait_s - wait0:.2f}",
                    )
                    if on_step is not None:
                        on_step(StepInfo(epoch, loader.position, ids.cpu(), loss))
                    # A stop on the epoch's last batch is handled after the epoch's own
                    # bookkeeping below; resuming then starts the next epoch.
                    if env.any(stop.set) and loader.position < len(loader):
                        bar.close()
                        checkpoint("last.pt")
                        result.interrupted = True
                        return result
                bar.close()
                seconds = time.perf_counter() - started
                accuracy = _accuracy(model, val_set, env.device) if val_set is not None else None
                result.epochs.append(
                    EpochResult(
                        epoch=epoch,
                        loss=env.mean(total_loss / max(batches, 1)),
                        val_accuracy=accuracy,
                        samples_per_s=(loader.stats.samples - samples0) / max(seconds, 1e-9),
                        wait_s=loader.stats.wait_s - wait0,
                        seconds=seconds,
                    )
                )
                if not math.isfinite(result.epochs[-1].loss):
                    raise ValueError(
                        f"epoch {epoch + 1}: the training loss is {result.epochs[-1].loss}: lower "
                        f"optimizer.lr or check the teachers' knowledge (meaning, temperature)"
                    )
                checkpoint(f"epoch-{epoch + 1:03d}.pt")
                if env.any(stop.set) and epoch + 1 < config.epochs:
                    result.interrupted = True
                    return result
                if env.rank == 0 and config.progress:
                    e = result.epochs[-1]
                    acc = "n/a" if e.val_accuracy is None else f"{100 * e.val_accuracy:.1f}%"
                    tqdm.write(
                        f"epoch {epoch + 1}/{config.epochs}: loss {e.loss:.4f}, val acc {acc}, "
                        f"{e.samples_per_s:.0f} samples/s, waited for batches "
                        f"{e.wait_s:.2f}s of {e.seconds:.2f}s"
                    )
        return result
    finally:
        for source in sources.values():
            source.close()
