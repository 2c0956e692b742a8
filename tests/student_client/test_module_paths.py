"""A student's feature maps by module path: hooked with their gradients, the student's own
outputs first, paths checked before training with close names, hooks removed on close."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lyceum.student_client._module_paths import StudentFeatures, find_module, student_features


class _Recurrent(nn.Module):
    """A student with a submodule returning (output, state), as recurrent layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_hooked_maps_carry_their_gradients() -> None:
    student = _mlp()
    wrapped = student_features(student, {"1": "term a", "logits": "term b"}, torch.zeros(1, 4))
    assert isinstance(wrapped, StudentFeatures) and wrapped.paths == ("1",)
    x = torch.randn(5, 4)
    out = wrapped(x)
    assert sorted(out) == ["1", "logits"]
    assert torch.equal(out["1"], torch.relu(student[0](x)))
    out["1"].sum().backward()
    assert student[0].weight.grad is not None and student[2].weight.grad is None
    wrapped.close()
    assert not any(m._forward_hooks for m in student.modules())


def test_only_logits_needs_no_wrapper_and_no_forward() -> None:
    class _Refuses(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("no probe forward was expected")

    assert student_features(_Refuses(), {"logits": "kd"}, torch.zeros(1, 4)) is None


def test_a_module_returning_a_tuple_gives_its_first_entry() -> None:
    student = _Recurrent()
    wrapped = student_features(student, {"rnn": "hint"}, torch.zeros(1, 2, 4))
    assert wrapped is not None
    x = torch.randn(3, 2, 4)
    assert torch.equal(wrapped(x)["rnn"], student.rnn(x)[0])


def test_a_key_the_forward_returns_is_that_output_not_a_module() -> None:
    class _Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feat = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": x, "feat": 2 * self.feat(x)}

    assert student_features(_Named(), {"feat": "mse"}, torch.zeros(1, 4)) is None


def test_the_probe_leaves_the_students_mode_and_statistics() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    student_features(student, {"1": "fsp"}, torch.randn(1, 4))
    assert student.training
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_an_unknown_path_names_the_key_and_close_names() -> None:
    with pytest.raises(ValueError) as exc:
        student_features(_mlp(), {"3": "losses.terms 'l2': student"}, torch.zeros(1, 4))
    message = str(exc.value)
    assert message.startswith("losses.terms 'l2': student '3': the Sequential has no submodule")
    assert "nor is it an output of the student's forward, which returns ['logits']" in message
    with pytest.raises(ValueError) as exc:
        find_module(_two_layers(), "layer9", "teacher 't' outputs 'layer9'")
    assert str(exc.value).startswith("teacher 't' outputs 'layer9': the Module has no submodule")
    assert "close names: ['layer3', 'layer1']" in str(exc.value)


def _two_layers() -> nn.Module:
    model = nn.Module()
    model.layer1 = nn.ReLU()
    model.layer3 = nn.ReLU()
    return model
