"""Language-model students: held-out perplexity and KL to the teacher, per KD recipe.

The teacher, tokenizer, data and student are the language-model demo's (`lyceum demo --lm`,
`lyceum.deploy.demo_lm`): a tiny Llama trained on the spot on the Python standard library's
sources, its top-k log-probs of the students' training set dumped once per k, its full
log-probs of held-out modules dumped for the KL. Every recipe trains one student per seed
with the same steps and data order: CE only; CE + KD with forward KL, reverse KL and JSD;
KD only; missing = zero / uniform / tail; k = 8, 32, 128. The goals (issue 15): a KD recipe
beating CE alone on perplexity by more than the seed spread (max - min over the seeds), and
KD only with `tail` within 10% of CE only's perplexity.

A second table says where each recipe's perplexity comes from: the held-out targets split by
whether they lie in the teacher's top-`SPLIT_K` there, the student's mean NLL on each part,
and the probability it puts outside that top-k (the teacher's own figures on the first line).
A top-k KD term without CE never says how to spread the mass outside the top k: this is where
a KD-only student loses to CE.

    .venv/bin/python bench/lm_quality.py                  # ~6 min on two cores
    .venv/bin/python bench/lm_quality.py --only "KD only" --student-epochs 6   # CE only too
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lyceum.deploy.demo_lm import (
    CE_ONLY,
    LMDemoConfig,
    LMRow,
    LMTeacher,
    StudentRecipe,
    lm_table,
    prepare_teacher,
    student_figures,
)
from lyceum.deploy.stdlib_text import stdlib_text

K = 32
SPLIT_K = 32  # the split table's k: the demo's


def _kd(name: str, **keys: object) -> StudentRecipe:
    return StudentRecipe.model_validate({"name": name, "kd_weight": 1.0, **keys})


RECIPES = (
    CE_ONLY,
    _kd(f"CE + KD forward_kl, tail, k={K}"),
    _kd(f"CE + KD reverse_kl, tail, k={K}", divergence="reverse_kl"),
    _kd(f"CE + KD jsd, tail, k={K}", divergence="jsd"),
    _kd(f"KD only forward_kl, tail, k={K}", task_weight=0.0),
    _kd(f"KD only forward_kl, uniform, k={K}", task_weight=0.0, missing="uniform"),
    _kd(f"KD only forward_kl, zero, k={K}", task_weight=0.0, missing="zero"),
    _kd("KD only forward_kl, tail, k=128", task_weight=0.0, topk=128),
    _kd("KD only forward_kl, uniform, k=128", task_weight=0.0, missing="uniform", topk=128),
    _kd(f"CE + KD forward_kl, zero, k={K}", missing="zero"),
    _kd(f"CE + KD forward_kl, uniform, k={K}", missing="uniform"),
    _kd("CE + KD forward_kl, tail, k=8", topk=8),
    _kd("CE + KD forward_kl, tail, k=128", topk=128),
)


@dataclass(frozen=True)
class Split:
    """A model's held-out figures split by the teacher's top-k at each position."""

    outside: float  # share of the targets outside the teacher's top-k
    nll_in: float  # mean NLL of the targets inside it
    nll_out: float  # mean NLL of the targets outside it
    mass_out: float  # mean probability the model puts outside it


@torch.no_grad()
def _split(model: nn.Module, teacher: LMTeacher, k: int) -> Split:
    """`model`'s held-out NLL on the targets in / outside the teacher's top-k, computed on the
    teacher model's own logits (the same positions as the trainer's perplexity: every target
    of the fixed-length held-out sequences)."""
    val = stdlib_text(**teacher.data("val"))
    ids = torch.stack([val[i]["input_ids"] for i in range(len(val))])
    model.eval()
    log_q = F.log_softmax(model(input_ids=ids).logits.float(), -1)[:, :-1]
    log_p = F.log_softmax(teacher.model(input_ids=ids).logits.float(), -1)[:, :-1]
    target = ids[:, 1:, None]
    nll = -log_q.gather(-1, target)[..., 0]
    top = log_p.topk(k, -1).indices
    inside = (top == target).any(-1)
    mass_out = log_q.exp().scatter(-1, top, 0.0).sum(-1)
    return Split(
        outside=float((~inside).float().mean()),
        nll_in=float(nll[inside].mean()),
        nll_out=float(nll[~inside].mean()),
        mass_out=float(mass_out.mean()),
    )


def _split_table(splits: dict[str, list[Split]]) -> str:
    """Mean over the seeds of each recipe's split, the teacher's first."""
    outside = next(iter(splits.values()))[0].outside
    lines = [
        f"| run | NLL, targets in the teacher's top-{SPLIT_K} ({1 - outside:.0%}) | "
        f"NLL, targets outside it ({outside:.0%}) | probability outside it |",
        "| --- | --- | --- | --- |",
    ]
    for name, runs in splits.items():
        figures = [statistics.mean(getattr(r, f) for r in runs) for f in ("nll_in", "nll_out")]
        mass = statistics.mean(r.mass_out for r in runs)
        lines.append(f"| {name} | {figures[0]:.3f} | {figures[1]:.3f} | {mass:.3f} |")
    return "\n".join(lines)


def _goals(rows: dict[str, LMRow]) -> list[str]:
    """The issue's two goals, one line each for what the run measured: figures and met / not."""
    ce = rows.get(CE_ONLY.name)
    if ce is None:
        return []
    lines = []
    kd = [r for name, r in rows.items() if name not in ("teacher", CE_ONLY.name)]
    with_ce = [r for r in kd if r.name.startswith("CE + KD")]
    if with_ce:
        best = min(with_ce, key=lambda r: r.mean_perplexity)
        margin = ce.mean_perplexity - best.mean_perplexity
        spread = max(ce.perplexity_spread, best.perplexity_spread)
        beat = "met" if margin > spread else "not met"
        lines.append(
            f"- best CE + KD recipe vs CE only: {best.name}, perplexity "
            f"{best.mean_perplexity:.1f} vs {ce.mean_perplexity:.1f} ({margin:+.1f} better), "
            f"seed spread {spread:.1f}: {beat}"
        )
    for only in (r for r in kd if r.name.startswith("KD only") and ", tail," in r.name):
        ratio = only.mean_perplexity / ce.mean_perplexity
        within = "met" if ratio <= 1.10 else "not met"
        lines.append(
            f"- {only.name} vs CE only: perplexity {only.mean_perplexity:.1f} vs "
            f"{ce.mean_perplexity:.1f} ({ratio:.3f}x, goal <= 1.10x): {within}"
        )
    return lines


def _recipes(only: list[str] | None) -> list[StudentRecipe]:
    """CE only (what every goal compares with) and the recipes naming any of `only`."""
    if not only:
        return list(RECIPES)
    chosen = [r for r in RECIPES if r is CE_ONLY or any(word in r.name for word in only)]
    if len(chosen) == 1:
        names = "; ".join(r.name for r in RECIPES)
        raise SystemExit(
            f"--only {only}: no recipe's name contains any of them; the names: {names}"
        )
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    defaults = LMDemoConfig()
    parser.add_argument("--student-epochs", type=int, default=defaults.student_epochs, metavar="N")
    parser.add_argument("--teacher-epochs", type=int, default=defaults.teacher_epochs, metavar="N")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="WORDS",
        help='run CE only and the recipes whose name contains any of these (e.g. "KD only")',
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    recipes = _recipes(args.only)
    torch.set_num_threads(args.threads)
    config = LMDemoConfig(
        seeds=tuple(args.seeds),
        student_epochs=args.student_epochs,
        teacher_epochs=args.teacher_epochs,
    )
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {line}", file=sys.stderr, flush=True)

    rows: dict[str, LMRow] = {}
    splits: dict[str, list[Split]] = {}
    with tempfile.TemporaryDirectory(prefix="lyceum-lm-quality-") as tmp:
        teacher = prepare_teacher(config, Path(tmp), log)
        rows["teacher"] = LMRow("teacher", (0,), [teacher.perplexity], [None])
        splits["teacher"] = [_split(teacher.model, teacher, SPLIT_K)]
        for recipe in recipes:
            figures, splits[recipe.name] = [], []
            for seed in config.seeds:
                run = teacher.train_run(recipe, seed)
                figures.append(student_figures(recipe, run))
                splits[recipe.name].append(_split(run.model, teacher, SPLIT_K))
                log(f"{recipe.name}, seed {seed}: perplexity {figures[-1][0]:.1f}")
            rows[recipe.name] = LMRow(
                recipe.name, config.seeds, [p for p, _ in figures], [k for _, k in figures]
            )
    print(
        f"teacher {config.teacher_hidden} wide, {config.teacher_layers} layers, "
        f"{config.teacher_epochs} epoch(s) of {config.teacher_sequences} sequences; student "
        f"{config.student_hidden} wide, {config.student_layers} layer(s), "
        f"{config.student_epochs} epoch(s) of {config.train_sequences} sequences of "
        f"{config.seq_len} tokens; vocab {config.vocab}"
    )
    print(lm_table(list(rows.values())))
    print()
    print(_split_table(splits))
    print()
    print("\n".join(_goals(rows)))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
