"""`--store-inputs` and `--shard-tokens`: a dump that keeps its inputs reads them back equal to
the dataset's (the real tokens of padded items, the position ids of packed ones), apart from
its knowledge, whose schema and values are those of a dump without them; shards sized in
tokens hold at most that many positions, read back the same knowledge and resume; resuming
with other options is refused naming them."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lyceum.deploy.examples import token_documents
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import MANIFEST_NAME, Manifest, dataset_fingerprint, model_identity
from lyceum.student_client import DumpInputs, OfflineKnowledge, OfflineTeacher
from lyceum.teacher_server._token_batches import token_shard_starts
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from tests._support.llm_reference import MODEL_SPEC, VOCAB, llm_engine

_QUIET: dict[str, Any] = {"workers": 0, "progress": False, "batch_size": 4}


def _dump(data: Any, out: Path, **config: Any) -> Manifest:
    engine = llm_engine(item_inputs(data[0]))
    identity = model_identity(MODEL_SPEC, engine.model)
    try:
        return dump_knowledge(engine, data, out, DumpConfig(**_QUIET, **config), identity)
    finally:
        engine.close()


@pytest.mark.parametrize("padding", ["left", "right", "packed"])
def test_stored_inputs_read_back_equal_to_the_dataset(tmp_path: Path, padding: str) -> None:
    data = token_documents(n=10, vocab=VOCAB, padding=padding, seed=3)  # type: ignore[arg-type]
    manifest = _dump(data, tmp_path / "with", store_inputs=True, shard_rows=4)
    _dump(data, tmp_path / "without", shard_rows=4)
    names = ("input_ids", "position_ids") if padding == "packed" else ("input_ids",)
    assert manifest.stored_inputs == names
    raw = json.loads((tmp_path / "with" / MANIFEST_NAME).read_text())
    assert raw["format_version"] == "1.3" and raw["stored_inputs"] == list(names)
    assert "stored_inputs" not in json.loads((tmp_path / "without" / MANIFEST_NAME).read_text())
    with (
        OfflineKnowledge(tmp_path / "with") as stored,
        OfflineKnowledge(tmp_path / "without") as plain,
    ):
        assert stored.schema == plain.schema and [f.name for f in stored.input_fields] == list(
            names
        )
        ids = [7, 0, 3, 9]
        for i, inputs in zip(ids, stored.inputs(ids), strict=True):
            item = data[i]
            real = item["attention_mask"].bool()
            assert isinstance(inputs, dict) and sorted(inputs) == sorted(names)
            assert torch.equal(inputs["input_ids"], item["input_ids"][real])
            assert torch.equal(inputs["input_ids"], torch.cat(data.documents(i)))
            if padding == "packed":
                assert torch.equal(inputs["position_ids"], item["position_ids"])
        want, got = plain.get(ids), stored.get(ids)
        assert set(got.tensors) == {"logits.values", "logits.indices"}
        for column, t in want.tensors.items():
            for a, b in zip(t.unbind(), got.tensors[column].unbind(), strict=True):
                assert torch.equal(a, b)
        # Each position's knowledge has its token: as many rows as stored ids.
        lengths = [x["input_ids"].numel() for x in stored.inputs(ids)]  # type: ignore[index]
        assert [v.shape[0] for v in got.tensors["logits.values"].unbind()] == lengths
        dataset = DumpInputs(stored)
        assert len(dataset) == len(data)
        assert torch.equal(dataset[5]["input_ids"], torch.cat(data.documents(5)))  # type: ignore[index]


def test_inputs_of_a_dump_without_them_name_the_fix(tmp_path: Path) -> None:
    data = token_documents(n=4, vocab=VOCAB, seed=1)
    _dump(data, tmp_path / "d")
    teacher = OfflineTeacher(tmp_path / "d")
    try:
        with pytest.raises(ValueError, match="dumped without --store-inputs; read the inputs"):
            teacher.inputs(torch.tensor([0]))
        with pytest.raises(ValueError, match="holds no inputs"):
            DumpInputs(teacher.knowledge)
    finally:
        teacher.close()


def test_resume_with_other_inputs_or_shards_is_refused(tmp_path: Path) -> None:
    data = token_documents(n=6, vocab=VOCAB, seed=2)
    _dump(data, tmp_path / "d", store_inputs=True, shard_tokens=40)
    with pytest.raises(ValueError, match=r"stored inputs: .*rerun with --store-inputs"):
        _dump(data, tmp_path / "d", shard_tokens=40)
    with pytest.raises(ValueError, match="shard tokens: the directory has 40, this run 50"):
        _dump(data, tmp_path / "d", store_inputs=True, shard_tokens=50)
    # The same options resume (nothing left to do) and leave the dump as it was.
    again = _dump(data, tmp_path / "d", store_inputs=True, shard_tokens=40)
    assert again.complete and again.shard_tokens == 40


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 60), min_size=1, max_size=40),
    st.integers(1, 100),
    st.integers(1, 10),
)
def test_token_shards_are_full_and_within_their_budget(
    lengths: list[int], max_tokens: int, max_rows: int
) -> None:
    starts = token_shard_starts(lengths, max_tokens, max_rows)
    bounds = [*starts, len(lengths)]
    assert starts[0] == 0 and all(a < b for a, b in itertools.pairwise(bounds))
    for a, b in itertools.pairwise(bounds):
        shard = lengths[a:b]
        assert len(shard) <= max_rows
        assert sum(shard) <= max_tokens or len(shard) == 1
        if b < len(lengths):  # closed because the next sample would not fit
            assert sum(shard) + lengths[b] > max_tokens or len(shard) == max_rows


def test_token_shards_by_the_cli(tmp_path: Path) -> None:
    data: dict[str, Any] = {"n": 16, "vocab": VOCAB, "padding": "left", "seed": 5}
    out = tmp_path / "d"
    command = [
        sys.executable,
        "-m",
        "lyceum.deploy.cli",
        "teacher",
        "dump",
        "--model",
        'lyceum.deploy.examples:tiny_llama{"layers": 2, "hidden": 32}',
        "--dataset",
        "lyceum.deploy.examples:token_documents",
        "--dataset-kwargs",
        json.dumps(data),
        "--output",
        "logits=@output.logits",
        "--topk",
        "4",
        "--values",
        "log_probs",
        "--out",
        str(out),
        "--shard-tokens",
        "60",
        "--store-inputs",
        "--workers",
        "0",
        "--quiet",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = Manifest.read(out)
    dataset = token_documents(**data)
    real = [int(dataset[i]["attention_mask"].sum()) for i in range(len(dataset))]
    assert manifest.shard_starts == token_shard_starts(real, 60, manifest.shard_rows)
    assert len(manifest.shards) == len(manifest.shard_starts) > 1
    with OfflineKnowledge(out) as knowledge:
        for shard in manifest.shards:
            rows = knowledge.get(range(shard.start, shard.stop)).tensors["logits.values"]
            assert rows.values().shape[0] == sum(real[shard.start : shard.stop])
            assert rows.values().shape[0] <= 60 or shard.rows == 1
        inputs = knowledge.inputs(range(len(dataset)))
        assert [x["input_ids"].numel() for x in inputs] == real  # type: ignore[index]
    info = subprocess.run(
        [sys.executable, "-m", "lyceum.deploy.cli", "knowledge", "info", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 0, info.stderr
    assert (
        f"shards:     {len(manifest.shards)} of {len(manifest.shards)}, at most 60 tokens"
        in info.stdout
    )
    assert "inputs:     input_ids (stored with the knowledge)" in info.stdout


def test_shard_tokens_need_sequences(tmp_path: Path) -> None:
    from lyceum.deploy.examples import digits, teacher_cnn
    from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

    data = digits("test")
    engine = TeacherEngine(teacher_cnn(), EngineConfig(), data[0][0])
    try:
        with pytest.raises(ValueError, match="--shard-tokens sizes shards of sequence inputs"):
            dump_knowledge(
                engine,
                data,
                tmp_path / "d",
                DumpConfig(**_QUIET, shard_tokens=100),
                model_identity("cnn", engine.model),
            )
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("starts", "tokens", "message"),
    [
        ((0, 3, 3), 10, "shard_starts must rise from 0"),
        ((1, 3), 10, "shard_starts must rise from 0"),
        ((0, 6), 10, "shard_starts must rise from 0 below the 6 samples"),
        ((0, 3), None, "shard_tokens and shard_starts go together"),
    ],
)
def test_bad_shard_starts_are_refused(
    starts: tuple[int, ...], tokens: int | None, message: str
) -> None:
    data = token_documents(n=6, vocab=VOCAB, seed=2)
    with pytest.raises(ValueError, match=message):
        Manifest(
            knowledge_schema=llm_engine(item_inputs(data[0])).schema,
            model=model_identity("m", torch.nn.Linear(2, 2)),
            dataset=dataset_fingerprint(data),
            shard_rows=4,
            shard_tokens=tokens,
            shard_starts=starts,
        )
