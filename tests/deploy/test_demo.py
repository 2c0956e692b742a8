"""The main job: distillation beats training from scratch on the few labels the student has."""

from __future__ import annotations

import pytest

from lyceum.deploy.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_distillation_beats_scratch(tmp_path):
    config = DemoConfig(
        seeds=(0,), steps=300, finetune_steps=100, teacher_epochs=6, workdir=tmp_path
    )
    result = run_demo(config, log=lambda _: None)
    acc = {r.name: r.accuracy for r in result.rows}
    teacher, scratch, distilled, pruned = (r.accuracy for r in result.rows[:4])
    assert teacher > 0.95, acc
    # Measured: scratch ~0.90, distilled ~0.97 at these settings; the margin is wide.
    assert distilled > scratch + 0.02, acc
    assert pruned > scratch, acc
    assert result.knowledge_rows == 1257
    # float32 logits for 10 classes plus the uint64 id: 48 B of payload per sample.
    assert 48 <= result.knowledge_bytes / result.knowledge_rows < 80
    assert (tmp_path / "knowledge" / "manifest.json").is_file()
    assert "distilled" in result.table()
