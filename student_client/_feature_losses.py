"""Feature-level distillation losses: L2 with an adapter, FitNets hints, FSP matrices.

Import them from `lyceum.student_client.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lyceum.student_client._positions import flatten_positions


def _as_student_dtype(teacher: Tensor, student: Tensor) -> Tensor:
    # Knowledge may be fp16/bf16 and read-only; .to() returns a new tensor, never edits it.
    return teacher.to(torch.promote_types(student.dtype, torch.float32))


class FeatureMSE(nn.Module):
    """L2 feature distillation: mean((adapter(student) - teacher)^2) over all elements.

    With `student_channels` and `teacher_channels` given, a learned adapter maps the
    student's channels to the teacher's: a 1x1 convolution on dim 1 of `[B, C, H, W]` maps
    (`spatial=True`), else a linear layer on the last dim (`[B, C]`, token features
    `[B, T, C]` or jagged `[B, j, C]`). Without them the features are compared as they are.
    Its parameters belong to this module: give them to the optimizer with the student's.
    `mask` (non-spatial only) is a bool position mask, as in the logit losses.
    """

    def __init__(
        self,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        spatial: bool = False,
    ) -> None:
        super().__init__()
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError(
                f"FeatureMSE: give both student_channels and teacher_channels for an adapter, "
                f"or neither; got {student_channels} and {teacher_channels}"
            )
        self.spatial = spatial
        self.adapter: nn.Module
        if student_channels is None or teacher_channels is None:
            self.adapter = nn.Identity()
        elif spatial:
            self.adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        else:
            self.adapter = nn.Linear(student_channels, teacher_channels)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.spatial and student.dim() != 4:
            raise ValueError(
                f"FeatureMSE(spatial=True) expects [B, C, H, W] maps, got {list(student.shape)}"
            )
        mapped = self.adapter(student)
        if self.spatial:
            if mask is not None:
                raise ValueError("FeatureMSE(spatial=True) takes no mask (it has no positions)")
            s, t = mapped, teacher
        else:
            s, (t,) = flatten_positions(mapped, [teacher], mask)
        if s.shape != t.shape:
            raise ValueError(
                f"FeatureMSE: student features {list(s.shape)} (after the adapter) and teacher "
                f"{list(t.shape)} differ; pass student_channels= and teacher_channels= to learn "
                f"an adapter, or pool the maps to the same size"
            )
        return F.mse_loss(s, _as_student_dtype(t, s))


class HintLoss(nn.Module):
    """FitNets hint (Romero et al. 2015): mean((r(student_hint) - teacher_guided)^2).

    r is a learned convolutional regressor (k x k, stride 1, 'same' padding) from the
    student's hint channels to the teacher's guided-layer channels. FitNets writes the loss
    as 1/2 ||.||^2 summed; we take the mean over elements so its scale does not depend on
    the map size (only the weight in the objective changes). Both maps are `[B, C, H, W]`
    with the same H and W.
    """

    def __init__(self, student_channels: int, teacher_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"HintLoss: kernel_size must be odd and >= 1 so 'same' padding keeps the map "
                f"size, got {kernel_size}"
            )
        self.regressor = nn.Conv2d(
            student_channels, teacher_channels, kernel_size, padding=kernel_size // 2
        )

    def forward(self, student_hint: Tensor, teacher_guided: Tensor) -> Tensor:
        if student_hint.dim() != 4 or teacher_guided.dim() != 4:
            raise ValueError(
                f"HintLoss expects [B, C, H, W] maps, got student {list(student_hint.shape)} "
                f"and teacher {list(teacher_guided.shape)}"
            )
        if student_hint.shape[-2:] != teacher_guided.shape[-2:]:
            raise ValueError(
                f"HintLoss: hint {list(student_hint.shape[-2:])} and guided "
                f"{list(teacher_guided.shape[-2:])} spatial sizes differ; pick layers of the "
                f"same resolution or pool the larger one"
            )
        regressed = self.regressor(student_hint)
        if regressed.shape != teacher_guided.shape:
            raise ValueError(
                f"HintLoss: regressed hint {list(regressed.shape)} vs teacher guided "
                f"{list(teacher_guided.shape)}; check student_channels/teacher_channels"
            )
        return F.mse_loss(regressed, _as_student_dtype(teacher_guided, regressed))


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """FSP matrix G = F1^T F2 / (H*W): `[B, C1, H, W]`, `[B, C2, H, W]` -> `[B, C1, C2]`.

    G[b, i, j] = sum_{h,w} F1[b, i, h, w] * F2[b, j, h, w] / (H * W) (Yim et al. 2017).
    """
    if first.dim() != 4 or second.dim() != 4:
        raise ValueError(
            f"fsp_matrix expects [B, C, H, W] maps, got {list(first.shape)} and {list(second.shape)}"
        )
    if first.shape[0] != second.shape[0] or first.shape[-2:] != second.shape[-2:]:
        raise ValueError(
            f"fsp_matrix: maps {list(first.shape)} and {list(second.shape)} need the same batch "
            f"and spatial size; pool the larger one first"
        )
    h, w = first.shape[-2:]
    return torch.einsum("bihw,bjhw->bij", first, second) / (h * w)


class FSPLoss(nn.Module):
    """Flow-of-solution-procedure loss (Yim et al. 2017; PaddleSlim's `fsp_loss`).

    For each chosen pair (i, j) of feature maps, G_s = fsp_matrix(student[i], student[j]) and
    G_t likewise from the teacher's maps; the loss is sum over pairs of mean((G_s - G_t)^2).
    Each pair's term is PaddleSlim's `fsp_loss`; Yim et al. sum the pairs with equal weights.
    `forward(student_maps, teacher_maps)` takes the maps as sequences that `pairs` index into.
    """

    def __init__(self, pairs: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("FSPLoss needs at least one (first, second) pair of map indices")
        self.pairs = [(int(i), int(j)) for i, j in pairs]

    def forward(self, student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
        needed = max(max(i, j) for i, j in self.pairs) + 1
        if len(student_maps) < needed or len(teacher_maps) < needed:
            raise ValueError(
                f"FSPLoss pairs {self.pairs} need {needed} maps, got {len(student_maps)} student "
                f"and {len(teacher_maps)} teacher maps"
            )
        terms: list[Tensor] = []
        for i, j in self.pairs:
            g_s = fsp_matrix(student_maps[i], student_maps[j])
            g_t = fsp_matrix(
                _as_student_dtype(teacher_maps[i], g_s), _as_student_dtype(teacher_maps[j], g_s)
            )
            if g_s.shape != g_t.shape:
                raise ValueError(
                    f"FSPLoss pair ({i}, {j}): student FSP {list(g_s.shape[1:])} vs teacher "
                    f"{list(g_t.shape[1:])}; the paired maps need the same channel counts"
                )
            terms.append(F.mse_loss(g_s, g_t))
        return torch.stack(terms).sum()
