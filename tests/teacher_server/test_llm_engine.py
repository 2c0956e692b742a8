"""A Hugging Face Llama teacher (random weights from a config, 2 layers) on dict inputs:
left-padded, right-padded and packed items give the top-k of unpadded per-document
forwards; scored tokens equal log_softmax(logits) gathered by hand; tuple outputs are
indexed; the vocabulary is in the schema; a dump writes the same knowledge."""

from __future__ import annotations

import json

import pytest
import torch

from lyceum.deploy.examples import TokenDocuments, tiny_llama, token_documents
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import model_identity
from lyceum.proto.vocab import Vocabulary, vocabulary_sha256
from lyceum.student_client import OfflineKnowledge
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine
from tests._support.llm_reference import (
    VOCAB,
    assert_topk_equal,
    llama,
    llm_engine,
    reference_topk,
    unpadded_log_probs,
)


@pytest.mark.parametrize("padding", ["none", "left", "right", "packed"])
def test_topk_equals_unpadded_per_document_forwards(padding):
    data = token_documents(n=6, vocab=VOCAB, padding=padding)
    engine = llm_engine(item_inputs(data[0]))
    assert engine.schema.vocab == Vocabulary(size=VOCAB)
    batch = engine.collate_batch([item_inputs(data[i]) for i in range(len(data))])
    columns = engine.infer(batch)
    model = llama()
    for i in range(len(data)):
        want = reference_topk(model, data, i)
        assert_topk_equal(columns["logits.values"][i], columns["logits.indices"][i], want)
    if padding != "none":
        # The batch is padded beyond the real positions, and those are never computed on.
        assert batch.padded_tokens > batch.real_tokens


def test_scored_tokens_equal_log_softmax_gathered_by_hand():
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, VOCAB, (n,), generator=g) for n in (9, 5)]
    # Left-pad the shorter one, as generate leaves a batch; score 2 tokens per position.
    width = 9
    samples = []
    for d in docs:
        pad = width - d.numel()
        score = torch.randint(0, VOCAB, (width, 2), generator=g)
        samples.append(
            {
                "input_ids": torch.cat([torch.zeros(pad, dtype=torch.long), d]),
                "attention_mask": torch.cat([torch.zeros(pad), torch.ones(d.numel())]).long(),
                "score_ids": score,
            }
        )
    engine = llm_engine(samples[0], score="token_lp")
    spec = engine.schema.field("token_lp")
    assert (spec.dtype, spec.shape, spec.meaning) == ("float32", (None, 2), "log_probs")
    assert engine.input_schema.names == ("input_ids", "attention_mask", "score_ids")
    got = engine.infer(engine.collate_batch(samples))["token_lp"]
    model = llama()
    for d, s, g_ in zip(docs, samples, got, strict=True):
        lp = unpadded_log_probs(model, [d])
        want = lp.gather(-1, s["score_ids"][width - d.numel() :])
        assert g_.shape == (d.numel(), 2)
        assert torch.allclose(g_, want, atol=1e-5, rtol=0)


def test_score_ids_outside_the_vocabulary_are_refused():
    sample = {"input_ids": torch.arange(1, 5), "score_ids": torch.tensor([1, 2, 3, VOCAB])}
    engine = llm_engine({"input_ids": torch.arange(1, 5), "score_ids": torch.arange(4)}, "lp")
    with pytest.raises(ValueError, match=r"score_ids must be token ids in \[0, 1024\)"):
        engine.infer(engine.collate_batch([sample]))


def test_hidden_states_of_layer_n_and_a_tuple_without_index():
    model = tiny_llama(vocab=VOCAB, layers=2, hidden=32, output_hidden_states=True)
    example = {"input_ids": torch.arange(1, 7)}
    config = EngineConfig(outputs=(OutputSpec.parse("h2=@output.hidden_states.2"),))
    engine = TeacherEngine(model, config, example)
    spec = engine.schema.field("h2")
    assert (spec.shape, spec.meaning, spec.encoding.kind) == ((None, 32), "features", "dense")
    got = engine.infer(engine.collate_batch([example]))["h2"][0]
    with torch.inference_mode():
        want = model(input_ids=example["input_ids"][None]).hidden_states[2][0]
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"is a tuple of 3 entries: pick one with @output\."):
        TeacherEngine(
            model, EngineConfig(outputs=(OutputSpec.parse("h=@output.hidden_states"),)), example
        )
    plain = tiny_llama(vocab=VOCAB, layers=2, hidden=32)
    with pytest.raises(ValueError, match="output_hidden_states"):
        TeacherEngine(plain, config, example)


def test_inputs_the_model_does_not_take_are_named():
    with pytest.raises(ValueError, match=r"inputs \['segment'\] that the model's forward"):
        llm_engine({"input_ids": torch.arange(1, 5), "segment": torch.zeros(4).long()})


def test_tokenizer_hash_is_in_the_schema(tmp_path):
    vocab = {f"t{i}": i for i in range(VOCAB - 1)}
    tokenizer = {
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "added_tokens": [{"id": VOCAB - 1, "content": "<eos>"}],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = EngineConfig(
        outputs=(OutputSpec.parse("logits=@output.logits"),), topk=4, tokenizer=tmp_path
    )
    engine = TeacherEngine(llama(), config, {"input_ids": torch.arange(1, 5)})
    want = vocabulary_sha256({**vocab, "<eos>": VOCAB - 1})
    assert engine.schema.vocab == Vocabulary(size=VOCAB, tokenizer_sha256=want)


@pytest.mark.integration
@pytest.mark.parametrize("padding", ["left", "packed"])
def test_dump_holds_the_unpadded_topk(tmp_path, padding):
    data = TokenDocuments(n=10, vocab=VOCAB, padding=padding)
    engine = llm_engine(item_inputs(data[0]))
    identity = model_identity("lyceum.deploy.examples:tiny_llama", engine.model, None)
    manifest = dump_knowledge(
        engine,
        data,
        tmp_path / "dump",
        DumpConfig(shard_rows=4, batch_size=3, workers=0, progress=False),
        identity,
    )
    assert manifest.complete and manifest.knowledge_schema.vocab == Vocabulary(size=VOCAB)
    assert manifest.dataset.scope == "inputs"
    knowledge = OfflineKnowledge(tmp_path / "dump")
    got = knowledge.get(torch.arange(len(data)))
    model = llama()
    for i in range(len(data)):
        want = reference_topk(model, data, i)
        values = got.tensors["logits.values"][i]
        assert_topk_equal(values, got.tensors["logits.indices"][i], want)
