"""The run of a pipeline's plan behind `compress`: one model through every step,
checkpointed as it goes, resumable, stopped gracefully by a signal.

One model goes through the plan (`_plan`): train stages set the loss of the epochs they
cover (the teachers' terms, an earlier stage's model, or the labels alone), a prune stage
prunes it before its window, QAT swaps in the fake-quantized model for the rest of the run
and converts it at its end, PTQ calibrates and converts at its point. Every epoch is one
pass of a `DistillLoader` over the training split, shuffled by `seed + epoch`, so the batches
of an epoch are known from its number alone and a resumed epoch skips the ones done.

The optimizer (Adam, SGD, ... as the stage's `optimizer` says) is made anew whenever the
trained parameters change: a stage starts (its own optimizer), or a train stage whose losses
have learned adapters ends while training goes on. A checkpoint (`state`) is written after
every step of the plan, every `checkpoint_every` batches and at the batch boundary where a
SIGINT or SIGTERM stops the run; a resumed run rebuilds the model the checkpoint was taken
of (the pruned layers from the prune stage's folder, the fake-quantized graph by preparing
it again), loads its tensors, the optimizer's state and the RNG, and continues at the batch
after it: a run stopped (or killed) and resumed ends with the same weights and figures as
one that was not.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from lyceum.compression import analysis
from lyceum.compression.pipeline import _stages
from lyceum.compression.pipeline._plan import Step, build_plan, open_stages, started_stages
from lyceum.compression.pipeline.report import CompressResult, StageRow, write_report
from lyceum.compression.pipeline.schema import (
    PipelineConfig,
    PruneStage,
    QuantizeStage,
    TrainStage,
)
from lyceum.compression.pipeline.state import (
    CHECKPOINT,
    RunState,
    check_same_run,
    find_checkpoint,
    load_model_tensors,
    read_checkpoint,
    run_identity,
    write_checkpoint,
)
from lyceum.proto.display import Progress, plural
from lyceum.proto.schema import SAMPLE_ID
from lyceum.proto.specs import WEIGHTS_FILE, load_dataset, load_model, parse_spec
from lyceum.student_client._checkpoints import save_weights
from lyceum.student_client._train_env import StopSignals
from lyceum.student_client._train_optim import build_optimizer
from lyceum.student_client.loader import DistillLoader
from lyceum.student_client.losses import labeled_cross_entropy

__all__ = ["Run"]

_log = logging.getLogger("lyceum.compression")


def _epochs_label(start: int, end: int | None) -> str:
    return "-" if end is None else (str(start) if start == end else f"{start}-{end}")


class Run:
    """One run of a pipeline: `run(resume)` it, then `close()` it."""

    def __init__(
        self,
        config: PipelineConfig,
        on_checkpoint: Callable[[Path, RunState], None] | None,
        stop: StopSignals,
    ) -> None:
        self.config = config
        self.on_checkpoint = on_checkpoint
        self.stop = stop
        self.out = Path(config.out_dir)
        self.stages_dir = self.out / "stages"
        self.plan = build_plan(config)
        self.windows = config.windows()
        self.total = config.total_epochs()
        self.device = torch.device("cpu")
        self.sets = {
            name: self._split(split)
            for name, split in (
                ("train", config.train_split),
                ("val", config.val_split),
                ("test", config.test_split),
            )
        }
        train = self.sets["train"]
        n = min(config.batch_size, len(train))  # type: ignore[arg-type]
        self.example = torch.stack([train[i][0] for i in range(n)])
        self.state = RunState(identity=run_identity(config))
        self.model: nn.Module = nn.Identity()
        self.optimizer: torch.optim.Optimizer | None = None
        self.knowledge: dict[int, _stages.Knowledge] = {}
        self.qat = False

    def _split(self, split: str) -> Dataset:
        spec = parse_spec(self.config.dataset, {**self.config.dataset_kwargs, "split": split})
        return load_dataset(spec)

    def close(self) -> None:
        for knowledge in self.knowledge.values():
            knowledge.close()

    # -- the run -------------------------------------------------------------------------

    def run(self, resume: bool) -> CompressResult:
        found = find_checkpoint(self.out)
        if resume:
            if found is None:
                raise ValueError(
                    f"--resume: no pipeline checkpoint in {str(self.out)!r} (checkpoint/ with "
                    f"state.json); start without --resume, or give the run's --out"
                )
            self._restore(found)
        else:
            if found is not None:
                raise ValueError(
                    f"out_dir {str(self.out)!r} holds a pipeline run ({found.name}/): continue "
                    f"it with --resume, or give another --out"
                )
            torch.manual_seed(self.config.seed)
            self.model = load_model(self.config.model_spec(), self.config.checkpoint)
            self.model.eval()
            self.state.rows.append(
                _stages.measure(
                    self.config,
                    stage="baseline",
                    kind="baseline",
                    epochs="-",
                    model=self.model,
                    test_set=self.sets["test"],
                    example=self.example,
                    flops=analysis.count_flops(self.model, self.example[:1]),
                    file=None,
                ).model_dump()
            )
        _log.info("%s", self.describe())
        while not self.state.finished:
            if self.stop.signum is not None:
                return self._stopped(self.stop.signum)
            step = self.plan[self.state.step]
            if not self._run_step(step):
                assert self.stop.signum is not None  # an epoch stops early on a signal only
                return self._stopped(self.stop.signum)
            self.state.step += 1
            self.state.position, self.state.loss_sum = 0, 0.0
            self.state.finished = self.state.step >= len(self.plan)
            self._checkpoint()
        rows = [StageRow(**r) for r in self.state.rows]
        report = write_report(self.out, rows, self.config.test_split)
        return CompressResult(self.model, rows, report, self.state.epochs, self.out)

    def describe(self) -> str:
        parts = []
        for stage, w in zip(self.config.stages, self.windows, strict=True):
            span = f"before epoch {w.start}" if w.end is None else f"epochs {w.start}-{w.end}"
            parts.append(f"{stage.name} ({stage.kind}, {span})")
        where = f"from step {self.state.step + 1}/{len(self.plan)}" if self.state.step else "new"
        return (
            f"pipeline: {plural(self.total, 'epoch')}; {'; '.join(parts)}; out {self.out} ({where})"
        )

    def _stopped(self, signum: int) -> CompressResult:
        """The result of a run stopped by `signum`, its checkpoint written where it stood."""
        step = self.plan[self.state.step]
        where = f"plan step {self.state.step + 1}/{len(self.plan)}"
        if step.kind == "epoch" and self.state.position:
            where += f", epoch {step.epoch + 1} after batch {self.state.position}"
        _log.warning(
            "stopped on %s: checkpoint in %s at %s; --resume continues from it",
            signal.Signals(signum).name,
            self.out / CHECKPOINT,
            where,
        )
        rows = [StageRow(**r) for r in self.state.rows]
        return CompressResult(self.model, rows, "", self.state.epochs, self.out, signum=signum)

    def _run_step(self, step: Step) -> bool:
        """Run one step of the plan; False where a signal stopped its epoch early."""
        if step.kind == "epoch":
            return self._epoch(step.epoch)
        # Boundaries see the model in eval mode, whether the run trained up to here or was
        # resumed here: a traced pass in train mode would move BN statistics. (A mode change
        # of a fake-quantized graph rewrites it, seconds each: only epochs and boundaries do.)
        self.model.eval()
        assert step.stage is not None  # start and end steps name their stage
        stage = self.config.stages[step.stage]
        if step.kind == "start":
            self._start(step.stage, stage)
        else:
            self._end(step.stage, stage)
        return True

    def _start(self, index: int, stage: TrainStage | PruneStage | QuantizeStage) -> None:
        out = self.stages_dir / stage.name
        if isinstance(stage, TrainStage):
            self.knowledge[index] = _stages.build_knowledge(
                self.config, stage, self.sets["train"], out, self.device
            )
        elif isinstance(stage, PruneStage):
            _stages.prune_stage(
                self.config,
                stage,
                self.model,
                self.example[:1],
                self.sets["train"],
                self.sets["val"],
                out,
            )
        else:
            from lyceum.compression.quantization.api import quantize

            self.state.float_flops = analysis.count_flops(self.model, self.example[:1])
            self.model = quantize(self.model, stage.scheme, self.example)
            self.qat = stage.scheme.kind == "qat"
        if stage.trains:
            self._new_optimizer(index)

    def _end(self, index: int, stage: TrainStage | PruneStage | QuantizeStage) -> None:
        out = self.stages_dir / stage.name
        window = self.windows[index]
        label = _epochs_label(window.start, window.end)
        note, file, flops = "", None, None
        if isinstance(stage, QuantizeStage):
            self.model, file = _stages.to_int8(
                self.config, stage, self.model, self.sets["train"], self.example, out
            )
            self.qat = False
            flops = self.state.float_flops
        elif self.qat:
            note = "ends inside the quantization window: its model is fake-quantized, the "
            note += "quantize stage's row has the int8 program"
        else:
            file = self._save_float(out)
            flops = analysis.count_flops(self.model, self.example[:1])
        self.model.eval()
        self.state.rows.append(
            _stages.measure(
                self.config,
                stage=stage.name,
                kind=stage.kind,
                epochs=label,
                model=self.model,
                test_set=self.sets["test"],
                example=self.example,
                flops=flops,
                file=file,
                note=note,
            ).model_dump()
        )
        knowledge = self.knowledge.pop(index, None)
        if knowledge is not None:
            knowledge.close()
            if knowledge.parameters() and self.state.optimizer_stage is not None:
                self._new_optimizer(self.state.optimizer_stage)

    def _save_float(self, out: Path) -> Path:
        """The float model as a stage's output, what every command's --checkpoint takes:
        `model.safetensors`, with the prune plan beside it once the model is pruned."""
        from lyceum.compression.pruning.plan import read_plan, save_pruned

        pruned = [
            i
            for i in started_stages(self.plan, self.state.step)
            if self.config.stages[i].kind == "prune"
        ]
        if pruned:
            plan = self.stages_dir / self.config.stages[pruned[0]].name / "prune_plan.json"
            save_pruned(self.model, read_plan(plan), out)
            return out / WEIGHTS_FILE
        path = out / WEIGHTS_FILE
        save_weights(path, self.model)
        return path

    # -- training ------------------------------------------------------------------------

    def _trained_parameters(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        for index in sorted(self.knowledge):
            params += self.knowledge[index].parameters()
        return params

    def _new_optimizer(self, owner: int) -> None:
        stage = self.config.stages[owner]
        config = stage.optimizer  # every stage kind that trains has one
        self.optimizer = build_optimizer(config, self._trained_parameters())
        self.state.optimizer_stage = owner

    def _active_train_stage(self, epoch: int) -> int | None:
        for i, (stage, window) in enumerate(zip(self.config.stages, self.windows, strict=True)):
            if stage.kind == "train" and epoch in window.epochs:
                return i
        return None

    def _epoch(self, epoch: int) -> bool:
        """Train epoch `epoch` (the rest of it, resumed); False where a signal stopped it
        at a batch boundary, that boundary checkpointed."""
        assert self.optimizer is not None  # the plan covers every epoch with a training stage
        active = self._active_train_stage(epoch)
        knowledge = self.knowledge.get(active) if active is not None else None
        loader = DistillLoader(
            self.sets["train"],
            knowledge.sources if knowledge is not None else {},
            self.config.batch_size,
            shuffle=True,
            seed=self.config.seed,
            window=self.config.window,
            merger=knowledge.merger if knowledge is not None else None,
        )
        loader.load_state_dict(
            {"epoch": epoch, "seed": self.config.seed, "position": self.state.position}
        )
        names = [self.config.stages[i].name for i in open_stages(self.plan, self.state.step)]
        self.model.train()
        with (
            Progress(
                total=len(loader),
                initial=self.state.position,
                desc=f"epoch {epoch + 1}/{self.total} ({', '.join(names)})",
                unit="batch",
                enabled=self.config.progress,
            ) as bar,
            contextlib.closing(iter(loader)) as batches,
        ):
            # Closed on a stop too: the loader's producer ends before the checkpoint.
            for inputs, labels, batch in batches:
                loss = self._train_step(knowledge, inputs, labels, batch)
                self.state.loss_sum += loss
                self.state.position += 1
                bar.update(1, loss=f"{loss:.4f}")
                inside = self.state.position < len(loader)
                every = self.config.checkpoint_every
                if inside and self.stop.signum is not None:
                    self._checkpoint()
                    return False
                if inside and every and self.state.position % every == 0:
                    self._checkpoint()
        self.state.epochs.append(
            {"epoch": epoch, "loss": self.state.loss_sum / len(loader), "stages": names}
        )
        return True

    def _train_step(
        self,
        knowledge: _stages.Knowledge | None,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        batch: dict[str, torch.Tensor],
    ) -> float:
        assert self.optimizer is not None
        out = self.model(inputs)
        student = dict(out) if isinstance(out, Mapping) else {"logits": out}
        task = labeled_cross_entropy(
            student["logits"], labels, batch[SAMPLE_ID], self.config.labeled
        )
        loss = task if knowledge is None else knowledge.loss(student, inputs, labels, task, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def _final_model(self) -> nn.Module:
        """A finished run's last model, read back from its stage's file."""
        last = StageRow(**self.state.rows[-1])
        if last.file is None:
            return nn.Identity()
        path = self.out / last.file
        if path.suffix == ".pt2":
            from lyceum.compression.quantization.export import load_int8

            return load_int8(path).module()
        return load_model(self.config.model_spec(), path)

    # -- checkpoints ---------------------------------------------------------------------

    def _checkpoint(self) -> None:
        train: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "objectives": {
                str(i): k.objective.state_dict()
                for i, k in self.knowledge.items()
                if k.objective is not None
            },
            "rng": torch.get_rng_state(),
        }
        model = None if self.state.finished else self.model
        folder = write_checkpoint(self.out, self.state, model, train)
        if self.on_checkpoint is not None:
            self.on_checkpoint(folder, self.state)

    def _restore(self, folder: Path) -> None:
        state, tensors, train = read_checkpoint(folder)
        check_same_run(state.identity, self.state.identity, self.out)
        self.state = state
        if state.finished:
            self.model = self._final_model()
            return
        step = state.step
        started = started_stages(self.plan, step)
        pruned = [i for i in started if self.config.stages[i].kind == "prune"]
        weights = (
            self.stages_dir / self.config.stages[pruned[0]].name / "model.safetensors"
            if pruned
            else None
        )
        self.model = load_model(self.config.model_spec(), weights)
        for i in open_stages(self.plan, step):
            stage = self.config.stages[i]
            if isinstance(stage, QuantizeStage):
                from lyceum.compression.quantization.api import quantize

                self.model = quantize(self.model, stage.scheme, self.example)
                self.qat = stage.scheme.kind == "qat"
            elif isinstance(stage, TrainStage):
                self.knowledge[i] = _stages.build_knowledge(
                    self.config,
                    stage,
                    self.sets["train"],
                    self.stages_dir / stage.name,
                    self.device,
                )
                objective = self.knowledge[i].objective
                if objective is not None:
                    objective.load_state_dict(train["objectives"][str(i)])
        if tensors is not None:
            load_model_tensors(self.model, tensors)
        if state.optimizer_stage is not None:
            self._new_optimizer(state.optimizer_stage)
            assert self.optimizer is not None
            self.optimizer.load_state_dict(train["optimizer"])
        torch.set_rng_state(train["rng"])
