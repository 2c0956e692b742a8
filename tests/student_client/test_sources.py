"""Knowledge sources: offline by id, and one online plus one offline teacher merged by a
loader (values checked against hand-computed means)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lyceum.deploy.examples import digits
from lyceum.deploy.launcher import start_teacher
from lyceum.student_client.loader import DistillLoader
from lyceum.student_client.merger import Merger
from lyceum.student_client.offline import OfflineKnowledge
from lyceum.student_client.sources import KnowledgeSource, OfflineTeacher, OnlineTeacher
from tests._support.teachers import (
    DIGITS,
    ENV,
    SLOW,
    make_dump,
    reference_logits,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def small_set() -> torch.utils.data.Dataset:
    return digits("test")  # 360 samples: quick to dump


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory, small_set) -> Path:
    return make_dump(tmp_path_factory.mktemp("dump"), seed=5, dataset=small_set)


def test_offline_teacher_submit_poll_outstanding(dump_dir: Path, small_set) -> None:
    source = OfflineTeacher(dump_dir, small_set)
    assert isinstance(source, KnowledgeSource)
    assert not source.needs_inputs
    source.submit(7, torch.tensor([5, 2, 300]))
    source.submit(8, torch.tensor([0]))
    assert {k: v.tolist() for k, v in source.outstanding().items()} == {7: [5, 2, 300], 8: [0]}
    done = dict(source.poll(0))
    assert source.outstanding() == {} and source.poll(0) == []
    direct = OfflineKnowledge(dump_dir).get([5, 2, 300])
    assert done[7].sample_ids.tolist() == [5, 2, 300]
    assert torch.equal(done[7].tensors["logits"], direct.tensors["logits"])
    source.close()


@pytest.mark.integration
def test_online_and_offline_teachers_merged(tmp_path: Path, dump_dir: Path, small_set) -> None:
    checkpoint = save_checkpoint(tmp_path / "t.safetensors", seed=11)
    online_ref = reference_logits(checkpoint, small_set)
    offline_all = OfflineKnowledge(dump_dir).get(range(len(small_set))).tensors["logits"]
    with start_teacher(
        SLOW,
        dataset=DIGITS,
        checkpoint=checkpoint,
        env=ENV,
        zmq=True,
        exit_after_s=60,
        extra_args=["--model-kwargs", '{"delay_s": 0.0}'],
    ) as server:
        online = OnlineTeacher(server.endpoint("zmq"), mode="query")
        offline = OfflineTeacher(dump_dir, small_set)
        loader = DistillLoader(
            small_set,
            {"online": online, "offline": offline},
            batch_size=50,
            shuffle=True,
            merger=Merger({"logits": "mean"}),
        )
        got: dict[int, torch.Tensor] = {}
        for _x, _y, k in loader:
            got.update(zip(k["sample_id"].tolist(), k["logits"], strict=True))
        online.close()
        # The same server through a dns:/// name (gRPC resolves it, round_robin), index mode.
        with OnlineTeacher(f"dns:///localhost:{server.port('grpc')}", mode="index") as by_name:
            by_dns = by_name.request([4, 0])
    assert by_dns.sample_ids.tolist() == [4, 0]
    train_ref = reference_logits(checkpoint, digits("train"))
    torch.testing.assert_close(by_dns.tensors["logits"], train_ref[[4, 0]])
    assert sorted(got) == list(range(len(small_set)))
    for i, row in got.items():
        # By hand: the mean of the two teachers' logits for sample i.
        torch.testing.assert_close(row, (online_ref[i] + offline_all[i]) / 2)


def test_incompatible_schemas_refused(tmp_path: Path, dump_dir: Path, small_set) -> None:
    five = make_dump(tmp_path / "five", seed=1, dataset=small_set, num_classes=5)
    with pytest.raises(
        ValueError, match=r"field 'logits': teachers 'ten' and 'five' disagree on shape"
    ):
        DistillLoader(
            small_set,
            {"ten": OfflineTeacher(dump_dir, small_set), "five": OfflineTeacher(five, small_set)},
            batch_size=10,
            merger=Merger({"logits": "mean"}),
        )
