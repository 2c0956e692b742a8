"""Language-model students: tokens/s of `task: causal_lm` with offline top-k knowledge vs
without distillation.

A tiny HF Llama teacher (random weights, 2 layers, hidden 64, vocab 1,024) dumps its top-k
log-probs of `token_documents` (documents of 32-128 tokens); a smaller student (hidden 32)
trains one epoch per run through `lyceum.student_client.train`, in this process: CE only (no
teachers, the baseline), then CE + top-k KD with each `missing` mode and divergence, padded
or packed (`--pack`). Student tokens/s = the epoch's real tokens / its seconds (median of
`--repeats`, the runs interleaved after a warm-up); the ratio is against CE only. The goal
(issue 15): >= 0.9x.

    .venv/bin/python bench/lm_student.py            # ~3 min on two idle cores
    .venv/bin/python bench/lm_student.py --k 128 --pack 512
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from lyceum.deploy.examples import tiny_llama, token_documents
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import model_identity
from lyceum.student_client import train
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine

VOCAB = 1024
DATA: dict[str, Any] = {"n": 64, "vocab": VOCAB, "min_len": 32, "max_len": 128}
STUDENT: dict[str, Any] = {"vocab": VOCAB, "layers": 2, "hidden": 32, "heads": 4}


def _dump(out: Path, k: int) -> Path:
    data = token_documents(**DATA)
    teacher = tiny_llama(vocab=VOCAB, layers=2, hidden=64, heads=4, seed=1)
    config = EngineConfig(
        outputs=(OutputSpec.parse("logits=@output.logits"),), topk=k, values="log_probs"
    )
    engine = TeacherEngine(teacher, config, item_inputs(data[0]))
    identity = model_identity("lyceum.deploy.examples:tiny_llama", teacher, None)
    dump_knowledge(
        engine, data, out, DumpConfig(batch_size=32, workers=0, progress=False), identity
    )
    return out


def _config(dump: Path | None, term: dict[str, Any] | None, pack: int | None) -> dict[str, Any]:
    spec = "lyceum.deploy.examples:token_documents"
    raw: dict[str, Any] = {
        "task": "causal_lm",
        "model": "lyceum.deploy.examples:tiny_llama",
        "model_kwargs": STUDENT,
        "dataset": {"train": spec, "train_kwargs": DATA},
        "lm": {"labels": "next_token", "pack_tokens": pack},
        "epochs": 1,
        "batch_size": 16,
        "progress": False,
    }
    if dump is not None and term is not None:
        raw["teachers"] = {"llama": {"dir": str(dump)}}
        raw["losses"] = {"terms": [{"name": "kd", "kind": "topk", "field": "logits", **term}]}
    return raw


RUNS: dict[str, dict[str, Any] | None] = {
    "CE only": None,
    "CE + KD forward_kl, zero": {"missing": "zero"},
    "CE + KD forward_kl, tail": {"missing": "tail"},
    "CE + KD forward_kl, uniform": {"missing": "uniform"},
    "CE + KD jsd, tail": {"missing": "tail", "divergence": "jsd"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pack", type=int, default=None, help="lm.pack_tokens (None: padded)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = token_documents(**DATA)
    tokens = sum(int(data[i]["input_ids"].numel()) for i in range(len(data)))
    print(f"{len(data)} documents, {tokens} tokens; student {STUDENT}; pack_tokens {args.pack}")
    with tempfile.TemporaryDirectory() as tmp:
        dump = _dump(Path(tmp) / "dump", args.k)
        configs = {name: _config(dump, term, args.pack) for name, term in RUNS.items()}
        train(configs["CE only"])  # warm-up: first-call costs out of the figures
        seconds: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.repeats):  # interleaved, so a busy machine slows every run alike
            for name, raw in configs.items():
                seconds[name].append(train(raw).epochs[0].seconds)
    base = tokens / statistics.median(seconds["CE only"])
    print("| run | k | tokens/s | vs CE only |")
    print("| --- | --- | --- | --- |")
    for name, times in seconds.items():
        rate = tokens / statistics.median(times)
        k = "-" if RUNS[name] is None else str(args.k)
        print(f"| {name} | {k} | {rate:.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
