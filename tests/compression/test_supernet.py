"""The once-for-all supernet: subnets as tokens, extraction equal to the supernet's active
subnet (also after a save and a rebuild by `load_model`), FLOPs of each elastic dimension."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from lyceum.compression.analysis import count_flops
from lyceum.compression.nas import (
    SUBNET_FILE,
    SUBNET_FORMAT,
    BudgetedSpace,
    NASSpace,
    SubnetConfig,
    Supernet,
    extract,
    load_subnet,
    save_subnet,
)
from lyceum.compression.nas._elastic import ElasticBlock
from lyceum.compression.pruning import UniformPruning, prune
from lyceum.compression.search import CanonicalSpace
from lyceum.proto.specs import WEIGHTS_FILE, load_model, weights_metadata
from tests._support.supernets import TINY, tiny_space, trained_like


def test_tokens_map_to_configs_and_back() -> None:
    space = tiny_space()
    assert isinstance(space, NASSpace)
    # Per stage: depth, then kernel and expansion of each of its 2 blocks.
    assert space.range_table() == [2, 2, 2, 2, 2] * 2
    assert space.subnet(space.init_tokens()) == space.largest()
    rng = random.Random(3)
    for _ in range(20):
        tokens = [rng.randrange(n) for n in space.range_table()]
        assert space.tokens(space.subnet(tokens)) == tokens
    assert space.tokens(space.smallest()) == [0] * 10


def test_canonical_tokens_name_each_subnet_once() -> None:
    space = tiny_space()
    assert isinstance(space, CanonicalSpace)
    # Stage 0 at depth 1 (token 0): its second block's kernel and expansion (tokens 3, 4)
    # change nothing, and canonical sets them to the smallest values (index 0 of 2).
    twins = [[0, 0, 1, 0, 0, *[1] * 5], [0, 0, 1, 1, 0, *[1] * 5], [0, 0, 1, 0, 1, *[1] * 5]]
    assert {tuple(space.canonical(t)) for t in twins} == {(0, 0, 1, 0, 0, *[1] * 5)}
    rng = random.Random(0)
    for _ in range(50):
        tokens = [rng.randrange(n) for n in space.range_table()]
        canonical = space.canonical(tokens)
        assert space.subnet(canonical) == space.subnet(tokens).canonical(space)
        assert space.canonical(canonical) == canonical
        # The same network: the same ops, so the same figures and latency.
        assert [op.key for op in space.ops(canonical)] == [op.key for op in space.ops(tokens)]
    # The budgeted space the search runs on hands them on.
    assert BudgetedSpace(space).canonical(twins[1]) == space.canonical(twins[1])


def test_a_config_outside_the_space_is_refused_naming_the_value() -> None:
    space = tiny_space()
    net = Supernet(space)
    bad = SubnetConfig(depths=(2, 2), kernels=((3, 7), (3, 3)), expands=((2, 2), (2, 2)))
    with pytest.raises(ValueError, match=r"stage 0 block 1 kernel 7 is not one of \[3, 5\]"):
        net.set_active(bad)
    with pytest.raises(ValueError, match=r"token 0 is 2, outside its range \[0, 1\]"):
        space.subnet([2] + [0] * 9)


@pytest.mark.parametrize("kernel_transform", [False, True])
def test_extracted_subnets_equal_the_supernets_active_subnet(kernel_transform: bool) -> None:
    space = tiny_space(kernels=[3, 5, 7])
    net = trained_like(space, kernel_transform=kernel_transform)
    x = torch.randn(8, 1, 8, 8)
    rng = random.Random(0)
    configs = [space.largest(), space.smallest()] + [
        net.space.subnet([rng.randrange(n) for n in space.range_table()]) for _ in range(6)
    ]
    for config in configs:
        net.set_active(config)
        plain = extract(net).eval()
        # No supernet code in it: Light-NAS blocks and torch modules only.
        assert not any(isinstance(m, ElasticBlock | Supernet) for m in plain.modules())
        assert len(plain) == 4 + sum(config.depths)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), net(x), atol=1e-5, rtol=0)


def test_sorting_channels_keeps_the_largest_subnet_and_keeps_the_important_ones() -> None:
    net = trained_like(tiny_space())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = net(x)
        net.sort_channels()
        torch.testing.assert_close(net(x), before, atol=1e-5, rtol=0)
    for module in net.modules():
        if isinstance(module, ElasticBlock):
            importance = module.project.weight.abs().sum(dim=(0, 2, 3))
            assert torch.all(importance[:-1] >= importance[1:])


def _block_macs(cin: int, cout: int, hidden: int, kernel: int, h_in: int, h_out: int) -> int:
    """Expansion 1x1 at the input size, depthwise and projection at the output size."""
    return cin * hidden * h_in**2 + hidden * kernel**2 * h_out**2 + hidden * cout * h_out**2


def test_each_elastic_dimension_alone_changes_flops_as_computed_by_hand() -> None:
    space = tiny_space()
    figures = BudgetedSpace(space).figures
    largest = space.largest()
    base = figures(space.tokens(largest)).flops
    # The figures are the network's own.
    net = Supernet(space)
    assert base == count_flops(extract(net, largest), torch.zeros(1, 1, 8, 8))

    # Kernel: stage 0, block 1 (4 -> 4 channels, hidden 4*3, 8x8) from 5x5 to 3x3.
    kernels = ((5, 3), (5, 5))
    smaller = largest.model_copy(update={"kernels": kernels})
    assert base - figures(space.tokens(smaller)).flops == 12 * (25 - 9) * 8 * 8

    # Depth: stage 1 keeps 1 block, the second (8 -> 8, hidden 8*3, kernel 5, 4x4) goes.
    shallower = largest.model_copy(update={"depths": (2, 1)})
    assert base - figures(space.tokens(shallower)).flops == _block_macs(8, 8, 24, 5, 4, 4)

    # Expansion: stage 1, block 0 (4 -> 8, stride 2: 8x8 in, 4x4 out) from ratio 3 to 2.
    narrower = largest.model_copy(update={"expands": ((3, 3), (2, 3))})
    expected = _block_macs(4, 8, 12, 5, 8, 4) - _block_macs(4, 8, 8, 5, 8, 4)
    assert base - figures(space.tokens(narrower)).flops == expected
    assert count_flops(extract(net, narrower), torch.zeros(1, 1, 8, 8)) == base - expected


def test_a_saved_subnet_is_rebuilt_by_load_model_from_its_path_alone(tmp_path: Path) -> None:
    space = tiny_space()
    net = trained_like(space, kernel_transform=True)
    x = torch.randn(4, 1, 8, 8)
    spec = "lyceum.compression.nas:ofa_supernet" + json.dumps({"kernel_transform": True, **TINY})
    for i, config in enumerate(
        [space.smallest(), net.sample_active(random.Random(5)), net.sample_active(random.Random(6))]
    ):
        out = tmp_path / f"subnet{i}"
        net.set_active(config)
        save_subnet(extract(net), space, config, out)
        assert weights_metadata(out / WEIGHTS_FILE)["format"] == SUBNET_FORMAT
        record = json.loads((out / SUBNET_FILE).read_text())
        assert record["tokens"] == space.tokens(config)
        own = 'lyceum.compression.nas:ofa_subnet{"config": "%s"}' % (out / SUBNET_FILE)
        with torch.no_grad():
            expected = net(x)
            for model in (
                load_model(spec, out / WEIGHTS_FILE),
                load_model(own, out / WEIGHTS_FILE),
                load_subnet(out),
            ):
                assert isinstance(model, nn.Sequential)
                torch.testing.assert_close(model.eval()(x), expected, atol=1e-5, rtol=0)


def test_subnet_weights_without_their_config_or_with_a_foreign_spec_are_refused(
    tmp_path: Path,
) -> None:
    space = tiny_space()
    net = Supernet(space)
    save_subnet(extract(net, space.smallest()), space, space.smallest(), tmp_path / "s")
    weights = tmp_path / "s" / WEIGHTS_FILE
    with pytest.raises(ValueError, match="the model spec builds a TeacherCNN of another shape"):
        load_model("lyceum.deploy.examples:teacher_cnn", weights)
    other = "lyceum.compression.nas:ofa_supernet" + json.dumps({**TINY, "head_channels": 32})
    with pytest.raises(ValueError, match="a subnet of another supernet than the model spec"):
        load_model(other, weights)
    (tmp_path / "s" / SUBNET_FILE).unlink()
    with pytest.raises(ValueError, match=f"{SUBNET_FILE}, which says which subnet, is not beside"):
        load_model("lyceum.compression.nas:ofa_supernet" + json.dumps(TINY), weights)


def test_an_extracted_subnet_prunes_like_any_model() -> None:
    space = tiny_space()
    model = extract(Supernet(space), space.largest()).eval()
    x = torch.zeros(1, 1, 8, 8)
    before = count_flops(model, x)
    prune(model, UniformPruning(ratio=0.5), x, progress=False)
    assert count_flops(model, x) < before
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_every_op_of_any_subnet_is_among_the_ops_a_latency_table_measures() -> None:
    space = tiny_space(kernels=[3, 5, 7])
    measured = {op.key for op in space.all_ops()}
    rng = random.Random(1)
    for _ in range(30):
        tokens = [rng.randrange(n) for n in space.range_table()]
        assert {op.key for op in space.ops(tokens)} <= measured
