"""On-policy distillation: steps/s of `OnPolicyDistiller` with the teacher online, and where a
step's time goes (the student sampling, the teacher's reply, the student's loss and step).

The teacher is `lyceum teacher serve` in its own process (a tiny HF Llama, random weights,
hidden 64, vocabulary 1,024; top-8 log-probs and scored tokens, one thread), the student a
smaller tiny Llama (hidden 32) in this process. A step: 8 prompts of 16 tokens, 32 sampled
tokens each (no eos). Rows: each estimator on each transport, and an off-policy step
(`on_policy_fraction=0`: the same lengths of reference responses, nothing sampled) as the
reference the ratio is against. Figures are medians of `--repeats` runs of `--steps` steps
each, the rows interleaved after a warm-up.

    .venv/bin/python bench/on_policy.py             # ~2 min on two idle cores
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lyceum.deploy.examples import tiny_llama
from lyceum.deploy.launcher import start_teacher
from lyceum.student_client import OnlineTeacher, OnPolicyConfig, OnPolicyDistiller, Rollout

VOCAB = 1024
PROMPT, NEW, BATCH = 16, 32, 8
TEACHER = 'lyceum.deploy.examples:tiny_llama{"vocab": 1024, "hidden": 64}'
DATA = 'lyceum.deploy.examples:token_documents{"vocab": 1024, "score_ids": true}'
SERVE = ["--output", "logits=@output.logits", "--topk", "8", "--values", "log_probs"]
SERVE += ["--score", "token_lp", "--max-delay-ms", "1"]


def _items(n: int, off_policy: bool) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (n, PROMPT + NEW), generator=g)
    if not off_policy:
        return [t[:PROMPT] for t in tokens]
    mask = torch.cat([torch.zeros(PROMPT), torch.ones(NEW)]).long()
    return [{"input_ids": t, "loss_mask": mask} for t in tokens]


def _timed(
    distiller: OnPolicyDistiller, totals: dict[str, float]
) -> Callable[[Rollout], dict[str, Tensor]]:
    """The distiller's teacher query, its seconds added to `totals['teacher']`."""
    query = distiller.knowledge

    def knowledge(rollout: Rollout) -> dict[str, Tensor]:
        start = time.perf_counter()
        try:
            return query(rollout)
        finally:
            totals["teacher"] += time.perf_counter() - start

    return knowledge


def _run(endpoint: str, estimator: str, off_policy: bool, steps: int) -> dict[str, float]:
    student = tiny_llama(vocab=VOCAB, layers=2, hidden=32, heads=4, seed=0).train()
    config = OnPolicyConfig(
        estimator=estimator,  # type: ignore[arg-type]
        field="logits" if estimator == "topk" else "token_lp",
        max_new_tokens=NEW,
        on_policy_fraction=0.0 if off_policy else 1.0,
    )
    items = _items(steps * BATCH, off_policy)
    totals = {"teacher": 0.0, "sample": 0.0}
    with OnlineTeacher(endpoint, mode="query") as teacher:
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
        distiller = OnPolicyDistiller(student, teacher, optimizer, config)
        distiller.knowledge = _timed(distiller, totals)  # type: ignore[method-assign]
        sample = distiller.sample

        def timed_sample(prompts: list[Tensor]) -> Rollout:
            start = time.perf_counter()
            try:
                return sample(prompts)
            finally:
                totals["sample"] += time.perf_counter() - start

        distiller.sample = timed_sample  # type: ignore[method-assign]
        torch.manual_seed(0)
        start = time.perf_counter()
        for i in range(steps):
            distiller.step(items[i * BATCH : (i + 1) * BATCH])
        seconds = time.perf_counter() - start
    learn = seconds - totals["teacher"] - totals["sample"]
    return {
        "steps_s": steps / seconds,
        "sample_ms": 1e3 * totals["sample"] / steps,
        "teacher_ms": 1e3 * totals["teacher"] / steps,
        "learn_ms": 1e3 * learn / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per run (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        (scheme, estimator, off)
        for scheme in ("zmq", "grpc")
        for estimator, off in (("topk", True), ("topk", False), ("sampled", False))
    ]
    with start_teacher(TEACHER, dataset=DATA, grpc=True, zmq=True, extra_args=SERVE) as served:
        endpoints = {s: served.endpoint(s) for s in ("zmq", "grpc")}
        _run(endpoints["zmq"], "topk", False, 2)  # warm-up
        runs: dict[tuple[str, str, bool], list[dict[str, float]]] = {r: [] for r in rows}
        for _ in range(args.repeats):
            for row in rows:
                runs[row].append(_run(endpoints[row[0]], row[1], row[2], args.steps))
    print(f"{BATCH} prompts x {PROMPT} tokens, {NEW} sampled, vocabulary {VOCAB}; medians of")
    print(f"{args.repeats} runs x {args.steps} steps\n")
    print("| transport | step | steps/s | vs off-policy | sample ms | teacher ms | learn ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        med = {k: statistics.median(r[k] for r in runs[row]) for k in runs[row][0]}
        base = statistics.median(r["steps_s"] for r in runs[(row[0], "topk", True)])
        name = "off-policy, topk" if row[2] else f"on-policy, {row[1]}"
        print(
            f"| {row[0]} | {name} | {med['steps_s']:.2f} | {med['steps_s'] / base:.2f}x | "
            f"{med['sample_ms']:.0f} | {med['teacher_ms']:.0f} | {med['learn_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
