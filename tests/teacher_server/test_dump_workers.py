"""A dump's loader workers: the same bytes as loading in the dump's own process, whichever
way the workers start (fork, or spawn, where everything they get is pickled)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lyceum.deploy.examples import digits, teacher_cnn, tiny_lm, token_sequences
from lyceum.proto.manifest import Manifest, model_identity
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

# Token sequences of varying length: the workers pad them, which needs the sequence flag.
_LM_DUMP = """
import multiprocessing
import sys

import torch

from lyceum.deploy.examples import tiny_lm, token_sequences
from lyceum.proto.manifest import model_identity
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

multiprocessing.set_start_method("spawn")
torch.manual_seed(0)
data, model = token_sequences(n=90), tiny_lm()
engine = TeacherEngine(model, EngineConfig(topk=4), data[0][0])
config = DumpConfig(shard_rows=40, batch_size=16, workers=2, progress=False)
dump_knowledge(engine, data, sys.argv[1], config, model_identity("lm", model))
"""


def _same_shards(a: Path, b: Path) -> None:
    left, right = Manifest.read(a), Manifest.read(b)
    assert left.complete and right.complete
    assert left.shards == right.shards  # names, ranges, sizes and sha256s
    for shard in left.shards:
        assert (a / shard.file).read_bytes() == (b / shard.file).read_bytes()


@pytest.mark.integration
def test_two_workers_write_the_bytes_of_zero(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data, model = digits("test"), teacher_cnn(width=8)
    engine = TeacherEngine(model, EngineConfig(), data[0][0])
    identity = model_identity("cnn", model)
    for workers in (0, 2):
        config = DumpConfig(shard_rows=100, batch_size=32, workers=workers, progress=False)
        manifest = dump_knowledge(engine, data, tmp_path / f"w{workers}", config, identity)
        assert manifest.rows == 360 and len(manifest.shards) == 4
    _same_shards(tmp_path / "w0", tmp_path / "w2")


@pytest.mark.integration
def test_spawned_workers_collate_sequences_without_the_engine(tmp_path: Path) -> None:
    # Spawned workers get their collate function pickled: one that held the engine (and so
    # the model) would fail to pickle, which is why the dump used to force fork.
    done = subprocess.run(
        [sys.executable, "-c", _LM_DUMP, str(tmp_path / "spawned")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    torch.manual_seed(0)
    data, model = token_sequences(n=90), tiny_lm()
    engine = TeacherEngine(model, EngineConfig(topk=4), data[0][0])
    config = DumpConfig(shard_rows=40, batch_size=16, workers=0, progress=False)
    dump_knowledge(engine, data, tmp_path / "inline", config, model_identity("lm", model))
    _same_shards(tmp_path / "inline", tmp_path / "spawned")
