"""Index mode loads a request's samples through the fastest path the dataset offers (one
gather for a TensorDataset, `__getitems__`, else `__getitem__` per id): every path must give
the same inputs as `torch.stack([dataset[i][0] for i in ids])`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lyceum.proto.errors import INVALID_ARGUMENT
from lyceum.teacher_server.batcher import DynamicBatcher
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine
from lyceum.teacher_server.errors import ServeError
from lyceum.teacher_server.metrics import ServerMetrics
from lyceum.teacher_server.transport.base import TeacherService

IMAGES = torch.arange(40 * 2 * 3, dtype=torch.float32).reshape(40, 2, 3)
LABELS = torch.arange(40) % 7


class PerItem(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    def __len__(self) -> int:
        return len(LABELS)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return IMAGES[i], int(LABELS[i])


class Batched(PerItem):
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        self.calls.append(indices)
        return [self[i] for i in indices]


class NumpyItems(PerItem):
    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:  # type: ignore[override]
        return IMAGES[i].numpy(), int(LABELS[i])


class Doubled(torch.utils.data.TensorDataset):
    """A subclass with its own __getitem__: the gather shortcut must not bypass it."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(2 * t[i] for t in self.tensors)


def _service(dataset: torch.utils.data.Dataset, sequence_input: bool = False) -> TeacherService:
    engine = TeacherEngine(nn.Flatten(), EngineConfig(), torch.zeros(2, 3))
    batcher = DynamicBatcher([engine], 16, 0.0, 64, ServerMetrics())
    return TeacherService(
        batcher,
        input_schema=engine.input_schema,
        sequence_input=sequence_input,
        dataset=dataset,
        token=None,
        max_message_bytes=1 << 20,
        metrics=ServerMetrics(),
        teacher_id="t",
    )


IDS = np.array([7, 3, 39, 0, 12], dtype=np.uint64)


@pytest.mark.parametrize(
    "dataset",
    [PerItem(), Batched(), NumpyItems(), torch.utils.data.TensorDataset(IMAGES, LABELS)],
    ids=["getitem", "getitems", "numpy", "tensor_dataset"],
)
def test_every_loading_path_gives_the_per_item_inputs(dataset):
    ids, inputs = _service(dataset)._load_index(IDS)
    assert isinstance(inputs, torch.Tensor)
    assert torch.equal(inputs, torch.stack([IMAGES[i] for i in IDS.tolist()]))
    assert ids is IDS


def test_getitems_is_called_once_per_request():
    dataset = Batched()
    _service(dataset)._load_index(IDS)
    assert dataset.calls == [IDS.tolist()]


def test_tensor_dataset_subclass_keeps_its_own_getitem():
    _ids, inputs = _service(Doubled(IMAGES, LABELS))._load_index(IDS)
    assert isinstance(inputs, torch.Tensor)  # dense inputs: one stacked tensor
    assert torch.equal(inputs, 2 * torch.stack([IMAGES[i] for i in IDS.tolist()]))


def test_sequence_inputs_stay_a_list_of_samples():
    _ids, inputs = _service(Batched(), sequence_input=True)._load_index(IDS)
    assert isinstance(inputs, list) and len(inputs) == len(IDS)
    assert all(
        isinstance(x, torch.Tensor) and torch.equal(x, IMAGES[i])
        for x, i in zip(inputs, IDS.tolist(), strict=True)
    )


def test_repeated_ids_are_refused():
    with pytest.raises(ServeError) as err:
        _service(PerItem())._load_index(np.array([4, 9, 4], dtype=np.uint64))
    assert err.value.code == INVALID_ARGUMENT and "repeats sample ids" in err.value.message
