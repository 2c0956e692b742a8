"""Causal language-model students (`task: causal_lm`) on a tiny HF Llama (random weights from
a config, 2 layers, vocabulary 64) distilled from an offline top-k dump of a larger one: the
collate's targets by hand; packed rows give the per-document results of unpadded runs;
masked positions get zero gradient from every term; knowledge lengths and vocabularies are
checked; `lyceum student train` runs, checkpoints and resumes mid-epoch to identical weights."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from lyceum.deploy.examples import tiny_llama, token_documents
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import model_identity
from lyceum.proto.schema import SAMPLE_ID
from lyceum.student_client import OfflineKnowledge
from lyceum.student_client._lm_collate import IGNORE_INDEX, LMCollate
from lyceum.student_client._lm_task import CausalLMTask, masked_objective
from lyceum.student_client.losses import DistillObjective, Divergence
from lyceum.student_client.trainer import train
from lyceum.student_client.trainer_config import (
    LMConfig,
    TeacherConfig,
    TopKTerm,
    validate_config,
)
from lyceum.teacher_server.config import ServerConfig
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine
from lyceum.teacher_server.server import create_server
from tests._support.teachers import ENV

VOCAB = 64
N = 24
DATA: dict[str, Any] = {"n": N, "vocab": VOCAB}
STUDENT: dict[str, Any] = {"vocab": VOCAB, "layers": 2, "hidden": 16, "heads": 2, "seed": 0}
NEXT = LMConfig(labels="next_token")  # token_documents' labels are the next tokens already


def _student() -> nn.Module:
    return tiny_llama(**STUDENT).train()


def _teacher_engine() -> TeacherEngine:
    """Top-8 log-probs of a larger tiny Llama, for `token_documents(n=24, vocab=64)` items."""
    teacher = tiny_llama(vocab=VOCAB, layers=2, hidden=32, heads=4, seed=1)
    config = EngineConfig(
        outputs=(OutputSpec.parse("logits=@output.logits"),), topk=8, values="log_probs"
    )
    return TeacherEngine(teacher, config, item_inputs(token_documents(**DATA)[0]))


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The teacher's knowledge of `token_documents(n=24, vocab=64)`, dumped."""
    data = token_documents(**DATA)
    engine = _teacher_engine()
    teacher = engine.model
    out = tmp_path_factory.mktemp("lm") / "dump"
    identity = model_identity("lyceum.deploy.examples:tiny_llama", teacher, None)
    dump_knowledge(
        engine,
        data,
        out,
        DumpConfig(shard_rows=8, batch_size=8, workers=0, progress=False),
        identity,
    )
    return out


def _knowledge(dump_dir: Path, ids: list[int]) -> dict[str, torch.Tensor]:
    knowledge = OfflineKnowledge(dump_dir)
    try:
        got = knowledge.get(torch.tensor(ids))
        return {**got.tensors, SAMPLE_ID: got.sample_ids}
    finally:
        knowledge.close()


def _kd_objective(
    dump_dir: Path, divergence: Divergence = "forward_kl", task_weight: float = 1.0
) -> DistillObjective:
    knowledge = OfflineKnowledge(dump_dir)
    try:
        schema = knowledge.schema
    finally:
        knowledge.close()
    term = TopKTerm(name="kd", field="logits", missing="tail", divergence=divergence)
    objective = DistillObjective([term.distill_term(schema)], task_weight=task_weight)
    return masked_objective(objective)


def test_collate_shifts_within_documents_and_drops_the_items_padding():
    collate = LMCollate()
    left_padded = {
        "input_ids": torch.tensor([0, 0, 5, 6, 7]),
        "attention_mask": torch.tensor([0, 0, 1, 1, 1]),
        "loss_mask": torch.tensor([0, 0, 0, 1, 1]),
    }
    packed = {  # two documents: [9, 8] and [4, 3, 2]
        "input_ids": torch.tensor([9, 8, 4, 3, 2]),
        "position_ids": torch.tensor([0, 1, 0, 1, 2]),
        "labels": torch.tensor([9, 8, IGNORE_INDEX, 3, 2]),
    }
    inputs, targets = collate([left_padded, packed])
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 0, 0], [9, 8, 4, 3, 2]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 0], [0, 1, 0, 1, 2]]
    x = IGNORE_INDEX
    # hf labels: position t learns labels[t + 1]; never across the end of a document.
    assert targets["labels"].tolist() == [[6, 7, x, x, x], [8, x, 3, 2, x]]
    assert targets["loss_mask"].tolist() == [
        [False, True, True, False, False],
        [True, True, True, True, True],
    ]
    assert targets["lengths"].tolist() == [3, 5]
    assert bool(targets["packed"])  # the second item holds two documents

    shifted = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([2, 3, x])}
    _, targets = LMCollate(labels="next_token")([shifted])
    assert targets["labels"].tolist() == [[2, 3, x]]
    copied = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2, 3])}
    inputs, targets = LMCollate(pack_tokens=6)([copied, copied, left_padded])
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 1, 2, 3], [5, 6, 7, 0, 0, 0]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 0, 0]]
    assert targets["labels"].tolist() == [[2, 3, x, 2, 3, x], [6, 7, x, x, x, x]]  # hf: shifted
    assert targets["lengths"].tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match=r"dataset item 0: task causal_lm needs mapping items"):
        LMCollate()([(torch.tensor([1, 2]), 0)])
    with pytest.raises(ValueError, match=r"'loss_mask' has 2 entries, 'input_ids' 3"):
        LMCollate()([{"input_ids": torch.tensor([1, 2, 3]), "loss_mask": torch.tensor([1, 0])}])


def _step(
    task: CausalLMTask, model: nn.Module, items: list[Any], ids: list[int], dump_dir: Path
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    inputs, targets = task.collate(items)
    loss = task.loss(
        model, inputs, targets, _knowledge(dump_dir, ids), _kd_objective(dump_dir), 1.0
    )
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_packed_rows_equal_unpadded_runs(dump_dir):
    data = token_documents(**DATA)
    ids = list(range(6))
    items = [data[i] for i in ids]
    model = _student()
    padded = CausalLMTask(NEXT, model)
    packed = CausalLMTask(LMConfig(labels="next_token", pack_tokens=64), model)
    inputs, targets = packed.collate(items)
    assert inputs["input_ids"].shape[0] < len(items) and bool(targets["packed"])
    # Logits of the packed rows, item by item, are those of each document run alone.
    got = packed.logits(model, inputs, packed=True)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=it["input_ids"][None]).logits[0] for it in items])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    # Task + KD loss and gradients: packed equals padded.
    want_loss, want_grads = _step(padded, model, items, ids, dump_dir)
    got_loss, got_grads = _step(packed, model, items, ids, dump_dir)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-4)


def test_items_packed_by_the_dataset_keep_their_documents_apart():
    data = token_documents(n=3, vocab=VOCAB, padding="packed")
    model = _student()
    task = CausalLMTask(NEXT, model)
    inputs, targets = task.collate([data[i] for i in range(3)])
    assert bool(targets["packed"])
    got = task.logits(model, inputs, packed=True)
    with torch.no_grad():
        alone = torch.cat(
            [model(input_ids=d[None]).logits[0] for i in range(3) for d in data.documents(i)]
        )
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


class _Recording(nn.Module):
    """A Llama whose logits keep their gradient, to look at per position."""

    def __init__(self) -> None:
        super().__init__()
        self.llama = _student()
        self.logits: torch.Tensor | None = None

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        out = self.llama(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )
        out.logits.retain_grad()
        self.logits = out.logits
        return out


def test_masked_positions_get_zero_gradient_from_every_term(dump_dir):
    data = token_documents(**DATA)
    ids = [0, 1, 2]
    items = []
    for i in ids:
        item = dict(data[i])
        n = item["input_ids"].numel()
        item["loss_mask"] = (torch.arange(n) >= n // 2).long()  # the prompt: the first half
        items.append(item)
    model = _Recording()
    task = CausalLMTask(NEXT, model)
    inputs, targets = task.collate(items)
    knowledge = _knowledge(dump_dir, ids)
    cases: list[tuple[float, Divergence | None]] = [
        (1.0, None),
        (0.0, "forward_kl"),
        (0.0, "reverse_kl"),
        (1.0, "jsd"),
    ]
    for task_weight, kd in cases:
        model.zero_grad()
        objective = _kd_objective(dump_dir, kd, task_weight) if kd is not None else None
        task.loss(model, inputs, targets, knowledge, objective, task_weight).backward()
        assert model.logits is not None and model.logits.grad is not None
        grad = model.logits.grad.abs().sum(-1)  # [rows, tokens]
        counted = targets["loss_mask"] & inputs["attention_mask"].bool()
        assert float(grad[~counted].max()) == 0.0, kd
        # The last counted position of each item has no CE target; KD still reaches it.
        nonzero = int((grad[counted] > 0).sum())
        assert nonzero == int(counted.sum()) - (len(ids) if kd is None else 0), kd


def test_knowledge_of_other_lengths_is_refused_naming_the_sample(dump_dir):
    data = token_documents(**DATA)
    items = [data[3], {"input_ids": data[4]["input_ids"][:-1]}]
    task = CausalLMTask(NEXT, _student())
    inputs, targets = task.collate(items)
    knowledge = _knowledge(dump_dir, [3, 4])
    want = data[4]["input_ids"].numel()
    with pytest.raises(ValueError, match=rf"sample 4 has {want} positions in the teacher's"):
        task.loss(_student(), inputs, targets, knowledge, _kd_objective(dump_dir), 1.0)


def _config(dump_dir: Path, ckpt: Path, **extra: Any) -> dict[str, Any]:
    spec = "lyceum.deploy.examples:token_documents"
    return {
        "task": "causal_lm",
        "model": "lyceum.deploy.examples:tiny_llama",
        "model_kwargs": STUDENT,
        "dataset": {
            "train": spec,
            "train_kwargs": DATA,
            "validation": spec,
            "validation_kwargs": DATA,
        },
        "teachers": {"llama": {"dir": str(dump_dir)}},
        # token_documents' labels are the next tokens already
        "lm": {"labels": "next_token", "validation_teacher": str(dump_dir), "pack_tokens": 48},
        "losses": {"terms": [{"name": "kd", "kind": "topk", "field": "logits", "missing": "tail"}]},
        "optimizer": {"lr": 0.01},
        "epochs": 2,
        "batch_size": 4,
        "seed": 1,
        "checkpoint_dir": str(ckpt),
        "progress": False,
        **extra,
    }


def test_vocabularies_are_checked_before_training(dump_dir, tmp_path):
    small = {**STUDENT, "vocab": 32}
    with pytest.raises(ValueError, match=r"vocabulary has 64 token ids, the student's only 32"):
        train(_config(dump_dir, tmp_path / "a", model_kwargs=small))
    declared = {"llama": {"dir": str(dump_dir), "vocab": {"size": 48}}}
    with pytest.raises(ValueError, match=r"vocabulary has 64 token ids, the student's only 48"):
        train(_config(dump_dir, tmp_path / "b", teachers=declared))


def test_lm_keys_are_refused_where_they_do_not_apply(dump_dir, tmp_path):
    raw = _config(dump_dir, tmp_path / "c")
    with pytest.raises(ValueError, match=r"'lm' is for task: causal_lm"):
        validate_config({**raw, "task": "classification"})
    online = {"t": {"endpoints": ["grpc://127.0.0.1:1"], "mode": "query"}}
    with pytest.raises(ValueError, match=r"teachers \['t'\] are asked with the batch's rows"):
        validate_config({**raw, "teachers": online})


def _cli(config: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lyceum.deploy.cli", "student", "train", str(config)]
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.integration
def test_student_train_runs_checkpoints_and_resumes_mid_epoch_to_identical_weights(
    dump_dir, tmp_path
):
    whole = tmp_path / "whole.yaml"
    whole.write_text(yaml.safe_dump(_config(dump_dir, tmp_path / "whole")))
    done = _cli(whole)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.startswith("trained 2 epochs: final loss ")
    assert "val perplexity " in done.stdout and "val KL to the teacher " in done.stdout
    assert (tmp_path / "whole" / "epoch-001.pt").is_file()
    assert (tmp_path / "whole" / "model.safetensors").is_file()
    want = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)

    torch.set_num_threads(1)  # as the CLI run: the same float reductions
    config = _config(dump_dir, tmp_path / "stopped")

    def stop_at_batch_2(step: Any) -> None:
        if step.epoch == 0 and step.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer: checkpoint, return

    stopped = train(config, on_step=stop_at_batch_2)
    assert stopped.ended == "signal" and stopped.stopped_at == (0, 2)
    resumed = train(config, resume=True)
    assert resumed.ended == "finished" and len(resumed.epochs) == 2
    got = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert got["model"].keys() == want["model"].keys()
    for name, value in want["model"].items():
        torch.testing.assert_close(got["model"][name], value)
    perplexity = [e["val_perplexity"] for e in got["epochs"]]
    assert perplexity == pytest.approx([e["val_perplexity"] for e in want["epochs"]], rel=1e-5)
    assert perplexity[1] < perplexity[0] < VOCAB * 1.5


def test_the_readmes_causal_lm_config_is_valid():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "causal_lm" in b]
    assert len(blocks) == 1
    config = validate_config(yaml.safe_load(blocks[0]))
    assert config.task == "causal_lm" and config.lm_config.pack_tokens == 512
    llama = config.teachers["llama"]
    assert isinstance(llama, TeacherConfig) and llama.vocab is not None


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["query", "index"])
def test_an_online_teacher_trains_the_student_as_its_dump_does(dump_dir, tmp_path, mode):
    config = ServerConfig(grpc_port=0, max_batch=8, max_delay_ms=1)
    server, _ports = create_server(config, [_teacher_engine()], token_documents(**DATA))
    server.start()
    try:
        endpoint = next(e for e in server.endpoints if e.startswith("grpc://"))
        online = {"llama": {"endpoints": [endpoint], "mode": mode}}
        # Query mode sends the batch's padded rows with their mask: no packing there.
        lm = {"labels": "next_token"}
        got = train(_config(dump_dir, tmp_path / "online", teachers=online, lm=lm, epochs=1))
    finally:
        assert server.stop(grace_s=5)
    want = train(_config(dump_dir, tmp_path / "offline", lm=lm, epochs=1))
    assert got.ended == want.ended == "finished"
    for name, value in want.model.state_dict().items():
        torch.testing.assert_close(got.model.state_dict()[name], value)


def test_labeled_hides_later_ids_labels_and_a_prompt_only_batch_gives_zero(dump_dir):
    data = token_documents(**DATA)
    model = _student()
    items = [data[0], data[5]]
    task = CausalLMTask(NEXT, model, labeled=5)  # sample 5 learns from the teacher alone
    inputs, targets = task.collate(items)
    labels, counts = task._targets(inputs, targets, torch.tensor([0, 5]))
    first = data[0]["input_ids"].numel()
    assert labels[:first].tolist() == data[0]["labels"].tolist()
    assert set(labels[first:].tolist()) == {IGNORE_INDEX} and bool(counts.all())
    prompts = [{**it, "loss_mask": torch.zeros_like(it["input_ids"])} for it in items]
    inputs, targets = task.collate(prompts)
    loss = task.loss(
        model, inputs, targets, _knowledge(dump_dir, [0, 5]), _kd_objective(dump_dir), 1.0
    )
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_labels_shifted_already_are_refused_when_read_as_hugging_faces() -> None:
    ids = torch.tensor([5, 9, 2, 7, 3])
    shifted = {"input_ids": ids, "labels": torch.tensor([9, 2, 7, 3, -100])}
    with pytest.raises(ValueError, match=r"item 0: its labels are its input ids shifted by one"):
        LMCollate()([shifted])
    # Read as next_token they are what they say; Hugging Face's own copy passes as hf.
    _, targets = LMCollate(labels="next_token")([shifted])
    assert targets["labels"].tolist() == [[9, 2, 7, 3, -100]]
    _, targets = LMCollate()([{"input_ids": ids, "labels": ids}])
    assert targets["labels"].tolist() == [[9, 2, 7, 3, -100]]
