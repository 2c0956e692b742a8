"""A student that declares its vocabulary (`vocab=`) is checked against the teacher's, offline
and online: fewer ids or another tokenizer is refused naming both, a padded vocabulary of the
same tokenizer is accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lyceum.deploy.examples import TokenDocuments, tiny_llama
from lyceum.proto.items import item_inputs
from lyceum.proto.manifest import model_identity
from lyceum.proto.vocab import Vocabulary, vocabulary_sha256
from lyceum.student_client import OfflineTeacher, OnlineTeacher, TeacherTimeouts
from lyceum.teacher_server.config import ServerConfig
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine
from lyceum.teacher_server.server import create_server

VOCAB = 1024


def _engine(example: object, tokenizer: Path | None = None) -> TeacherEngine:
    model = tiny_llama(vocab=VOCAB, layers=1, hidden=16, heads=2, seed=0)
    outputs = (OutputSpec.parse("logits=@output.logits"),)
    return TeacherEngine(model, EngineConfig(outputs=outputs, topk=4, tokenizer=tokenizer), example)


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = TokenDocuments(n=6, vocab=VOCAB, seed=0)
    engine = _engine(item_inputs(data[0]))
    out = tmp_path_factory.mktemp("vocab") / "dump"
    config = DumpConfig(shard_rows=6, batch_size=3, workers=0, progress=False)
    dump_knowledge(engine, data, out, config, model_identity("lm", engine.model))
    return out


def test_offline_student_of_fewer_ids_is_refused_naming_both(dump: Path) -> None:
    with pytest.raises(ValueError) as err:
        OfflineTeacher(dump, vocab=Vocabulary(size=1000))
    message = str(err.value)
    assert f"dump {str(dump)!r}" in message
    assert "the teacher's vocabulary has 1024 token ids, the student's only 1000" in message


def test_offline_student_of_a_padded_vocabulary_reads(dump: Path) -> None:
    teacher = OfflineTeacher(dump, vocab=Vocabulary(size=1088, tokenizer_sha256="ab" * 32))
    try:
        assert teacher.schema.vocab == Vocabulary(size=VOCAB)
    finally:
        teacher.close()


@pytest.mark.integration
def test_online_student_of_another_tokenizer_is_refused_naming_both(tmp_path: Path) -> None:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}})
    )
    engine = _engine({"input_ids": torch.arange(1, 5)}, tokenizer=tmp_path)
    ours = vocabulary_sha256(vocab)
    assert engine.schema.vocab == Vocabulary(size=VOCAB, tokenizer_sha256=ours)
    server, _ports = create_server(ServerConfig(grpc_port=0, max_delay_ms=1), [engine])
    server.start()
    try:
        endpoint = server.endpoints[0]
        student = Vocabulary(size=VOCAB, tokenizer_sha256="ef" * 32)
        timeouts = TeacherTimeouts(timeout_s=30)
        client = OnlineTeacher(endpoint, vocab=student, timeouts=timeouts)
        try:
            with pytest.raises(ValueError) as err:
                client.describe()
        finally:
            client.close()
        message = str(err.value)
        assert f"the teacher's tokenizer (vocabulary sha256 {ours[:16]})" in message
        assert "is not the student's (efefefefefefefef)" in message
        same = Vocabulary(size=VOCAB, tokenizer_sha256=ours)
        with OnlineTeacher(endpoint, vocab=same, timeouts=timeouts) as client:
            inputs = [torch.arange(1, 7), torch.arange(3, 6)]
            got = client.request(torch.tensor([0, 1]), inputs={"input_ids": inputs})
            assert got.tensors["logits.indices"].unbind()[0].shape[-1] == 4
    finally:
        assert server.stop(grace_s=5)
