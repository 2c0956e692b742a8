"""Attention modules whose heads are pruned whole, found by their attributes.

Torch-Pruning prunes heads only inside its own pruners, told `num_heads` per module; the
graph (`_tracing`) finds them itself: any module with an int `num_heads` and a fused `qkv`
linear or `q`/`k`/`v` linears (timm's ViT, Swin's window attention, hand-written blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class AttentionHeads:
    """An attention module whose heads are pruned whole.

    Its `num_heads` follows its projections' widths; its own parameters with a dimension of
    `num_heads` (Swin's relative position bias table) lose the removed heads along it.
    """

    module: str
    projections: tuple[str, ...]  # ("x.qkv",) fused, or ("x.q", "x.k", "x.v")
    head_dim: int
    head_params: tuple[tuple[str, int], ...]  # (parameter name, its heads dimension)

    @property
    def per_head(self) -> int:
        """Output features of each projection per head."""
        return self.head_dim * (3 if len(self.projections) == 1 else 1)


def find_attention_heads(model: nn.Module) -> list[AttentionHeads]:
    """Modules with an int `num_heads` and a fused `qkv` linear or `q`/`k`/`v` linears."""
    found = []
    for name, module in model.named_modules():
        heads = getattr(module, "num_heads", None)
        if isinstance(module, nn.MultiheadAttention) or not isinstance(heads, int) or heads < 1:
            continue
        prefix = f"{name}." if name else ""
        parts = ("qkv",) if isinstance(getattr(module, "qkv", None), nn.Linear) else ("q", "k", "v")
        layers = [
            layer for part in parts if isinstance(layer := getattr(module, part, None), nn.Linear)
        ]
        if len(layers) != len(parts):
            continue
        features = heads * (3 if len(layers) == 1 else 1)
        if layers[0].out_features % features:
            continue
        head_dim = layers[0].out_features // features
        head_params = tuple(
            (f"{prefix}{p}", max(d for d, size in enumerate(param.shape) if size == heads))
            for p, param in module.named_parameters(recurse=False)
            if heads in param.shape
        )
        projections = tuple(f"{prefix}{part}" for part in parts)
        found.append(AttentionHeads(name, projections, head_dim, head_params))
    return found
