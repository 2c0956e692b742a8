"""Meeting a FLOPs target: bisection, the uniform ratio's last step, and the tolerance.

FLOPs move in unit-sized steps (a channel, an attention head, one position of every conv
group), so a target is met only up to a step. `bisect` finds the closest point of a
non-decreasing reduction curve; `closest_ratios` then refines per-group ratios where they
jump over the target; `check_target` accepts what lands within the config's `tolerance` and names
the closest reachable reduction otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Bracket", "bisect", "check_target", "closest_ratios"]

_STEPS = 40
# Closer than this (a fraction of the FLOPs) is as good as exact: the search stops there.
_CLOSE = 5e-4


@dataclass(frozen=True)
class Bracket:
    """The closest point found, and the two points either side of the target's step."""

    best: float
    reached: float
    below: float
    above: float


def bisect(reduction_of: Callable[[float], float], target: float, hi: float) -> Bracket:
    """The x in [0, hi] whose reduction is closest to `target` (reduction non-decreasing in x).

    FLOPs move in steps, so the search keeps the closest point it has seen rather than the
    last one.
    """
    lo, best = 0.0, (abs(reduction_of(0.0) - target), 0.0)
    top = hi
    for _ in range(_STEPS):
        mid = (lo + top) / 2
        got = reduction_of(mid)
        best = min(best, (abs(got - target), mid))
        if best[0] <= _CLOSE:
            break
        if got < target:
            lo = mid
        else:
            top = mid
    return Bracket(best=best[1], reached=reduction_of(best[1]), below=lo, above=top)


def closest_ratios(
    ratios_at: Callable[[float], dict[str, float]],
    reduction_of: Callable[[dict[str, float]], float],
    target: float,
    hi: float,
) -> tuple[dict[str, float], float]:
    """Per-group ratios from a one-parameter family, refined where the target falls in a step.

    `ratios_at(t)` (t in [0, hi]) removes more as `t` grows: one ratio for every group
    (uniform pruning), or a loss threshold (sensitivity pruning). `t` is bisected first. If
    the target falls where some groups lose a unit at once (the *jumping* groups), two
    refinements are tried and the closest result kept: the jumping groups move one by one to
    their ratio above the step, the one that removes most first; or they are held below (or
    above) the step while `t` is bisected again for the other groups. Groups that lose only
    coarse units (an attention embedding, in blocks of `num_heads`; a ShuffleNet stage) thus
    take a step next to the family's ratio and the fine-grained groups make up the rest.
    """
    bracket = bisect(lambda t: reduction_of(ratios_at(t)), target, hi)
    candidates = [(bracket.reached, ratios_at(bracket.best))]
    if abs(bracket.reached - target) <= _CLOSE:
        return candidates[0][1], bracket.reached
    below, above = ratios_at(bracket.below), ratios_at(bracket.above)
    base = reduction_of(below)
    gains = {n: reduction_of({**below, n: above[n]}) - base for n in below}
    jumping = sorted((n for n in gains if gains[n] > 0), key=lambda n: -gains[n])
    current = below
    for name in jumping:  # largest step first, then finer ones
        current = {**current, name: above[name]}
        got = reduction_of(current)
        candidates.append((got, current))
        if got >= target:
            break
    reached, ratios = min(candidates, key=lambda pair: abs(pair[0] - target))
    if abs(reached - target) > _CLOSE and 0 < len(jumping) < len(below):
        for side in (below, above):
            held = {n: side[n] for n in jumping}

            def others_at(t: float, held: dict[str, float] = held) -> dict[str, float]:
                return {**ratios_at(t), **held}

            found = bisect(lambda t: reduction_of(others_at(t)), target, hi)
            candidates.append((found.reached, others_at(found.best)))
        reached, ratios = min(candidates, key=lambda pair: abs(pair[0] - target))
    return ratios, reached


def check_target(reached: float, target: float, tolerance: float) -> None:
    """Raise unless `reached` is within `tolerance` of `target` (fractions of the FLOPs)."""
    if abs(reached - target) <= tolerance + 1e-12:
        return
    gap = abs(reached - target)
    # Rounded up to the printed digits, so the value suggested does accept it.
    needed = math.ceil(gap * 1000) / 1000
    raise ValueError(
        f"prune: cannot remove {target:.1%} of the FLOPs; the closest reachable is "
        f"{reached:.1%}, {gap:.1%} away, beyond tolerance={tolerance:g} (tolerance={needed:g} "
        "accepts it). Or lower the target, select more layers (include/exclude) or allow "
        "larger per-layer ratios (max_ratio)"
    )
