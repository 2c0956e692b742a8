"""The distilled NAS reward: the teacher's knowledge of the training set from an offline dump
or a real online teacher, equal to the teacher run here, and a search that learns from it; a
supernet's teacher section instead of its in-place distillation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lyceum.compression.nas import (
    NASDistillation,
    SupernetJobConfig,
    TeacherKnowledge,
    run_supernet_train,
    train_candidate,
)
from lyceum.deploy._exit_codes import USAGE
from lyceum.deploy._nas_knowledge import teacher_knowledge
from lyceum.deploy.cli import main
from lyceum.deploy.examples import TeacherCNN, digits
from lyceum.student_client.losses import soft_label_kd
from tests._support.servers import ServerProcess
from tests._support.supernets import TINY
from tests._support.teachers import DIGITS, MODEL, make_dump, reference_logits, save_checkpoint
from tests.deploy.test_cli_nas import SPACE, tiny_space


def _seeded_teacher_logits(seed: int, data: torch.utils.data.Dataset) -> torch.Tensor:
    """`make_dump`'s teacher (seeded width-8 TeacherCNN) run here, in eval mode."""
    torch.manual_seed(seed)
    model = TeacherCNN(8, 10).eval()
    with torch.no_grad():
        return model(torch.stack([data[i][0] for i in range(len(data))]))  # type: ignore[arg-type]


def test_offline_knowledge_is_the_teachers_logits_and_a_distilled_search_runs(
    tmp_path: Path,
) -> None:
    train = digits("train", limit=64)
    dump = make_dump(tmp_path / "dump", 3, train)
    knowledge = teacher_knowledge(NASDistillation(knowledge_dir=str(dump), alpha=0.7), train)
    assert knowledge.alpha == 0.7
    torch.testing.assert_close(knowledge.outputs, _seeded_teacher_logits(3, train))

    config = {
        "space": SPACE,
        "dataset_kwargs": {"limit": 64},
        "epochs": 1,
        "batch_size": 32,
        "search": {"max_iterations": 2},
        "study": {"storage": str(tmp_path / "nas.db"), "study": "kd"},
        "distill": {"knowledge_dir": str(dump)},
    }
    (tmp_path / "nas.yaml").write_text(yaml.safe_dump(config))
    assert main(["nas", "search", str(tmp_path / "nas.yaml")]) == 0
    # A dump of another split is refused by its dataset fingerprint, before any training.
    with pytest.raises(ValueError, match="dataset"):
        teacher_knowledge(NASDistillation(knowledge_dir=str(dump)), digits("train", limit=32))
    # A field the dump lacks is named under the config's own key for the teacher.
    missing = NASDistillation(knowledge_dir=str(dump), field="probs")
    with pytest.raises(ValueError, match=r"^teacher\.field 'probs': dump .* set teacher\.field"):
        teacher_knowledge(missing, train, key="teacher")
    with pytest.raises(ValueError, match=r"^distill\.field 'probs'"):
        teacher_knowledge(missing, train)


@pytest.mark.integration
def test_online_knowledge_equals_the_teacher_run_here(tmp_path: Path) -> None:
    train = digits("train", limit=40)
    checkpoint = save_checkpoint(tmp_path / "teacher.safetensors", seed=5)
    proc = ServerProcess(
        ["--model", f'{MODEL}{{"width": 8}}', "--checkpoint", str(checkpoint),
         "--dataset", DIGITS, "--grpc-port", "0"],
        tmp_path,
    )  # fmt: skip
    try:
        config = NASDistillation(endpoints=[proc.endpoint("grpc")])
        knowledge = teacher_knowledge(config, train)
    finally:
        proc.kill()
    torch.testing.assert_close(knowledge.outputs, reference_logits(checkpoint, train))


def test_alpha_zero_trains_exactly_as_plain_training_and_rows_must_match() -> None:
    space, train = tiny_space(), digits("train", limit=64)
    outputs = torch.randn(64, 10)
    models = []
    for teacher in (None, TeacherKnowledge(outputs=outputs, loss=soft_label_kd, alpha=0.0)):
        torch.manual_seed(0)
        model = space.build([1, 1, 1])
        train_candidate(model, train, epochs=1, lr=1e-2, batch_size=16, seed=0, teacher=teacher)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # Taught (alpha 1), the student moves towards the teacher's outputs.
    torch.manual_seed(0)
    taught = space.build([1, 1, 1])
    teacher = TeacherKnowledge(outputs=outputs, loss=soft_label_kd, alpha=1.0)
    train_candidate(taught, train, epochs=3, lr=1e-2, batch_size=16, seed=0, teacher=teacher)
    x = torch.stack([train[i][0] for i in range(64)])
    with torch.no_grad():
        assert soft_label_kd(taught(x), outputs) < soft_label_kd(models[0](x), outputs)
    with pytest.raises(ValueError, match="teacher knowledge has 64 rows and the training set 32"):
        train_candidate(
            space.build([1, 1, 1]), digits("train", limit=32), epochs=1, lr=1e-2,
            batch_size=16, seed=0, teacher=teacher,
        )  # fmt: skip


def test_a_distill_section_names_exactly_one_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"space": SPACE, "distill": {"knowledge_dir": "d", "endpoints": ["grpc://h:1"]}}
    (tmp_path / "nas.yaml").write_text(yaml.safe_dump(config))
    assert main(["nas", "search", str(tmp_path / "nas.yaml")]) == USAGE
    assert "give exactly one teacher" in capsys.readouterr().err


def test_a_supernet_teacher_replaces_in_place_distillation_explicitly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {
        "space": TINY,
        "train": {"distill": {"alpha": 0.3}},
        "teacher": {"knowledge_dir": str(tmp_path / "dump")},
    }
    (tmp_path / "supernet.yaml").write_text(yaml.safe_dump(config))
    assert main(["nas", "supernet", "train", str(tmp_path / "supernet.yaml")]) == USAGE
    assert "train.distill (in-place distillation from the largest subnet) is not used" in (
        capsys.readouterr().err
    )
    # In Python, a config naming a teacher needs its knowledge: no silent in-place fallback.
    del config["train"]
    job = SupernetJobConfig.model_validate(config)
    assert job.train.distill.alpha == 0.5  # the default, unused: the teacher's alpha applies
    train = digits("train", limit=8)
    with pytest.raises(ValueError, match="the config names a teacher and no teacher knowledge"):
        run_supernet_train(job, train, train, soft_label_kd)
