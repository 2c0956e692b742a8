"""export_knowledge: Parquet and CSV that equal the dump's decoded tensors, streamed per
record batch, checked shard by shard, never a half-written file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lyceum.deploy.examples import digits, teacher_cnn, tiny_lm, token_sequences
from lyceum.proto.manifest import Manifest, model_identity
from lyceum.proto.schema import KnowledgeSchema
from lyceum.student_client.export import export_knowledge
from lyceum.student_client.offline import OfflineKnowledge
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

# Small record batches: several per shard, so the export writes many batches.
CONFIG = DumpConfig(
    shard_rows=100, batch_size=20, workers=0, record_batch_bytes=800, progress=False
)


def _dump(out: Path, precision: str, topk: int | None = None) -> Path:
    torch.manual_seed(0)
    model = teacher_cnn(width=8)
    engine = TeacherEngine(
        model,
        # A string, as a config file gives it: pydantic checks it.
        EngineConfig(precision=precision, topk=topk),  # type: ignore[arg-type]
        digits("test")[0][0],
    )
    dump_knowledge(engine, digits("test"), out, CONFIG, model_identity("cnn", model))
    return out


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dumps")
    out = {p: _dump(root / p, p) for p in ("fp32", "fp16", "bf16")}
    out["topk"] = _dump(root / "topk", "bf16", topk=3)
    torch.manual_seed(0)
    data, model = token_sequences(n=40), tiny_lm()
    engine = TeacherEngine(model, EngineConfig(topk=4, precision="fp16"), data[0][0])
    config = CONFIG.model_copy(update={"shard_rows": 15})
    dump_knowledge(engine, data, root / "lm", config, model_identity("lm", model))
    out["lm"] = root / "lm"
    return out


def _decoded(directory: Path) -> dict[str, torch.Tensor]:
    with OfflineKnowledge(directory) as knowledge:
        batch = knowledge.get(np.arange(len(knowledge)))
    return {"sample_id": batch.sample_ids, **batch.tensors}


def _record_batches(directory: Path) -> int:
    m = Manifest.read(directory)
    return sum(pa.ipc.open_file(str(directory / s.file)).num_record_batches for s in m.shards)


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "topk"])
def test_parquet_equals_the_decoded_dump_as_float32(
    dumps: dict[str, Path], tmp_path: Path, name: str
) -> None:
    result = export_knowledge(dumps[name], tmp_path / "k.parquet", progress=False)
    expected = _decoded(dumps[name])
    table = pq.read_table(result.path)
    assert result.rows == 360 and result.columns == tuple(table.column_names)
    assert table.column_names == list(expected)
    assert result.bytes == result.path.stat().st_size
    assert np.array_equal(table["sample_id"].to_numpy(), expected["sample_id"].numpy())
    for column, tensor in expected.items():
        if column == "sample_id":
            continue
        got = torch.from_numpy(np.stack(table[column].to_numpy(zero_copy_only=False)))
        want = tensor if column.endswith(".indices") else tensor.float()
        assert got.dtype == want.dtype and torch.equal(got, want), column
    # Streamed: one row group per record batch of the dump.
    assert pq.ParquetFile(result.path).num_row_groups == _record_batches(dumps[name])
    # The file says what it holds: the exported schema (float32) and where it came from.
    meta = table.schema.metadata
    exported = KnowledgeSchema.from_json(meta[b"lyceum.schema"])
    assert {f.dtype for f in exported.fields} == {"float32"}
    source = Manifest.model_validate_json(meta[b"lyceum.manifest"])
    assert source.model == Manifest.read(dumps[name]).model and source.shards == ()


def test_sequences_export_to_parquet_as_lists(dumps: dict[str, Path], tmp_path: Path) -> None:
    export_knowledge(dumps["lm"], tmp_path / "lm.parquet", progress=False)
    table = pq.read_table(tmp_path / "lm.parquet")
    expected = _decoded(dumps["lm"])
    assert table["logits.values"].type == pa.large_list(pa.list_(pa.float32(), 4))
    for j in range(40):
        for column in ("logits.values", "logits.indices"):
            got = np.array(table[column][j].as_py())
            want = expected[column][j]
            want = want.float() if column.endswith(".values") else want
            assert np.array_equal(got, want.numpy()), (column, j)


def test_csv_has_a_column_per_value(dumps: dict[str, Path], tmp_path: Path) -> None:
    result = export_knowledge(dumps["topk"], tmp_path / "k.csv", to="csv", progress=False)
    names = [f"logits.values[{i}]" for i in range(3)] + [f"logits.indices[{i}]" for i in range(3)]
    assert result.columns == ("sample_id", *names)
    lines = result.path.read_text().splitlines()
    assert [h.strip('"') for h in lines[0].split(",")] == list(result.columns)
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    expected = _decoded(dumps["topk"])
    assert np.array_equal(rows[:, 0], expected["sample_id"].numpy())
    assert np.array_equal(
        rows[:, 1:4].astype(np.float32), expected["logits.values"].float().numpy()
    )
    assert np.array_equal(rows[:, 4:].astype(np.int64), expected["logits.indices"].numpy())


def test_csv_refuses_sequences(dumps: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sequence fields .*CSV has a fixed number of columns"):
        export_knowledge(dumps["lm"], tmp_path / "lm.csv", to="csv", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_shard_leaves_no_output(dumps: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(dumps["fp32"], tmp_path / "dump"))
    shard = copy / "shard-00002.arrow"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    shard.write_bytes(bytes(raw))
    out = tmp_path / "out.parquet"
    with pytest.raises(ValueError, match=r"shard shard-00002.arrow: sha256"):
        export_knowledge(copy, out, progress=False)
    assert not out.exists() and not (tmp_path / "out.parquet.tmp").exists()


def test_an_incomplete_dump_is_refused(dumps: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(dumps["fp32"], tmp_path / "dump"))
    m = Manifest.read(copy)
    m.model_copy(update={"shards": m.shards[:3]}).write(copy)
    with pytest.raises(ValueError, match=r"missing ids 300-359 \(shard 3\)"):
        export_knowledge(copy, tmp_path / "out.parquet", progress=False)
