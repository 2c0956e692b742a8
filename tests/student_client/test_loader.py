"""DistillLoader: sampler order, one delivery per id, resumption mid-epoch, DDP shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from teachers import make_dump

from lyceum.deploy.examples import digits
from lyceum.student_client.loader import DistillLoader
from lyceum.student_client.offline import OfflineKnowledge
from lyceum.student_client.sources import OfflineTeacher


@pytest.fixture(scope="module")
def data() -> torch.utils.data.Dataset:
    return digits("test")  # 360 samples


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory, data) -> Path:
    return make_dump(tmp_path_factory.mktemp("dump"), seed=2, dataset=data)


def _loader(data, dump_dir: Path, **kwargs) -> DistillLoader:
    return DistillLoader(
        data, {"t": OfflineTeacher(dump_dir, data)}, **{"batch_size": 64, **kwargs}
    )


def test_batches_follow_the_sampler_with_their_knowledge(data, dump_dir: Path) -> None:
    loader = _loader(data, dump_dir, shuffle=True, seed=4, window=3)
    expected = torch.randperm(len(data), generator=torch.Generator().manual_seed(4)).tolist()
    full = OfflineKnowledge(dump_dir).get(range(len(data))).tensors["logits"]
    ids: list[int] = []
    for x, y, k in loader:
        batch_ids = k["sample_id"]
        assert torch.equal(x, data.images[batch_ids]) and torch.equal(y, data.labels[batch_ids])
        assert torch.equal(k["logits"], full[batch_ids])
        ids += batch_ids.tolist()
    assert ids == expected
    assert loader.epoch == 1 and loader.position == 0
    assert loader.stats.batches == len(loader) == 6 and loader.stats.samples == 360
    # The next epoch is another permutation (seed + epoch).
    second = [i for _x, _y, k in loader for i in k["sample_id"].tolist()]
    assert second == torch.randperm(360, generator=torch.Generator().manual_seed(5)).tolist()


def test_resume_mid_epoch_yields_the_remaining_ids(data, dump_dir: Path) -> None:
    loader = _loader(data, dump_dir, shuffle=True, seed=9)
    order = [b for b in loader.batches()]
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "seed": 9, "position": 2}
    resumed = _loader(data, dump_dir, shuffle=True, seed=9)
    resumed.load_state_dict(state)
    rest = [k["sample_id"].tolist() for _x, _y, k in resumed]
    assert rest == order[2:]
    wrong_seed = _loader(data, dump_dir, shuffle=True, seed=1)
    with pytest.raises(ValueError, match="seed 9 but this loader has seed 1"):
        wrong_seed.load_state_dict(state)


def test_distributed_sampler_shards_cover_each_id_once(data, dump_dir: Path) -> None:
    seen: list[int] = []
    for rank in range(2):
        sampler: torch.utils.data.DistributedSampler = torch.utils.data.DistributedSampler(
            data, num_replicas=2, rank=rank, seed=3
        )
        loader = _loader(data, dump_dir, sampler=sampler, batch_size=32)
        loader.set_epoch(1)
        seen += [i for _x, _y, k in loader for i in k["sample_id"].tolist()]
    assert sorted(seen) == list(range(360))


def test_bad_arguments_are_named(data, dump_dir: Path) -> None:
    with pytest.raises(ValueError, match="shuffle=True or a sampler, not both"):
        _loader(data, dump_dir, shuffle=True, sampler=torch.utils.data.SequentialSampler(data))
    with pytest.raises(ValueError, match="window must be >= 0"):
        _loader(data, dump_dir, window=-1)
