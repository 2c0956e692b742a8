"""The language-model demo at a reduced size, through the same code as `lyceum demo --lm`: a
BPE and a tiny Llama teacher trained on the stdlib's sources, its dumps, CE-only and KD
students; the table's figures are checked against an independent computation where one is
cheap (an untrained student against the teacher model itself) and for sense elsewhere."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lyceum.deploy.cli import build_parser, main
from lyceum.deploy.demo_lm import (
    CE_ONLY,
    LMDemoConfig,
    LMTeacher,
    StudentRecipe,
    demo_rows,
    lm_table,
    prepare_teacher,
)
from lyceum.deploy.examples import tiny_llama
from lyceum.deploy.stdlib_text import stdlib_text
from lyceum.proto.manifest import Manifest
from lyceum.proto.schema import TopK
from lyceum.proto.vocab import tokenizer_sha256
from lyceum.student_client import StepInfo, train
from lyceum.student_client._checkpoints import save_weights

SMALL = LMDemoConfig(
    seeds=(0, 1),
    vocab=512,
    seq_len=32,
    teacher_sequences=256,
    train_sequences=128,
    val_sequences=16,
    batch_size=8,
    teacher_hidden=32,
    teacher_epochs=3,
    student_hidden=16,
    student_epochs=1,
    lr=1e-2,
    topk=8,
)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> LMTeacher:
    return prepare_teacher(SMALL, tmp_path_factory.mktemp("demo-lm"), log=lambda _: None)


@pytest.mark.slow
@pytest.mark.integration
def test_the_untrained_students_figures_equal_a_direct_computation(teacher: LMTeacher) -> None:
    val = stdlib_text(**teacher.data("val"))
    ids = torch.stack([val[i]["input_ids"] for i in range(len(val))])
    student = tiny_llama(vocab=512, layers=1, hidden=16, heads=4, seed=1)
    with torch.no_grad():
        log_q = F.log_softmax(student(input_ids=ids).logits.float(), -1)
        log_p = F.log_softmax(teacher.model(input_ids=ids).logits.float(), -1)
    nll = -log_q[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()  # every position: the dump is dense
    perplexity, got_kl = teacher.untrained(1)
    assert perplexity == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert got_kl == pytest.approx(float(kl), rel=1e-4)
    # An untrained student is about uniform over the 512 ids; the teacher learnt something.
    assert 300 < perplexity < 900
    assert 1 < teacher.perplexity < perplexity / 2


@pytest.mark.slow
@pytest.mark.integration
def test_the_dumps_are_the_teachers_knowledge_of_the_stdlib_text(teacher: LMTeacher) -> None:
    top = Manifest.read(teacher.dump(SMALL.topk))
    val = Manifest.read(teacher.val_dump)
    assert (top.rows, val.rows) == (128, 16)
    (field,) = top.knowledge_schema.fields
    assert isinstance(field.encoding, TopK) and field.encoding.k == 8
    assert field.meaning == "log_probs"
    assert not isinstance(val.knowledge_schema.fields[0].encoding, TopK)  # every id: exact KL
    for manifest in (top, val):
        vocab = manifest.knowledge_schema.vocab
        assert vocab is not None and vocab.size == 512
        assert vocab.tokenizer_sha256 == tokenizer_sha256(teacher.tokenizer)


@pytest.mark.slow
@pytest.mark.integration
def test_demo_rows_show_trained_students_between_untrained_and_teacher(
    teacher: LMTeacher,
) -> None:
    rows = {r.name: r for r in demo_rows(teacher, log=lambda _: None)}
    ce, kd = rows["student, CE only"], rows["student, CE + top-8 KD (forward KL, tail)"]
    untrained = rows["student, untrained"]
    assert list(rows) == [
        "teacher (hidden 32, 2 layers)",
        "student, untrained",
        "student, CE only",
        "student, CE + top-8 KD (forward KL, tail)",
    ]
    for row in (untrained, ce, kd):
        assert row.seeds == (0, 1)
        assert all(math.isfinite(p) and p > 1 for p in row.perplexity), row
        assert all(k is not None and k >= 0 for k in row.kl), row
        assert row.mean_kl is not None
    # Training lowers both figures; the two seeds are two different runs.
    for row in (ce, kd):
        assert row.mean_perplexity < 0.75 * untrained.mean_perplexity, row  # measured 0.62
        assert row.mean_kl < untrained.mean_kl, row  # type: ignore[operator]
        assert row.perplexity[0] != row.perplexity[1], row
    table = lm_table(list(rows.values())).splitlines()
    assert table[0] == "| run | seed(s) | held-out perplexity | KL to teacher |"
    p0, p1 = ce.perplexity
    k0, k1 = ce.kl
    assert table[4] == (
        f"| student, CE only | 0 1 | {ce.mean_perplexity:.1f} ({p0:.1f} / {p1:.1f}) | "
        f"{ce.mean_kl:.3f} ({k0:.3f} / {k1:.3f}) |"
    )
    assert table[2] == f"| teacher (hidden 32, 2 layers) | 0 | {teacher.perplexity:.1f} | - |"


@pytest.mark.slow
@pytest.mark.integration
def test_the_teacher_as_student_meets_its_own_knowledge_at_every_position(
    teacher: LMTeacher, tmp_path: Path
) -> None:
    """The knowledge of position t is the teacher's prediction of token t + 1, as the
    student's logit at t is: the teacher's weights trained on its own top-k dump by KD alone
    give a KD loss of 0 at every step (a shift by one would cost the KL between neighbouring
    positions), and by CE alone the teacher's own cross-entropy of the step's samples."""
    weights = tmp_path / "teacher.safetensors"
    save_weights(weights, teacher.model)
    kd_only = StudentRecipe(name="KD only", task_weight=0.0, kd_weight=1.0)
    train_set = stdlib_text(**teacher.data("train"))
    for recipe in (kd_only, CE_ONLY):
        config = teacher.student_config(recipe, 0)
        steps: list[StepInfo] = []
        as_teacher = {"hidden": SMALL.teacher_hidden, "layers": SMALL.teacher_layers}
        config = config.model_copy(
            update={
                "model_kwargs": {**config.model_kwargs, **as_teacher},
                "checkpoint": weights,
                "epochs": 1,
                # Too small to move a weight in float32: every step sees the teacher.
                "optimizer": config.optimizer.model_copy(update={"lr": 1e-30}),
            }
        )
        train(config, on_step=steps.append)
        assert len(steps) == SMALL.train_sequences // SMALL.batch_size
        for step in steps[:3]:
            ids = torch.stack([train_set[int(i)]["input_ids"] for i in step.sample_ids])
            with torch.no_grad():
                log_p = F.log_softmax(teacher.model(input_ids=ids).logits.float(), -1)
            if recipe is kd_only:
                assert abs(step.loss) < 1e-5, step
                shifted = (log_p[:, 1:].exp() * (log_p[:, 1:] - log_p[:, :-1])).sum(-1).mean()
                assert float(shifted) > 0.5  # what misaligned knowledge would cost
            else:
                ce = F.cross_entropy(log_p[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                assert step.loss == pytest.approx(float(ce), rel=1e-4)


def test_lm_demo_refuses_the_digits_demos_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--lm", "--steps", "5"]) == 2
    assert "--steps apply to the digits demo, not to --lm: drop them" in capsys.readouterr().err
    assert main(["demo", "--topk", "8"]) == 2
    assert "--topk is an option of the language-model demo: add --lm" in capsys.readouterr().err


def test_lm_demo_defaults_are_what_make_demo_lm_runs() -> None:
    args = build_parser().parse_args(["demo", "--lm"])
    assert args.lm and args.topk == LMDemoConfig().topk == 32
    assert tuple(args.seeds) == LMDemoConfig().seeds
