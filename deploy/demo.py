"""The main job (`lyceum demo`): distillation on scikit-learn's digits, end to end.

A teacher CNN trains on the training split and dumps its knowledge offline (sharded Arrow
files). A small MLP student then trains twice with the same steps and seeds: from scratch on
the few labels it has, and distilled from the teacher's knowledge, which covers every
training input (the transfer set). That is the setting where distillation earns its keep: with
every label available the gain was within noise (-0.8 to +0.8 points) when we measured it.

The compression rows are PaddleSlim's hybrid table (baseline, distilled, distilled + int8,
pruned -50% FLOPs, pruned + int8, each with its size on disk), made by `lyceum compress`
from the pipeline configs in `deploy/configs/` (`_demo_pipelines`), starting from the first
seed's scratch student.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lyceum.compression.training import train_steps
from lyceum.deploy._demo_pipelines import HybridRow, hybrid_rows
from lyceum.deploy.examples import Digits, digits, student_mlp, teacher_cnn, train_classifier
from lyceum.deploy.launcher import start_teacher
from lyceum.proto.evaluation import top1_accuracy
from lyceum.proto.manifest import model_identity
from lyceum.proto.specs import WEIGHTS_FILE
from lyceum.student_client._checkpoints import save_weights
from lyceum.student_client.losses import SoftLabelKD
from lyceum.student_client.offline import OfflineKnowledge
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

if TYPE_CHECKING:
    from lyceum.student_client.trainer_config import TrainConfig

_DIGITS = "lyceum.deploy.examples:digits"


class DemoConfig(BaseModel):
    """Settings of the demo; the defaults are what `make demo` runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seeds: tuple[int, ...] = Field(default=(0, 1, 2), description="One student run per seed.")
    steps: int = Field(default=600, gt=0, description="Optimizer steps per student run.")
    labeled: int = Field(default=100, gt=0, description="Training labels the student may use.")
    batch_size: int = Field(default=32, gt=0, description="Labelled samples per step.")
    transfer_batch: int = Field(default=64, gt=0, description="Transfer-set samples per step.")
    temperature: float = Field(default=4.0, gt=0, description="Distillation temperature.")
    kd_weight: float = Field(default=1.0, ge=0, description="Weight of the KD term.")
    teacher_width: int = Field(default=16, gt=0, description="Teacher CNN width (channels).")
    teacher_epochs: int = Field(default=10, gt=0, description="Teacher training epochs.")
    trainer_epochs: int = Field(
        default=30, gt=0, description="Epochs of the trainer-driven students (ensemble rows)."
    )
    workdir: Path | None = Field(default=None, description="Where knowledge is dumped (temp dir).")


@dataclass
class DemoRow:
    name: str
    accuracy: float
    per_seed: list[float] = field(default_factory=list)
    note: str = ""


@dataclass
class DemoResult:
    rows: list[DemoRow]
    hybrid: list[HybridRow]  # PaddleSlim's hybrid table, from the two demo pipelines
    seed: int  # the hybrid table's: the first of the seeds
    knowledge_bytes: int
    knowledge_rows: int
    seconds: float

    def table(self) -> str:
        lines = [
            f"{'model':<46} {'test acc':>9}  {'per seed':<18} note",
            f"{'-' * 46} {'-' * 9}  {'-' * 18} {'-' * 30}",
        ]
        for r in self.rows:
            seeds = " ".join(f"{a * 100:.1f}" for a in r.per_seed)
            lines.append(f"{r.name:<46} {r.accuracy * 100:>8.1f}%  {seeds:<18} {r.note}".rstrip())
        lines += [
            "",
            f"compression with `lyceum compress` (seed {self.seed}; deploy/configs/"
            f"demo_distill_quant.yaml, demo_prune_quant.yaml)",
            f"{'model':<34} {'test acc':>9}  {'size on disk':<28} {'MACs':>6}  from run/stage",
            f"{'-' * 34} {'-' * 9}  {'-' * 28} {'-' * 6}  {'-' * 20}",
            *(r.line() for r in self.hybrid),
            "",
        ]
        lines.append(
            f"knowledge on disk: {self.knowledge_bytes / 1024:.1f} KiB for {self.knowledge_rows} "
            f"samples ({self.knowledge_bytes / max(self.knowledge_rows, 1):.0f} B/sample)"
        )
        lines.append(f"wall time: {self.seconds:.1f} s")
        return "\n".join(lines)


KDTerm = Callable[[nn.Module, torch.Generator], torch.Tensor]


def _train_student(
    config: DemoConfig,
    seed: int,
    labeled: Digits,
    kd: KDTerm | None,
    student: nn.Module | None = None,
    steps: int | None = None,
    lr: float = 1e-2,
) -> nn.Module:
    """Same steps, batches and seed for every student; `kd` adds the distillation term.

    Trains a fresh MLP, or continues training `student` (fine-tuning after compression), in
    the one training loop (`train_steps`): each step draws `batch_size` labelled samples
    with replacement, and the generator of its distillation term's transfer batch."""
    torch.manual_seed(seed)
    student = student if student is not None else student_mlp(hidden=32)
    g = torch.Generator().manual_seed(seed)
    images, labels = labeled.images, labeled.labels
    total = steps or config.steps

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Generator]]:
        for _ in range(total):
            pick = torch.randint(0, len(labels), (config.batch_size,), generator=g)
            # Drawn with or without a KD term, so that both students see the same batches.
            kd_seed = int(torch.randint(0, 2**31, (1,), generator=g))
            yield images[pick], labels[pick], torch.Generator().manual_seed(kd_seed)

    def step_loss(
        model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Generator]
    ) -> torch.Tensor:
        x, y, kd_g = batch
        loss = nn.functional.cross_entropy(model(x), y)
        return loss if kd is None else loss + config.kd_weight * kd(model, kd_g)

    train_steps(student, batches(), step_loss, lr=lr, total=total, progress=False)
    return student


def demo_student_config(
    teachers: Mapping[str, Mapping[str, Any]],
    *,
    labeled: int = 100,
    epochs: int = 30,
    batch_size: int = 64,
    temperature: float = 4.0,
    kd_weight: float = 1.0,
    lr: float = 1e-2,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> TrainConfig:
    """The demo's distilled student as a `lyceum student train` config: `student_mlp` on
    digits, every training input in the transfer set (the teachers' soft labels), only ids
    < `labeled` contributing their labels, teachers' logits merged with `mean`.

    `teachers` maps a name to a teacher entry of the config (`{"endpoints": [...], "mode":
    "index"}` or `{"dir": ...}`).
    """
    from lyceum.student_client.trainer_config import validate_config

    return validate_config(
        {
            "model": "lyceum.deploy.examples:student_mlp",
            "model_kwargs": {"hidden": 32},
            "dataset": {
                "train": _DIGITS,
                "train_kwargs": {"split": "train"},
                "validation": _DIGITS,
                "validation_kwargs": {"split": "val"},
                "labeled": labeled,
            },
            "teachers": {name: dict(entry) for name, entry in teachers.items()},
            "merge": {"logits": "mean"},
            "losses": {
                "terms": [
                    {
                        "name": "kd",
                        "kind": "soft_label",
                        "field": "logits",
                        "weight": kd_weight,
                        "temperature": temperature,
                    }
                ]
            },
            "optimizer": {"name": "adam", "lr": lr},
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
            "progress": progress,
        },
        "demo_student_config",
    )


@contextlib.contextmanager
def start_ensemble(
    checkpoints: Sequence[str | Path],
    knowledge_dir: str | Path,
    teacher_model: str = "lyceum.deploy.examples:teacher_cnn",
) -> Iterator[dict[str, dict[str, Any]]]:
    """Serve two teacher checkpoints on loopback, the first over gRPC, the second over
    ZeroMQ (index mode: the servers read the digits themselves); yields the three teacher
    entries (`grpc`, `zmq`, `offline` = `knowledge_dir`) of a student config. The servers
    are always stopped when the block ends."""
    if len(checkpoints) != 2:
        raise ValueError(
            f"start_ensemble: expected 2 teacher checkpoints (one gRPC server, one ZeroMQ "
            f"server), got {len(checkpoints)}"
        )
    with (
        start_teacher(teacher_model, dataset=_DIGITS, checkpoint=checkpoints[0]) as over_grpc,
        start_teacher(
            teacher_model, dataset=_DIGITS, checkpoint=checkpoints[1], grpc=False, zmq=True
        ) as over_zmq,
    ):
        yield {
            "grpc": {"endpoints": [over_grpc.endpoint("grpc")], "mode": "index"},
            "zmq": {"endpoints": [over_zmq.endpoint("zmq")], "mode": "index"},
            "offline": {"dir": str(knowledge_dir)},
        }


def _ensemble_rows(
    config: DemoConfig, train: Digits, test: Digits, knowledge_dir: Path, workdir: Path
) -> tuple[list[float], list[float]]:
    """Students trained by the config-driven trainer, from the offline teacher alone and from
    three teachers (two more trained with other seeds, served by real server processes)."""
    from safetensors.torch import save_file

    from lyceum.student_client.trainer import train as train_student

    checkpoints = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teacher = train_classifier(
            teacher_cnn(width=config.teacher_width),
            train,
            epochs=config.teacher_epochs,
            lr=3e-3,
            seed=seed,
        )
        path = workdir / f"teacher-{seed}.safetensors"
        save_file(teacher.state_dict(), str(path))
        checkpoints.append(path)

    def run(teachers: Mapping[str, Mapping[str, Any]]) -> list[float]:
        return [
            top1_accuracy(
                train_student(
                    demo_student_config(
                        teachers, labeled=config.labeled, epochs=config.trainer_epochs, seed=s
                    )
                ).model,
                test,
            )
            for s in config.seeds
        ]

    single = run({"offline": {"dir": str(knowledge_dir)}})
    spec = f'lyceum.deploy.examples:teacher_cnn{{"width": {config.teacher_width}}}'
    with start_ensemble(checkpoints, knowledge_dir, spec) as teachers:
        ensemble = run(teachers)
    return single, ensemble


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    start = time.perf_counter()
    train, test = digits("train"), digits("test")
    labeled = digits("train", limit=config.labeled)

    log(f"[1/6] training the teacher CNN on {len(train)} labelled digits")
    torch.manual_seed(0)
    teacher = train_classifier(
        teacher_cnn(width=config.teacher_width), train, epochs=config.teacher_epochs, lr=3e-3
    )
    teacher_acc = top1_accuracy(teacher, test)

    with (
        tempfile.TemporaryDirectory(prefix="lyceum-demo-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = config.workdir or Path(tmp)
        knowledge_dir = workdir / "knowledge"
        log(f"[2/6] dumping the teacher's knowledge of the transfer set to {knowledge_dir}")
        engine = TeacherEngine(teacher, EngineConfig(), train[0][0])
        manifest = dump_knowledge(
            engine,
            train,
            knowledge_dir,
            DumpConfig(batch_size=256, shard_rows=512, workers=0, progress=False),
            model_identity(
                f'lyceum.deploy.examples:teacher_cnn{{"width": {config.teacher_width}}}', teacher
            ),
        )
        engine.close()
        knowledge = stack.enter_context(OfflineKnowledge(knowledge_dir, dataset=train))
        transfer = train.images
        field = knowledge.schema.fields[0]
        kd_loss = SoftLabelKD.for_field(field, temperature=config.temperature)

        def kd_term(student: nn.Module, g: torch.Generator) -> torch.Tensor:
            ids = torch.randint(0, len(train), (config.transfer_batch,), generator=g)
            batch = knowledge.get(ids.tolist())
            return kd_loss(student(transfer[ids]), batch.tensors[field.name])

        log(
            f"[3/6] training students ({config.steps} steps, {config.labeled} labels, seeds "
            f"{list(config.seeds)}): from scratch and distilled"
        )
        scratch_models = [_train_student(config, s, labeled, None) for s in config.seeds]
        scratch = [top1_accuracy(m, test) for m in scratch_models]
        distilled = [
            top1_accuracy(_train_student(config, s, labeled, kd_term), test) for s in config.seeds
        ]

        log(
            "[4/6] training students with `lyceum student train`: from the offline teacher, "
            "and from an ensemble of three (gRPC server + ZeroMQ server + offline, mean)"
        )
        single, ensemble = _ensemble_rows(config, train, test, knowledge_dir, workdir)

        # The hybrid table starts from the first seed's scratch student: its weights file is
        # the first pipeline's checkpoint.
        scratch_file = workdir / "scratch" / WEIGHTS_FILE
        scratch_file.parent.mkdir(parents=True, exist_ok=True)
        save_weights(scratch_file, scratch_models[0])
        hybrid = hybrid_rows(
            workdir,
            scratch=scratch_file,
            knowledge_dir=knowledge_dir,
            labeled=config.labeled,
            seed=config.seeds[0],
            log=log,
        )
        knowledge_bytes = manifest.bytes
        rows = manifest.rows

    def row(name: str, accs: list[float], note: str = "") -> DemoRow:
        return DemoRow(name, statistics.mean(accs), accs, note)

    gain = 100 * (statistics.mean(distilled) - statistics.mean(scratch))
    rows_out = [
        row("teacher CNN (all labels)", [teacher_acc]),
        row(f"student MLP, scratch ({config.labeled} labels)", scratch),
        row("student MLP, distilled (offline knowledge)", distilled, f"gain {gain:+.1f} points"),
        row("trainer: 1 teacher (offline)", single, "same recipe as the next row"),
        row(
            "trainer: 3 teachers (gRPC + ZMQ + offline)",
            ensemble,
            f"ensemble gain {100 * (statistics.mean(ensemble) - statistics.mean(single)):+.1f}",
        ),
    ]
    return DemoResult(
        rows_out, hybrid, config.seeds[0], knowledge_bytes, rows, time.perf_counter() - start
    )
