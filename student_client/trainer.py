"""The config-driven student trainer: `train(config)`, `lyceum student train CONFIG.yaml`.

One loop for one process or many: under `torchrun` (WORLD_SIZE > 1) the model is wrapped in
DDP (gloo on CPU, nccl on CUDA) and each rank draws its own shard of ids from a
`DistributedSampler`; every rank asks the teachers for its own shard's knowledge.

Checkpoints (`_checkpoints`: plain state dicts, read back with `weights_only=True`) are
written after every epoch (`epoch-NNN.pt` and `last.pt`) and when a run stops early
(`last.pt`, with the position inside the epoch), so `--resume` continues with the remaining
ids of that epoch. A run stops early, and says so in `TrainResult.ended`:

- on SIGINT or SIGTERM, after the batch in progress (a second signal aborts at once);
- when a teacher stays unavailable mid-epoch, after the last batch it answered: the
  loader's position counts the batches consumed, so the resumed run asks for the rest.
  Before the run's first step there is nothing to save: `TeacherUnavailableError` is raised.

A new run refuses a `checkpoint_dir` that holds another run's checkpoints, unless `resume`
(continue it) or `overwrite` (remove them first). Beside the checkpoints, every one of those
writes rewrites `model.safetensors` (rank 0): the student's weights alone, the file every
command's `--checkpoint` takes.

Under torchrun, `parallel: fsdp` shards the student instead (FSDP2, `_train_parallel`);
checkpoints hold the full state either way. `precision: bf16` autocasts the forward,
`accumulate: N` steps once per N batches, `clip_grad_norm` clips before each step
(`_train_loop`).

A config without teachers is plain supervised training (how a user makes a teacher): the
same loop, checkpoints, resume, DDP and signals, with the task loss alone.

Under DDP every rank fetches its next batch, then the ranks agree whether to stop before the
step (`Distributed.halt`), so all stop at the same batch: a DDP step cannot be skipped on one
rank. A teacher that stays unavailable on one rank therefore stops every rank there; rank 0
writes the checkpoint of the batches all ranks stepped, the failing rank's result carries
the error's text and the others' results name that rank.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lyceum.proto.items import item_inputs
from lyceum.proto.specs import Spec, carry_weights_format, load_dataset, load_model
from lyceum.proto.vocab import Vocabulary
from lyceum.student_client import _checkpoints as checkpoints
from lyceum.student_client._inprocess_config import InProcessTeacherConfig
from lyceum.student_client._lm_task import CausalLMTask, masked_objective, model_vocabulary
from lyceum.student_client._module_paths import StudentFeatures, student_features
from lyceum.student_client._train_env import Distributed, StopSignals, rank_from_env
from lyceum.student_client._train_log import log_teachers
from lyceum.student_client._train_loop import Run, steps_per_epoch
from lyceum.student_client._train_optim import build_optimizer, build_scheduler
from lyceum.student_client._train_parallel import Placement, distribute
from lyceum.student_client._train_results import EpochResult, StepInfo, TrainResult
from lyceum.student_client.inprocess import InProcessTeacher
from lyceum.student_client.loader import DistillLoader
from lyceum.student_client.merger import Merger, Weighted
from lyceum.student_client.online import TeacherTimeouts
from lyceum.student_client.sources import KnowledgeSource, OfflineTeacher, OnlineTeacher
from lyceum.student_client.trainer_config import (
    TeacherConfig,
    TrainConfig,
    load_config,
    validate_config,
)

__all__ = ["EpochResult", "StepInfo", "TrainResult", "build_sources", "train"]


def build_sources(
    config: TrainConfig,
    dataset: torch.utils.data.Dataset | None = None,
    vocab: Vocabulary | None = None,
    device: str | torch.device | None = None,
) -> dict[str, KnowledgeSource]:
    """The teachers of a config as knowledge sources; offline dumps and online teachers in
    index mode are checked against `dataset` (the student's training set), and against the
    student's vocabulary: a teacher's `vocab:`, else `vocab`. In-process teachers learn their
    inputs from `dataset[0]` and run on their own `device`, else on `device` (the student's;
    default: the config's)."""
    sources: dict[str, KnowledgeSource] = {}
    try:
        for name, teacher in config.teachers.items():
            if isinstance(teacher, InProcessTeacherConfig):
                sources[name] = _in_process(name, teacher, dataset, device or config.device)
                continue
            declared = teacher.vocab.vocabulary() if teacher.vocab is not None else vocab
            sources[name] = _source(name, teacher, dataset, declared)
    except BaseException:
        for source in sources.values():
            source.close()
        raise
    return sources


def _source(
    name: str,
    teacher: TeacherConfig,
    dataset: torch.utils.data.Dataset | None,
    vocab: Vocabulary | None,
) -> KnowledgeSource:
    if teacher.dir is not None:
        return OfflineTeacher(teacher.dir, dataset, verify=teacher.verify, vocab=vocab)
    assert teacher.endpoints is not None  # TeacherConfig allows exactly one of the two
    return OnlineTeacher(
        teacher.endpoints,
        mode=teacher.mode,
        credentials=teacher.credential_options(),
        timeouts=TeacherTimeouts(
            timeout_s=teacher.timeout_s, request_timeout_s=teacher.request_timeout_s
        ),
        name=name,
        dataset=dataset,
        vocab=vocab,
    )


def _in_process(
    name: str,
    teacher: InProcessTeacherConfig,
    dataset: torch.utils.data.Dataset | None,
    device: str | torch.device,
) -> InProcessTeacher:
    if dataset is None:
        raise ValueError(
            f"teacher {name!r} runs in this process: build_sources needs the training dataset, "
            f"whose first sample shows the teacher its inputs"
        )
    try:
        return InProcessTeacher.from_spec(
            teacher.model_spec(),
            teacher.checkpoint,
            dataset,
            outputs=teacher.outputs,
            device=teacher.device or device,
            precision=teacher.precision,
            name=name,
        )
    except ValueError as exc:
        raise ValueError(f"config key 'teachers.{name}': {exc}") from None


def _merger(config: TrainConfig) -> Merger:
    # Any: a strategy is a name, a spec or a MergeStrategy object (the merger resolves all).
    strategies: dict[str, Any] = {
        f: Weighted(weights=s) if isinstance(s, dict) else s for f, s in config.merge.items()
    }
    try:
        return Merger(strategies, renames=config.renames)
    except ValueError as exc:  # e.g. a spec that does not import: say which key
        raise ValueError(f"config key 'merge': {exc}") from None


def _dataset(spec: Spec, key: str) -> torch.utils.data.Dataset:
    """The dataset a spec builds, refused when it is empty (an epoch of it would be 0 steps)."""
    dataset = load_dataset(spec)
    if len(dataset) == 0:  # type: ignore[arg-type]  # map-style datasets define __len__
        raise ValueError(
            f"config key '{key}': the dataset {spec} is empty (0 samples); check the spec and "
            f"its arguments ({key}_kwargs: split, path, limit)"
        )
    return dataset


def _features(
    config: TrainConfig, model: nn.Module, train_set: torch.utils.data.Dataset, device: torch.device
) -> StudentFeatures | None:
    """The student wrapped to return the maps the loss terms name by module path, if any."""
    keys: dict[str, str] = {}
    for term in config.losses.terms:
        for key in (term.student,) if isinstance(term.student, str) else term.student:
            keys.setdefault(key, f"losses.terms {term.name!r}: student")
    example = torch.utils.data.default_collate([item_inputs(train_set[0])])
    if isinstance(example, Mapping):
        example = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()
        }
    elif isinstance(example, torch.Tensor):
        example = example.to(device)
    return student_features(model, keys, example)


def train(
    config: TrainConfig | Mapping[str, Any] | str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train the student a config describes; the Python form of `lyceum student train`.

    `config`: a `TrainConfig`, a mapping (validated) or a YAML path. `resume`: continue from
    `checkpoint_dir/last.pt` (mid-epoch if the run stopped early). `overwrite`: start a new
    run in a `checkpoint_dir` that holds another run's checkpoints, removing them (`last.pt`,
    `epoch-*.pt`; nothing else); without `resume` or `overwrite` such a directory is refused.
    `on_step` is called after every loader batch (`StepInfo.stepped`: the optimizer stepped
    after it; every batch unless `accumulate` > 1) for logging and tests.

    Returns how the run ended (`TrainResult.ended`: finished, stopped by a signal, teachers
    unavailable). Raises `TeacherUnavailableError` if the teachers are unavailable before the
    run's first step (nothing to save), `ValueError` for what the user must fix, `OSError`
    (with its path) when a checkpoint cannot be written.
    """
    if isinstance(config, str | Path):
        config = load_config(config)
    elif not isinstance(config, TrainConfig):
        config = validate_config(config)
    # Before DDP starts, so a refusal stops every rank before any waits for the others;
    # under --overwrite only rank 0 removes the old files.
    checkpoints.prepare(
        config.checkpoint_dir, resume=resume, overwrite=overwrite, clear=rank_from_env() == 0
    )
    env = Distributed(config.device)
    try:
        result = _run(config, env, resume, on_step)
    except BaseException as exc:
        # The traceback's frames hold the run (its DDP module, and through it the process
        # group): cleared, so that the group is destroyed here rather than at exit.
        traceback.clear_frames(exc.__traceback__)
        env.close(together=False)
        raise
    env.close(together=True)
    return result


def _run(
    config: TrainConfig,
    env: Distributed,
    resume: bool,
    on_step: Callable[[StepInfo], None] | None,
) -> TrainResult:
    torch.manual_seed(config.seed)
    train_set = _dataset(config.dataset.train_spec(), "dataset.train")
    val_spec = config.dataset.validation_spec()
    val_set = _dataset(val_spec, "dataset.validation") if val_spec is not None else None
    model = load_model(config.model_spec(), config.checkpoint).to(env.device)
    weights_metadata = (
        carry_weights_format(config.checkpoint, config.checkpoint_dir)
        if config.checkpoint_dir is not None and env.rank == 0
        else {}
    )
    sampler: torch.utils.data.Sampler[int] | None = (
        torch.utils.data.DistributedSampler(
            train_set, num_replicas=env.world, rank=env.rank, shuffle=True, seed=config.seed
        )
        if env.enabled
        else None
    )
    merger = _merger(config)  # before the sources: a bad strategy spec fails at once
    causal_lm = config.task == "causal_lm"
    features = _features(config, model, train_set, env.device)  # so does a bad module path
    vocab = model_vocabulary(model) if causal_lm else None
    sources = build_sources(config, train_set, vocab=vocab, device=env.device)
    lm: CausalLMTask | None = None
    try:
        if causal_lm:
            lm = CausalLMTask.for_run(config, model, sources, val_set)
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
            collate_fn=lm.collate if lm is not None else None,
        )
        if env.rank == 0:
            log_teachers(sources, config.dataset.labeled)
        objective = (
            None
            if config.supervised
            else config.losses.objective(loader.merged.knowledge_schema).to(env.device)
        )
        if objective is not None and lm is not None:
            objective = masked_objective(objective)
        student = model if features is None else features
        net = distribute(student, model, env, config.parallel, objective)
        adapters = [] if objective is None else list(objective.parameters())
        optimizer = build_optimizer(config.optimizer, [*model.parameters(), *adapters])
        run = Run(
            config=config,
            env=env,
            model=model,
            net=net,
            objective=objective,
            optimizer=optimizer,
            placement=Placement(net, model, optimizer, env.enabled and config.parallel == "fsdp"),
            scheduler=build_scheduler(
                config.schedule,
                optimizer,
                epochs=config.epochs,
                steps_per_epoch=steps_per_epoch(len(loader), config.accumulate),
            ),
            loader=loader,
            val_set=val_set,
            lm=lm,
            identity=checkpoints.run_identity(config, env.world),
            weights_metadata=weights_metadata,
            result=TrainResult(
                model=model,
                total_epochs=config.epochs,
                batches_per_epoch=len(loader),
                supervised=config.supervised,
            ),
        )
        if resume:
            run.resume()
        with StopSignals() as stop:
            return run.epochs(stop, on_step)
    finally:
        for source in sources.values():
            source.close()
        if lm is not None:
            lm.close()
        if features is not None:  # the student the result hands back runs without hooks
            features.close()
