"""Tiny vision transformers for 8x8 digits: ViT (two kinds of attention) and Swin.

The structures that make transformers hard to prune and quantize are kept: heads of a fused
qkv projection (timm's layout) or of `nn.MultiheadAttention` (torchvision's), LayerNorm, a
class token and position embedding (parameters outside any layer), patch embedding by a
strided conv, and Swin's windows with a relative position bias per head. Part of
`lyceum.deploy.architectures` (see `ARCHITECTURES` there).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "QKVAttention",
    "SwinTiny",
    "ViTTiny",
    "WindowAttention",
    "swin_tiny",
    "vit_mha_tiny",
    "vit_qkv_tiny",
]


class QKVAttention(nn.Module):
    """timm's ViT attention: one qkv linear, `num_heads` heads of `head_dim`, an output proj.

    The output width is `num_heads * head_dim` (not the input's), so whole heads can go.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class _EncoderBlock(nn.Module):
    """Pre-norm transformer block: LN, attention, residual; LN, GELU MLP, residual."""

    def __init__(self, dim: int, heads: int, mlp: int, attention: str) -> None:
        super().__init__()
        self.attention = attention
        self.ln_1 = nn.LayerNorm(dim)
        self.attn: nn.Module = (
            nn.MultiheadAttention(dim, heads, batch_first=True)
            if attention == "mha"
            else QKVAttention(dim, heads)
        )
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y = self.attn(y, y, y, need_weights=False)[0] if self.attention == "mha" else self.attn(y)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViTTiny(nn.Module):
    """ViT: patch embedding by a strided conv, a class token, learned position embeddings,
    pre-norm encoder blocks, and a linear head on the class token's final LayerNorm."""

    def __init__(
        self,
        attention: str = "mha",
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp: int = 64,
        patch: int = 2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if attention not in ("mha", "qkv"):
            raise ValueError(f"ViTTiny: attention must be 'mha' or 'qkv', got {attention!r}")
        tokens = (8 // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(
            *(_EncoderBlock(dim, heads, mlp, attention) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class WindowAttention(nn.Module):
    """Swin's (shifted) window attention: qkv heads inside windows of `window` x `window`
    tokens, a learned relative position bias per head, a cyclic shift every other block."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window, self.shift = window, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            0.02 * torch.randn((2 * window - 1) ** 2, num_heads)
        )
        grid = torch.stack(
            torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        ).flatten(1)
        offsets = (grid[:, :, None] - grid[:, None, :]).permute(1, 2, 0) + window - 1
        index = offsets[..., 0] * (2 * window - 1) + offsets[..., 1]
        self.relative_position_index: torch.Tensor
        self.register_buffer("relative_position_index", index.flatten(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        w, tokens = self.window, self.window**2
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = x.view(batch, height // w, w, width // w, w, -1).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, tokens, x.shape[-1])
        qkv = self.qkv(x).reshape(x.shape[0], tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index]
        attn = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        attn = attn + bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)
        x = self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(x.shape[0], tokens, -1))
        x = x.view(batch, height // w, width // w, w, w, -1).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch, height, width, -1)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window, shift)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchMerging(nn.Module):
    """Swin's downsampling: each 2x2 patch's four tokens concatenated on the (last) channel
    dimension, LayerNorm, a linear from 4C to 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corners = [x[..., i::2, j::2, :] for j in (0, 1) for i in (0, 1)]
        return self.reduction(self.norm(torch.cat(corners, -1)))


class SwinTiny(nn.Module):
    """Swin: patch embedding, a window-attention block and a shifted one (channels last),
    patch merging, a block at half the resolution, LayerNorm, global average pooling."""

    def __init__(self, dim: int = 32, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 2, stride=2)
        self.norm0 = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(
            _SwinBlock(dim, heads, 2, 0),
            _SwinBlock(dim, heads, 2, 1),
            _PatchMerging(dim),
            _SwinBlock(2 * dim, 2 * heads, 2, 0),
        )
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.norm0(self.patch_embed(x).permute(0, 2, 3, 1)))
        return self.head(self.norm(x).mean((1, 2)))


def vit_mha_tiny() -> ViTTiny:
    return ViTTiny("mha")


def vit_qkv_tiny() -> ViTTiny:
    return ViTTiny("qkv")


def swin_tiny() -> SwinTiny:
    return SwinTiny()
