"""Quantization configs: PaddleSlim's int8 schemes as frozen pydantic models.

The names are PaddleSlim's so that a user coming from `paddleslim.quant` finds the same knobs:

- weights `abs_max`: one symmetric scale per tensor, `max|W| / 127`;
- weights `channel_wise_abs_max`: one symmetric scale per output channel, `max|W[c]| / 127`;
- activations `abs_max`: dynamic, the scale is taken from each batch, also at inference;
- activations `moving_average_abs_max`: static, an EMA of the per-batch `max|x|` over training
  (QAT) or calibration (PTQ) batches, frozen at export.

Only convolutions and linear layers are quantized (PaddleSlim's `conv2d`, `depthwise_conv2d`,
`mul`); everything else stays float. Layers are addressed by their module path (`features.0.0`,
`classifier.1`), matched with `re.fullmatch`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

WeightScheme = Literal["abs_max", "channel_wise_abs_max"]
ActivationScheme = Literal["abs_max", "moving_average_abs_max"]
Observer = Literal["minmax", "percentile", "mse"]

WEIGHT_SCHEMES: tuple[str, ...] = ("abs_max", "channel_wise_abs_max")
ACTIVATION_SCHEMES: tuple[str, ...] = ("abs_max", "moving_average_abs_max")


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"layer pattern {pattern!r} is not a valid regular expression: {exc}"
        ) from exc
    return pattern


class LayerOverride(BaseModel):
    """A per-layer exception to the model-wide scheme, for layers whose name fully matches `pattern`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str = Field(
        description="Regex matched with re.fullmatch against the module path, e.g. 'features\\.0\\..*'."
    )
    weights: WeightScheme | None = Field(
        default=None, description="Weight scheme for the matching layers; None keeps the model's."
    )
    activations: ActivationScheme | None = Field(
        default=None,
        description="Activation scheme for the matching layers; None keeps the model's.",
    )

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        return _check_regex(value)


class _SchemeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: WeightScheme = Field(
        default="channel_wise_abs_max",
        description="Model-wide weight scheme: 'abs_max' (per tensor) or 'channel_wise_abs_max'.",
    )
    activations: ActivationScheme = Field(
        default="moving_average_abs_max",
        description="Model-wide activation scheme: 'abs_max' (dynamic, per batch) or "
        "'moving_average_abs_max' (static, EMA of the abs max).",
    )
    skip: tuple[str, ...] = Field(
        default=(),
        description="Regexes of conv/linear module paths left in float (re.fullmatch).",
    )
    overrides: tuple[LayerOverride, ...] = Field(
        default=(),
        description="Per-layer scheme overrides; the first override whose pattern matches wins.",
    )
    moving_rate: float = Field(
        default=0.9,
        gt=0.0,
        lt=1.0,
        description="EMA rate of 'moving_average_abs_max' (PaddleSlim's moving_rate).",
    )

    @field_validator("skip")
    @classmethod
    def _valid_skip(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_regex(p) for p in value)

    def scheme_for(self, layer: str) -> tuple[WeightScheme, ActivationScheme] | None:
        """The (weights, activations) scheme of the layer at module path `layer`, or None if skipped."""
        if any(re.fullmatch(p, layer) for p in self.skip):
            return None
        for override in self.overrides:
            if re.fullmatch(override.pattern, layer):
                return (
                    override.weights or self.weights,
                    override.activations or self.activations,
                )
        return self.weights, self.activations

    def patterns(self) -> tuple[str, ...]:
        """Every layer pattern in this config (skip list first), for the matches-nothing check."""
        return self.skip + tuple(o.pattern for o in self.overrides)


class QAT(_SchemeConfig):
    """Quantization-aware training: train with fake quantization, then convert to int8.

    Weight fake-quant recomputes `abs_max` from the current weights at every step (PaddleSlim's
    behaviour); static activations track the EMA of `max|x|` during training.
    """

    kind: Literal["qat"] = Field(default="qat", description="Discriminator for job configs.")


class PTQ(_SchemeConfig):
    """Post-training quantization: calibrate static activation scales on a few batches, no training.

    Here `activations="moving_average_abs_max"` selects static (per-tensor, frozen) activation
    scales, and `observer` says how calibration computes them; 'minmax' is PaddleSlim PTQ's
    'abs_max' algorithm (running max of |x|), not an EMA.
    """

    kind: Literal["ptq"] = Field(default="ptq", description="Discriminator for job configs.")
    observer: Observer = Field(
        default="minmax",
        description="How static activation ranges are calibrated: 'minmax' (running abs max), "
        "'percentile' (the given percentile of |x|) or 'mse' (clip minimising quantization error).",
    )
    percentile: float = Field(
        default=99.99,
        gt=50.0,
        le=100.0,
        description="Percentile of |x| used as the clip value when observer='percentile'.",
    )
    bins: int = Field(
        default=2048,
        ge=128,
        le=65536,
        description="Histogram bins of the 'percentile' and 'mse' observers.",
    )

    @model_validator(mode="after")
    def _observer_needs_static_activations(self) -> PTQ:
        static = self.activations == "moving_average_abs_max" or any(
            o.activations == "moving_average_abs_max" for o in self.overrides
        )
        if self.observer != "minmax" and not static:
            raise ValueError(
                f"PTQ observer={self.observer!r} calibrates static activation scales, but "
                "activations='abs_max' is dynamic (scale from each batch) and has nothing to "
                "calibrate; use activations='moving_average_abs_max' or observer='minmax'"
            )
        return self
