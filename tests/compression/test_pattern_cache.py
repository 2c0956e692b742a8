"""The cache of torchao's pattern graphs changes no graph torchao produces, only its cost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torchao.quantization.pt2e.export_utils import WrapperModule

from lyceum.compression.quantization import _pattern_cache
from lyceum.compression.quantization._pattern_cache import pattern_key

# One conv-BN-ReLU block, a BN-less conv and a linear head: the fuse and fold passes have work
# for conv2d only, so the other three conv kinds are the passes the cache skips.
_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch
    from torch import nn
    from lyceum.compression.quantization import QAT, convert, quantize
    from lyceum.compression.quantization import _pattern_cache

    if sys.argv[1] == "torchao":
        _pattern_cache.install = lambda: True  # torchao exactly as it ships
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(256, 10),
    )
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    prepared = quantize(model, QAT(), x)
    prepared(x)
    prepared.eval()
    prepared.train()
    prepared(x)
    converted = convert(prepared)
    out = converted(x)
    print(json.dumps({
        "prepared": prepared.code, "converted": converted.code,
        "out": out.flatten().tolist(), "stats": _pattern_cache.stats(),
    }))
    """
)


def _convert_in_a_process(mode: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.integration
def test_a_qat_model_prepares_and_converts_to_the_same_graph_as_torchao_alone() -> None:
    alone = _convert_in_a_process("torchao")
    cached = _convert_in_a_process("cached")
    assert cached["prepared"] == alone["prepared"]
    assert cached["converted"] == alone["converted"]
    assert cached["out"] == alone["out"]
    assert alone["stats"] == {"exports": 0, "hits": 0, "passes_skipped": 0}
    stats = cached["stats"]
    assert isinstance(stats, dict)
    # Prepare fuses (3 patterns per conv kind, 1 kind present), each train/eval switch
    # rewrites BN and dropout, convert folds (12 pattern pairs for conv2d): every pattern
    # after its first export comes from the cache, and 3 of 4 conv kinds are skipped in both
    # the fuse and the fold pass.
    assert stats["passes_skipped"] == 6
    assert stats["hits"] > 0
    assert stats["exports"] <= 3 + 6 + 24


def _dropout(inplace: bool) -> WrapperModule:
    def pattern(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, p=0.5, training=True, inplace=inplace)

    return WrapperModule(pattern)


def test_the_key_follows_the_closure_and_shapes_not_the_example_values() -> None:
    x = (torch.randn(1, 3),)
    assert pattern_key(_dropout(False), x, False, {}) == pattern_key(
        _dropout(False), (torch.zeros(1, 3),), False, {}
    )
    assert pattern_key(_dropout(False), x, False, {}) != pattern_key(_dropout(True), x, False, {})
    assert pattern_key(_dropout(False), x, False, {}) != pattern_key(
        _dropout(False), (torch.randn(2, 3),), False, {}
    )
    assert pattern_key(_dropout(False), x, False, {}) != pattern_key(
        _dropout(False), x, False, {"scale": torch.ones(1)}
    )
    with torch.no_grad():
        no_grad_key = pattern_key(_dropout(False), x, False, {})
    assert no_grad_key is not None
    assert no_grad_key != pattern_key(_dropout(False), x, False, {})


def test_a_pattern_with_an_unhashable_closure_has_no_key() -> None:
    table = {"p": 0.5}

    def pattern(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, p=table["p"])

    assert pattern_key(WrapperModule(pattern), (torch.randn(1, 3),), False, {}) is None


def test_cached_patterns_equal_fresh_exports_and_are_copies() -> None:
    assert _pattern_cache.install()
    from torchao.quantization.pt2e import utils

    get = utils._get_aten_graph_module_for_pattern
    fresh_export = get.__wrapped__
    x = (torch.randn(1, 3),)
    for inplace in (False, True):
        first = get(_dropout(inplace), x)
        again = get(_dropout(inplace), x)
        assert again is not first
        assert again.code == first.code == fresh_export(_dropout(inplace), x).code
        # An edit of a graph handed out does not reach the cache.
        first.graph.create_node("call_function", torch.relu, (next(iter(first.graph.nodes)),))
        first.recompile()
        assert first.code != again.code
        assert get(_dropout(inplace), x).code == again.code
    assert get(_dropout(False), x).code != get(_dropout(True), x).code
