"""The README's "Reading knowledge files with other tools": every snippet, run as printed,
against float32, float16 and bfloat16 dumps, gives the values `OfflineKnowledge` decodes."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from lyceum.deploy.cli import main
from lyceum.deploy.examples import digits, teacher_cnn, tiny_lm, token_sequences
from lyceum.proto.manifest import model_identity
from lyceum.student_client.offline import OfflineKnowledge
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Reading knowledge files with other tools"
CONFIG = DumpConfig(shard_rows=200, batch_size=50, workers=0, progress=False)
PRECISIONS = ["fp32", "fp16", "bf16"]


def _snippets() -> list[tuple[str, str]]:
    text = README.read_text()
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)


SNIPPETS = _snippets()
PYARROW, POLARS, DUCKDB, EXPORT_COMMANDS, EXPORTED = SNIPPETS


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dumps")
    torch.manual_seed(0)
    model = teacher_cnn(width=8)
    out = {}
    for precision in PRECISIONS:
        config = EngineConfig(precision=precision)  # type: ignore[arg-type]  # a string as a config file gives it: pydantic checks it
        engine = TeacherEngine(model, config, digits("test")[0][0])
        out[precision] = root / precision
        dump_knowledge(engine, digits("test"), out[precision], CONFIG, model_identity("t", model))
    data, lm = token_sequences(n=30), tiny_lm()
    engine = TeacherEngine(lm, EngineConfig(topk=8, precision="bf16"), data[0][0])
    out["lm"] = root / "lm"
    dump_knowledge(engine, data, out["lm"], CONFIG, model_identity("lm", lm))
    return out


@pytest.fixture
def workdir(
    dumps: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: Any
) -> Path:
    """A directory laid out as the snippets expect: `knowledge/` (of the precision the test
    is parametrized with) and `lm-knowledge/`."""
    shutil.copytree(dumps[request.param], tmp_path / "knowledge")
    shutil.copytree(dumps["lm"], tmp_path / "lm-knowledge")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _decoded(directory: Path, rows: int | None = None) -> dict[str, torch.Tensor]:
    with OfflineKnowledge(directory) as knowledge:
        batch = knowledge.get(np.arange(rows if rows is not None else len(knowledge)))
    return {"sample_id": batch.sample_ids, **batch.tensors}


def _run(code: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_the_section_has_the_snippets_this_file_runs() -> None:
    assert [lang for lang, _ in SNIPPETS] == ["python", "python", "python", "bash", "python"]


@pytest.mark.parametrize("workdir", PRECISIONS, indirect=True)
def test_pyarrow_numpy(workdir: Path) -> None:
    ns = _run(PYARROW[1])
    expected = _decoded(workdir / "knowledge", rows=200)  # shard 0
    assert ns["logits"].dtype == np.float32
    assert np.array_equal(ns["logits"], expected["logits"].float().numpy())
    assert np.array_equal(ns["sample_ids"], expected["sample_id"].numpy())


@pytest.mark.parametrize("workdir", PRECISIONS, indirect=True)
def test_polars(workdir: Path) -> None:
    ns = _run(POLARS[1])
    expected = _decoded(workdir / "knowledge", rows=200)
    df = ns["df"]
    assert df.schema["logits"].inner in (pl.Float32, pl.Float16)
    got = torch.from_numpy(df["logits"].to_numpy().astype(np.float32))
    assert torch.equal(got, expected["logits"].float())
    assert ns["everything"]["sample_id"].to_list() == list(range(360))
    lm = _decoded(workdir / "lm-knowledge")["logits.values"]
    values = ns["lm"]["logits.values"]
    assert values.dtype == pl.List(pl.Array(pl.Float32, 8))
    for j in range(len(values)):
        assert np.array_equal(np.array(values[j].to_list()), lm[j].float().numpy()), j


@pytest.mark.parametrize("workdir", ["fp32", "fp16"], indirect=True)
def test_duckdb(workdir: Path) -> None:
    ns = _run(DUCKDB[1])
    logits = _decoded(workdir / "knowledge", rows=200)["logits"].float()
    assert ns["top"] == [(i, float(logits[i].max())) for i in range(200)]


@pytest.mark.parametrize("workdir", PRECISIONS, indirect=True)
def test_export_then_any_reader(workdir: Path) -> None:
    commands = [line for line in EXPORT_COMMANDS[1].splitlines() if line.strip()]
    assert len(commands) == 2
    for line in commands:
        words = shlex.split(line, comments=True)
        assert words[0] == "lyceum"
        assert main([*words[1:], "--quiet"]) == 0
    assert (workdir / "knowledge.parquet").is_file()  # the default output beside the directory
    ns = _run(EXPORTED[1])
    expected = _decoded(workdir / "knowledge")
    logits = expected["logits"].float()
    assert ns["top"] == [(i, float(logits[i].max())) for i in range(360)]
    assert ns["df"].schema["logits"] == pl.Array(pl.Float32, 10)
    assert torch.equal(torch.from_numpy(ns["df"]["logits"].to_numpy()), logits)
    table = ns["table"]
    assert table.columns == ["sample_id", *[f"logits[{i}]" for i in range(10)]]
    assert torch.equal(torch.from_numpy(table.drop("sample_id").to_numpy()).float(), logits)
