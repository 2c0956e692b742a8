"""DistillLoader: sampler order, one delivery per id, resumption mid-epoch, DDP shards,
worker processes, pinned memory and device transfer."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lyceum.deploy.examples import digits
from lyceum.student_client.loader import DistillLoader
from lyceum.student_client.offline import OfflineKnowledge
from lyceum.student_client.sources import OfflineTeacher
from tests._support.teachers import make_dump


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


class _Structured(torch.utils.data.Dataset):
    """digits with structured inputs: `({"image": x, "where": (pid, id)}, label)`, so a test
    sees which process loaded each sample and that nested tensors travel intact."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[dict[str, Any], Any]:
        x, y = self.data[i]
        return {"image": x, "where": (torch.tensor(os.getpid()), torch.tensor(i))}, y


def _check_epoch(loader: DistillLoader, data, dump_dir: Path, seed: int) -> list[int]:
    """One epoch: inputs, labels and knowledge belong to the batch's ids, in the shuffled
    order; returns the pids that loaded the samples."""
    full = OfflineKnowledge(dump_dir).get(range(len(data))).tensors["logits"]
    ids: list[int] = []
    pids: list[int] = []
    for x, y, k in loader:
        batch_ids = k["sample_id"]
        assert x["where"][1].tolist() == batch_ids.tolist()
        assert torch.equal(x["image"], data.images[batch_ids])
        assert torch.equal(y, data.labels[batch_ids])
        assert torch.equal(k["logits"], full[batch_ids])
        ids += batch_ids.tolist()
        pids += x["where"][0].tolist()
    assert ids == torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    return pids


@pytest.mark.integration  # starts DataLoader worker processes
def test_worker_processes_load_the_data(data, dump_dir: Path) -> None:
    structured = _Structured(data)
    teacher = OfflineTeacher(dump_dir, data)
    loader = DistillLoader(structured, {"t": teacher}, 64, shuffle=True, seed=4, num_workers=2)
    pids = _check_epoch(loader, data, dump_dir, seed=4)
    assert os.getpid() not in pids and len(set(pids)) == 2
    # Stopped early (as for a checkpoint), the pass ends its workers; resuming from the
    # state continues with the remaining batches, loaded by fresh workers.
    before = set(multiprocessing.active_children())
    it = iter(loader)
    next(it)
    next(it)
    it.close()
    assert set(multiprocessing.active_children()) == before
    resumed = DistillLoader(structured, {"t": teacher}, 64, shuffle=True, seed=5, num_workers=2)
    resumed.load_state_dict({"epoch": 0, "seed": 5, "position": 2})
    expected = resumed.batches()[2:]
    rest = [k["sample_id"].tolist() for _x, _y, k in resumed]
    assert rest == expected and len(rest) == 4


def test_device_transfer_moves_every_tensor_of_the_batch(data, dump_dir: Path) -> None:
    """'meta' stands in for an accelerator on a CPU-only machine: a real move to another
    device, so a tensor left behind (e.g. nested in the inputs) shows."""
    structured = _Structured(data)
    teacher = OfflineTeacher(dump_dir, data)
    on_cpu = DistillLoader(structured, {"t": teacher}, 64, shuffle=True, seed=4, device="cpu")
    assert _check_epoch(on_cpu, data, dump_dir, seed=4) == [os.getpid()] * len(data)
    on_meta = DistillLoader(structured, {"t": teacher}, 64, window=1, device="meta")
    x, y, k = next(iter(on_meta))
    tensors = [x["image"], *x["where"], y, *k.values()]
    assert [t.device.type for t in tensors] == ["meta"] * 6
    assert x["image"].shape == (64, 1, 8, 8) and k["logits"].shape == (64, 10)


def test_pin_memory_without_an_accelerator_warns_and_loads_unpinned(
    data, dump_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CPU-only machine, on any machine (this test used to skip wherever a GPU was).
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="pin_memory=True but no accelerator"):
        loader = _loader(data, dump_dir, shuffle=True, seed=4, pin_memory=True)
    assert not loader.pin_memory
    full = OfflineKnowledge(dump_dir).get(range(len(data))).tensors["logits"]
    batches = [(x, k) for x, _y, k in loader]
    assert sum(len(k["sample_id"]) for _x, k in batches) == len(data)
    for x, k in batches:
        assert torch.equal(k["logits"], full[k["sample_id"]]) and not x.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_reach_the_gpu(data, dump_dir: Path) -> None:
    loader = _loader(data, dump_dir, shuffle=True, seed=4, pin_memory=True, device="cuda")
    assert loader.pin_memory
    full = OfflineKnowledge(dump_dir).get(range(len(data))).tensors["logits"]
    seen = 0
    for x, y, k in loader:
        ids = k["sample_id"].cpu()
        assert x.is_cuda and y.is_cuda and k["logits"].is_cuda
        assert torch.equal(x.cpu(), data.images[ids]) and torch.equal(k["logits"].cpu(), full[ids])
        seen += len(ids)
    assert seen == len(data)


class _Counting(OfflineTeacher):
    """An offline teacher that records the sample ids of every request it is sent."""

    def __init__(self, *args: Any, needs_inputs: bool = False) -> None:
        super().__init__(*args)
        self.asked: list[list[int]] = []
        self._needs_inputs = needs_inputs

    @property
    def needs_inputs(self) -> bool:
        return self._needs_inputs

    def submit(self, request_id: int, ids: torch.Tensor, inputs: Any = None) -> None:
        self.asked.append(ids.tolist())
        super().submit(request_id, ids, inputs)


def _epoch_ids(loader: DistillLoader, full: torch.Tensor) -> list[list[int]]:
    out = []
    for _x, _y, k in loader:
        assert torch.equal(k["logits"], full[k["sample_id"]])
        out.append(k["sample_id"].tolist())
    return out


def test_the_next_epochs_first_batches_are_requested_before_it_starts(data, dump_dir):
    teacher = _Counting(dump_dir, data)
    loader = DistillLoader(data, {"t": teacher}, 64, shuffle=True, seed=4, window=2)
    full = OfflineKnowledge(dump_dir).get(range(len(data))).tensors["logits"]
    first = _epoch_ids(loader, full)
    # Epoch 0's 6 batches, then epoch 1's first window + 1 while epoch 0 ended.
    assert teacher.asked == first + loader.batches(1)[:3]
    second = _epoch_ids(loader, full)
    assert second == loader.batches(1)
    # Epoch 1 took the prefetched requests over: each of its batches was asked once.
    assert teacher.asked[6:12] == second and teacher.asked[12:] == loader.batches(2)[:3]


def test_prefetched_batches_another_epoch_does_not_want_are_dropped(data, dump_dir):
    teacher = _Counting(dump_dir, data)
    loader = DistillLoader(data, {"t": teacher}, 64, shuffle=True, seed=4, window=2)
    full = OfflineKnowledge(dump_dir).get(range(len(data))).tensors["logits"]
    _epoch_ids(loader, full)
    loader.set_epoch(7)  # not the epoch that was prefetched
    assert _epoch_ids(loader, full) == loader.batches(7)
    assert teacher.asked[9:15] == loader.batches(7)  # asked again, in epoch 7's order


def test_no_prefetch_when_a_teacher_needs_inputs_or_it_is_turned_off(data, dump_dir):
    full = OfflineKnowledge(dump_dir).get(range(len(data))).tensors["logits"]
    cases: tuple[tuple[_Counting, dict[str, Any]], ...] = (
        (_Counting(dump_dir, data, needs_inputs=True), {}),
        (_Counting(dump_dir, data), {"prefetch_next_epoch": False}),
    )
    for teacher, kwargs in cases:
        loader = DistillLoader(data, {"t": teacher}, 64, shuffle=True, window=2, **kwargs)
        assert teacher.asked == [] and _epoch_ids(loader, full) == teacher.asked
