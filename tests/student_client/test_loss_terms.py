"""Every loss of `lyceum.student_client.losses` from YAML: the registry, each loss's own
keys validated, the objective a config builds (values by hand), and a training run."""

# nn.Module's __getattr__ is typed `Tensor | Module`: reaching a submodule by attribute or
# index (model.layer2, model[1].weight) needs a cast on every line; these are modules.
# mypy: disable-error-code="union-attr,arg-type"

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lyceum.deploy.examples import TeacherCNN, digits
from lyceum.proto.manifest import model_identity
from lyceum.proto.schema import KnowledgeSchema, dense, topk
from lyceum.student_client import _checkpoints as checkpoints
from lyceum.student_client import _loss_terms, trainer_config
from lyceum.student_client._loss_terms import loss_registry
from lyceum.student_client.loader import DistillLoader
from lyceum.student_client.losses import soft_label_kd, topk_kd
from lyceum.student_client.merger import Merger
from lyceum.student_client.trainer import build_sources, train
from lyceum.student_client.trainer_config import (
    LOSSES,
    FeatureMSETerm,
    FSPTerm,
    HintTerm,
    SoftLabelTerm,
    TopKTerm,
    load_config,
    validate_config,
)
from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine
from tests._support.models import feature_cnn

STUDENT_YAML = Path(trainer_config.__file__).parent.parent / "deploy" / "configs" / "student.yaml"

# One term of each kind. The dense teacher sends logits and its layer2 and layer3 maps
# ([16, 4, 4] each); the top-k teacher its 4 largest log-probs at T_f = 2 as `top`.
TERMS: list[dict[str, Any]] = [
    {"name": "kd", "kind": "soft_label", "field": "logits", "temperature": 4.0},
    {
        "name": "tok",
        "kind": "topk",
        "field": "top",
        "temperature": 3.0,
        "missing": "uniform",
        "weight": 0.5,
    },
    {
        "name": "feat",
        "kind": "mse",
        "field": "feat3",
        "student": "s1",
        "student_channels": 8,
        "spatial": True,
        "weight": 2.0,
    },
    {"name": "hint", "kind": "hint", "field": "feat2", "student": "s1", "student_channels": 8},
    {
        "name": "fsp",
        "kind": "fsp",
        "field": ["feat2", "feat3"],
        "student": ["s2", "s3"],
        "pairs": [[0, 1]],
        "weight": 0.1,
    },
]


def _dump(directory: Path, engine: EngineConfig) -> Path:
    torch.manual_seed(0)
    model = TeacherCNN(8, 10)
    dataset = digits("train")
    config = DumpConfig(shard_rows=512, batch_size=256, workers=0, progress=False)
    dump_knowledge(
        TeacherEngine(model, engine, dataset[0][0]),
        dataset,
        directory,
        config,
        model_identity("test", model),
    )
    return directory


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dumps")
    outputs = tuple(OutputSpec.parse(o) for o in ("logits=@output", "feat2=layer2", "feat3=layer3"))
    dense_dir = _dump(root / "dense", EngineConfig(outputs=outputs))
    top_dir = _dump(root / "top", EngineConfig(topk=4, values="log_probs", temperature=2.0))
    return dense_dir, top_dir


def _raw(dumps: tuple[Path, Path], checkpoint_dir: Path | None) -> dict[str, Any]:
    dense_dir, top_dir = dumps
    return {
        "model": "tests._support.models:feature_cnn",
        "dataset": {"train": "lyceum.deploy.examples:digits"},
        "teachers": {"dense": {"dir": str(dense_dir)}, "top": {"dir": str(top_dir)}},
        "renames": {"top": {"logits": "top"}},
        "losses": {"task_weight": 1.0, "terms": TERMS},
        "epochs": 1,
        "batch_size": 256,
        "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
        "progress": False,
    }


def _yaml_config(tmp_path: Path, dumps: tuple[Path, Path], **extra: Any) -> Path:
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump({**_raw(dumps, tmp_path / "ckpt"), **extra}))
    return path


# -- the registry ----------------------------------------------------------------------------


def test_the_registry_holds_every_loss_by_its_kind() -> None:
    assert dict(LOSSES) == {
        "soft_label": SoftLabelTerm,
        "topk": TopKTerm,
        "mse": FeatureMSETerm,
        "hint": HintTerm,
        "fsp": FSPTerm,
    }
    # Validation picks exactly the registry's classes: a term of every kind parses as its own.
    config = validate_config(_raw((Path("/d"), Path("/t")), None))
    assert [type(t) for t in config.losses.terms] == list(LOSSES.values())


def test_a_config_dumped_without_its_defaults_loads_back() -> None:
    """`kind` is the union's tag, so a dump that leaves defaults out keeps it."""
    config = validate_config(_raw((Path("/d"), Path("/t")), None))
    dumped = config.model_dump(mode="json", exclude_defaults=True)
    assert [t["kind"] for t in dumped["losses"]["terms"]] == list(LOSSES)
    assert validate_config(dumped) == config


def test_a_kind_registered_twice_is_refused() -> None:
    class Again(SoftLabelTerm):
        pass

    with pytest.raises(ValueError, match="loss kind 'soft_label' is taken by SoftLabelTerm"):
        loss_registry(SoftLabelTerm, TopKTerm, Again)


def test_every_kind_is_documented_in_the_config_docstring_and_the_shipped_yaml() -> None:
    """The term examples of `trainer_config`'s docstring and the commented-out terms of
    `deploy/configs/student.yaml` are valid terms, one of each kind."""
    doc = trainer_config.__doc__ or ""
    block = doc[doc.index("Distillation terms") :]
    doc_terms = yaml.safe_load(
        "\n".join(line[4:] for line in block.splitlines() if line.startswith(("    -", "     ")))
    )
    text = STUDENT_YAML.read_text()
    terms_block = text[text.index("  terms:") : text.index("optimizer:")]
    yaml_terms = yaml.safe_load(re.sub(r"^    # ?", "    ", terms_block, flags=re.M))["terms"]
    for terms in (doc_terms, yaml_terms):
        raw = _raw((Path("/d"), Path("/t")), None)
        config = validate_config({**raw, "losses": {"terms": terms}})
        assert sorted(t.kind for t in config.losses.terms) == sorted(LOSSES)


# -- each loss's own keys, validated where the YAML has them ---------------------------------


@pytest.mark.parametrize(
    ("term", "problem"),
    [
        (
            {"kind": "soft_lable", "field": "logits"},
            "key 'losses.terms.0.kind': Input tag 'soft_lable' found using 'kind' does not "
            "match any of the expected tags: 'soft_label', 'topk', 'mse', 'hint', 'fsp'",
        ),
        (
            {"kind": "soft_label", "field": "logits", "kernel_size": 3},
            "key 'losses.terms.0.kernel_size': got 3: Extra inputs are not permitted",
        ),
        (
            {"kind": "soft_label", "field": "logits", "temperature": 0},
            "key 'losses.terms.0.temperature': got 0: Input should be greater than 0",
        ),
        (
            {"kind": "topk", "field": "top", "missing": "some"},
            "key 'losses.terms.0.missing': got 'some': Input should be 'zero', 'uniform' or 'tail'",
        ),
        (
            {"kind": "mse", "field": "f", "student_channels": 0},
            "key 'losses.terms.0.student_channels': got 0: Input should be greater than 0",
        ),
        (
            {"kind": "hint", "field": "f", "student": "s", "student_channels": 8, "kernel_size": 2},
            "key 'losses.terms.0.kernel_size': got 2: kernel_size must be odd and >= 1, so "
            "'same' padding keeps the map size",
        ),
        (
            {"kind": "hint", "field": "f", "student": "s"},
            "key 'losses.terms.0.student_channels': required, but not given",
        ),
        (
            {"kind": "fsp", "field": ["a", "b", "c"], "student": ["x", "y"]},
            "key 'losses.terms.0.student': fsp needs one student map per teacher field: got 3 "
            "fields ['a', 'b', 'c'] and 2 student maps",
        ),
        (
            {"kind": "fsp", "field": ["a", "b"], "student": ["x", "y"], "pairs": [[0, 2]]},
            "key 'losses.terms.0.pairs': pairs [[0, 2]] point outside the 2 maps (positions 0 "
            "to 1)",
        ),
        (
            {"kind": "fsp", "field": "a", "student": ["x", "y"]},
            "key 'losses.terms.0.field': got 'a': Input should be a valid tuple",
        ),
        (
            {"name": "task", "kind": "mse", "field": "f"},
            "key 'losses.terms.0.name': term name 'task' is reserved or empty: 'task' is the "
            "task loss; pick another name",
        ),
    ],
)
def test_a_bad_term_is_named_by_its_key(term: dict[str, Any], problem: str) -> None:
    raw = _raw((Path("/d"), Path("/t")), None)
    raw["losses"] = {"terms": [{"name": "t", **term}]}
    with pytest.raises(ValueError) as err:
        validate_config(raw, "cfg.yaml")
    assert str(err.value) == f"cfg.yaml: invalid trainer config: {problem}"


def test_two_terms_of_one_name_are_refused() -> None:
    raw = _raw((Path("/d"), Path("/t")), None)
    raw["losses"] = {"terms": [TERMS[0], {**TERMS[2], "name": "kd"}]}
    with pytest.raises(ValueError, match="terms share the names \\['kd'\\]; give each term"):
        validate_config(raw)


# -- what a term needs of the teachers' schema -----------------------------------------------

SCHEMA = KnowledgeSchema(
    fields=(
        dense("logits", "float32", (10,), meaning="logits"),
        topk("top", "float32", (10,), 4, meaning="log_probs"),
        dense("maps", "float32", (16, 4, 4)),
        dense("wide", "float32", (16, 8, 8)),
        dense("vec", "float32", (32,)),
    )
)


@pytest.mark.parametrize(
    ("term", "problem"),
    [
        (
            SoftLabelTerm(name="t", field="top"),
            "losses.terms 't' (kind soft_label): field 'top' is top-k (4 of 10): use kind: topk",
        ),
        (
            TopKTerm(name="t", field="logits"),
            "losses.terms 't' (kind topk): field 'logits' is dense: use kind: soft_label",
        ),
        (
            SoftLabelTerm(name="t", field="maps"),
            "losses.terms 't' (kind soft_label): teacher meaning 'features' is not a distribution",
        ),
        (
            HintTerm(name="t", field="vec", student="s", student_channels=8),
            "losses.terms 't' (kind hint): field 'vec' is [32] per sample, not [C, H, W] "
            "feature maps",
        ),
        (
            FSPTerm(name="t", field=("maps", "wide"), student=("a", "b")),
            "losses.terms 't' (kind fsp): pair (0, 1): fields 'maps' [16, 4, 4] and 'wide' "
            "[16, 8, 8] differ in H and W",
        ),
        (
            FeatureMSETerm(name="t", field="nope"),
            "losses.terms 't': field 'nope' is not in the merged knowledge; the teachers send "
            "['logits', 'maps', 'top', 'vec', 'wide']",
        ),
        (
            FSPTerm(name="t", field=("nope", "maps", "gone"), student=("a", "b", "c")),
            "losses.terms 't': fields ['nope', 'gone'] are not in the merged knowledge",
        ),
    ],
)
def test_a_term_that_does_not_fit_the_knowledge_says_which_and_why(
    term: _loss_terms.LossTerm, problem: str
) -> None:
    with pytest.raises(ValueError) as err:
        term.distill_term(SCHEMA)
    assert str(err.value).startswith(problem), str(err.value)


def test_channels_and_pairs_come_from_the_schema() -> None:
    mse = FeatureMSETerm(name="m", field="vec", student_channels=8).distill_term(SCHEMA).loss
    assert mse.adapter.weight.shape == (32, 8)  # linear: 8 student -> 32 teacher channels
    maps = FeatureMSETerm(name="m", field="maps", student_channels=8, spatial=True)
    assert maps.distill_term(SCHEMA).loss.adapter.weight.shape == (16, 8, 1, 1)
    as_they_are = FeatureMSETerm(name="m", field="maps").distill_term(SCHEMA).loss
    assert isinstance(as_they_are.adapter, nn.Identity)
    hint = HintTerm(name="h", field="maps", student="s", student_channels=4, kernel_size=5)
    assert hint.distill_term(SCHEMA).loss.regressor.weight.shape == (16, 4, 5, 5)
    fsp = FSPTerm(name="f", field=("maps", "maps", "maps"), student=("a", "b", "c"))
    term = fsp.distill_term(SCHEMA)
    assert term.loss.pairs == [(0, 1), (1, 2)]  # each map with the next
    assert term.teacher == ("maps", "maps", "maps") and term.student == ("a", "b", "c")


# -- from YAML to the objective and to training ----------------------------------------------


def _fsp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.flatten(2) @ b.flatten(2).transpose(1, 2) / (a.shape[-1] * a.shape[-2])


def test_a_yaml_config_builds_every_loss_with_its_parameters_and_the_teachers_schema(
    tmp_path: Path, dumps: tuple[Path, Path]
) -> None:
    """The objective the trainer builds from the YAML, on a real batch of both dumps: each
    term's value equals the loss computed by hand with the same parameters."""
    config = load_config(_yaml_config(tmp_path, dumps))
    train_set = digits("train")
    sources = build_sources(config, train_set)
    try:
        loader = DistillLoader(
            train_set, sources, 64, merger=Merger({}, renames=config.renames), window=0
        )
        objective = config.losses.objective(loader.merged.knowledge_schema)
        inputs, labels, knowledge = next(iter(loader))
    finally:
        for source in sources.values():
            source.close()
    torch.manual_seed(1)
    out = feature_cnn()(inputs)
    task = F.cross_entropy(out["logits"], labels)
    got = objective(out, knowledge, task_loss=task)

    losses = objective.losses
    assert (losses["tok"].meaning, losses["tok"].teacher_temperature) == ("log_probs", 2.0)
    mse_adapter, regressor = losses["feat"].adapter, losses["hint"].regressor
    s1 = out["s1"]
    expected = {
        "task": task,
        "kd": soft_label_kd(out["logits"], knowledge["logits"], temperature=4.0),
        "tok": topk_kd(
            out["logits"],
            knowledge["top.values"],
            knowledge["top.indices"],
            meaning="log_probs",
            missing="uniform",
            temperature=3.0,
            teacher_temperature=2.0,
        ),
        "feat": (
            (F.conv2d(s1, mse_adapter.weight, mse_adapter.bias) - knowledge["feat3"]) ** 2
        ).mean(),
        "hint": (
            (F.conv2d(s1, regressor.weight, regressor.bias, padding=1) - knowledge["feat2"]) ** 2
        ).mean(),
        "fsp": (
            (_fsp(out["s2"], out["s3"]) - _fsp(knowledge["feat2"], knowledge["feat3"])) ** 2
        ).mean(),
    }
    assert sorted(got.terms) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got.terms[name], value.detach(), msg=name)
        assert float(value.detach()) > 0, name
    weights = {"task": 1.0, **{t["name"]: t.get("weight", 1.0) for t in TERMS}}
    total = sum(weights[n] * float(v.detach()) for n, v in expected.items())
    assert math.isclose(float(got.total.detach()), total, rel_tol=1e-5)


@pytest.mark.integration
def test_training_from_yaml_steps_every_loss_and_its_learned_parts(
    tmp_path: Path, dumps: tuple[Path, Path]
) -> None:
    """`train(path)` with a term of every kind: each step moves the student and the losses'
    adapter and regressor, which the checkpoint keeps with the shapes the schema gave."""
    steps: list[float] = []
    result = train(_yaml_config(tmp_path, dumps), on_step=lambda s: steps.append(s.loss))
    assert result.ended == "finished" and len(steps) == 5  # 1257 samples, batches of 256
    assert all(math.isfinite(loss) and loss > 0 for loss in steps)
    state = checkpoints.read(tmp_path / "ckpt" / checkpoints.LAST)
    shapes = {k: tuple(v.shape) for k, v in state["objective"].items()}
    assert shapes == {
        "losses.feat.adapter.weight": (16, 8, 1, 1),
        "losses.feat.adapter.bias": (16,),
        "losses.hint.regressor.weight": (16, 8, 3, 3),
        "losses.hint.regressor.bias": (16,),
    }
    # Adam keeps a state for every parameter it stepped: the student's and the four above.
    n_student = len(list(feature_cnn().parameters()))
    assert len(state["optimizer"]["state"]) == n_student + 4
    assert state["run"]["loss terms"] == (
        "kd: soft_label logits -> logits; tok: topk top -> logits; feat: mse feat3 -> s1; "
        "hint: hint feat2 -> s1; fsp: fsp [feat2, feat3] -> [s2, s3]"
    )
