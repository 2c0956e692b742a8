"""The main job: distillation beats training from scratch on the few labels the student has."""

from __future__ import annotations

import pytest

from lyceum.deploy.cli import build_parser
from lyceum.deploy.demo import DemoConfig, run_demo


@pytest.mark.slow
@pytest.mark.integration
def test_demo_distillation_beats_scratch(tmp_path):
    config = DemoConfig(
        seeds=(0,),
        steps=300,
        finetune_steps=100,
        teacher_epochs=6,
        trainer_epochs=8,
        workdir=tmp_path,
    )
    result = run_demo(config, log=lambda _: None)
    acc = {r.name.split(" (")[0]: r.accuracy for r in result.rows}
    assert len(acc) == 8, acc
    assert acc["teacher CNN"] > 0.95, acc
    # Measured: scratch ~0.90, distilled ~0.97 at these settings; the margin is wide.
    assert acc["student MLP, scratch"] + 0.02 < acc["student MLP, distilled"], acc
    for row in (
        "trainer: 1 teacher",
        "trainer: 3 teachers",
        "distilled student, pruned -50% FLOPs",
        "distilled student, QAT int8",
        "distilled student, pruned -50% + QAT int8",
    ):
        assert acc[row] > acc["student MLP, scratch"], (row, acc)
    assert result.knowledge_rows == 1257
    # float32 logits for 10 classes plus the uint64 id: 48 B of payload per sample.
    assert 48 <= result.knowledge_bytes / result.knowledge_rows < 80
    assert (tmp_path / "knowledge" / "manifest.json").is_file()
    # The table shows those numbers: each row's mean and its one seed, and the gains.
    lines = result.table().splitlines()
    for demo_row, line in zip(result.rows, lines[2:10], strict=True):
        mean = f"{demo_row.name:<46} {demo_row.accuracy * 100:>8.1f}%  "
        assert line.startswith(mean)
        assert line[len(mean) :].split()[0] == f"{demo_row.per_seed[0] * 100:.1f}"
    gain = 100 * (acc["student MLP, distilled"] - acc["student MLP, scratch"])
    assert lines[4].endswith(f"gain {gain:+.1f} points")
    ensemble = 100 * (acc["trainer: 3 teachers"] - acc["trainer: 1 teacher"])
    assert lines[6].endswith(f"ensemble gain {ensemble:+.1f}")
    assert lines[11] == (
        f"knowledge on disk: {result.knowledge_bytes / 1024:.1f} KiB for 1257 samples "
        f"({result.knowledge_bytes / 1257:.0f} B/sample)"
    )


def test_demo_options_default_to_the_demo_config() -> None:
    args = build_parser().parse_args(["demo"])
    defaults = DemoConfig()
    assert (tuple(args.seeds), args.steps, args.labeled) == (
        defaults.seeds,
        defaults.steps,
        defaults.labeled,
    )
    assert args.workdir is None
