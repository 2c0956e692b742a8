"""One training run's epoch loop: steps, epoch figures, checkpoints, and stopping early.

`trainer.train` builds a `Run` (model, objective, optimizer, loader, ...) and calls
`Run.epochs`. After each batch is fetched, and before its step, every rank learns whether a
stop signal arrived or a teacher failed on any rank (`Distributed.halt`); then all stop at
that batch and `Run.halt` saves the batches done (`last.pt` at the position in the epoch).
Every checkpoint also rewrites `model.safetensors`, the student's weights alone.

Without teachers (`objective` None) the same loop trains on the task loss alone: the
loader's knowledge then holds only the batch's `sample_id`, which keeps its position.

One optimizer step per `accumulate` batches (`Accumulation`): groups start at multiples of
`accumulate` within each epoch, and the epoch's last group may be shorter. Each batch's loss
is scaled by its share of its group's samples, so the group's gradient is that of one batch
of all its samples (a causal LM's per-token mean loss is weighted by samples too, not by
tokens). Under DDP the first batches of a group run under `no_sync`: only the group's last
backward all-reduces. A run stopped inside a group saves the position where that group
began: the group's gradients are not saved, its batches run again on resume, so a resumed
run ends with the weights of an unbroken one.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lyceum.proto.evaluation import top1_accuracy
from lyceum.proto.schema import SAMPLE_ID
from lyceum.student_client import _checkpoints as checkpoints
from lyceum.student_client._lm_task import CausalLMTask, LMValidation
from lyceum.student_client._train_env import Distributed, StopSignals
from lyceum.student_client._train_log import epoch_line, epoch_progress, log, log_resume
from lyceum.student_client._train_parallel import Placement
from lyceum.student_client._train_results import EpochResult, StepInfo, TrainResult
from lyceum.student_client.loader import DistillLoader
from lyceum.student_client.losses import DistillObjective, labeled_cross_entropy
from lyceum.student_client.sources import TeacherUnavailableError
from lyceum.student_client.trainer_config import TrainConfig

__all__ = ["Run"]


@dataclass(frozen=True)
class Accumulation:
    """An epoch's batches in groups of `every`, one optimizer step per group."""

    sizes: tuple[int, ...]  # samples of each batch of the epoch
    every: int

    def start(self, index: int) -> int:
        """The first batch of the group that batch `index` (from 0) is in."""
        return index - index % self.every

    def last(self, index: int) -> bool:
        """Whether the optimizer steps after batch `index`: its group's last batch."""
        return (index + 1) % self.every == 0 or index + 1 == len(self.sizes)

    def share(self, index: int) -> float:
        """Batch `index`'s part of its group's samples: the scale of its loss (1.0 alone)."""
        start = self.start(index)
        return self.sizes[index] / sum(self.sizes[start : start + self.every])

    def kept(self, done: int) -> int:
        """Of `done` batches, those whose group stepped: where a stopped run resumes."""
        return done if done >= len(self.sizes) else self.start(done)


def steps_per_epoch(batches: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of `batches` batches (a last, shorter group steps too)."""
    return -(-batches // accumulate)


@dataclass
class Run:
    """The parts of one training run, built once by `trainer.train`, and its epoch loop."""

    config: TrainConfig
    env: Distributed
    model: nn.Module
    net: nn.Module
    objective: DistillObjective | None  # None: supervised, the task loss alone
    optimizer: torch.optim.Optimizer
    placement: Placement  # state dicts (whole under FSDP too), gradient sync, their norm
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    loader: DistillLoader
    val_set: torch.utils.data.Dataset | None
    identity: dict[str, str]
    # The header of model.safetensors: its format, that of the weights the run started from
    # (a pruned student's plan then sits beside it too).
    weights_metadata: dict[str, str]
    result: TrainResult
    steps: int = 0  # optimizer steps taken by this process (a resumed run's earlier ones not)
    lm: CausalLMTask | None = (
        None  # task causal_lm: its loss and validation replace the classifier's
    )

    def resume(self) -> None:
        assert self.config.checkpoint_dir is not None  # checked by checkpoints.prepare
        path = self.config.checkpoint_dir / checkpoints.LAST
        state = checkpoints.read(path)
        checkpoints.check_identity(path, state, self.identity)
        checkpoints.restore(path, "model", self.placement.load_model, state["model"])
        if self.objective is not None:
            adapters = self.objective.load_state_dict
            checkpoints.restore(path, "losses' adapters", adapters, state["objective"])
        checkpoints.restore(
            path, "optimizer state", self.placement.load_optimizer, state["optimizer"]
        )
        if self.scheduler is not None:
            schedule = self.scheduler.load_state_dict
            checkpoints.restore(path, "LR schedule", schedule, state["scheduler"])
        checkpoints.restore(path, "loader position", self.loader.load_state_dict, state["loader"])
        self.result.epochs = [EpochResult(**e) for e in state["epochs"]]
        self.result.checkpoint = path
        weights = self.config.checkpoint_dir / checkpoints.WEIGHTS
        self.result.weights = weights if weights.is_file() else None
        if self.env.rank == 0:
            log_resume(path, state, self.config.epochs, len(self.loader))

    def checkpoint(self, names: tuple[str, ...], written: str, loader: dict[str, int]) -> None:
        """Write the run's state (rank 0) to `names` in checkpoint_dir, if there is one, and
        the student's weights to `model.safetensors` beside them."""
        ckpt_dir = self.config.checkpoint_dir
        if ckpt_dir is None:
            return
        model, optimizer = self.placement.model_state(), self.placement.optimizer_state()
        if self.env.rank == 0:
            state = {
                "version": checkpoints.VERSION,
                "run": self.identity,
                "written": written,
                "model": model,
                "objective": self.objective.state_dict() if self.objective is not None else {},
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                "loader": loader,
                "epochs": [asdict(e) for e in self.result.epochs],
            }
            for name in names:
                checkpoints.save(ckpt_dir / name, state)
            checkpoints.save_weights(ckpt_dir / checkpoints.WEIGHTS, model, self.weights_metadata)
        self.result.checkpoint = ckpt_dir / checkpoints.LAST
        self.result.weights = ckpt_dir / checkpoints.WEIGHTS

    def _loss(self, inputs: Any, labels: Any, knowledge: dict[str, Tensor]) -> Tensor:
        if self.lm is not None:
            weight = self.config.losses.task_weight
            return self.lm.loss(self.net, inputs, labels, knowledge, self.objective, weight)
        ids = knowledge[SAMPLE_ID]
        out = self.net(inputs)
        student = dict(out) if isinstance(out, Mapping) else {"logits": out}
        task = labeled_cross_entropy(student["logits"], labels, ids, self.config.dataset.labeled)
        if self.objective is None:
            return self.config.losses.task_weight * task
        return self.objective(student, knowledge, task_loss=task).total

    def _precision(self) -> contextlib.AbstractContextManager[object]:
        if self.config.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _clip(self) -> float | None:
        """Clip the gradients to `clip_grad_norm`; their total norm before it (None: off)."""
        if self.config.clip_grad_norm is None:
            return None
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return self.placement.total_norm(
            nn.utils.clip_grad_norm_(params, self.config.clip_grad_norm)
        )

    def step(
        self,
        inputs: Any,
        labels: Any,
        knowledge: dict[str, Tensor],
        index: int,
        groups: Accumulation,
    ) -> tuple[float, float | None]:
        """Batch `index` of the epoch forward and backward, its loss scaled by its share of
        its group; the optimizer steps after the group's last batch. Returns the batch's loss
        and, if it stepped with clipping on, the gradients' norm before clipping."""
        last = groups.last(index)
        if index == groups.start(index):
            self.optimizer.zero_grad(set_to_none=True)
        with self.placement.gradient_sync(last):
            with self._precision():  # the backward runs outside autocast, as torch advises
                total = self._loss(inputs, labels, knowledge)
            (total * groups.share(index)).backward()
        norm = None
        if last:
            norm = self._clip()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.steps += 1
        return float(total.detach()), norm

    def epochs(self, stop: StopSignals, on_step: Callable[[StepInfo], None] | None) -> TrainResult:
        """Every remaining epoch; returns early (`halt`) on a signal or unavailable teachers."""
        while self.loader.epoch < self.config.epochs:
            epoch = self.loader.epoch
            stopped = self._epoch(stop, on_step)
            if stopped is not None:
                return stopped
            signum, _ = self.env.halt(stop.signum, False)
            if signum is not None and epoch + 1 < self.config.epochs:
                return self.halt(signum, None, None, len(self.loader), epoch=epoch)
        return self.result

    def _epoch(
        self, stop: StopSignals, on_step: Callable[[StepInfo], None] | None
    ) -> TrainResult | None:
        """One epoch (what is left of it, resumed); None once its figures and checkpoint
        are written, the halted run's result if it stopped."""
        config, loader, env = self.config, self.loader, self.env
        epoch, stats = loader.epoch, replace(loader.stats)
        started = time.perf_counter()
        total_loss, batches, done = 0.0, 0, loader.position
        bar = epoch_progress(
            epoch,
            config.epochs,
            len(loader),
            done,
            enabled=config.progress and env.rank == 0,
            every_s=config.log_every_s,
        )
        groups = Accumulation(tuple(len(b) for b in loader.batches()), config.accumulate)
        pending = iter(loader)
        try:
            while True:
                error: TeacherUnavailableError | None = None
                try:
                    inputs, labels, knowledge = next(pending)
                except StopIteration:
                    break
                except TeacherUnavailableError as exc:
                    error = exc
                signum, failed = env.halt(stop.signum, error is not None)
                if signum is not None or failed is not None:
                    kept = groups.kept(done)
                    return self.halt(signum, failed, error, kept, redone=done - kept)
                loss, norm = self.step(inputs, labels, knowledge, done, groups)
                total_loss, batches, done = total_loss + loss, batches + 1, done + 1
                elapsed = time.perf_counter() - started
                bar.update(
                    1,
                    loss=f"{loss:.4f}",
                    samples_s=f"{(loader.stats.samples - stats.samples) / max(elapsed, 1e-9):.0f}",
                    wait_s=f"{loader.stats.wait_s - stats.wait_s:.2f}",
                )
                if on_step is not None:
                    stepped = groups.last(done - 1)
                    ids = knowledge[SAMPLE_ID].cpu()
                    on_step(StepInfo(epoch, done, ids, loss, stepped=stepped, grad_norm=norm))
        finally:
            pending.close()  # stops the loader's producer before anything else runs
            bar.close()
        seconds = time.perf_counter() - started
        accuracy = (
            top1_accuracy(self.model, self.val_set, device=env.device)
            if self.val_set is not None and self.lm is None
            else None
        )
        held_out: LMValidation | None = (
            self.lm.validate(self.model, self.val_set, config.batch_size, env.device)
            if self.val_set is not None and self.lm is not None
            else None
        )
        figures = EpochResult(
            epoch=epoch,
            loss=env.mean(total_loss / max(batches, 1)),
            val_accuracy=accuracy,
            samples_per_s=(loader.stats.samples - stats.samples) / max(seconds, 1e-9),
            wait_s=loader.stats.wait_s - stats.wait_s,
            seconds=seconds,
            val_perplexity=held_out.perplexity if held_out is not None else None,
            val_kl=held_out.kl if held_out is not None else None,
        )
        if not math.isfinite(figures.loss):
            raise ValueError(
                f"epoch {epoch + 1}: the training loss is {figures.loss}: lower optimizer.lr or "
                f"check the teachers' knowledge (meaning, temperature)"
            )
        self.result.epochs.append(figures)
        self.checkpoint(
            (checkpoints.epoch_file(epoch), checkpoints.LAST),
            f"after epoch {epoch + 1}",
            loader.state_dict(),
        )
        bar.write(epoch_line(figures, config.epochs))
        return None

    def halt(
        self,
        signum: int | None,
        failed_rank: int | None,
        error: TeacherUnavailableError | None,
        done: int,
        epoch: int | None = None,
        redone: int = 0,
    ) -> TrainResult:
        """End the run after `done` batches of the epoch, on every rank: rank 0 saves them
        (a run that took no step has nothing new: its last checkpoint, if any, stands).
        `redone`: batches after those of an accumulation group that did not step."""
        result, loader = self.result, self.loader
        epoch = loader.epoch if epoch is None else epoch
        result.stopped_at = (epoch, done)
        if signum is not None:
            result.ended, result.signum = "signal", signum
            written = f"on {signal.Signals(signum).name}"
        else:
            result.ended = "teachers_unavailable"
            result.error = (
                str(error)
                if error is not None
                else f"a teacher stayed unavailable on rank {failed_rank}; its log has the error"
            )
            if self.steps == 0:
                raise error or TeacherUnavailableError(result.error)
            written = "when the teachers became unavailable"
        if self.steps and done < len(loader):
            if self.env.rank == 0 and self.config.checkpoint_dir is not None:
                log.info(
                    "stopping %s: writing the checkpoint of epoch %d, batch %d/%d%s%s",
                    written,
                    epoch + 1,
                    done,
                    len(loader),
                    f" (the {redone} batches of the unfinished accumulation group after it run "
                    f"again on resume)"
                    if redone
                    else "",
                    " (a second signal aborts without it)" if signum is not None else "",
                )
            self.checkpoint(
                (checkpoints.LAST,),
                written,
                {**loader.state_dict(), "epoch": epoch, "position": done},
            )
        return result
