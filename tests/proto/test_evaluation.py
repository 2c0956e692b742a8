"""Top-1 accuracy, the one score the trainer, compression and the demo report."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lyceum.proto.evaluation import eval_mode, top1_accuracy


class _Pick(nn.Module):
    """Predicts the class written in input column 0; `mapping` returns it as a student with
    features would. Dropout makes train mode visible in the outputs."""

    def __init__(self, mapping: bool = False) -> None:
        super().__init__()
        self.mapping = mapping
        self.drop = nn.Dropout(p=1.0)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        self.calls.append(len(x))
        logits = self.drop(nn.functional.one_hot(x[:, 0].long(), 3).float())
        return {"logits": logits, "feat": x} if self.mapping else logits


def _data(predicted: list[int], labels: list[int]) -> TensorDataset:
    x = torch.zeros(len(predicted), 2)
    x[:, 0] = torch.tensor(predicted, dtype=torch.float32)
    return TensorDataset(x, torch.tensor(labels))


def test_counts_the_items_whose_largest_output_is_the_label() -> None:
    # 7 items, 5 right: batches of 3 (3 + 3 + 1) are scored together.
    data = _data([0, 1, 2, 2, 1, 0, 1], [0, 1, 2, 0, 1, 0, 2])
    model = _Pick()
    assert top1_accuracy(model, data, batch_size=3) == 5 / 7
    assert model.calls == [3, 3, 1]
    assert model.training  # restored; dropout(p=1) in train mode would have zeroed the logits
    assert top1_accuracy(_Pick(mapping=True), data, device="cpu") == 5 / 7


def test_a_module_left_in_eval_mode_stays_there_and_callables_are_scored_too() -> None:
    data = _data([2, 2], [2, 1])
    model = _Pick().eval()
    assert top1_accuracy(model, data) == 0.5
    assert not model.training
    assert top1_accuracy(lambda x: nn.functional.one_hot(x[:, 0].long(), 3), data) == 0.5


def test_a_module_that_refuses_a_mode_change_runs_as_it_is() -> None:
    class Exported(_Pick):
        # What `ExportedProgram.module()` does: its mode is fixed when it is exported.
        def train(self, mode: bool = True) -> Exported:
            raise NotImplementedError("Calling train() is not supported yet.")

    model = Exported()
    model.drop.p = 0.0
    with eval_mode(model):
        assert model.training
    assert top1_accuracy(model, _data([1], [1])) == 1.0


def test_an_empty_dataset_is_an_error_not_a_zero() -> None:
    with pytest.raises(ValueError, match=r"top1_accuracy: the dataset is empty \(0 samples\)"):
        top1_accuracy(_Pick(), _data([], []))
