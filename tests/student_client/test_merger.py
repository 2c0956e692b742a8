"""The merger: join by sample id (teachers in shuffled row orders), then combine per field."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from lyceum.proto import codec
from lyceum.proto.schema import DType, FieldSpec, KnowledgeSchema, dense, topk
from lyceum.student_client.merger import (
    STRATEGIES,
    Mean,
    MergedField,
    Merger,
    Weighted,
    register_strategy,
)
from tests._support.custom_strategies import Median

torch.set_num_threads(1)

IDS = [10, 11, 12, 13]  # the dataset ids every teacher has knowledge for
STUDENT_IDS = torch.tensor([12, 10, 13, 11])
TEACHERS = ("a", "b", "c")
# Each teacher answers in its own row order.
ROW_ORDER = {"a": [0, 1, 2, 3], "b": [3, 1, 0, 2], "c": [2, 3, 1, 0]}


def value(teacher: str, sample_id: int, j: int) -> float:
    """The knowledge teacher `teacher` has for `sample_id`, element j: distinct, exact in fp16."""
    return (TEACHERS.index(teacher) + 1) * 0.5 + (sample_id - 10) * 0.25 - j * 0.125


def make_batch(
    fields: Sequence[FieldSpec], columns: Mapping[str, object], ids: Sequence[int]
) -> codec.KnowledgeBatch:
    """A real decoded batch: through the codec's encode and decode."""
    schema = KnowledgeSchema(fields=tuple(fields))
    return codec.decode(codec.encode(schema, ids, columns))  # type: ignore[arg-type]


def logits_batch(
    teacher: str, dtype: DType = "float32", meaning: str = "logits"
) -> codec.KnowledgeBatch:
    ids = [IDS[i] for i in ROW_ORDER[teacher]]
    rows = torch.tensor([[value(teacher, i, j) for j in range(3)] for i in ids])
    spec = dense("logits", dtype, (3,), meaning=meaning)  # type: ignore[arg-type]  # parametrized
    return make_batch([spec], {"logits": rows.to(codec.TORCH_DTYPES[dtype])}, ids)


def merged_by_hand(combine: object) -> Tensor:
    """Per student id, per element: combine([value(t, id, j) for t in teachers])."""
    return torch.tensor(
        [[combine([value(t, int(i), j) for t in TEACHERS]) for j in range(3)] for i in STUDENT_IDS]  # type: ignore[operator]
    )


def three_teacher_merge(strategy: object, meaning: str = "logits") -> dict[str, Tensor]:
    batches = {
        "a": logits_batch("a", "float32", meaning),
        "b": logits_batch("b", "float16", meaning),
        "c": logits_batch("c", "bfloat16", meaning),
    }
    merger = Merger({"logits": strategy})  # type: ignore[dict-item]
    merger.check({t: b.schema for t, b in batches.items()})
    return merger.merge(STUDENT_IDS, batches)


@pytest.mark.parametrize(
    ("strategy", "combine"),
    [
        ("mean", lambda xs: sum(xs) / len(xs)),
        ("sum", sum),
        ("max", max),
        ("first", lambda xs: xs[0]),
        (
            Weighted(weights={"a": 1.0, "b": 2.0, "c": 1.0}),
            lambda xs: (xs[0] + 2 * xs[1] + xs[2]) / 4,
        ),
        (lambda ts: torch.stack(ts).median(0).values, lambda xs: sorted(xs)[1]),
    ],
    ids=["mean", "sum", "max", "first", "weighted", "callable"],
)
def test_strategies_join_by_id_and_match_hand_values(strategy: object, combine: object) -> None:
    out = three_teacher_merge(strategy)
    assert list(out) == ["logits"]
    assert out["logits"].dtype == torch.float32  # teachers sent fp32, fp16 and bf16
    torch.testing.assert_close(out["logits"], merged_by_hand(combine), rtol=0, atol=0)


@given(
    order_a=st.permutations(range(6)),
    order_b=st.permutations(range(6)),
    wanted=st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True),
)
def test_join_by_id_for_any_row_orders(
    order_a: list[int], order_b: list[int], wanted: list[int]
) -> None:
    spec = dense("x", "float32", (2,))
    batches = {
        t: make_batch([spec], {"x": torch.tensor([[i * 10.0 + n, -i] for i in order])}, order)
        for n, (t, order) in enumerate((("a", order_a), ("b", order_b)))
    }
    merger = Merger({"x": "stack"})
    merger.check({t: b.schema for t, b in batches.items()})
    out = merger.merge(torch.tensor(wanted), batches)["x"]
    assert out.tolist() == [[[i * 10.0, -i], [i * 10.0 + 1, -i]] for i in wanted]


def test_merged_tensors_are_writable_copies_not_views_of_the_message() -> None:
    batches = {"a": logits_batch("a"), "b": logits_batch("b")}
    merger = Merger({"logits": "first"})
    merger.check({t: b.schema for t, b in batches.items()})
    out = merger.merge(STUDENT_IDS, batches)["logits"]
    out.add_(1.0)  # would fail, or corrupt the Arrow buffer, on a view of it
    assert batches["a"].tensors["logits"][0].tolist() == [value("a", 10, j) for j in range(3)]


def test_logsumexp_mixes_log_probabilities() -> None:
    out = three_teacher_merge("logsumexp", meaning="log_probs")
    expected = merged_by_hand(lambda xs: math.log(sum(math.exp(x) for x in xs) / len(xs)))
    torch.testing.assert_close(out["logits"], expected)


def test_stack_keeps_a_teacher_dim_at_dim_1() -> None:
    out = three_teacher_merge("stack")["logits"]
    assert out.shape == (4, 3, 3)
    expected = torch.tensor(
        [[[value(t, int(i), j) for j in range(3)] for t in TEACHERS] for i in STUDENT_IDS]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_check_describes_the_merged_fields() -> None:
    merger = Merger({"logits": "stack"}, renames={"b": {"out": "logits"}})
    a = dense("logits", "float16", (3,), meaning="logits", temperature=2.0)
    b = dense("out", "float16", (3,), meaning="logits", temperature=2.0)
    feat = dense("feat", "int64", (2,))
    merged = merger.check(
        {"a": KnowledgeSchema(fields=(a, feat)), "b": KnowledgeSchema(fields=(b,))}
    )
    assert merged.teachers == ("a", "b")
    assert merged.fields == (
        MergedField(
            spec=dense("logits", "float32", (2, 3), meaning="logits", temperature=2.0),
            teachers=("a", "b"),
            sources=("logits", "out"),
            strategy="stack",
        ),
        MergedField(spec=feat, teachers=("a",), sources=("feat",), strategy="only"),
    )
    assert merged.knowledge_schema.columns == ("logits", "feat")
    assert merged.describe() == (
        "logits: float32 [2, 3] dense logits <- stack(a.logits, b.out)\n"
        "feat: int64 [2] dense features <- only(a.feat)"
    )


def test_renames_and_single_teacher_fields_pass_through() -> None:
    ids_a, ids_b = [10, 11, 12, 13], [13, 12, 11, 10]
    a = make_batch(
        [dense("out", "float32", (2,)), dense("emb", "float16", (1,))],
        {
            "out": torch.tensor([[float(i), 1.0] for i in ids_a]),
            "emb": torch.tensor([[i / 4] for i in ids_a], dtype=torch.float16),
        },
        ids_a,
    )
    b = make_batch(
        [dense("logits", "float32", (2,)), dense("label", "int64", (1,))],
        {
            "logits": torch.tensor([[float(-i), 3.0] for i in ids_b]),
            "label": torch.tensor([[i * 100] for i in ids_b]),
        },
        ids_b,
    )
    merger = Merger({"logits": "sum"}, renames={"a": {"out": "logits"}})
    merger.check({"a": a.schema, "b": b.schema})
    out = merger.merge(STUDENT_IDS, {"b": b, "a": a})
    torch.testing.assert_close(out["logits"], torch.tensor([[0.0, 4.0]] * 4))
    torch.testing.assert_close(out["emb"], (STUDENT_IDS / 4).unsqueeze(1).float())
    assert out["label"].dtype == torch.int64
    assert out["label"].squeeze(1).tolist() == (STUDENT_IDS * 100).tolist()


def test_topk_fields_merge_with_first_and_stack_only() -> None:
    spec = topk("tok", "float16", (6,), k=2, meaning="logits")
    ids = {"a": [10, 11], "b": [11, 10]}
    batches = {
        t: make_batch(
            [spec],
            {
                "tok.values": torch.tensor([[i + n, i - n] for i in ids[t]], dtype=torch.float16),
                "tok.indices": torch.tensor([[n, 5 - n] for _ in ids[t]], dtype=torch.int32),
            },
            ids[t],
        )
        for n, t in enumerate(("a", "b"))
    }
    schemas = {t: b.schema for t, b in batches.items()}
    want = torch.tensor([11, 10])
    merger = Merger({"tok": "stack"})
    merger.check(schemas)
    out = merger.merge(want, batches)
    assert out["tok.values"].dtype == torch.float32 and out["tok.indices"].dtype == torch.int32
    assert out["tok.values"].tolist() == [[[11, 11], [12, 10]], [[10, 10], [11, 9]]]
    assert out["tok.indices"].tolist() == [[[0, 5], [1, 4]], [[0, 5], [1, 4]]]
    first = Merger({"tok": "first"})
    first.check(schemas)
    assert first.merge(want, batches)["tok.values"].tolist() == [[11, 11], [10, 10]]
    with pytest.raises(
        ValueError, match=r"field 'tok' is top-k: strategy 'mean'.*'first' or 'stack'"
    ):
        Merger({"tok": "mean"}).check(schemas)
    with pytest.raises(ValueError, match="callable strategy would get values and indices"):
        Merger({"tok": lambda ts: ts[0]}).check(schemas)


def jagged_batch(teacher: str, ids: list[int], lengths: dict[int, int]) -> codec.KnowledgeBatch:
    spec = dense("tokens", "bfloat16", (None, 2), meaning="logits")
    pieces = [
        torch.tensor(
            [[value(teacher, i, p), float(p)] for p in range(lengths[i])], dtype=torch.bfloat16
        )
        for i in ids
    ]
    return make_batch([spec], {"tokens": pieces}, ids)


def test_jagged_sequence_fields_are_joined_and_merged_per_position() -> None:
    lengths = {10: 2, 11: 1, 12: 3, 13: 2}
    batches = {
        "a": jagged_batch("a", [10, 11, 12, 13], lengths),
        "b": jagged_batch("b", [13, 12, 10, 11], lengths),
    }
    schemas = {t: b.schema for t, b in batches.items()}
    mean = Merger({"tokens": "mean"})
    mean.check(schemas)
    out = mean.merge(STUDENT_IDS, batches)["tokens"]
    assert out.is_nested and out.dtype == torch.float32
    for got, i in zip(out.unbind(), STUDENT_IDS.tolist(), strict=True):
        expected = [
            [(value("a", i, p) + value("b", i, p)) / 2, float(p)] for p in range(lengths[i])
        ]
        assert got.tolist() == expected
    stack = Merger({"tokens": "stack"})
    assert stack.check(schemas).fields[0].spec.shape == (None, 2, 2)
    stacked = stack.merge(STUDENT_IDS, batches)["tokens"]
    assert stacked.unbind()[0].shape == (3, 2, 2)  # sample 12: 3 tokens, 2 teachers, 2 values
    assert stacked.unbind()[0][2].tolist() == [[value("a", 12, 2), 2.0], [value("b", 12, 2), 2.0]]


def test_jagged_length_mismatch_names_teachers_and_ids() -> None:
    lengths = {10: 2, 11: 1, 12: 3, 13: 2}
    batches = {
        "a": jagged_batch("a", [10, 11, 12, 13], lengths),
        "b": jagged_batch("b", [13, 12, 10, 11], {**lengths, 13: 4}),
    }
    merger = Merger({"tokens": "mean"})
    merger.check({t: b.schema for t, b in batches.items()})
    with pytest.raises(
        ValueError,
        match=r"teachers 'a' and 'b' sent sequences of different lengths for sample ids \[13\]",
    ):
        merger.merge(STUDENT_IDS, batches)


def test_missing_ids_are_refused_naming_teacher_and_ids() -> None:
    batches = {"a": logits_batch("a"), "b": logits_batch("b")}
    merger = Merger({"logits": "mean"})
    merger.check({t: b.schema for t, b in batches.items()})
    with pytest.raises(
        ValueError, match=r"teacher 'a' sent no knowledge for 2 of the 3 .*\[20, 7\]"
    ):
        merger.merge(torch.tensor([20, 10, 7]), batches)
    # A teacher may send more ids than asked for: the extra rows are ignored.
    out = merger.merge(torch.tensor([13]), batches)
    assert out["logits"].tolist() == [
        [(value("a", 13, j) + value("b", 13, j)) / 2 for j in range(3)]
    ]


@pytest.mark.parametrize(
    ("b_spec", "strategy", "message"),
    [
        (
            dense("logits", "float32", (4,), "logits"),
            "mean",
            r"teachers 'a' and 'b' disagree on shape",
        ),
        (
            dense("logits", "int32", (3,), "logits"),
            "mean",
            r"teachers 'a' and 'b' disagree on dtype",
        ),
        (topk("logits", "float32", (3,), k=2), "first", r"'a' and 'b' disagree on encoding"),
        (dense("logits", "float32", (3,), "log_probs"), "mean", r"'a' and 'b' disagree on meaning"),
        (dense("logits", "float32", (3,), "logits", 2.0), "mean", "disagree on temperature"),
        (dense("other", "float32", (3,), "logits"), "mean", r"teachers \['b'\] do not send it"),
        (dense("logits", "float32", (3,), "logits"), "logsumexp", "have them send log_probs"),
        (
            dense("logits", "float32", (3,), "logits"),
            Weighted(weights={"a": 1.0}),
            r"no weight for \['b'\]",
        ),
        (dense("logits", "float32", (3,), "logits"), "median", "unknown merge strategy 'median'"),
        (dense("logits", "float32", (3,), "logits"), "weighted", r"pass Weighted\(weights="),
    ],
)
def test_incompatible_teachers_are_refused_by_name(
    b_spec: FieldSpec, strategy: object, message: str
) -> None:
    a = KnowledgeSchema(fields=(dense("logits", "float32", (3,), "logits"),))
    b = KnowledgeSchema(fields=(b_spec,))
    with pytest.raises(ValueError, match=message):
        Merger({"logits": strategy}).check({"a": a, "b": b})  # type: ignore[dict-item]


def test_shared_field_without_strategy_and_bad_renames_are_refused() -> None:
    a = KnowledgeSchema(fields=(dense("x", "float32", (3,)),))
    with pytest.raises(
        ValueError, match=r"field 'x' is sent by teachers \['a', 'b'\] but has no merge strategy"
    ):
        Merger({}).check({"a": a, "b": a})
    with pytest.raises(ValueError, match=r"renames for teacher 'a' name fields \['y'\]"):
        Merger({}, renames={"a": {"y": "x"}}).check({"a": a})
    with pytest.raises(ValueError, match=r"renames name teachers \['z'\]"):
        Merger({}, renames={"z": {"x": "y"}}).check({"a": a})
    with pytest.raises(ValueError, match=r"strategies name fields \['y'\] that no teacher sends"):
        Merger({"y": "mean"}).check({"a": a})


def test_merge_needs_check_and_the_checked_schemas() -> None:
    batches = {"a": logits_batch("a"), "b": logits_batch("b")}
    merger = Merger({"logits": "mean"})
    with pytest.raises(ValueError, match=r"call check\(schemas\)"):
        merger.merge(STUDENT_IDS, batches)
    merger.check({"a": batches["a"].schema, "b": logits_batch("b", "float16").schema})
    with pytest.raises(ValueError, match="teacher 'b' changed its knowledge schema since check"):
        merger.merge(STUDENT_IDS, batches)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        merger.merge(STUDENT_IDS, {"a": batches["a"]})


def test_callable_returning_wrong_shape_is_refused() -> None:
    batches = {"a": logits_batch("a"), "b": logits_batch("b")}
    merger = Merger({"logits": lambda ts: torch.stack(ts, 1)})
    merger.check({t: b.schema for t, b in batches.items()})
    with pytest.raises(
        ValueError, match=r"returned torch.float32 \[4, 2, 3\], expected torch.float32 \[4, 3\]"
    ):
        merger.merge(STUDENT_IDS, batches)


def test_registry_rejects_duplicate_names() -> None:
    registry = dict(STRATEGIES)
    assert sorted(registry) == ["first", "logsumexp", "max", "mean", "stack", "sum"]
    with pytest.raises(ValueError, match="merge strategy 'mean' is already registered"):
        register_strategy(registry, Mean())


def test_registry_rejects_names_with_a_colon() -> None:
    renamed = Mean()
    renamed.name = "my:mean"
    with pytest.raises(ValueError, match="cannot hold ':'"):
        register_strategy(dict(STRATEGIES), renamed)


def test_a_registry_of_the_users_own_feeds_the_merger() -> None:
    with pytest.raises(ValueError, match="unknown merge strategy 'median'"):
        three_teacher_merge("median")
    registry = register_strategy(dict(STRATEGIES), Median())
    merger = Merger({"logits": "median"}, registry=registry)
    batches = {"a": logits_batch("a"), "b": logits_batch("b"), "c": logits_batch("c")}
    assert merger.check({t: b.schema for t, b in batches.items()}).fields[0].strategy == "median"
    out = merger.merge(STUDENT_IDS, batches)
    torch.testing.assert_close(out["logits"], merged_by_hand(lambda xs: sorted(xs)[1]))
    assert "median" not in STRATEGIES  # the built-in registry is left alone


@pytest.mark.parametrize(
    ("spec", "name", "combine"),
    [
        ("tests._support.custom_strategies:Median", "median", lambda xs: sorted(xs)[1]),
        ("tests._support.custom_strategies:MEDIAN", "median", lambda xs: sorted(xs)[1]),
        (
            "tests._support.custom_strategies:scaled_sum",
            "tests._support.custom_strategies:scaled_sum",
            sum,
        ),
        (
            'tests._support.custom_strategies:scaled_sum{"scale": 0.5}',
            'tests._support.custom_strategies:scaled_sum{"scale": 0.5}',
            lambda xs: 0.5 * sum(xs),
        ),
    ],
    ids=["class", "instance", "function", "function-kwargs"],
)
def test_a_spec_names_a_strategy_of_the_users_own(spec: str, name: str, combine: object) -> None:
    merger = Merger({"logits": spec})
    assert merger.strategies["logits"].name == name
    torch.testing.assert_close(
        three_teacher_merge(spec)["logits"], merged_by_hand(combine), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "tests._support.custom_strategies:nope",
            "module 'tests._support.custom_strategies' has no attribute 'nope'",
        ),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("tests._support.custom_strategies:", "expected 'package.module:callable'"),
        ("tests._support.custom_strategies:NotAStrategy", "NotAStrategy is not a MergeStrategy"),
        (
            'tests._support.custom_strategies:MEDIAN{"x": 1}',
            "names an instance, which takes no keyword",
        ),
        ('tests._support.custom_strategies:Median{"x": 1}', "building it failed"),
    ],
)
def test_bad_strategy_specs_are_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="field 'logits': merge strategy") as err:
        Merger({"logits": spec})
    assert message in str(err.value)
