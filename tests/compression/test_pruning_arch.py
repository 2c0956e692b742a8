"""Structured pruning on the architectures people use (`lyceum.deploy.architectures`).

Every structure prunes to -30% and -50% FLOPs (the project's own counter, within the default
tolerance), keeps its output shape, and rebuilds bit-identically from `save_pruned` on a fresh
instance. Where no LayerNorm mixes channels, the pruned model is also checked against an
independent path: the unpruned model with every removed channel zeroed where it leaves its
layer must compute the same outputs, which fails if any index mapping (concat offsets, a
flatten's blocks, a shuffle's permutation, a split's halves, conv groups) is wrong.
"""

# nn.Module's __getattr__ is typed `Tensor | Module`: reaching a submodule by attribute or
# index (model.blocks[0].attn) needs a cast on every line; these are modules.
# mypy: disable-error-code="index,union-attr,arg-type,operator"

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lyceum.compression.analysis import count_flops
from lyceum.compression.pruning import (
    AutoPruning,
    PrunePlan,
    SensitivityPruning,
    UniformPruning,
    load_pruned,
    prune,
    save_pruned,
)
from lyceum.compression.search import SAConfig
from lyceum.deploy.architectures import ARCHITECTURES

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
# Structures without a LayerNorm across the pruned channels: zeroing a channel equals removing it.
CHANNEL_WISE = [
    "vgg",
    "resnet",
    "mobilenetv2",
    "resnext",
    "inception",
    "concat_flatten",
    "shufflenetv2",
    "mnasnet",
]


def _model(name: str, seed: int = 0) -> nn.Module:
    """A fresh instance with non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]().train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))
    return model.eval()


@contextmanager
def _silenced(model: nn.Module, plan: PrunePlan) -> Iterator[nn.Module]:
    """`model` with every channel the plan removes zeroed where its layer (and the batch norm
    right after it, in these models' conv-BN pairs) outputs it."""
    handles = []
    for step in plan.steps:
        for layer, idxs in step.members.items():
            parent, _, last = layer.rpartition(".")
            target = model.get_submodule(layer)
            if last.isdigit():
                sibling = f"{parent}.{int(last) + 1}" if parent else str(int(last) + 1)
                follower = dict(model.named_modules()).get(sibling)
                if isinstance(follower, nn.BatchNorm2d):
                    target = follower
            dim = 1 if isinstance(target, nn.Conv2d | nn.BatchNorm2d) else -1

            def zero(_m: nn.Module, _i: object, out: torch.Tensor, idxs=idxs, dim=dim) -> None:
                out.index_fill_(dim, torch.tensor(idxs), 0.0)

            handles.append(target.register_forward_hook(zero))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("target", [0.3, 0.5])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_prunes_to_target_keeps_shape_and_rebuilds_identically(
    name: str, target: float, tmp_path: Path
) -> None:
    model = _model(name)
    flops = count_flops(model, X[:1])
    shape = model(X).shape
    result = prune(model, UniformPruning(flops=-target), X[:1])
    achieved = 1 - count_flops(model, X[:1]) / flops
    assert result.target == target
    assert result.flops_reduction == pytest.approx(achieved)
    assert abs(achieved - target) <= 0.02
    assert model(X).shape == shape == (4, 10)
    save_pruned(model, result.plan, tmp_path)
    rebuilt = load_pruned(ARCHITECTURES[name](), tmp_path)
    assert torch.equal(rebuilt(X), model(X))
    assert str(rebuilt) == str(model)


@pytest.mark.parametrize("name", CHANNEL_WISE)
def test_pruned_model_equals_the_unpruned_with_removed_channels_zeroed(name: str) -> None:
    model = _model(name)
    original = copy.deepcopy(model)
    result = prune(model, UniformPruning(ratio=0.4), X[:1])
    assert len(result.plan.steps) >= 3
    with torch.no_grad(), _silenced(original, result.plan) as reference:
        assert torch.allclose(model(X), reference(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["shufflenetv2", "vit_qkv"])
def test_sensitivity_and_auto_pruning_choose_whole_units(name: str) -> None:
    reference = _model(name)
    with torch.no_grad():
        logits = reference(X)

    def closeness(model: nn.Module) -> float:
        with torch.no_grad():
            return -float((model(X) - logits).norm())

    model = copy.deepcopy(reference)
    config = SensitivityPruning(flops=-0.5, ratios=(0.25, 0.5, 0.75))
    result = prune(model, config, X[:1], evaluate=closeness, progress=False)
    assert abs(result.flops_reduction - 0.5) <= 0.02
    assert result.sensitivity is not None and set(result.sensitivity.metrics) == set(result.ratios)
    model = copy.deepcopy(reference)
    auto = AutoPruning(min_ratio=0.45, max_ratio=0.55, search=SAConfig(max_iterations=4, seed=0))
    result = prune(model, auto, X[:1], evaluate=closeness, progress=False)
    assert 0.45 <= result.flops_reduction <= 0.55
    assert model(X).shape == (4, 10)


def test_concat_flattened_into_a_linear_loses_blocks_of_the_spatial_size() -> None:
    model = _model("concat_flatten")
    original = copy.deepcopy(model)
    result = prune(model, UniformPruning(ratio=0.5), X[:1])
    removed = {s.layer: s.removed for s in result.plan.steps}
    kept_a = [c for c in range(16) if c not in removed["branch_a.0"]]
    kept_b = [c for c in range(8) if c not in removed["branch_b.0"]]
    assert (len(kept_a), len(kept_b)) == (8, 4)
    # The concat's channel c is fc1's inputs 16c..16c+15 (4x4 positions), b's after a's 16.
    columns = [16 * c + s for c in kept_a + [16 + c for c in kept_b] for s in range(16)]
    kept_rows = [r for r in range(32) if r not in removed["fc1"]]
    assert torch.equal(model.fc1.weight, original.fc1.weight[kept_rows][:, columns])
    assert model.fc1.in_features == 12 * 16


def test_shuffle_units_keep_equal_halves() -> None:
    model = _model("shufflenetv2")
    result = prune(model, UniformPruning(flops=-0.5), X[:1])
    stage = model.stage2
    half = stage[0].branch1[1][0].out_channels
    assert half == stage[0].branch2[2][0].out_channels < 16
    for unit in stage[1:]:
        # chunk(2) gives x2 the second half: the branch's input and output keep that width.
        assert unit.branch2[0][0].in_channels == unit.branch2[2][0].out_channels == half
    assert model.conv5[0].in_channels == 2 * half
    step = next(s for s in result.plan.steps if s.layer == "stage2.0.branch1.1.0")
    # The same positions leave both branches of the downsampling unit (a shuffle's blocks).
    assert step.members["stage2.0.branch1.1.0"] == step.members["stage2.0.branch2.2.0"]


@pytest.mark.parametrize(("name", "blocks"), [("vit_qkv", (0, 1)), ("swin", (0, 1, 3))])
def test_attention_heads_go_whole_and_num_heads_follows(name: str, blocks: tuple[int, ...]) -> None:
    model = _model(name)
    original = copy.deepcopy(model)
    heads = r"blocks\.\d\.attn\.qkv|blocks\.\d\.mlp\.0"
    result = prune(model, UniformPruning(ratio=0.5, include=heads), X[:1])
    expected = {f"blocks.{b}.{layer}" for b in blocks for layer in ("attn.qkv", "mlp.0")}
    assert {s.layer for s in result.plan.steps} == expected
    for b in blocks:
        attn, before = model.blocks[b].attn, original.blocks[b].attn
        assert attn.num_heads == before.num_heads // 2 and attn.head_dim == before.head_dim == 8
        width = attn.num_heads * attn.head_dim
        assert (attn.qkv.out_features, attn.proj.in_features) == (3 * width, width)
        assert attn.proj.out_features == before.proj.out_features  # the embedding stays
        if name == "swin":
            step = next(s for s in result.plan.steps if s.layer == f"blocks.{b}.attn.qkv")
            gone = {i // 8 for i in step.removed if i < before.num_heads * 8}
            kept = [h for h in range(before.num_heads) if h not in gone]
            table = before.relative_position_bias_table[:, kept]
            assert torch.equal(attn.relative_position_bias_table, table)
    # A removed head's q, k and v are all zero: it adds nothing, as if it were gone.
    with torch.no_grad(), _silenced(original, result.plan) as reference:
        assert torch.allclose(model(X), reference(X), rtol=1e-4, atol=1e-5)


def test_swin_patch_merging_loses_each_embedding_channel_from_all_four_corners() -> None:
    model = _model("swin")
    original = copy.deepcopy(model)
    result = prune(model, UniformPruning(ratio=0.5, include="patch_embed"), X[:1])
    (step,) = result.plan.steps
    kept = [c for c in range(32) if c not in step.removed]
    assert len(kept) == 16 and model.patch_embed.out_channels == 16
    # The four 2x2 corners are concatenated channels last: channel c is inputs c + 32k.
    columns = [32 * k + c for k in range(4) for c in kept]
    merging, before = model.blocks[2], original.blocks[2]
    assert torch.equal(merging.reduction.weight, before.reduction.weight[:, columns])
    assert torch.equal(merging.norm.weight, before.norm.weight[columns])
    assert merging.reduction.out_features == 64  # the merged width is its own group


def test_multihead_attention_embedding_stays_whole_across_residuals() -> None:
    model = _model("vit_mha")
    prune(model, UniformPruning(flops=-0.5), X[:1])
    dim = model.patch_embed.out_channels
    assert dim < 32 and dim % 4 == 0
    assert model.cls_token.shape[-1] == model.pos_embed.shape[-1] == model.head.in_features == dim
    assert model.norm.normalized_shape == (dim,)
    for block in model.blocks:
        attn = block.attn
        assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (dim, 4, dim // 4)
        assert block.ln_1.normalized_shape == block.ln_2.normalized_shape == (dim,)
        assert block.mlp[0].in_features == block.mlp[2].out_features == dim


def _weights_header(directory: Path) -> dict[str, str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return f.metadata()


def test_state_dict_versions_travel_with_the_pruned_weights(tmp_path: Path) -> None:
    model = _model("mnasnet")
    result = prune(model, UniformPruning(flops=-0.5), X[:1])
    save_pruned(model, result.plan, tmp_path)
    versions = json.loads(_weights_header(tmp_path)["state_dict_metadata"])
    assert versions[""] == {"version": 2}
    assert torch.equal(load_pruned(ARCHITECTURES["mnasnet"](), tmp_path)(X), model(X))
    # Without them (a file of an older Lyceum), MNASNet's own check refuses the load.
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "lyceum-pruned"})
    with pytest.raises(ValueError, match="version should be set to 1 or 2 instead of None"):
        load_pruned(ARCHITECTURES["mnasnet"](), tmp_path)


class _Coarse(nn.Module):
    """Ten channels hold the prunable MACs, 832 each of 10,880: targets fall between steps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(10, 4, 1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def test_far_miss_names_the_closest_plan_and_tolerance_accepts_it() -> None:
    x = torch.zeros(1, 1, 8, 8)
    assert count_flops(_Coarse(), x) == 10_880
    # -50% is 6.54 channels: 6 remove 45.9%, 7 remove 53.5% (5,824 MACs), the closest.
    with pytest.raises(
        ValueError,
        match=r"cannot remove 50\.0% of the FLOPs; the closest reachable is 53\.5%, 3\.5% away, "
        r"beyond tolerance=0\.02 \(tolerance=0\.036 accepts it\)",
    ):
        prune(_Coarse(), UniformPruning(flops=-0.5, include="conv1"), x)
    model = _Coarse()
    result = prune(model, UniformPruning(flops=-0.5, include="conv1", tolerance=0.036), x)
    assert model.conv1.out_channels == 3
    assert result.flops_reduction == 5_824 / 10_880
    assert result.target == 0.5
    with pytest.raises(ValueError, match="less than 1"):
        UniformPruning(flops=-0.5, tolerance=1.0)


class _StoredWidth(nn.Module):
    """torchvision's ViT reshapes its patch embedding with the width it was built with."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden_dim = 16
        self.conv_proj = nn.Conv2d(1, 16, 2, stride=2)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).reshape(x.shape[0], self.hidden_dim, -1).transpose(1, 2)
        return self.head(torch.relu(self.fc(x)).mean(1))


def test_a_forward_that_breaks_after_pruning_is_named_with_its_groups() -> None:
    with pytest.raises(ValueError, match=r"fails on the example input .*hidden_dim.*'conv_proj'"):
        prune(_StoredWidth(), UniformPruning(ratio=0.5), torch.zeros(1, 1, 8, 8))
    # Keeping the embedding, the rest prunes.
    model = _StoredWidth()
    result = prune(model, UniformPruning(ratio=0.5, exclude="conv_proj"), torch.zeros(1, 1, 8, 8))
    assert [s.layer for s in result.plan.steps] == ["fc"]
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


class _FunctionalHead(nn.Module):
    """torchvision's Swin calls `F.linear(x, self.qkv.weight)`: the trace never sees `fc`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.linear(self.conv(x).mean((2, 3)), self.fc.weight, self.fc.bias)
        return self.head(torch.relu(x))


def test_a_layer_used_by_a_functional_call_is_named_when_the_pruned_model_breaks() -> None:
    with pytest.raises(
        ValueError, match=r"not called as modules, their weights are used by .*\['fc'\]"
    ):
        prune(_FunctionalHead(), UniformPruning(ratio=0.5), torch.zeros(1, 1, 8, 8))


class _FixedSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 12, 3, padding=1)
        self.a = nn.Conv2d(4, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.stem(x).split([4, 8], dim=1)
        y = torch.cat([self.a(left), self.b(right)], 1)
        return self.fc(y.mean((2, 3)))


def test_split_into_sizes_written_in_the_code_keeps_its_channels() -> None:
    model = _FixedSplit()
    result = prune(model, UniformPruning(ratio=0.5), torch.zeros(1, 1, 8, 8))
    assert "stem" not in {s.layer for s in result.plan.steps}
    assert model.stem.out_channels == 12
    assert (model.a.out_channels, model.b.out_channels) == (4, 4)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
