"""The language-model demo (`lyceum demo --lm`): distilling a causal LM on local text.

A byte-level BPE is trained on the Python standard library's sources (`stdlib_text`), a tiny
Llama teacher is trained on the spot on sequences of that text (`lyceum.student_client.train`,
`task: causal_lm`, no teachers), and its top-k log-probs of the training set are dumped
through the offline dump path (`dump_knowledge`), with its full log-probs of the held-out
set beside them. A smaller Llama student then trains with the same steps and seeds, on
cross-entropy alone and on cross-entropy plus top-k KD from the dump; every run reports its
held-out perplexity and its KL(teacher || student) over the held-out positions, exact (the
held-out dump is dense).

`LMTeacher` (`prepare_teacher`) and `StudentRecipe` are the pieces `bench/lm_quality.py`
runs its grid of recipes with, so that the demo and the bench share one teacher and one
student configuration.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from lyceum.deploy.stdlib_text import TextSplit, stdlib_text, train_tokenizer
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import model_identity
from lyceum.student_client import (
    CausalLMTask,
    Divergence,
    TrainConfig,
    TrainResult,
    train,
    validate_config,
)
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine

__all__ = [
    "CE_ONLY",
    "LMDemoConfig",
    "LMDemoResult",
    "LMRow",
    "LMTeacher",
    "StudentRecipe",
    "demo_rows",
    "lm_table",
    "prepare_teacher",
    "run_lm_demo",
    "student_figures",
]

_TEXT = "lyceum.deploy.stdlib_text:stdlib_text"
_LLAMA = "lyceum.deploy.examples:tiny_llama"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class LMDemoConfig(BaseModel):
    """Settings of the language-model demo; the defaults are what `make demo-lm` runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seeds: tuple[int, ...] = Field(
        default=(0, 1, 2), min_length=1, description="One student run per seed and recipe."
    )
    vocab: int = Field(default=1024, ge=258, description="Ids of the BPE trained on the text.")
    seq_len: int = Field(default=64, gt=1, description="Tokens per sequence (sample).")
    teacher_sequences: int = Field(
        default=6144, gt=0, description="Sequences the teacher trains on (the text's first ones)."
    )
    train_sequences: int = Field(
        default=1024,
        gt=0,
        description="Sequences every student trains on, the first of the teacher's: the "
        "transfer set its knowledge is dumped for.",
    )
    val_sequences: int = Field(
        default=128, gt=0, description="Held-out sequences, from held-out stdlib modules."
    )
    batch_size: int = Field(default=32, gt=0, description="Sequences per optimizer step.")
    teacher_hidden: int = Field(default=64, gt=0, description="Teacher width (hidden size).")
    teacher_layers: int = Field(default=2, gt=0, description="Teacher transformer layers.")
    teacher_epochs: int = Field(
        default=3,
        gt=0,
        description="Teacher training epochs. At 1 the teacher (held-out perplexity ~137) "
        "keeps only 58% of its held-out mass in its top 32, too little for a top-k student "
        "without cross-entropy; at 3 (~76), 76%.",
    )
    student_hidden: int = Field(default=32, gt=0, description="Student width (hidden size).")
    student_layers: int = Field(default=1, gt=0, description="Student transformer layers.")
    student_epochs: int = Field(default=2, gt=0, description="Epochs of every student run.")
    lr: float = Field(default=1e-2, gt=0, description="Adam learning rate (cosine to 0).")
    topk: int = Field(default=32, gt=0, description="Top-k log-probs the teacher dumps.")
    workdir: Path | None = Field(
        default=None, description="Where the tokenizer, dumps and runs go (a temp dir)."
    )

    @model_validator(mode="after")
    def _students_text_is_the_teachers(self) -> LMDemoConfig:
        if self.train_sequences > self.teacher_sequences:
            raise ValueError(
                f"train_sequences {self.train_sequences} > teacher_sequences "
                f"{self.teacher_sequences}: the students' text is the first of the teacher's; "
                f"raise teacher_sequences or lower train_sequences"
            )
        return self


class StudentRecipe(BaseModel):
    """How a student learns: cross-entropy alone (`kd_weight` 0), or with a top-k KD term."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The table's name of the run.")
    task_weight: float = Field(default=1.0, ge=0, description="Weight of the cross-entropy.")
    kd_weight: float = Field(default=0.0, ge=0, description="Weight of the KD term; 0: none.")
    topk: int | None = Field(default=None, gt=0, description="k of the dump; None: the config's.")
    missing: Literal["zero", "uniform", "tail"] = Field(
        default="tail", description="The dropped ids' probability (see TopKTerm.missing)."
    )
    divergence: Divergence = Field(default="forward_kl", description="The KD divergence.")


CE_ONLY = StudentRecipe(name="CE only")


@dataclass
class LMRow:
    """A table row: one figure per seed (`kl` None where there is no teacher to compare)."""

    name: str
    seeds: tuple[int, ...]
    perplexity: list[float]
    kl: list[float | None] = field(default_factory=list)

    @property
    def mean_perplexity(self) -> float:
        return statistics.mean(self.perplexity)

    @property
    def perplexity_spread(self) -> float:
        """max - min over the seeds: what a difference must exceed to be more than noise."""
        return max(self.perplexity) - min(self.perplexity)

    @property
    def mean_kl(self) -> float | None:
        known = [k for k in self.kl if k is not None]
        return statistics.mean(known) if known and len(known) == len(self.kl) else None


def _figure(values: Sequence[float | None], digits: int) -> str:
    known = [v for v in values if v is not None]
    if not known or len(known) != len(values):
        return "-"
    mean = f"{statistics.mean(known):.{digits}f}"
    if len(known) == 1:
        return mean
    return f"{mean} ({' / '.join(f'{v:.{digits}f}' for v in known)})"


def lm_table(rows: Sequence[LMRow]) -> str:
    """A Markdown table: run | seeds | held-out perplexity | KL to the teacher; each figure
    is the mean over the seeds, the per-seed figures in brackets."""
    lines = [
        "| run | seed(s) | held-out perplexity | KL to teacher |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        seeds = " ".join(map(str, r.seeds))
        lines.append(f"| {r.name} | {seeds} | {_figure(r.perplexity, 1)} | {_figure(r.kl, 3)} |")
    return "\n".join(lines)


@dataclass
class LMTeacher:
    """What every student run shares: the tokenizer, the trained teacher and its dumps."""

    config: LMDemoConfig
    workdir: Path
    tokenizer: Path
    model: nn.Module
    perplexity: float
    val_dump: Path
    dumps: dict[int, Path] = field(default_factory=dict)

    def data(self, split: TextSplit) -> dict[str, Any]:
        """The `stdlib_text` kwargs of a split."""
        return _data(self.config, self.tokenizer, split)

    def dump(self, k: int) -> Path:
        """The teacher's top-k log-probs of the training set, dumped once per k."""
        if k not in self.dumps:
            out = self.workdir / f"knowledge-top{k}"
            self.dumps[k] = _dump(self.model, self.config, self.tokenizer, "train", k, out)
        return self.dumps[k]

    def student_config(self, recipe: StudentRecipe, seed: int) -> TrainConfig:
        """A student's `lyceum student train` config: `recipe` with seed `seed`."""
        c = self.config
        raw: dict[str, Any] = {
            **_lm_run(c, self.tokenizer, seed),
            "lm": {"validation_teacher": str(self.val_dump)},
        }
        if recipe.kd_weight > 0:
            k = recipe.topk or c.topk
            vocab = {"size": c.vocab, "tokenizer": str(self.tokenizer)}
            raw["teachers"] = {"llama": {"dir": str(self.dump(k)), "vocab": vocab}}
            raw["losses"] = {
                "task_weight": recipe.task_weight,
                "terms": [
                    {
                        "name": "kd",
                        "kind": "topk",
                        "field": "logits",
                        "weight": recipe.kd_weight,
                        "missing": recipe.missing,
                        "divergence": recipe.divergence,
                    }
                ],
            }
        elif recipe.task_weight == 0:
            raise ValueError(
                f"recipe {recipe.name!r}: task_weight and kd_weight are both 0, nothing would "
                f"train the student; give one of them > 0"
            )
        return validate_config(raw, f"student {recipe.name!r}")

    def train_student(self, recipe: StudentRecipe, seed: int) -> tuple[float, float | None]:
        """(held-out perplexity, KL to the teacher) of a student trained by `recipe`."""
        return student_figures(recipe, self.train_run(recipe, seed))

    def train_run(self, recipe: StudentRecipe, seed: int) -> TrainResult:
        """The whole run of a student trained by `recipe` (the model included, for analyses
        beyond the figures `train_student` gives)."""
        return train(self.student_config(recipe, seed))

    def untrained(self, seed: int) -> tuple[float, float | None]:
        """The figures of a student before its first step (what training must improve on)."""
        config = self.student_config(CE_ONLY, seed)
        model = tiny_llama_from(config)
        val_set = stdlib_text(**self.data("val"))
        task = CausalLMTask.for_run(config, model, {}, val_set)
        try:
            figures = task.validate(model, val_set, config.batch_size, torch.device("cpu"))
        finally:
            task.close()
        return figures.perplexity, figures.kl


def student_figures(recipe: StudentRecipe, run: TrainResult) -> tuple[float, float | None]:
    """(held-out perplexity, KL to the teacher) of a student run's last epoch."""
    last = run.epochs[-1]
    if last.val_perplexity is None:
        raise ValueError(f"student {recipe.name!r}: the run reported no perplexity")
    return last.val_perplexity, last.val_kl


def tiny_llama_from(config: TrainConfig) -> nn.Module:
    """The (untrained) model of a student config, as the trainer would build it."""
    from lyceum.deploy.examples import tiny_llama

    return tiny_llama(**config.model_kwargs)


def _data(
    config: LMDemoConfig, tokenizer: Path, split: TextSplit, teacher: bool = False
) -> dict[str, Any]:
    """The `stdlib_text` kwargs of a split (training: the teacher's, or the students')."""
    n = config.val_sequences
    if split == "train":
        n = config.teacher_sequences if teacher else config.train_sequences
    return {"tokenizer": str(tokenizer), "split": split, "n": n, "seq_len": config.seq_len}


def _lm_run(
    c: LMDemoConfig, tokenizer: Path, seed: int, *, teacher: bool = False
) -> dict[str, Any]:
    """The keys a teacher's and a student's training configs share."""
    return {
        "task": "causal_lm",
        "model": _LLAMA,
        "model_kwargs": {
            "vocab": c.vocab,
            "layers": c.teacher_layers if teacher else c.student_layers,
            "hidden": c.teacher_hidden if teacher else c.student_hidden,
            "heads": 4,
            "seed": seed,
        },
        "dataset": {
            "train": _TEXT,
            "train_kwargs": _data(c, tokenizer, "train", teacher),
            "validation": _TEXT,
            "validation_kwargs": _data(c, tokenizer, "val"),
        },
        "optimizer": {"name": "adam", "lr": c.lr},
        "schedule": {"name": "cosine"},
        "epochs": c.teacher_epochs if teacher else c.student_epochs,
        "batch_size": c.batch_size,
        "seed": seed,
        "progress": False,
    }


def _dump(
    model: nn.Module,
    config: LMDemoConfig,
    tokenizer: Path,
    split: TextSplit,
    k: int | None,
    out: Path,
) -> Path:
    """The teacher's log-probs of a split (top-k, or every id with `k` None), dumped to `out`."""
    data = stdlib_text(**_data(config, tokenizer, split))
    engine_config = EngineConfig(
        outputs=(OutputSpec.parse("logits=@output.logits"),),
        topk=k,
        values="log_probs",
        tokenizer=tokenizer,
    )
    engine = TeacherEngine(model, engine_config, item_inputs(data[0]))
    try:
        dump_knowledge(
            engine,
            data,
            out,
            DumpConfig(batch_size=64, workers=0, progress=False),
            model_identity(_LLAMA, model),
        )
    finally:
        engine.close()
    return out


def prepare_teacher(
    config: LMDemoConfig, workdir: Path, log: Callable[[str], None] = _stderr
) -> LMTeacher:
    """Train the tokenizer and the teacher, dump its held-out log-probs (dense) and its
    top-`config.topk` knowledge of the training set."""
    log(f"training a byte-level BPE of {config.vocab} ids on the stdlib sources")
    tokenizer = train_tokenizer(workdir / "tokenizer.json", config.vocab)
    log(
        f"training the teacher Llama (hidden {config.teacher_hidden}, {config.teacher_layers} "
        f"layers) for {config.teacher_epochs} epoch(s) of {config.teacher_sequences} sequences of "
        f"{config.seq_len} tokens"
    )
    raw = _lm_run(config, tokenizer, 0, teacher=True)
    result = train(validate_config(raw, "the demo's teacher"))
    model = result.model.eval()
    log(f"dumping its log-probs: held-out (every id) and training set (top-{config.topk})")
    val_dump = _dump(model, config, tokenizer, "val", None, workdir / "knowledge-val")
    perplexity = result.epochs[-1].val_perplexity or float("nan")
    teacher = LMTeacher(config, workdir, tokenizer, model, perplexity, val_dump)
    teacher.dump(config.topk)
    return teacher


@dataclass
class LMDemoResult:
    rows: list[LMRow]
    seconds: float

    def table(self) -> str:
        return f"{lm_table(self.rows)}\n\nwall time: {self.seconds:.1f} s"


def demo_rows(teacher: LMTeacher, log: Callable[[str], None] = _stderr) -> list[LMRow]:
    """The demo's rows: the teacher, untrained students, CE-only and CE + top-k KD students."""
    config, seeds = teacher.config, teacher.config.seeds
    kd = StudentRecipe(name=f"CE + top-{config.topk} KD (forward KL, tail)", kd_weight=1.0)
    rows = [
        LMRow(
            f"teacher (hidden {config.teacher_hidden}, {config.teacher_layers} layers)",
            (0,),
            [teacher.perplexity],
            [None],  # the reference the others' KL is measured to
        )
    ]
    untrained = [teacher.untrained(s) for s in seeds]
    rows.append(
        LMRow("student, untrained", seeds, [p for p, _ in untrained], [k for _, k in untrained])
    )
    for recipe in (CE_ONLY, kd):
        log(f"training students: {recipe.name}, seeds {list(seeds)}")
        figures = [teacher.train_student(recipe, s) for s in seeds]
        rows.append(
            LMRow(
                f"student, {recipe.name}", seeds, [p for p, _ in figures], [k for _, k in figures]
            )
        )
    return rows


def run_lm_demo(config: LMDemoConfig, log: Callable[[str], None] = _stderr) -> LMDemoResult:
    """Train the tokenizer, the teacher and the students; the table's rows and the wall time."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lyceum-demo-lm-") as tmp:
        teacher = prepare_teacher(config, config.workdir or Path(tmp), log)
        rows = demo_rows(teacher, log)
    return LMDemoResult(rows, time.perf_counter() - start)
