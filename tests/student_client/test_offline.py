"""OfflineKnowledge: random access by id, validation on open, refusals that name the culprit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lyceum.deploy.examples import digits, teacher_cnn, tiny_lm, token_sequences
from lyceum.proto.codec import from_record_batch
from lyceum.proto.manifest import MANIFEST_NAME, Manifest, model_identity
from lyceum.student_client.offline import OfflineKnowledge, verify_knowledge
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

# Batch size 1 makes every sample's knowledge independent of its batch, so expected values
# come from one-sample inference; 1 kB record batches put several in every shard.
CONFIG = DumpConfig(
    shard_rows=100, batch_size=1, workers=0, record_batch_bytes=1000, progress=False
)


def _engine(precision: str = "fp32") -> TeacherEngine:
    torch.manual_seed(0)
    return TeacherEngine(
        teacher_cnn(width=8),
        EngineConfig(precision=precision),  # type: ignore[arg-type]  # a string as a config file gives it: pydantic checks it
        digits("test")[0][0],
    )


@pytest.fixture(scope="module")
def engine() -> TeacherEngine:
    return _engine()


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory, engine: TeacherEngine) -> Path:
    out = tmp_path_factory.mktemp("dump")
    dump_knowledge(engine, digits("test"), out, CONFIG, model_identity("cnn", engine.model))
    return out


@pytest.fixture
def copy(dump_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the dump, free to damage."""
    return Path(shutil.copytree(dump_dir, tmp_path / "dump"))


def _expected(engine: TeacherEngine, ids: list[int]) -> torch.Tensor:
    data = digits("test")
    rows = [engine.infer(data[i][0].unsqueeze(0))["logits"] for i in ids]
    assert all(isinstance(r, torch.Tensor) for r in rows)  # a dense field
    return torch.cat(rows)  # type: ignore[arg-type]  # narrowed by the line above


def test_get_any_order_across_shards_and_record_batches(
    dump_dir: Path, engine: TeacherEngine
) -> None:
    edges = [0, 359, 100, 99]  # first and last ids, both sides of a shard boundary
    shuffled = [i for i in np.random.default_rng(1).permutation(360).tolist() if i not in edges]
    ids = shuffled[:97] + edges
    with OfflineKnowledge(dump_dir, dataset=digits("test")) as knowledge:
        assert len(knowledge._shards[0].batches) > 1  # the gather crosses record batches
        batch = knowledge.get(ids)
        again = knowledge.get(torch.tensor(ids))
    assert batch.sample_ids.tolist() == ids and len(batch) == len(ids)
    assert torch.equal(batch.tensors["logits"], _expected(engine, ids))
    assert torch.equal(again.tensors["logits"], batch.tensors["logits"])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_round_trip(tmp_path: Path, precision: str) -> None:
    engine = _engine(precision)
    dump_knowledge(engine, digits("test"), tmp_path, CONFIG, model_identity("cnn", engine.model))
    ids = [359, 7, 150]
    with OfflineKnowledge(tmp_path) as knowledge:
        got = knowledge.get(ids).tensors["logits"]
    assert got.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert torch.equal(got, _expected(engine, ids))


def test_empty_and_bad_ids(dump_dir: Path) -> None:
    with OfflineKnowledge(dump_dir) as knowledge:
        empty = knowledge.get([])
        assert empty.tensors["logits"].shape == (0, 10) and len(empty) == 0
        with pytest.raises(ValueError, match=r"sample ids \[360\] are outside .*\[0, 360\)"):
            knowledge.get([3, 360])
        repeated = knowledge.get([3, 4, 3])  # drawn with replacement: each gets its row
        assert repeated.sample_ids.tolist() == [3, 4, 3]
        assert torch.equal(repeated.tensors["logits"][0], repeated.tensors["logits"][2])


def test_refuses_another_dataset(dump_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"from a different dataset .*360 samples"):
        OfflineKnowledge(dump_dir, dataset=digits("val"))
    # Same length, different items: only the content hash can tell.
    with pytest.raises(ValueError, match="different dataset"):
        OfflineKnowledge(dump_dir, dataset=digits("train", limit=360))


def test_truncated_shard_is_named(copy: Path) -> None:
    shard = copy / "shard-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard-00002.arrow.*truncated"):
        OfflineKnowledge(copy)


def test_corrupt_footer_is_named(copy: Path) -> None:
    shard = copy / "shard-00001.arrow"
    raw = bytearray(shard.read_bytes())
    raw[-6:] = b"\0" * 6  # the trailing ARROW1 magic
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"shard-00001.arrow.*not a readable Arrow file"):
        OfflineKnowledge(copy)


def test_flipped_byte_fails_verify(copy: Path) -> None:
    assert verify_knowledge(copy) == []
    shard = copy / "shard-00003.arrow"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    problems = verify_knowledge(copy)
    assert len(problems) == 1 and problems[0].startswith("shard-00003.arrow: sha256")


def test_unknown_manifest_major_is_refused(copy: Path) -> None:
    raw = json.loads((copy / MANIFEST_NAME).read_bytes())
    raw["format_version"] = "2.0"
    (copy / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"unknown format version '2\.0'"):
        OfflineKnowledge(copy)


def test_incomplete_dump_is_refused_with_the_missing_ids(copy: Path) -> None:
    m = Manifest.read(copy)
    m.model_copy(update={"shards": (m.shards[0], m.shards[2])}).write(copy)
    with pytest.raises(
        ValueError,
        match=r"incomplete \(200 of 360 samples; missing ids 100-199 \(shard 1\), ids 300-359 "
        r"\(shard 3\)\): rerun the same `lyceum teacher dump` command",
    ):
        OfflineKnowledge(copy)


def test_an_empty_dataset_is_named_empty(dump_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"the student's dataset is empty \(0 samples\)"):
        OfflineKnowledge(dump_dir, dataset=torch.utils.data.TensorDataset(torch.zeros(0, 1)))


def test_stats_match_numpy(dump_dir: Path, engine: TeacherEngine) -> None:
    with OfflineKnowledge(dump_dir) as knowledge:
        stats = knowledge.stats()["logits"]
        everything = knowledge.get(list(range(360))).tensors["logits"].double()
    assert stats.count == 3600
    assert stats.min == float(everything.min()) and stats.max == float(everything.max())
    assert stats.mean == pytest.approx(float(everything.mean()), rel=1e-12)


@pytest.mark.parametrize("topk", [None, 3])
def test_sequences_across_record_batches_match_the_codec(tmp_path: Path, topk: int | None) -> None:
    """Token-level knowledge gathered by id equals each shard decoded by the codec."""
    torch.manual_seed(0)
    data = token_sequences(n=70)
    model = tiny_lm()
    engine = TeacherEngine(model, EngineConfig(topk=topk), data[0][0])
    config = DumpConfig(
        shard_rows=30, batch_size=4, workers=0, record_batch_bytes=1000, progress=False
    )
    manifest = dump_knowledge(engine, data, tmp_path, config, model_identity("lm", model))
    # The independent path: every record batch of every shard through the codec.
    reference: dict[int, dict[str, torch.Tensor]] = {}
    record_batches = 0
    for s in manifest.shards:
        reader = pa.ipc.open_file(pa.memory_map(str(tmp_path / s.file)))
        for i in range(reader.num_record_batches):
            decoded = from_record_batch(reader.get_batch(i), manifest.knowledge_schema)
            record_batches += 1
            for j, sample in enumerate(decoded.sample_ids.tolist()):
                reference[sample] = {c: t[j].clone() for c, t in decoded.tensors.items()}
    assert record_batches > 2 * len(manifest.shards)
    ids = np.random.default_rng(2).permutation(70).tolist()
    with OfflineKnowledge(tmp_path, dataset=data) as knowledge:
        batch = knowledge.get(ids)
    assert batch.sample_ids.tolist() == ids
    assert set(batch.tensors) == set(manifest.knowledge_schema.columns)
    for column, tensor in batch.tensors.items():
        assert tensor.is_nested
        for j, sample in enumerate(ids):
            assert tensor[j].shape[0] == len(data[sample][0])
            assert torch.equal(tensor[j], reference[sample][column])
