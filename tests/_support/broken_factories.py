"""Factories of a user's own code that raise, for the spec tests (and the CLI's, as specs)."""

from __future__ import annotations

from torch import nn


def model_that_raises(width: int = 8) -> nn.Module:
    raise RuntimeError(f"width {width} needs a GPU")


def dataset_that_raises() -> list[tuple[int, int]]:
    settings: dict[str, str] = {}
    return [(0, int(settings["split"]))]
