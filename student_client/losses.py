"""Distillation losses: soft-label and top-k divergences (forward and reverse KL, JSD, skew
KL, total variation: `_divergences`), feature L2, FitNets hints, FSP, and the
weighted objective that adds them to the task loss.

Conventions shared by every loss here:

- the student comes first, the teacher second (`loss(student, teacher, ...)`);
- teacher knowledge is never modified in place (decoded tensors may be read-only views of
  Arrow buffers) and is computed on in float32 or the student's dtype, whichever is wider;
- logit losses accept `[B, C]`, token-level `[B, T, C]` and `torch.nested` jagged `[B, j, C]`
  inputs, with an optional bool mask (True = the position counts). Their reduction is
  "batchmean over positions": the per-position KL summed over the classes, averaged over the
  positions that count (B for `[B, C]`, the unmasked tokens otherwise), so the value does not
  grow with sequence length. (`F.kl_div(reduction="batchmean")` on `[B, T, C]` divides by B
  only; we do not, on purpose.)

Feature losses and the objective live in `_feature_losses` and `_objective`; this module
re-exports them so `lyceum.student_client.losses` is the one place to import losses from.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lyceum.proto.schema import FieldSpec, TopK
from lyceum.student_client._divergences import (
    DIVERGENCES,
    Divergence,
    check_divergence,
    divergence_rows,
)
from lyceum.student_client._feature_losses import FeatureMSE, FSPLoss, HintLoss, fsp_matrix
from lyceum.student_client._objective import (
    DistillObjective,
    DistillOutput,
    DistillTerm,
    labeled_cross_entropy,
)
from lyceum.student_client._positions import flatten_positions

__all__ = [
    "DIVERGENCES",
    "DistillObjective",
    "DistillOutput",
    "DistillTerm",
    "Divergence",
    "FSPLoss",
    "FeatureMSE",
    "HintLoss",
    "SoftLabelKD",
    "TopKKD",
    "fsp_matrix",
    "labeled_cross_entropy",
    "soft_label_kd",
    "teacher_log_probs",
    "topk_kd",
]

TeacherMeaning = Literal["logits", "log_probs", "probs"]
Missing = Literal["zero", "uniform", "tail"]


def _check_meaning(meaning: str) -> None:
    if meaning not in ("logits", "log_probs", "probs"):
        raise ValueError(
            f"teacher meaning {meaning!r} is not a distribution: a KL loss needs 'logits', "
            f"'log_probs' or 'probs'; use FeatureMSE for 'features'"
        )


def _check_temperature(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_missing(missing: str, meaning: str, divergence: str = "forward_kl") -> None:
    if missing not in ("zero", "uniform", "tail"):
        raise ValueError(f"missing={missing!r}: use 'zero', 'uniform' or 'tail'")
    if missing != "zero" and meaning == "logits":
        raise ValueError(
            f"missing={missing!r} needs the teacher's top-k 'log_probs' or 'probs': top-k "
            f"logits do not say how much probability lies outside the top k. Have the teacher "
            f"send log_probs (--values log_probs), or use missing='zero'"
        )
    if missing == "zero" and divergence == "reverse_kl":
        raise ValueError(
            "divergence 'reverse_kl' with missing='zero' is infinite: the student has mass on "
            "ids the teacher would then give none. Use missing='tail' or 'uniform' (with the "
            "teacher's log_probs), or a bounded divergence (jsd, skew_reverse_kl, tv)"
        )


def _float(t: Tensor, like: Tensor) -> Tensor:
    """`t` in the wider of float32 and `like`'s dtype (teachers may send fp16/bf16)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return t.to(dtype)


def _scores(teacher: Tensor, meaning: str) -> Tensor:
    """Teacher values as log-scale scores: logits and log-probs as they are, log of probs.

    log(0) = -inf is fine: it is a score of an impossible class, and log_softmax keeps it
    -inf; the KL below gives such classes zero weight.
    """
    return torch.log(teacher) if meaning == "probs" else teacher


def teacher_log_probs(
    teacher: Tensor,
    meaning: TeacherMeaning,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> Tensor:
    """log p_T = log_softmax(s * T_f / T) over the last dim.

    s are the teacher's values as scores (logits, log-probs, or log of probs) produced at
    temperature T_f (`teacher_temperature`, the schema field's `temperature`). A log-prob at
    T_f is z / T_f minus a constant, so s * T_f recovers the raw logits z up to a constant,
    which log_softmax ignores; dividing by T gives the teacher distribution at the
    distillation temperature T. All three meanings therefore give the same p_T.
    """
    _check_meaning(meaning)
    _check_temperature("temperature", temperature)
    _check_temperature("teacher_temperature", teacher_temperature)
    return F.log_softmax(_scores(teacher, meaning) * (teacher_temperature / temperature), dim=-1)


def _mean_over_rows(per_row: Tensor) -> Tensor:
    # An empty selection (everything masked) contributes 0, not NaN.
    return per_row.sum() / max(per_row.numel(), 1)


def soft_label_kd(
    student_logits: Tensor,
    teacher: Tensor,
    *,
    meaning: TeacherMeaning = "logits",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: Tensor | None = None,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Hinton soft-label KD: T^2 * mean_positions D(p_T, q_T), D = KL(p_T || q_T) by default.

    q_T = softmax(student_logits / T); p_T = `teacher_log_probs(teacher, meaning, T, T_f)`.
    The T^2 factor keeps the gradient scale independent of T (Hinton et al. 2015); every
    `divergence` of `_divergences` is scaled the same way (`beta`: jsd's, `alpha`: the skew
    KLs'). Shapes: `[B, C]`, `[B, T, C]` or jagged `[B, j, C]` (student may be padded or
    jagged); `mask` is bool with the position shape, True = counts (see the module docstring).
    """
    _check_meaning(meaning)
    _check_temperature("temperature", temperature)
    check_divergence(divergence, beta, alpha)
    s, (t,) = flatten_positions(student_logits, [teacher], mask)
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"student has {s.shape[-1]} classes, teacher {t.shape[-1]}: soft-label KD needs the "
            f"same classes (for a top-k teacher use TopKKD)"
        )
    s = _float(s, s)  # bf16/fp16 student logits: take the softmax in float32
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = teacher_log_probs(_float(t, s), meaning, temperature, teacher_temperature)
    rows = divergence_rows(log_p, log_q, divergence, beta=beta, alpha=alpha)
    return _mean_over_rows(rows) * temperature**2


def topk_kd(
    student_logits: Tensor,
    values: Tensor,
    indices: Tensor,
    *,
    meaning: TeacherMeaning = "logits",
    missing: Missing = "zero",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: Tensor | None = None,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """A divergence (KL(teacher || student) by default) when the teacher kept only its k
    largest entries per row.

    The student gives full logits `[.., V]`; the teacher `values [.., k]` and integer
    `indices [.., k]` into V. The teacher distribution is rebuilt at its storage temperature
    T_f (the schema field's), then re-tempered to T by the power a = T_f / T; the student's
    is q = softmax(student / T) over all V. The V-k entries the teacher dropped get:

    - `missing="zero"`: probability 0, so the kept entries are renormalised:
      p_k = softmax(a * s_k) (s = the values as scores). Works for any meaning. The
      student's mass on the dropped ids is one bucket (exact for every divergence here:
      where p is 0 each is linear in q); `reverse_kl` is refused (infinite).
    - `missing="tail"`: the mass the teacher did not keep, m = 1 - sum_k exp(lp_k), stays
      as one bucket against the student's mass on the dropped ids, so nothing is
      renormalised away. Needs real probabilities: the teacher must send `log_probs` or
      `probs` (top-k logits do not say how much mass lies outside the top k). It says
      nothing about how the student spreads that mass over the dropped ids, so a student
      trained without cross-entropy spreads it badly wherever the teacher's top k holds
      little of its mass (`bench/README.md`, the LM students' perplexity split by the
      teacher's top k): there, raise k, or use `uniform`.
    - `missing="uniform"`: m spread evenly, u = m / (V-k) per dropped id, compared id by id
      with the student over all V (same needs as `tail`).

    The storage temperature: at T = T_f all three use the teacher's exact kept mass. At
    T != T_f the dropped ids' re-tempered mass depends on how m was spread among them,
    which the top-k does not say; `tail` and `uniform` assume evenly at T_f (the bucket at
    T is then ∝ (V-k) u^a), so for exact results store the knowledge at the temperature
    you distil at (`--temperature`). `zero` needs no assumption.

    The result is T^2 * the mean over positions, as in `soft_label_kd`. With k == V every
    variant equals the full-distribution `soft_label_kd` of the same divergence.
    """
    _check_meaning(meaning)
    _check_temperature("temperature", temperature)
    _check_temperature("teacher_temperature", teacher_temperature)
    check_divergence(divergence, beta, alpha)
    _check_missing(missing, meaning, divergence)
    s, (v, idx) = flatten_positions(student_logits, [values, indices], mask)
    vocab, k = s.shape[-1], v.shape[-1]
    if idx.shape[-1] != k:
        raise ValueError(f"top-k values have k={k} but indices k={idx.shape[-1]}")
    if k > vocab:
        raise ValueError(f"top-k k={k} exceeds the student's vocabulary {vocab}")
    s = _float(s, s)  # bf16/fp16 student logits: take the softmax in float32
    idx = idx.long()
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_q_kept = log_q.gather(-1, idx)
    a = teacher_temperature / temperature
    scores = _scores(_float(v, s), meaning)
    n_missing = vocab - k

    def reduce(log_p: Tensor, log_q_support: Tensor) -> Tensor:
        rows = divergence_rows(log_p, log_q_support, divergence, beta=beta, alpha=alpha)
        return _mean_over_rows(rows) * temperature**2

    if n_missing == 0:
        return reduce(F.log_softmax(scores * a, dim=-1), log_q_kept)
    # The student's mass on the dropped ids, as one log-probability per row.
    log_q_rest = log_q.scatter(-1, idx, -math.inf).logsumexp(-1, keepdim=True)
    if missing == "zero":
        log_p_kept = F.log_softmax(scores * a, dim=-1)
        nothing = torch.full_like(log_q_rest, -math.inf)
        return reduce(
            torch.cat([log_p_kept, nothing], dim=-1), torch.cat([log_q_kept, log_q_rest], dim=-1)
        )
    lp = scores  # real log-probabilities at T_f here ('logits' was refused above)
    # fp16 rounding can make the kept mass exceed 1 by a hair: nothing is left then.
    mass_left = (1 - lp.exp().sum(-1, keepdim=True)).clamp(min=0)
    log_u = torch.log(mass_left / n_missing)  # -inf where nothing is missing
    # Re-tempered log-weights: the k kept entries, then all dropped ones together.
    tail = log_u * a + math.log(n_missing)
    log_z = torch.logsumexp(torch.cat([lp * a, tail], dim=-1), dim=-1, keepdim=True)
    if missing == "tail":
        return reduce(
            torch.cat([lp * a - log_z, tail - log_z], dim=-1),
            torch.cat([log_q_kept, log_q_rest], dim=-1),
        )
    log_p = (log_u * a - log_z).expand_as(log_q).scatter(-1, idx, lp * a - log_z)
    return reduce(log_p, log_q)


class SoftLabelKD(nn.Module):
    """Module form of `soft_label_kd`: T^2 * D(p_T, q_T), batchmean over positions."""

    def __init__(
        self,
        temperature: float = 1.0,
        meaning: TeacherMeaning = "logits",
        teacher_temperature: float = 1.0,
        *,
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        alpha: float = 0.1,
    ) -> None:
        super().__init__()
        _check_meaning(meaning)
        _check_temperature("temperature", temperature)
        _check_temperature("teacher_temperature", teacher_temperature)
        check_divergence(divergence, beta, alpha)
        self.temperature = temperature
        self.meaning: TeacherMeaning = meaning
        self.teacher_temperature = teacher_temperature
        self.divergence: Divergence = divergence
        self.beta, self.alpha = beta, alpha

    @classmethod
    def for_field(
        cls,
        spec: FieldSpec,
        temperature: float = 1.0,
        *,
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        alpha: float = 0.1,
    ) -> SoftLabelKD:
        """Take the teacher's meaning and temperature from its knowledge schema field."""
        if isinstance(spec.encoding, TopK):
            raise ValueError(f"field {spec.name!r} is top-k: use TopKKD.for_field")
        _check_meaning(spec.meaning)
        return cls(
            temperature,
            spec.meaning,  # type: ignore[arg-type]
            spec.temperature,
            divergence=divergence,
            beta=beta,
            alpha=alpha,
        )

    def forward(
        self, student_logits: Tensor, teacher: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        return soft_label_kd(
            student_logits,
            teacher,
            meaning=self.meaning,
            temperature=self.temperature,
            teacher_temperature=self.teacher_temperature,
            mask=mask,
            divergence=self.divergence,
            beta=self.beta,
            alpha=self.alpha,
        )

    def extra_repr(self) -> str:
        return (
            f"T={self.temperature}, meaning={self.meaning}, T_teacher={self.teacher_temperature}, "
            f"divergence={self.divergence}"
        )


class TopKKD(nn.Module):
    """Module form of `topk_kd`; the teacher is the `(values, indices)` pair of a top-k field."""

    def __init__(
        self,
        temperature: float = 1.0,
        meaning: TeacherMeaning = "logits",
        missing: Missing = "zero",
        teacher_temperature: float = 1.0,
        *,
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        alpha: float = 0.1,
    ) -> None:
        super().__init__()
        _check_meaning(meaning)
        _check_temperature("temperature", temperature)
        _check_temperature("teacher_temperature", teacher_temperature)
        check_divergence(divergence, beta, alpha)
        _check_missing(missing, meaning, divergence)
        self.temperature = temperature
        self.meaning: TeacherMeaning = meaning
        self.missing: Missing = missing
        self.teacher_temperature = teacher_temperature
        self.divergence: Divergence = divergence
        self.beta, self.alpha = beta, alpha

    @classmethod
    def for_field(
        cls,
        spec: FieldSpec,
        temperature: float = 1.0,
        missing: Missing = "zero",
        *,
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        alpha: float = 0.1,
    ) -> TopKKD:
        """Take the teacher's meaning and temperature from its top-k knowledge field."""
        if not isinstance(spec.encoding, TopK):
            raise ValueError(f"field {spec.name!r} is dense: use SoftLabelKD.for_field")
        _check_meaning(spec.meaning)
        return cls(
            temperature,
            spec.meaning,  # type: ignore[arg-type]
            missing,
            spec.temperature,
            divergence=divergence,
            beta=beta,
            alpha=alpha,
        )

    def forward(
        self, student_logits: Tensor, teacher: tuple[Tensor, Tensor], mask: Tensor | None = None
    ) -> Tensor:
        values, indices = teacher
        return topk_kd(
            student_logits,
            values,
            indices,
            meaning=self.meaning,
            missing=self.missing,
            temperature=self.temperature,
            teacher_temperature=self.teacher_temperature,
            mask=mask,
            divergence=self.divergence,
            beta=self.beta,
            alpha=self.alpha,
        )

    def extra_repr(self) -> str:
        return (
            f"T={self.temperature}, meaning={self.meaning}, missing={self.missing}, "
            f"T_teacher={self.teacher_temperature}, divergence={self.divergence}"
        )
