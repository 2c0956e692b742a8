"""Token-budget batching: plans stay within the budget and cut padding; a dump batched by
tokens holds the knowledge of one batched by samples, in id order; the server's batcher
keeps a device batch within its token budget."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from lyceum.deploy.examples import TokenDocuments
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import model_identity
from lyceum.student_client import OfflineKnowledge
from lyceum.teacher_server._token_batches import padded_size, plan_window
from lyceum.teacher_server.batcher import DynamicBatcher, Job
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.metrics import ServerMetrics
from tests._support.llm_reference import VOCAB, assert_topk_equal, llama, llm_engine, reference_topk


def test_plan_stays_within_budget_and_cuts_padding():
    g = np.random.default_rng(0)
    lengths = [int(n) for n in g.integers(8, 513, 400)]
    ids = list(range(1000, 1400))
    plan = plan_window(ids, lengths, max_tokens=4096, max_samples=64)
    by_id = dict(zip(ids, lengths, strict=True))
    assert sorted(i for b in plan.batches for i in b) == ids
    for b in plan.batches:
        assert padded_size([by_id[i] for i in b]) <= 4096 and len(b) <= 64
    assert plan.real_tokens == sum(lengths)
    assert plan.padded_tokens == sum(padded_size([by_id[i] for i in b]) for b in plan.batches)
    assert 1 - plan.real_tokens / plan.padded_tokens < 0.05
    # Sample-count batches of the same ids waste far more.
    counted = sum(padded_size(lengths[lo : lo + 8]) for lo in range(0, 400, 8))
    assert 1 - plan.real_tokens / counted > 0.3


def test_a_sequence_longer_than_the_budget_is_a_batch_alone():
    plan = plan_window([0, 1, 2], [10, 100, 12], max_tokens=50, max_samples=8)
    assert plan.batches == [[0, 2], [1]]
    assert plan.padded_tokens == 2 * 12 + 100


@pytest.mark.integration
def test_dump_by_tokens_holds_the_unpadded_knowledge_in_id_order(tmp_path):
    data = TokenDocuments(n=14, vocab=VOCAB, min_len=2, max_len=30)
    engine = llm_engine(item_inputs(data[0]))
    identity = model_identity("lyceum.deploy.examples:tiny_llama", engine.model, None)
    config = DumpConfig(
        shard_rows=5,
        batch_size=8,
        max_batch_tokens=64,
        bucket_window=4,
        workers=0,
        progress=False,
    )
    dump_knowledge(engine, data, tmp_path / "dump", config, identity)
    got = OfflineKnowledge(tmp_path / "dump").get(torch.arange(len(data)))
    assert got.sample_ids.tolist() == list(range(len(data)))
    model = llama()
    for i in range(len(data)):
        want = reference_topk(model, data, i)
        assert_topk_equal(got.tensors["logits.values"][i], got.tensors["logits.indices"][i], want)


def test_batcher_keeps_each_device_batch_within_its_token_budget():
    data = TokenDocuments(n=12, vocab=VOCAB, min_len=2, max_len=30, seed=4)
    engine = llm_engine(item_inputs(data[0]))
    widths: list[tuple[int, int]] = []
    infer = engine.infer

    def recording(batch, lengths=None):
        widths.append((batch.samples, batch.padded_tokens))
        return infer(batch, lengths)

    engine.infer = recording  # type: ignore[method-assign]
    metrics = ServerMetrics()
    batcher = DynamicBatcher([engine], 8, 0.0, 1000, metrics, max_batch_tokens=60)
    answered = threading.Event()
    results: list[object] = []

    def done(result: object) -> None:
        results.append(result)
        if len(results) == len(data):
            answered.set()

    for i in range(len(data)):
        job = Job(ids=np.array([i], dtype=np.uint64), inputs=[item_inputs(data[i])], done=done)  # type: ignore[arg-type]  # a dict of tensors
        batcher.submit(job, defer=True)
    while batcher.run_ready(again=True):
        pass
    assert answered.wait(60)
    assert all(not isinstance(r, Exception) for r in results)
    assert sum(n for n, _ in widths) == len(data)
    longest = max(int(data[i]["input_ids"].numel()) for i in range(len(data)))
    assert all(t <= max(60, longest) for _, t in widths)
    assert metrics.padding_waste._sum.get() >= 0  # observed once per batch


@pytest.mark.integration
def test_cli_dump_by_tokens(tmp_path):
    out = tmp_path / "lm"
    dataset = 'lyceum.deploy.examples:token_documents{"n": 9, "padding": "left"}'
    proc = subprocess.run(
        [sys.executable, "-m", "lyceum.deploy.cli", "teacher", "dump",
         "--model", 'lyceum.deploy.examples:tiny_llama{"hidden": 32}',
         "--dataset", dataset, "--out", str(out), "--output", "logits=@output.logits",
         "--topk", "8", "--values", "log_probs", "--max-batch-tokens", "96",
         "--workers", "0", "--quiet"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    knowledge = OfflineKnowledge(out)
    assert knowledge.manifest.knowledge_schema.vocab.size == VOCAB  # type: ignore[union-attr]
    got = knowledge.get(torch.arange(9))
    data = TokenDocuments(n=9, padding="left")
    model = llama()
    for i in range(9):
        want = reference_topk(model, data, i)
        assert_topk_equal(got.tensors["logits.values"][i], got.tensors["logits.indices"][i], want)
