"""Structured pruning: dependencies, targets, criteria, selection, save and reload."""

# nn.Module's __getattr__ is typed `Tensor | Module`: reaching a submodule by attribute or
# index (model.layer2, model[1].weight) needs a cast on every line; these are modules.
# mypy: disable-error-code="index,union-attr,arg-type"

from __future__ import annotations

import copy
import typing
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from torch import nn

from lyceum.compression.analysis import count_flops
from lyceum.compression.pruning import (
    AutoPruning,
    PrunePlan,
    PruningConfig,
    SensitivityPruning,
    UniformPruning,
    api,
    load_pruned,
    prune,
    prune_to_flops,
    read_plan,
    save_pruned,
)
from lyceum.deploy.examples import mobilenet_cnn, resnet_cnn, student_cnn, student_mlp

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("factory", [resnet_cnn, mobilenet_cnn], ids=["resnet", "mobilenet"])
def test_flops_target_met_and_model_runs(factory: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    reference = copy.deepcopy(model)
    result = prune(model, UniformPruning(flops=-0.5), X[:1])
    assert result.model is model
    # Within 2% of the target FLOPs (0.5 * base): 1% of the base either side.
    assert abs(result.flops_after - 0.5 * result.flops_before) <= 0.01 * result.flops_before
    assert result.flops_after == count_flops(model, X[:1])
    assert model(X).shape == reference(X).shape == (2, 10)
    assert result.params_after < 0.6 * result.params_before
    # Tensors really shrink.
    shrunk = [
        name
        for name, p in model.named_parameters()
        if p.shape != reference.get_parameter(name).shape
    ]
    assert len(shrunk) > 10


def test_residual_group_pruned_consistently() -> None:
    torch.manual_seed(1)
    model = resnet_cnn().eval()
    original = copy.deepcopy(model)
    result = prune(model, UniformPruning(ratio=0.25), X[:1])
    step = next(s for s in result.plan.steps if s.layer == "layers.2.conv2")
    # Members of the residual sum: block 2's conv2 and shortcut, block 3's conv2.
    assert set(step.members) == {"layers.2.conv2", "layers.2.shortcut.0", "layers.3.conv2"}
    assert all(idxs == step.removed for idxs in step.members.values())
    assert len(step.removed) == 8  # round(0.25 * 32)
    removed = {s.layer: s.removed for s in result.plan.steps}

    def keep(group: str, n: int) -> list[int]:
        return [i for i in range(n) if i not in removed[group]]

    out = keep("layers.2.conv2", 32)
    # Producers of the residual stream keep the same output rows (inputs follow their groups).
    for name, in_group, cin in (
        ("layers.2.conv2", "layers.2.conv1", 32),
        ("layers.2.shortcut.0", "stem.0", 16),
        ("layers.3.conv2", "layers.3.conv1", 32),
    ):
        new, old = model.get_submodule(name).weight, original.get_submodule(name).weight
        assert torch.equal(new, old[out][:, keep(in_group, cin)]), name
    # Every consumer of the residual stream loses the same input channels.
    for name, out_group, cout in (
        ("layers.3.conv1", "layers.3.conv1", 32),
        ("layers.4.conv1", "layers.4.conv1", 64),
        ("layers.4.shortcut.0", "layers.4.conv2", 64),
    ):
        new, old = model.get_submodule(name).weight, original.get_submodule(name).weight
        assert torch.equal(new, old[keep(out_group, cout)][:, out]), name
    bn_new, bn_old = model.layers[2].shortcut[1], original.layers[2].shortcut[1]
    assert torch.equal(bn_new.running_mean, bn_old.running_mean[out])


def test_depthwise_convs_follow_their_producer() -> None:
    model = mobilenet_cnn().eval()
    prune(model, UniformPruning(ratio=0.5), X[:1])
    for block in model.blocks:
        dw = block.depthwise[0]
        assert dw.groups == dw.in_channels == dw.out_channels
        assert block.pointwise[0].in_channels == dw.out_channels
    assert model.blocks[0].depthwise[0].out_channels == model.stem[0].out_channels == 8
    assert model.fc.out_features == 10


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.merge = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.merge(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.head(torch.flatten(y, 1))


def test_concatenation_and_flatten_into_linear_head() -> None:
    torch.manual_seed(2)
    model = _Concat().eval()
    original = copy.deepcopy(model)
    result = prune(model, UniformPruning(ratio=0.5), X[:1])
    assert (model.a.out_channels, model.b.out_channels, model.merge.out_channels) == (4, 2, 3)
    assert model.merge.in_channels == 6
    # Flatten: each removed channel of `merge` removes its 64 positions from the head's inputs.
    assert model.head.in_features == 3 * 64
    assert model.head.out_features == 10 and model(X).shape == (2, 10)
    # The merge conv keeps the input slices of the surviving channels of both branches.
    removed_a = next(s for s in result.plan.steps if s.layer == "a").removed
    removed_b = next(s for s in result.plan.steps if s.layer == "b").removed
    keep = [i for i in range(8) if i not in removed_a] + [
        8 + i for i in range(4) if i not in removed_b
    ]
    removed_m = next(s for s in result.plan.steps if s.layer == "merge").removed
    keep_out = [i for i in range(6) if i not in removed_m]
    assert torch.equal(model.merge.weight, original.merge.weight[keep_out][:, keep])


def test_classifier_outputs_never_pruned() -> None:
    model = student_mlp(hidden=32).eval()
    result = prune(model, UniformPruning(ratio=0.5), torch.zeros(1, 1, 8, 8))
    assert [s.layer for s in result.plan.steps] == ["1"]
    assert model[1].out_features == 16 and model[3].out_features == 10
    cnn = student_cnn().eval()
    prune(cnn, UniformPruning(ratio=0.5), X[:1])
    assert cnn.classifier[1].out_features == 10
    assert cnn.classifier[1].in_features == 16 * 2 * 2  # 32 channels halved, 2x2 each


def test_include_and_exclude_select_groups_by_name() -> None:
    model = resnet_cnn().eval()
    result = prune(model, UniformPruning(ratio=0.5, include=r"layers\.\d\.conv1"), X[:1])
    assert {s.layer for s in result.plan.steps} == {f"layers.{i}.conv1" for i in range(6)}
    assert model.stem[0].out_channels == 16 and model.layers[0].conv1.out_channels == 8
    model = resnet_cnn().eval()
    result = prune(model, UniformPruning(ratio=0.5, exclude=r"stem.*|layers\.4.*"), X[:1])
    layers = {s.layer for s in result.plan.steps}
    assert (
        "stem.0" not in layers and "layers.4.conv1" not in layers and "layers.4.conv2" not in layers
    )
    assert "layers.2.conv2" in layers
    with pytest.raises(ValueError, match="no prunable groups selected"):
        prune(resnet_cnn(), UniformPruning(ratio=0.5, include="nothing"), X[:1])
    with pytest.raises(ValueError, match="invalid regex"):
        UniformPruning(ratio=0.5, include="(")


def _two_layer(weights: list[float]) -> nn.Sequential:
    first, second = nn.Conv2d(1, len(weights), 1, bias=False), nn.Conv2d(len(weights), 2, 1)
    with torch.no_grad():
        first.weight.copy_(torch.tensor(weights).view(-1, 1, 1, 1))
        second.weight.fill_(1.0)  # identical consumers: only the producer ranks channels
    return nn.Sequential(first, second)


@pytest.mark.parametrize(
    ("criterion", "removed"),
    # L1 and L2 remove the smallest filter; FPGM the one nearest the geometric median
    # (value 4: distance sum 3+2+4+96 = 105, the least of the five).
    [("l1", [0]), ("l2", [0]), ("fpgm", [2])],
)
def test_criteria_pick_expected_channels(criterion: str, removed: list[int]) -> None:
    model = _two_layer([1.0, 2.0, 4.0, 8.0, 100.0])
    result = prune(model, UniformPruning(ratio=0.2, criterion=criterion), torch.zeros(1, 1, 3, 3))
    assert result.plan.steps[0].removed == removed


def test_saved_and_reloaded_model_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = resnet_cnn()
    model.train()
    model(torch.randn(16, 1, 8, 8))  # non-trivial BN statistics
    model.eval()
    result = prune(model, UniformPruning(flops=-0.5, criterion="fpgm"), X[:1])
    save_pruned(model, result.plan, tmp_path)
    assert read_plan(tmp_path / "prune_plan.json") == result.plan
    torch.manual_seed(99)  # the fresh instance has different weights before loading
    rebuilt = load_pruned(resnet_cnn(), tmp_path)
    assert torch.equal(rebuilt(X), model(X))
    assert str(rebuilt) == str(model)
    with pytest.raises(
        ValueError,
        match=r"has 8 channels but the plan removes index \d+; the model.s width differs",
    ):
        load_pruned(resnet_cnn(width=8), tmp_path)


def test_plan_version_is_checked(tmp_path: Path) -> None:
    plan = PrunePlan(format_version=2, input_shape=[1, 1, 8, 8])
    (tmp_path / "prune_plan.json").write_text(plan.model_dump_json())
    with pytest.raises(ValueError, match="format_version 2 is not supported"):
        read_plan(tmp_path / "prune_plan.json")


def test_prune_to_flops_finetunes_and_configs_validate() -> None:
    calls: list[nn.Module] = []
    model = mobilenet_cnn().eval()
    result = prune_to_flops(model, X[:1], 0.4, finetune=calls.append)
    assert calls == [model]
    assert abs(result.flops_reduction - 0.4) <= 0.01
    with pytest.raises(ValueError, match="exactly one of 'ratio' or 'flops'"):
        UniformPruning()
    with pytest.raises(ValueError, match="relative FLOPs change in \\(-1, 0\\)"):
        UniformPruning(flops=0.5)


def test_tracing_leaves_batchnorm_statistics_and_mode_alone() -> None:
    model = resnet_cnn().train()
    stem_bn = model.get_submodule("stem.1")
    assert isinstance(stem_bn, nn.BatchNorm2d)
    mean, tracked = stem_bn.running_mean, stem_bn.num_batches_tracked
    assert mean is not None and tracked is not None
    stats = (mean.clone(), int(tracked))
    # Only conv1 groups are pruned, so the stem's BN keeps all its channels.
    prune(model, UniformPruning(ratio=0.5, include=r"layers\.\d\.conv1"), X)
    assert model.training
    assert torch.equal(mean, stats[0])
    assert int(tracked) == stats[1]


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.head = nn.Linear(16, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(torch.relu(self.a(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_grouped_conv_loses_the_same_positions_in_every_group() -> None:
    torch.manual_seed(4)
    model = _Grouped().eval()
    original = copy.deepcopy(model)
    result = prune(model, UniformPruning(ratio=0.5), X[:1])
    removed = {s.layer: s.removed for s in result.plan.steps}
    # `a` feeds 4 conv groups of 2 channels: one position per group goes, the same in each.
    assert len(removed["a"]) == 4 and len({i % 2 for i in removed["a"]}) == 1
    assert (model.g.in_channels, model.g.out_channels, model.g.groups) == (4, 8, 4)
    # Same function as the original with the removed channels silenced.
    with torch.no_grad():
        bias = original.a.bias
        assert bias is not None
        original.a.weight[removed["a"]] = 0
        bias[removed["a"]] = 0
        keep_out = [i for i in range(16) if i not in removed["g"]]
        expected = original.features(X)[:, keep_out]
        assert torch.allclose(model.features(X), expected, atol=1e-6)
    assert model(X).shape == (2, 10)


def test_unreachable_flops_target_is_an_error() -> None:
    # One group (the last block's conv1 outputs and conv2 inputs) holds under a fifth of the
    # MACs, so removing half of them is out of reach.
    with pytest.raises(ValueError, match=r"cannot remove 50\.0% of the FLOPs; the closest"):
        prune(resnet_cnn(), UniformPruning(flops=-0.5, include=r"layers\.5\.conv1"), X[:1])


def test_prune_dispatches_every_pruning_config_by_its_class() -> None:
    # One entry of prune's dispatch table per member of the PruningConfig union.
    assert set(api._STRATEGIES) == set(typing.get_args(PruningConfig))

    class Halved(UniformPruning):
        """A user's config built on a library one prunes as that one does."""

    torch.manual_seed(0)
    result = prune(student_cnn().eval(), Halved(ratio=0.5), X[:1])
    assert result.ratios and set(result.ratios.values()) == {0.5}

    class Other(BaseModel):
        include: str | None = None
        exclude: str | None = None
        criterion: str = "l1"

    with pytest.raises(ValueError) as err:
        prune(student_cnn(), Other(), X[:1])
    assert str(err.value) == (
        "prune: unknown config type Other; use UniformPruning, SensitivityPruning, AutoPruning"
    )


@pytest.mark.parametrize("config", [SensitivityPruning(flops=-0.5), AutoPruning()])
def test_strategies_that_score_candidates_need_evaluate_before_anything_runs(
    config: PruningConfig,
) -> None:
    model = student_cnn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        prune(model, config, X[:1])
    assert str(err.value) == (
        f"prune: {type(config).__name__} scores candidates, so pass "
        "evaluate=callable(model) -> metric (higher is better)"
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
