"""Distillation losses against values computed by hand (plain math / numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lyceum.proto import codec
from lyceum.proto.schema import KnowledgeSchema, dense, topk
from lyceum.student_client.losses import (
    DistillObjective,
    DistillTerm,
    FeatureMSE,
    FSPLoss,
    HintLoss,
    SoftLabelKD,
    TopKKD,
    fsp_matrix,
    soft_label_kd,
    topk_kd,
)

torch.set_num_threads(1)

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]


def softmax(xs: list[float], t: float = 1.0) -> list[float]:
    m = max(x / t for x in xs)
    e = [math.exp(x / t - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def hand_soft_kd(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    rows = [kl(softmax(tr, t), softmax(sr, t)) for sr, tr in zip(student, teacher, strict=True)]
    return t * t * sum(rows) / len(rows)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_label_kd_matches_hand_formula_with_t_squared(temperature: float) -> None:
    got = soft_label_kd(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature=temperature)
    assert got.item() == pytest.approx(hand_soft_kd(STUDENT, TEACHER, temperature), rel=1e-5)
    # The T^2 factor, separately: the unscaled KL is the hand value divided by T^2.
    unscaled = hand_soft_kd(STUDENT, TEACHER, temperature) / temperature**2
    assert got.item() / temperature**2 == pytest.approx(unscaled, rel=1e-5)


def test_soft_label_kd_same_value_for_logits_log_probs_and_probs() -> None:
    s, z = torch.tensor(STUDENT), torch.tensor(TEACHER)
    expected = hand_soft_kd(STUDENT, TEACHER, 3.0)
    # Knowledge produced at teacher temperature 2: log_softmax(z/2) and softmax(z/2).
    variants = [
        ("logits", z, 1.0),
        ("log_probs", torch.log_softmax(z / 2, -1), 2.0),
        ("probs", torch.softmax(z / 2, -1), 2.0),
    ]
    for meaning, teacher, t_f in variants:
        loss = SoftLabelKD(temperature=3.0, meaning=meaning, teacher_temperature=t_f)  # type: ignore[arg-type]
        assert loss(s, teacher).item() == pytest.approx(expected, rel=1e-5), meaning


def test_soft_label_kd_probs_with_zeros_is_finite_and_exact() -> None:
    teacher = torch.tensor([[0.5, 0.5, 0.0]])
    student = torch.tensor([[0.3, -0.2, 1.0]])
    q = softmax([0.3, -0.2, 1.0])
    expected = 0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1])
    got = soft_label_kd(student, teacher, meaning="probs")
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_soft_label_kd_token_level_mask_averages_kept_positions() -> None:
    student = torch.tensor([[STUDENT[0], STUDENT[1]], [TEACHER[0], STUDENT[0]]])
    teacher = torch.tensor([[TEACHER[0], TEACHER[1]], [STUDENT[1], TEACHER[1]]])
    mask = torch.tensor([[True, False], [True, True]])
    kept = [(STUDENT[0], TEACHER[0]), (TEACHER[0], STUDENT[1]), (STUDENT[0], TEACHER[1])]
    expected = 4 * sum(kl(softmax(t, 2), softmax(s, 2)) for s, t in kept) / 3
    got = soft_label_kd(student, teacher, temperature=2.0, mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_soft_label_kd_jagged_teacher_with_padded_or_jagged_student() -> None:
    torch.manual_seed(0)
    lengths = [2, 3]
    t_rows = torch.randn(5, 4)
    s_rows = torch.randn(5, 4)
    offsets = torch.tensor([0, 2, 5])
    teacher = torch.nested.nested_tensor_from_jagged(t_rows, offsets=offsets)
    padded = torch.full((2, 4, 4), 99.0)  # padding must be ignored, whatever it holds
    padded[0, :2], padded[1, :3] = s_rows[:2], s_rows[2:]
    expected = (
        2.25
        * sum(
            kl(softmax(t.tolist(), 1.5), softmax(s.tolist(), 1.5))
            for s, t in zip(s_rows, t_rows, strict=True)
        )
        / sum(lengths)
    )
    assert soft_label_kd(padded, teacher, temperature=1.5).item() == pytest.approx(
        expected, rel=1e-5
    )
    student = torch.nested.nested_tensor_from_jagged(s_rows, offsets=offsets)
    assert soft_label_kd(student, teacher, temperature=1.5).item() == pytest.approx(
        expected, rel=1e-5
    )
    # A jagged mask dropping the second sample's last token.
    mask = torch.nested.nested_tensor_from_jagged(
        torch.tensor([True, True, True, True, False]), offsets=offsets
    )
    expected_masked = (
        2.25
        * sum(
            kl(softmax(t.tolist(), 1.5), softmax(s.tolist(), 1.5))
            for s, t in zip(s_rows[:4], t_rows[:4], strict=True)
        )
        / 4
    )
    got = soft_label_kd(padded, teacher, temperature=1.5, mask=mask)
    assert got.item() == pytest.approx(expected_masked, rel=1e-5)


def test_soft_label_kd_refuses_short_padding_and_features() -> None:
    teacher = torch.nested.nested_tensor_from_jagged(
        torch.randn(5, 3), offsets=torch.tensor([0, 2, 5])
    )
    with pytest.raises(ValueError, match="shorter than the longest sequence 3"):
        soft_label_kd(torch.randn(2, 2, 3), teacher)
    with pytest.raises(ValueError, match="'features' is not a distribution"):
        SoftLabelKD(meaning="features")  # type: ignore[arg-type]


def test_soft_label_kd_gradient_flows_to_student_and_teacher_untouched() -> None:
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, dtype=torch.float16)
    before = teacher.clone()
    soft_label_kd(student, teacher, temperature=2.0).backward()
    assert student.grad is not None
    # d/ds of T^2 KL / B = T (q - p) / B per row.
    p = torch.softmax(torch.tensor(TEACHER) / 2, -1)
    q = torch.softmax(torch.tensor(STUDENT) / 2, -1)
    torch.testing.assert_close(student.grad, 2 * (q - p) / 2, atol=2e-3, rtol=0)
    assert torch.equal(teacher, before)


def hand_topk_uniform(
    student: list[float], kept: dict[int, float], t: float, t_f: float = 1.0
) -> float:
    """Full teacher distribution: kept probabilities, the rest spread evenly; re-tempered."""
    vocab = len(student)
    missing = [i for i in range(vocab) if i not in kept]
    u = (1 - sum(kept.values())) / len(missing)
    weights = [kept.get(i, u) ** (t_f / t) for i in range(vocab)]
    p = [w / sum(weights) for w in weights]
    return t * t * kl(p, softmax(student, t))


def test_topk_with_k_equal_vocab_equals_full_kl() -> None:
    s, z = torch.tensor(STUDENT), torch.tensor(TEACHER)
    order = torch.tensor([[2, 0, 1], [1, 2, 0]])
    values = z.gather(-1, order)
    idx = order.to(torch.int32)
    full = soft_label_kd(s, z, temperature=2.0).item()
    assert topk_kd(s, values, idx, temperature=2.0).item() == pytest.approx(full, rel=1e-5)
    log_probs = torch.log_softmax(z, -1).gather(-1, order)
    got = topk_kd(s, log_probs, idx, meaning="log_probs", missing="uniform", temperature=2.0)
    assert got.item() == pytest.approx(full, rel=1e-5)


def test_topk_zero_missing_renormalises_teacher_over_kept_entries() -> None:
    student = [0.5, 1.0, -1.0, 2.0, 0.0]
    values, idx = [3.0, 1.0], [3, 0]
    p = softmax(values, 2.0)
    q = softmax(student, 2.0)
    expected = 4 * sum(pi * math.log(pi / q[i]) for pi, i in zip(p, idx, strict=True))
    got = topk_kd(
        torch.tensor([student]),
        torch.tensor([values]),
        torch.tensor([idx], dtype=torch.int32),
        temperature=2.0,
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("t", "t_f"), [(1.0, 1.0), (2.0, 1.0), (3.0, 1.5)])
def test_topk_uniform_missing_mass_matches_hand_computation(t: float, t_f: float) -> None:
    student = [0.5, 1.0, -1.0, 2.0, 0.0]
    kept = {3: 0.6, 0: 0.25}
    idx = list(kept)
    probs = torch.tensor([[kept[i] for i in idx]])
    index = torch.tensor([idx], dtype=torch.int32)
    expected = hand_topk_uniform(student, kept, t, t_f)
    for meaning, values in (("probs", probs), ("log_probs", probs.log())):
        loss = TopKKD(t, meaning, "uniform", teacher_temperature=t_f)  # type: ignore[arg-type]
        got = loss(torch.tensor([student]), (values, index))
        assert got.item() == pytest.approx(expected, rel=1e-5), meaning


def test_topk_uniform_equals_full_kl_against_the_rebuilt_distribution_with_gradients() -> None:
    torch.manual_seed(3)
    student = torch.randn(3, 7, requires_grad=True)
    full = torch.softmax(torch.randn(3, 7) * 2, -1)
    probs, idx = full.topk(3, dim=-1)
    # Independent path: the dense teacher distribution the uniform variant stands for.
    spread = (1 - probs.sum(-1, keepdim=True)) / 4
    rebuilt = spread.expand(3, 7).scatter(-1, idx, probs)
    got = topk_kd(
        student,
        probs,
        idx.int(),
        meaning="probs",
        missing="uniform",
        temperature=2.0,
        teacher_temperature=1.5,
    )
    (grad_got,) = torch.autograd.grad(got, student)
    want = soft_label_kd(
        student, rebuilt, meaning="probs", temperature=2.0, teacher_temperature=1.5
    )
    (grad_want,) = torch.autograd.grad(want, student)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(grad_got, grad_want)


def test_for_field_takes_meaning_and_temperature_from_the_schema() -> None:
    kd = SoftLabelKD.for_field(
        dense("lp", "float16", (5,), meaning="log_probs", temperature=2.0), 4.0
    )
    assert (kd.meaning, kd.teacher_temperature, kd.temperature) == ("log_probs", 2.0, 4.0)
    tk = TopKKD.for_field(topk("t", "float16", (9,), k=2, meaning="probs"), missing="uniform")
    assert (tk.meaning, tk.missing) == ("probs", "uniform")
    with pytest.raises(ValueError, match=r"is top-k: use TopKKD\.for_field"):
        SoftLabelKD.for_field(topk("t", "float16", (9,), k=2))
    with pytest.raises(ValueError, match="'features' is not a distribution"):
        SoftLabelKD.for_field(dense("f", "float32", (9,)))


def test_topk_uniform_refuses_logits_and_handles_no_missing_mass() -> None:
    with pytest.raises(ValueError, match="needs the teacher's top-k 'log_probs' or 'probs'"):
        TopKKD(meaning="logits", missing="uniform")
    # All mass in the kept entries: the dropped ones get 0, same as missing="zero".
    student = torch.tensor([[0.5, 1.0, -1.0, 2.0]])
    probs = torch.tensor([[0.7, 0.3]])
    idx = torch.tensor([[1, 2]], dtype=torch.int32)
    uniform = topk_kd(student, probs, idx, meaning="probs", missing="uniform")
    zero = topk_kd(student, probs, idx, meaning="probs", missing="zero")
    assert torch.isfinite(uniform)
    assert uniform.item() == pytest.approx(zero.item(), rel=1e-6)


def test_topk_token_level_with_decoded_jagged_knowledge_and_gradient() -> None:
    torch.manual_seed(1)
    schema = KnowledgeSchema(fields=(topk("logits", "float16", (None, 6), k=6),))
    full = [torch.randn(2, 6), torch.randn(3, 6)]
    vals, idx = zip(*(x.sort(-1, descending=True) for x in full), strict=True)
    batch = codec.decode(
        codec.encode(
            schema,
            [7, 3],
            {
                "logits.values": [v.half() for v in vals],
                "logits.indices": [i.int() for i in idx],
            },
        )
    )
    student = torch.randn(2, 3, 6, requires_grad=True)
    got = TopKKD(temperature=2.0)(
        student, (batch.tensors["logits.values"], batch.tensors["logits.indices"])
    )
    rows_s = [student[0, 0], student[0, 1], student[1, 0], student[1, 1], student[1, 2]]
    rows_t = [*full[0].half().float(), *full[1].half().float()]
    expected = (
        4
        * sum(
            kl(softmax(t.tolist(), 2), softmax(s.tolist(), 2))
            for s, t in zip(rows_s, rows_t, strict=True)
        )
        / 5
    )
    assert got.item() == pytest.approx(expected, rel=1e-4)
    got.backward()
    assert student.grad is not None
    assert torch.all(student.grad[0, 2] == 0)  # padding gets no gradient
    assert student.grad[1, 2].abs().sum() > 0


def test_feature_mse_without_adapter_matches_hand_value() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert FeatureMSE()(s, t).item() == pytest.approx((1 + 0 + 4 + 9) / 4)


def test_feature_mse_adapters_have_right_shapes_and_learn() -> None:
    linear = FeatureMSE(student_channels=3, teacher_channels=5)
    assert isinstance(linear.adapter, nn.Linear)
    assert tuple(linear.adapter.weight.shape) == (5, 3)
    conv = FeatureMSE(student_channels=3, teacher_channels=5, spatial=True)
    assert isinstance(conv.adapter, nn.Conv2d)
    assert tuple(conv.adapter.weight.shape) == (5, 3, 1, 1)

    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = conv(student, torch.randn(2, 5, 4, 4))
    loss.backward()
    assert conv.adapter.weight.grad is not None and conv.adapter.weight.grad.abs().sum() > 0
    assert student.grad is not None and student.grad.abs().sum() > 0

    # A known adapter: weight = W, bias 0, so the value is mean((s W^T - t)^2).
    with torch.no_grad():
        linear.adapter.weight.copy_(torch.arange(15.0).reshape(5, 3) / 10)
        linear.adapter.bias.zero_()
    s, t = np.array([[1.0, -1.0, 2.0]]), np.array([[0.0, 1.0, 0.5, 2.0, -1.0]])
    w = np.arange(15.0).reshape(5, 3) / 10
    expected = float(np.mean((s @ w.T - t) ** 2))
    got = linear(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_feature_mse_refuses_mismatched_channels() -> None:
    with pytest.raises(ValueError, match="pass student_channels= and teacher_channels="):
        FeatureMSE()(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="give both student_channels and teacher_channels"):
        FeatureMSE(student_channels=3)


def test_hint_loss_regressor_shape_value_and_gradient() -> None:
    hint = HintLoss(student_channels=2, teacher_channels=3, kernel_size=3)
    assert tuple(hint.regressor.weight.shape) == (3, 2, 3, 3)
    # Centre-tap-only kernel: the regressor is then a per-pixel matrix A, r(x) = A x.
    a = np.array([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
    with torch.no_grad():
        hint.regressor.weight.zero_()
        hint.regressor.weight[:, :, 1, 1] = torch.tensor(a, dtype=torch.float32)
        nn.init.zeros_(hint.regressor.bias)  # type: ignore[arg-type]  # the regressor has a bias
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 2, 4, 4))
    t = rng.normal(size=(2, 3, 4, 4))
    expected = float(np.mean((np.einsum("oc,bchw->bohw", a, s) - t) ** 2))
    student = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    got = hint(student, torch.tensor(t, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert hint.regressor.weight.grad is not None and student.grad is not None
    assert hint.regressor.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="spatial sizes differ"):
        hint(torch.randn(1, 2, 4, 4), torch.randn(1, 3, 2, 2))


def hand_fsp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    batch, c1, h, w = a.shape
    c2 = b.shape[1]
    g = np.zeros((batch, c1, c2))
    for n in range(batch):
        for i in range(c1):
            for j in range(c2):
                g[n, i, j] = sum(a[n, i, y, x] * b[n, j, y, x] for y in range(h) for x in range(w))
    return g / (h * w)


def test_fsp_matrix_and_loss_match_hand_computation() -> None:
    rng = np.random.default_rng(2)
    s = [
        rng.normal(size=(2, 2, 3, 3)),
        rng.normal(size=(2, 3, 3, 3)),
        rng.normal(size=(2, 2, 3, 3)),
    ]
    t = [rng.normal(size=x.shape) for x in s]
    as_t = [torch.tensor(x, dtype=torch.float32) for x in s]
    torch.testing.assert_close(
        fsp_matrix(as_t[0], as_t[1]), torch.tensor(hand_fsp(s[0], s[1]), dtype=torch.float32)
    )
    pairs = [(0, 1), (1, 2)]
    expected = sum(
        float(np.mean((hand_fsp(s[i], s[j]) - hand_fsp(t[i], t[j])) ** 2)) for i, j in pairs
    )
    got = FSPLoss(pairs)(as_t, [torch.tensor(x, dtype=torch.float16) for x in t])
    assert got.item() == pytest.approx(expected, rel=1e-3)  # teacher sent fp16
    with pytest.raises(ValueError, match="same channel counts"):
        FSPLoss([(0, 1)])(as_t, [torch.randn(2, 4, 3, 3), torch.randn(2, 3, 3, 3)])
    with pytest.raises(ValueError, match="same batch and spatial size"):
        fsp_matrix(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 2, 2))


def test_distill_objective_weighted_total_and_per_term_values() -> None:
    schema = KnowledgeSchema(
        fields=(
            dense("probs", "float16", (3,), meaning="probs"),
            topk("tokens", "float32", (5,), k=2, meaning="logits"),
            dense("feat", "bfloat16", (4,)),
        )
    )
    teacher_probs = torch.softmax(torch.tensor(TEACHER), -1)
    knowledge = codec.decode(
        codec.encode(
            schema,
            [1, 2],
            {
                "probs": teacher_probs.half(),
                "tokens.values": torch.tensor([[3.0, 1.0], [2.0, 0.0]]),
                "tokens.indices": torch.tensor([[3, 0], [1, 4]], dtype=torch.int32),
                "feat": torch.ones(2, 4, dtype=torch.bfloat16),
            },
        )
    ).tensors
    student = {
        "logits": torch.tensor(STUDENT, requires_grad=True),
        "lm": torch.randn(2, 5),
        "hidden": torch.zeros(2, 2),
    }
    objective = DistillObjective(
        [
            DistillTerm(
                name="kd",
                weight=0.5,
                loss=SoftLabelKD(2.0, "probs"),
                student="logits",
                teacher="probs",
            ),
            DistillTerm(name="topk", weight=0.25, loss=TopKKD(), student="lm", teacher="tokens"),
            DistillTerm(
                name="feat", weight=2.0, loss=FeatureMSE(2, 4), student="hidden", teacher="feat"
            ),
        ],
        task_weight=0.3,
    )
    assert any(p.shape == (4, 2) for p in objective.parameters())  # the adapter is trainable
    out = objective(student, knowledge, task_loss=torch.tensor(1.5))
    kd = soft_label_kd(student["logits"], teacher_probs.half(), meaning="probs", temperature=2.0)
    tk = topk_kd(student["lm"], knowledge["tokens.values"], knowledge["tokens.indices"])
    adapter = objective.losses["feat"].get_submodule("adapter")
    feat = FeatureMSE()(adapter(student["hidden"]), torch.ones(2, 4))
    assert out.terms["task"].item() == 1.5
    assert out.terms["kd"].item() == pytest.approx(kd.item(), rel=1e-6)
    assert out.terms["topk"].item() == pytest.approx(tk.item(), rel=1e-6)
    assert out.terms["feat"].item() == pytest.approx(feat.item(), rel=1e-6)
    expected = 0.3 * 1.5 + 0.5 * kd.item() + 0.25 * tk.item() + 2.0 * feat.item()
    assert out.total.item() == pytest.approx(expected, rel=1e-6)
    out.total.backward()
    assert student["logits"].grad is not None


def test_distill_objective_refuses_bad_terms_and_keys() -> None:
    term = DistillTerm(
        name="kd", weight=1.0, loss=SoftLabelKD(), student="logits", teacher="logits"
    )
    with pytest.raises(ValueError, match=r"duplicate distillation term names \['kd'\]"):
        DistillObjective([term, term])
    with pytest.raises(ValueError, match="reserved"):
        DistillTerm(name="task", weight=1.0, loss=SoftLabelKD(), student="a", teacher="b")
    with pytest.raises(ValueError, match=r"knowledge has no 'logits'; it has \['feat'\]"):
        DistillObjective([term])({"logits": torch.zeros(1, 3)}, {"feat": torch.zeros(1, 3)})
