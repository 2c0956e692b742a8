"""Distillation losses: soft-label KL, top-k KL, feature L2, FitNets hints, FSP, and the
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
from lyceum.student_client._feature_losses import FeatureMSE, FSPLoss, HintLoss, fsp_matrix
from lyceum.student_client._objective import DistillObjective, DistillOutput, DistillTerm
from lyceum.student_client._positions import flatten_positions

__all__ = [
    "DistillObjective",
    "DistillOutput",
    "DistillTerm",
    "FSPLoss",
    "FeatureMSE",
    "HintLoss",
    "SoftLabelKD",
    "TopKKD",
    "fsp_matrix",
    "soft_label_kd",
    "teacher_log_probs",
    "topk_kd",
]

TeacherMeaning = Literal["logits", "log_probs", "probs"]
Missing = Literal["zero", "uniform"]


def _check_meaning(meaning: str) -> None:
    if meaning not in ("logits", "log_probs", "probs"):
        raise ValueError(
            f"teacher meaning {meaning!r} is not a distribution: a KL loss needs 'logits', "
            f"'log_probs' or 'probs'; use FeatureMSE for 'features'"
        )


def _check_temperature(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_missing(missing: str, meaning: str) -> None:
    if missing not in ("zero", "uniform"):
        raise ValueError(f"missing={missing!r}: use 'zero' or 'uniform'")
    if missing == "uniform" and meaning == "logits":
        raise ValueError(
            "missing='uniform' needs the teacher's top-k 'log_probs' or 'probs': top-k logits "
            "do not say how much probability lies outside the top k. Have the teacher send "
            "log_probs, or use missing='zero'"
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


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_c p_c (log p_c - log q_c) per row, with 0 * log 0 = 0."""
    p = log_p.exp()
    present = p > 0
    safe_log_p = torch.where(present, log_p, torch.zeros_like(log_p))
    return torch.where(present, p * (safe_log_p - log_q), torch.zeros_like(p)).sum(-1)


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
) -> Tensor:
    """Hinton soft-label KD: T^2 * mean_positions sum_c p_T,c (log p_T,c - log q_T,c).

    q_T = softmax(student_logits / T); p_T = `teacher_log_probs(teacher, meaning, T, T_f)`.
    The T^2 factor keeps the gradient scale independent of T (Hinton et al. 2015).
    Shapes: `[B, C]`, `[B, T, C]` or jagged `[B, j, C]` (student may be padded or jagged);
    `mask` is bool with the position shape, True = counts (see the module docstring).
    """
    _check_meaning(meaning)
    _check_temperature("temperature", temperature)
    s, (t,) = flatten_positions(student_logits, [teacher], mask)
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"student has {s.shape[-1]} classes, teacher {t.shape[-1]}: soft-label KD needs the "
            f"same classes (for a top-k teacher use TopKKD)"
        )
    s = _float(s, s)  # bf16/fp16 student logits: take the softmax in float32
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = teacher_log_probs(_float(t, s), meaning, temperature, teacher_temperature)
    return _mean_over_rows(_kl_rows(log_p, log_q)) * temperature**2


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
) -> Tensor:
    """KL(teacher || student) when the teacher kept only its k largest entries per row.

    The student gives full logits `[.., V]`; the teacher `values [.., k]` and int32
    `indices [.., k]` into V. The full teacher distribution is rebuilt at the teacher's
    temperature T_f, then re-tempered to T by the power a = T_f / T:

    - `missing="zero"`: the V-k dropped entries get probability 0, so p over the kept entries
      is softmax(a * s_k) (s = the values as scores); KL = sum_k p_k (log p_k - log q_k), with
      q = softmax(student / T) over all V. Works for any meaning.
    - `missing="uniform"`: the mass the teacher did not keep, m = 1 - sum_k exp(lp_k), is
      spread evenly, u = m / (V-k) per dropped entry. This needs real probabilities, so the
      teacher must send `log_probs` or `probs` (top-k logits do not say how much mass lies
      outside the top k). Re-tempered: p_k ∝ exp(lp_k)^a, each dropped entry ∝ u^a, and
      KL = sum_k p_k (log p_k - log q_k) + p_u * ((V-k) log p_u - sum_{j dropped} log q_j).

    The result is T^2 * the mean over positions, as in `soft_label_kd`. With k == V both
    variants equal the full soft-label KL.
    """
    _check_meaning(meaning)
    _check_temperature("temperature", temperature)
    _check_temperature("teacher_temperature", teacher_temperature)
    _check_missing(missing, meaning)
    s, (v, idx) = flatten_positions(student_logits, [values, indices], mask)
    vocab, k = s.shape[-1], v.shape[-1]
    if idx.shape[-1] != k:
        raise ValueError(f"top-k values have k={k} but indices k={idx.shape[-1]}")
    if k > vocab:
        raise ValueError(f"top-k k={k} exceeds the student's vocabulary {vocab}")
    s = _float(s, s)  # bf16/fp16 student logits: take the softmax in float32
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_q_kept = log_q.gather(-1, idx.long())
    a = teacher_temperature / temperature
    scores = _scores(_float(v, s), meaning)
    if missing == "zero":
        return (
            _mean_over_rows(_kl_rows(F.log_softmax(scores * a, dim=-1), log_q_kept))
            * temperature**2
        )

    n_missing = vocab - k
    lp = scores  # real log-probabilities at T_f here ('logits' was refused above)
    if n_missing == 0:
        return _mean_over_rows(_kl_rows(F.log_softmax(lp * a, dim=-1), log_q_kept)) * temperature**2
    # fp16 rounding can make the kept mass exceed 1 by a hair: nothing is left then.
    mass_left = (1 - lp.exp().sum(-1, keepdim=True)).clamp(min=0)
    log_u = torch.log(mass_left / n_missing)  # -inf where nothing is missing
    # Unnormalised re-tempered log-weights: the k kept entries, then all dropped ones together.
    tempered = torch.cat([lp * a, log_u * a + math.log(n_missing)], dim=-1)
    log_z = torch.logsumexp(tempered, dim=-1, keepdim=True)
    kept = _kl_rows(lp * a - log_z, log_q_kept)
    log_pu = (log_u * a - log_z).squeeze(-1)
    p_u = log_pu.exp()
    # Zero the kept entries and sum, rather than subtract two large sums over V.
    log_q_dropped = log_q.scatter(-1, idx.long(), 0.0).sum(-1)
    safe = torch.where(p_u > 0, log_pu, torch.zeros_like(log_pu))
    dropped = torch.where(p_u > 0, p_u * (n_missing * safe - log_q_dropped), torch.zeros_like(p_u))
    return _mean_over_rows(kept + dropped) * temperature**2


class SoftLabelKD(nn.Module):
    """Module form of `soft_label_kd`: T^2 * KL(p_T || q_T), batchmean over positions."""

    def __init__(
        self,
        temperature: float = 1.0,
        meaning: TeacherMeaning = "logits",
        teacher_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        _check_meaning(meaning)
        _check_temperature("temperature", temperature)
        _check_temperature("teacher_temperature", teacher_temperature)
        self.temperature = temperature
        self.meaning: TeacherMeaning = meaning
        self.teacher_temperature = teacher_temperature

    @classmethod
    def for_field(cls, spec: FieldSpec, temperature: float = 1.0) -> SoftLabelKD:
        """Take the teacher's meaning and temperature from its knowledge schema field."""
        if isinstance(spec.encoding, TopK):
            raise ValueError(f"field {spec.name!r} is top-k: use TopKKD.for_field")
        _check_meaning(spec.meaning)
        return cls(temperature, spec.meaning, spec.temperature)  # type: ignore[arg-type]

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
        )

    def extra_repr(self) -> str:
        return f"T={self.temperature}, meaning={self.meaning}, T_teacher={self.teacher_temperature}"


class TopKKD(nn.Module):
    """Module form of `topk_kd`; the teacher is the `(values, indices)` pair of a top-k field."""

    def __init__(
        self,
        temperature: float = 1.0,
        meaning: TeacherMeaning = "logits",
        missing: Missing = "zero",
        teacher_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        _check_meaning(meaning)
        _check_temperature("temperature", temperature)
        _check_temperature("teacher_temperature", teacher_temperature)
        _check_missing(missing, meaning)
        self.temperature = temperature
        self.meaning: TeacherMeaning = meaning
        self.missing: Missing = missing
        self.teacher_temperature = teacher_temperature

    @classmethod
    def for_field(
        cls, spec: FieldSpec, temperature: float = 1.0, missing: Missing = "zero"
    ) -> TopKKD:
        """Take the teacher's meaning and temperature from its top-k knowledge field."""
        if not isinstance(spec.encoding, TopK):
            raise ValueError(f"field {spec.name!r} is dense: use SoftLabelKD.for_field")
        _check_meaning(spec.meaning)
        return cls(temperature, spec.meaning, missing, spec.temperature)  # type: ignore[arg-type]

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
        )

    def extra_repr(self) -> str:
        return (
            f"T={self.temperature}, meaning={self.meaning}, missing={self.missing}, "
            f"T_teacher={self.teacher_temperature}"
        )
