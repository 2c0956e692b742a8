"""Dataset items' inputs, and fingerprints that cover inputs only: the same token inputs
with other labels are the same dataset; fingerprints written before scopes still verify."""

from __future__ import annotations

import pytest
import torch

from lyceum.proto.fingerprint import DatasetFingerprint, dataset_fingerprint, verify_dataset
from lyceum.proto.items import item_inputs


class _Items(torch.utils.data.Dataset):
    def __init__(self, labels: str, form: str = "tuple") -> None:
        g = torch.Generator().manual_seed(0)
        self.tokens = [torch.randint(0, 50, (n,), generator=g) for n in (5, 8, 3)]
        self.labels, self.form = labels, form

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int):
        t = self.tokens[i]
        label = torch.cat([t[1:], torch.tensor([-100])]) if self.labels == "next" else 0
        if self.form == "dict":
            return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": label}
        return t, label


def test_item_inputs_of_each_form():
    t = torch.arange(3)
    assert item_inputs((t, 1)) is t
    named = item_inputs({"input_ids": t, "labels": t, "loss_mask": t})
    assert list(named) == ["input_ids"]
    assert list(item_inputs(({"input_ids": t}, 0))) == ["input_ids"]


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_other_labels_are_the_same_dataset(form):
    zeros, shifted = _Items("zero", form), _Items("next", form)
    a, b = dataset_fingerprint(zeros, progress=False), dataset_fingerprint(shifted, progress=False)
    assert a == b and a.scope == "inputs"
    verify_dataset(a, shifted, "dump 'd'", "rerun it")


def test_fingerprints_without_a_scope_hash_labels_as_before():
    old = dataset_fingerprint(_Items("zero"), progress=False, scope="items")
    written = DatasetFingerprint.model_validate_json(old.model_dump_json(exclude={"scope"}))
    assert written.scope == "items"
    verify_dataset(written, _Items("zero"), "dump 'd'", "rerun it")
    with pytest.raises(ValueError, match="different dataset"):
        verify_dataset(written, _Items("next"), "dump 'd'", "rerun it")
