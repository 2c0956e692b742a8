"""Compression jobs fine-tune distilled from a teacher when the config asks for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lyceum.compression.distillation import distilled_loss
from lyceum.compression.pruning import PruneJobConfig, run_prune_job
from lyceum.compression.quantization import QAT, QuantizeJobConfig, quantize_job
from lyceum.compression.quantization.job import TeacherModel
from lyceum.deploy.examples import digits, student_mlp


class _Recorder:
    """A distillation loss that remembers the teacher logits it was given."""

    def __init__(self) -> None:
        self.teacher_batches: list[torch.Tensor] = []

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        self.teacher_batches.append(teacher.detach())
        return ((student - teacher) ** 2).mean()


def test_distilled_loss_mixes_ce_and_teacher_term_by_alpha():
    torch.manual_seed(0)
    teacher = student_mlp()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    out = torch.randn(4, 10)
    loss = distilled_loss(teacher, lambda s, t: ((s - t) ** 2).mean(), alpha=0.25)(out, x, y)
    with torch.no_grad():
        want = (
            0.75 * torch.nn.functional.cross_entropy(out, y)
            + 0.25 * ((out - teacher(x)) ** 2).mean()
        )
    assert torch.allclose(loss, want)


def test_prune_job_distils_from_the_unpruned_model(tmp_path: Path):
    config = PruneJobConfig.model_validate(
        {
            "model": "lyceum.deploy.examples:student_mlp",
            "dataset": "lyceum.deploy.examples:digits",
            "strategy": {"kind": "uniform", "flops": -0.5},
            "finetune_epochs": 1,
            "latency_runs": 1,
            "distill": {"temperature": 2.0, "alpha": 0.5},
            "out_dir": str(tmp_path),
        }
    )
    torch.manual_seed(0)
    model = student_mlp()
    unpruned = [p.clone() for p in model.parameters()]
    recorder = _Recorder()
    splits: dict[str, Any] = {
        "train_data": digits("train"),
        "val_data": digits("val"),
        "test_data": digits("test"),
    }
    with pytest.raises(ValueError, match="distill_loss exactly when"):
        run_prune_job(config, model=student_mlp(), **splits)
    run_prune_job(config, model=model, distill_loss=recorder, **splits)
    # One fine-tuning epoch over the training split, every batch taught by the teacher.
    assert sum(len(t) for t in recorder.teacher_batches) == len(digits("train"))
    # The teacher is the unpruned model: 10 logits from the full hidden layer.
    reference = student_mlp()
    with torch.no_grad():
        for p, v in zip(reference.parameters(), unpruned, strict=True):
            p.copy_(v)
    images = torch.stack([digits("train")[i][0] for i in range(len(digits("train")))])
    with torch.no_grad():
        expected = reference.eval()(images)[:, 0].sort().values
    # Batches come shuffled: compare the multiset of the teacher's first logits.
    got = torch.cat(recorder.teacher_batches)[:, 0].sort().values
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_quantize_job_distils_qat_from_the_teacher(tmp_path: Path):
    config = QuantizeJobConfig(
        model="lyceum.deploy.examples:student_mlp",
        dataset="lyceum.deploy.examples:digits",
        scheme=QAT(),
        epochs=1,
        latency=False,
        teacher=TeacherModel(model="lyceum.deploy.examples:teacher_cnn", alpha=0.7),
        out_dir=tmp_path,
    )
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    recorder = _Recorder()
    with pytest.raises(ValueError, match="teacher and distill_loss"):
        quantize_job(
            config, model=student_mlp(), train_data=digits("train"), test_data=digits("test")
        )
    report = quantize_job(
        config,
        model=student_mlp(),
        train_data=digits("train"),
        test_data=digits("test"),
        teacher=teacher,
        distill_loss=recorder,
    )
    assert sum(len(t) for t in recorder.teacher_batches) == len(digits("train"))
    assert report.int8_accuracy is not None
