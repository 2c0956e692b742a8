"""What `train` reports: a step to `on_step` callbacks, an epoch, and the whole run.

`TrainResult.ended` says how the run ended, so a caller (the CLI: an exit code) can tell a
finished run from one stopped by a signal or by teachers that stayed unavailable, and
`TrainResult.summary()` says it in one line, with the checkpoint to resume from.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import Tensor, nn

__all__ = ["Ended", "EpochResult", "StepInfo", "TrainResult"]

Ended = Literal["finished", "signal", "teachers_unavailable"]


@dataclass(frozen=True)
class StepInfo:
    """What `on_step` callbacks see after each loader batch: `stepped` when the optimizer
    stepped after it (every batch unless `accumulate` > 1: the last of each group), then
    `grad_norm`, the gradients' total norm before clipping, when `clip_grad_norm` is set."""

    epoch: int
    step: int  # batches done in this epoch, this one included
    sample_ids: Tensor
    loss: float
    stepped: bool = True
    grad_norm: float | None = None


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
    # task: causal_lm: held-out perplexity, and the KL to the teacher given a validation dump.
    val_perplexity: float | None = None
    val_kl: float | None = None

    def validation(self, accuracy: str = "val acc", digits: int = 1) -> str:
        """The validation figures in words: accuracy, or a language model's perplexity."""
        if self.val_perplexity is None:
            acc = "n/a" if self.val_accuracy is None else f"{100 * self.val_accuracy:.{digits}f}%"
            return f"{accuracy} {acc}"
        kl = "" if self.val_kl is None else f", val KL to the teacher {self.val_kl:.4f}"
        return f"val perplexity {self.val_perplexity:.2f}{kl}"


@dataclass
class TrainResult:
    """The trained model (unwrapped from DDP), per-epoch figures, and how the run ended.

    `ended`: `finished`; `signal` (SIGINT or SIGTERM, its number in `signum`) after the batch
    in progress; `teachers_unavailable` (the error's text in `error`) after the last batch
    the teachers answered. A stopped run's `stopped_at` is `(epoch, batches done in it)`
    (all of them: it stopped between epochs). `checkpoint` is the file `--resume` continues
    from; None when nothing was saved (no `checkpoint_dir`, or no step was taken). `weights`
    is `model.safetensors` beside it, the student's weights as of that checkpoint: what
    `--checkpoint` takes (`teacher serve`, `teacher dump`, `prune`, `quantize`).
    `supervised`: the run had no teachers and learnt from the labels alone.
    """

    model: nn.Module
    epochs: list[EpochResult] = field(default_factory=list)
    checkpoint: Path | None = None
    weights: Path | None = None
    supervised: bool = False
    ended: Ended = "finished"
    signum: int | None = None
    error: str | None = None
    stopped_at: tuple[int, int] | None = None
    total_epochs: int = 0
    batches_per_epoch: int = 0

    @property
    def interrupted(self) -> bool:
        """True unless every epoch ran."""
        return self.ended != "finished"

    @property
    def val_accuracy(self) -> float | None:
        return self.epochs[-1].val_accuracy if self.epochs else None

    def summary(self) -> str:
        """How the run ended, in one line: what happened, where, and what was saved."""
        if self.ended == "finished":
            last = self.epochs[-1] if self.epochs else None
            if last is None:
                return "trained 0 epochs"
            how = " (supervised, no teachers)" if self.supervised else ""
            return (
                f"trained {len(self.epochs)} epochs{how}: final loss {last.loss:.4f}, "
                f"{last.validation('validation accuracy', 2)}{self._saved(', ')}"
            )
        if self.ended == "signal":
            name = signal.Signals(self.signum).name if self.signum is not None else "a signal"
            what = f"stopped by {name}"
        else:
            what = f"teachers unavailable ({self.error})"
        if self.stopped_at is not None:
            epoch, done = self.stopped_at
            if done == self.batches_per_epoch:
                what += f" after epoch {epoch + 1}/{self.total_epochs}"
            else:
                what += (
                    f" at epoch {epoch + 1}/{self.total_epochs}, after batch "
                    f"{done}/{self.batches_per_epoch}"
                )
        if self.checkpoint is None and self.stopped_at == (0, 0):
            return f"{what}: nothing to save before the first step"
        if self.checkpoint is None:
            return (
                f"{what}: nothing was saved, the config has no checkpoint_dir (set one to keep "
                f"the progress of a run that stops)"
            )
        return f"{what}{self._saved(': ')}"

    def _saved(self, lead: str) -> str:
        """Where the run's files are: the checkpoint, and the weights `--checkpoint` takes."""
        if self.checkpoint is None:
            return ""
        weights = f", weights {self.weights} (for --checkpoint)" if self.weights else ""
        return f"{lead}checkpoint {self.checkpoint}{weights}"
