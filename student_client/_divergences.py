"""Divergences between a teacher distribution p and a student distribution q, per row.

Every divergence here takes both as log-probabilities over the same support (the last dim)
and returns one value per row; 0 * log 0 counts as 0. They are what the logit losses of
`losses` (`SoftLabelKD`, `TopKKD`) reduce over positions:

- `forward_kl`: KL(p || q), mean-seeking (Hinton KD);
- `reverse_kl`: KL(q || p), mode-seeking (MiniLLM, on-policy KD); infinite where the
  student puts mass the teacher does not;
- `jsd`: the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024),
  beta * KL(p || m) + (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q;
  beta = 0.5 is the usual JSD;
- `skew_kl`: KL(p || alpha * p + (1 - alpha) * q) (DistiLLM, Ko et al. 2024), forward KL
  at alpha = 0, bounded for alpha > 0;
- `skew_reverse_kl`: KL(q || alpha * q + (1 - alpha) * p);
- `tv`: total variation, 0.5 * sum |p - q|.

The top-k losses use these over a reduced support (the k kept entries and one bucket of
the rest) where that is exact, and over the whole vocabulary where it is not (see
`losses.topk_kd`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["DIVERGENCES", "Divergence", "check_divergence", "divergence_rows"]

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"]
DIVERGENCES: tuple[Divergence, ...] = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_kl",
    "skew_reverse_kl",
    "tv",
)


def check_divergence(divergence: str, beta: float, alpha: float) -> None:
    """Raise naming the bad value unless `divergence` and its parameter are valid."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r}: expected one of {list(DIVERGENCES)}")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1 (0.5: the usual JSD), got beta={beta}")
    if divergence in ("skew_kl", "skew_reverse_kl") and not 0 <= alpha < 1:
        raise ValueError(
            f"{divergence} needs 0 <= alpha < 1 (0: the plain KL; DistiLLM uses 0.1), got "
            f"alpha={alpha}"
        )


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum a (log a - log b) per row, 0 where a = 0 (and +inf where a > 0 = b)."""
    a = log_a.exp()
    present = a > 0
    zero = torch.zeros_like(a)
    # Masked operands on both sides: a -inf in the branch not taken would give NaN gradients.
    safe_a = torch.where(present, log_a, zero)
    safe_b = torch.where(present, log_b, zero)
    return torch.where(present, a * (safe_a - safe_b), zero).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(weight * a + (1 - weight) * b); clamped at the smallest normal number, which
    changes nothing where either has mass and keeps the gradient finite where neither has."""
    mix = weight * log_a.exp() + (1 - weight) * log_b.exp()
    return torch.log(mix.clamp(min=torch.finfo(mix.dtype).tiny))


def divergence_rows(
    log_p: Tensor,
    log_q: Tensor,
    divergence: Divergence = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """The divergence of each row of teacher `log_p` and student `log_q` (`[N, S]` -> `[N]`)."""
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(log_q, log_p)
    if divergence == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if divergence == "skew_kl":
        return _kl(log_p, _log_mix(log_p, log_q, alpha))
    if divergence == "skew_reverse_kl":
        return _kl(log_q, _log_mix(log_q, log_p, alpha))
    if divergence == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"divergence {divergence!r}: expected one of {list(DIVERGENCES)}")
