"""Language-model students: held-out perplexity and KL to the teacher, per KD recipe.

The teacher, tokenizer, data and student are the language-model demo's (`lyceum demo --lm`,
`lyceum.deploy.demo_lm`): a tiny Llama trained on the spot on the Python standard library's
sources, its top-k log-probs of the students' training set dumped once per k, its full
log-probs of held-out modules dumped for the KL. Every recipe trains one student per seed
with the same steps and data order: CE only; CE + KD with forward KL, reverse KL and JSD;
KD only; missing = zero / uniform / tail; k = 8, 32, 128. The goals (issue 15): a KD recipe
beating CE alone on perplexity by more than the seed spread (max - min over the seeds), and
KD only with `tail` within 10% of CE only's perplexity.

    .venv/bin/python bench/lm_quality.py                  # ~30 min on two loaded cores
    .venv/bin/python bench/lm_quality.py --seeds 0 1 --student-epochs 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from lyceum.deploy.demo_lm import (
    CE_ONLY,
    LMDemoConfig,
    LMRow,
    StudentRecipe,
    lm_table,
    prepare_teacher,
)

K = 32


def _kd(name: str, **keys: object) -> StudentRecipe:
    return StudentRecipe.model_validate({"name": name, "kd_weight": 1.0, **keys})


RECIPES = (
    CE_ONLY,
    _kd(f"CE + KD forward_kl, tail, k={K}"),
    _kd(f"CE + KD reverse_kl, tail, k={K}", divergence="reverse_kl"),
    _kd(f"CE + KD jsd, tail, k={K}", divergence="jsd"),
    _kd(f"KD only forward_kl, tail, k={K}", task_weight=0.0),
    _kd(f"KD only forward_kl, zero, k={K}", task_weight=0.0, missing="zero"),
    _kd(f"CE + KD forward_kl, zero, k={K}", missing="zero"),
    _kd(f"CE + KD forward_kl, uniform, k={K}", missing="uniform"),
    _kd("CE + KD forward_kl, tail, k=8", topk=8),
    _kd("CE + KD forward_kl, tail, k=128", topk=128),
)


def _goals(rows: dict[str, LMRow]) -> list[str]:
    """The issue's two goals, each in one line: the figures and met / not met."""
    ce = rows[CE_ONLY.name]
    noise = ce.perplexity_spread
    kd = [r for name, r in rows.items() if name not in ("teacher", CE_ONLY.name)]
    best = min(kd, key=lambda r: r.mean_perplexity)
    margin = ce.mean_perplexity - best.mean_perplexity
    spread = max(noise, best.perplexity_spread)
    beat = "met" if margin > spread else "not met"
    only = rows[f"KD only forward_kl, tail, k={K}"]
    ratio = only.mean_perplexity / ce.mean_perplexity
    within = "met" if ratio <= 1.10 else "not met"
    return [
        f"- best KD recipe vs CE only: {best.name}, perplexity {best.mean_perplexity:.1f} vs "
        f"{ce.mean_perplexity:.1f} ({margin:+.1f} better), seed spread {spread:.1f}: {beat}",
        f"- KD only (tail) vs CE only: perplexity {only.mean_perplexity:.1f} vs "
        f"{ce.mean_perplexity:.1f} ({ratio:.3f}x, goal <= 1.10x): {within}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--student-epochs", type=int, default=LMDemoConfig().student_epochs, metavar="N"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = LMDemoConfig(seeds=tuple(args.seeds), student_epochs=args.student_epochs)
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {line}", file=sys.stderr, flush=True)

    rows: dict[str, LMRow] = {}
    with tempfile.TemporaryDirectory(prefix="lyceum-lm-quality-") as tmp:
        teacher = prepare_teacher(config, Path(tmp), log)
        rows["teacher"] = LMRow("teacher", (0,), [teacher.perplexity], [None])
        for recipe in RECIPES:
            figures = []
            for seed in config.seeds:
                figures.append(teacher.train_student(recipe, seed))
                log(f"{recipe.name}, seed {seed}: perplexity {figures[-1][0]:.1f}")
            rows[recipe.name] = LMRow(
                recipe.name, config.seeds, [p for p, _ in figures], [k for _, k in figures]
            )
    print(
        f"teacher {config.teacher_hidden} wide, {config.teacher_layers} layers, "
        f"{config.teacher_sequences} sequences; student {config.student_hidden} wide, "
        f"{config.student_layers} layer(s), {config.student_epochs} epoch(s) of "
        f"{config.train_sequences} sequences of {config.seq_len} tokens; vocab {config.vocab}"
    )
    print(lm_table(list(rows.values())))
    print()
    print("\n".join(_goals(rows)))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
