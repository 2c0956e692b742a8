"""PaddleSlim's abs-max observers, written against torchao's PT2E observer base class.

torchao ships min/max, moving-average min/max and histogram observers, but none computes
PaddleSlim's scales: symmetric `max|x| / 127`, the bias-corrected EMA of
`moving_average_abs_max`, or a per-tensor weight scale stored per channel. These classes
plug into `prepare_pt2e` / `prepare_qat_pt2e` through a `QuantizationSpec`, either directly
(PTQ) or wrapped in torchao's `FakeQuantize` (QAT), and `convert_pt2e` reads their
`calculate_qparams()` like any torchao observer.

Zero points: int8 tensors use zero point 0; uint8 tensors use zero point 128, which puts
PaddleSlim's grid `{-127..127} * scale` on uint8 codes 1..255. Static activations are uint8
because x86 oneDNN's int8 convolution only accepts uint8 inputs (an int8 input compiles but
fails at run time with "Input tensor should have uint8"); see `quantizer.py`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torchao.quantization.pt2e.observer import UniformQuantizationObserverBase

# PaddleSlim's symmetric int8 uses [-127, 127] (bnt = 2**7 - 1), so scale = abs_max / 127.
QMAX = 127
_EPS = torch.finfo(torch.float32).eps


def _zero_point_for(dtype: torch.dtype) -> int:
    return 128 if dtype in (torch.uint8, torch.quint8) else 0


class _AbsMaxBase(UniformQuantizationObserverBase):
    """Shared parts: symmetric qparams from an `abs_max` tensor the subclass maintains."""

    def __init__(self, dtype: torch.dtype = torch.int8, **kwargs: Any) -> None:
        kwargs.setdefault("qscheme", torch.per_tensor_symmetric)
        kwargs.setdefault("eps", _EPS)
        super().__init__(dtype=dtype, **kwargs)

    def _abs_max(self) -> torch.Tensor:
        raise NotImplementedError

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        abs_max = self._abs_max()
        if abs_max.numel() == 0 or not bool(torch.isfinite(abs_max).all()):
            raise ValueError(
                f"{type(self).__name__} has seen no data: run training steps (QAT) or "
                "calibration batches (PTQ) through the prepared model before convert()"
            )
        scale = torch.clamp(abs_max.detach().float() / QMAX, min=float(self.eps)).reshape(-1)
        # int32: half the bytes of int64 in the exported program (one per channel).
        zero_point = torch.full_like(scale, _zero_point_for(self.dtype), dtype=torch.int32)
        return scale, zero_point

    def extra_repr(self) -> str:
        return f"abs_max={self._abs_max().tolist()}"


class AbsMaxObserver(_AbsMaxBase):
    """`abs_max` / `channel_wise_abs_max`: scale = max|x| / 127, per tensor or per channel.

    - `granularity="tensor"`: one scale (per_tensor_symmetric);
    - `granularity="channel"`: one scale per slice along `ch_axis` (per_channel_symmetric);
    - `granularity="shared_channel"`: PaddleSlim's per-tensor `abs_max` for weights, but
      stored as a per-channel scale vector whose entries are all equal. The numbers are those
      of per-tensor quantization; the layout is the one inductor's x86 pass fuses into oneDNN
      int8 kernels (a per_tensor weight spec is left as a dequantize + float conv).

    `accumulate=True` keeps the running max over batches (PTQ 'minmax' calibration);
    `accumulate=False` uses the current batch only (weights, whose QAT scale PaddleSlim
    recomputes from the current weights at every step).
    """

    abs_max: torch.Tensor

    def __init__(
        self,
        granularity: Literal["tensor", "channel", "shared_channel"] = "tensor",
        accumulate: bool = True,
        ch_axis: int = 0,
        **kwargs: Any,
    ) -> None:
        if granularity not in ("tensor", "channel", "shared_channel"):
            raise ValueError(
                f"AbsMaxObserver: unknown granularity {granularity!r}; "
                "expected 'tensor', 'channel' or 'shared_channel'"
            )
        per_channel = granularity != "tensor"
        kwargs["qscheme"] = (
            torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
        )
        super().__init__(**kwargs)
        self.granularity = granularity
        self.accumulate = accumulate
        self.ch_axis = ch_axis
        self.register_buffer("abs_max", torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        a = x.detach().abs().float()
        if self.granularity == "tensor":
            current = a.amax()
        else:
            current = a.transpose(0, self.ch_axis).reshape(a.shape[self.ch_axis], -1).amax(dim=1)
            if self.granularity == "shared_channel":
                current = current.amax().expand_as(current).clone()
        if self.accumulate and self.abs_max.shape == current.shape:
            current = torch.maximum(self.abs_max, current)
        self.abs_max.resize_(current.shape).copy_(current)
        return x

    def _abs_max(self) -> torch.Tensor:
        return self.abs_max


class MovingAverageAbsMaxObserver(_AbsMaxBase):
    """`moving_average_abs_max`: PaddleSlim's bias-corrected EMA of the per-batch abs max.

    On each batch: `accum = rate * accum + max|x|`, `state = rate * state + 1`, and the scale
    is `(accum / state) / 127`. PaddleSlim starts from accum = state = 1, which pulls early
    scales toward 1.0; this starts from 0, so the first batch's scale is its own abs max and
    the recurrence is the same afterwards.
    """

    accum: torch.Tensor
    state: torch.Tensor

    def __init__(self, moving_rate: float = 0.9, **kwargs: Any) -> None:
        if not 0.0 < moving_rate < 1.0:
            raise ValueError(f"moving_rate must be in (0, 1), got {moving_rate}")
        kwargs["qscheme"] = torch.per_tensor_symmetric
        super().__init__(**kwargs)
        self.moving_rate = moving_rate
        self.register_buffer("accum", torch.zeros(()))
        self.register_buffer("state", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        current = x.detach().abs().amax().float()
        self.accum.mul_(self.moving_rate).add_(current)
        self.state.mul_(self.moving_rate).add_(1.0)
        return x

    def _abs_max(self) -> torch.Tensor:
        if float(self.state) == 0.0:
            return torch.empty(0)
        return self.accum / self.state


class HistogramAbsMaxObserver(_AbsMaxBase):
    """PTQ calibration of a static per-tensor clip value from a histogram of |x|.

    - `method="percentile"`: the clip is the given percentile of |x| over all batches;
    - `method="mse"`: the clip (searched over histogram bin edges) that minimises the expected
      squared error of symmetric int8 quantization, clipping included.

    The histogram covers [0, max|x| seen so far]; when a batch exceeds it, the old counts are
    re-binned onto the wider range (at their bin centres) before adding the new batch.
    """

    hist: torch.Tensor
    upper: torch.Tensor

    def __init__(
        self,
        method: Literal["percentile", "mse"] = "percentile",
        percentile: float = 99.99,
        bins: int = 2048,
        **kwargs: Any,
    ) -> None:
        if method not in ("percentile", "mse"):
            raise ValueError(
                f"HistogramAbsMaxObserver: unknown method {method!r}; expected 'percentile' or 'mse'"
            )
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        kwargs["qscheme"] = torch.per_tensor_symmetric
        super().__init__(**kwargs)
        self.method = method
        self.percentile = percentile
        self.bins = bins
        self.register_buffer("hist", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("upper", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        a = x.detach().abs().double().flatten()
        top = float(a.max())
        if top <= 0.0 and float(self.upper) == 0.0:
            self.hist[0] += a.numel()
            return x
        upper = float(self.upper)
        if top > upper:
            if upper > 0.0:
                width = upper / self.bins
                centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width
                rebinned, _ = torch.histogram(
                    centres, bins=self.bins, range=(0.0, top), weight=self.hist
                )
                self.hist.copy_(rebinned)
            else:
                # All earlier values were exactly zero: they stay in bin 0 of the new range.
                pass
            self.upper.fill_(top)
            upper = top
        self.hist += torch.histc(a, bins=self.bins, min=0.0, max=upper)
        return x

    def _abs_max(self) -> torch.Tensor:
        total = float(self.hist.sum())
        if total == 0.0:
            return torch.empty(0)
        upper = float(self.upper)
        if upper == 0.0:
            return torch.zeros(())
        width = upper / self.bins
        if self.method == "percentile":
            cdf = torch.cumsum(self.hist, 0) / total
            index = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100.0).double()))
            return torch.tensor(min(index + 1, self.bins) * width)
        return torch.tensor(self._mse_clip(width))

    def _mse_clip(self, width: float) -> float:
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width
        # Candidate clips: every bin edge from 1/16 of the range up to the full range.
        edges = torch.arange(max(self.bins // 16, 1), self.bins + 1, dtype=torch.float64) * width
        scale = (edges / QMAX)[:, None]
        codes = torch.clamp(torch.round(centres[None, :] / scale), max=QMAX)
        error = ((centres[None, :] - codes * scale) ** 2 * self.hist[None, :]).sum(dim=1)
        return float(edges[int(torch.argmin(error))])
