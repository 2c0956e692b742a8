"""The main job: distillation beats training from scratch on the few labels the student has."""

from __future__ import annotations

import pytest

from lyceum.deploy.cli import build_parser
from lyceum.deploy.demo import DemoConfig, run_demo


@pytest.mark.slow
@pytest.mark.integration
def test_demo_distillation_beats_scratch(tmp_path):
    config = DemoConfig(seeds=(0,), steps=300, teacher_epochs=6, trainer_epochs=8, workdir=tmp_path)
    result = run_demo(config, log=lambda _: None)
    acc = {r.name.split(" (")[0]: r.accuracy for r in result.rows}
    assert len(acc) == 5, acc
    assert acc["teacher CNN"] > 0.95, acc
    # Measured: scratch ~0.90, distilled ~0.97 at these settings; the margin is wide.
    assert acc["student MLP, scratch"] + 0.02 < acc["student MLP, distilled"], acc
    for row in ("trainer: 1 teacher", "trainer: 3 teachers"):
        assert acc[row] > acc["student MLP, scratch"], (row, acc)
    assert result.knowledge_rows == 1257
    # float32 logits for 10 classes plus the uint64 id: 48 B of payload per sample.
    assert 48 <= result.knowledge_bytes / result.knowledge_rows < 80
    assert (tmp_path / "knowledge" / "manifest.json").is_file()
    # The table shows those numbers: each row's mean and its one seed, and the gains.
    lines = result.table().splitlines()
    for demo_row, line in zip(result.rows, lines[2:7], strict=True):
        mean = f"{demo_row.name:<46} {demo_row.accuracy * 100:>8.1f}%  "
        assert line.startswith(mean)
        assert line[len(mean) :].split()[0] == f"{demo_row.per_seed[0] * 100:.1f}"
    gain = 100 * (acc["student MLP, distilled"] - acc["student MLP, scratch"])
    assert lines[4].endswith(f"gain {gain:+.1f} points")
    ensemble = 100 * (acc["trainer: 3 teachers"] - acc["trainer: 1 teacher"])
    assert lines[6].endswith(f"ensemble gain {ensemble:+.1f}")
    assert lines[8].startswith("compression with `lyceum compress` (seed 0;")
    assert lines[11:16] == [r.line() for r in result.hybrid]
    assert lines[17] == (
        f"knowledge on disk: {result.knowledge_bytes / 1024:.1f} KiB for 1257 samples "
        f"({result.knowledge_bytes / 1257:.0f} B/sample)"
    )

    # PaddleSlim's hybrid table, the five rows of the two pipelines' reports; the baseline
    # is the scratch student of the row above (seed 0), the pipelines' starting checkpoint.
    rows = {r.name: r for r in result.hybrid}
    base, distilled, int8, pruned, pruned_int8 = (
        rows[n]
        for n in (
            "baseline (scratch)",
            "distilled",
            "distilled + int8 (QAT)",
            "pruned -50% FLOPs",
            "pruned -50% FLOPs + int8 (QAT)",
        )
    )
    assert base.accuracy == acc["student MLP, scratch"]
    # Measured: distilled ~0.98 and within a point of it for the others.
    assert distilled.accuracy > base.accuracy + 0.02, rows
    for compressed in (int8, pruned, pruned_int8):
        assert compressed.accuracy > distilled.accuracy - 0.03, rows
    # MLP 64-32-10: 2,368 weights and 42 biases in float32; -50% FLOPs halves the hidden layer.
    assert [r.flops for r in result.hybrid] == [2368, 2368, 2368, 1184, 1184]
    assert base.tensor_bytes == distilled.tensor_bytes == 4 * (2368 + 42)
    assert pruned.tensor_bytes == 4 * (1184 + 26)
    # int8: a byte per weight, plus float biases and per-channel scales.
    assert 2368 < int8.tensor_bytes < distilled.tensor_bytes / 3
    assert 1184 < pruned_int8.tensor_bytes < pruned.tensor_bytes / 2.5
    # On disk, float weights are safetensors (the tensors plus a header) ...
    for float_row in (base, distilled, pruned):
        assert float_row.tensor_bytes < float_row.size_bytes < float_row.tensor_bytes + 1024
    # ... and int8 models torch.export archives, their code and metadata ~20 KiB here.
    assert pruned_int8.size_bytes < int8.size_bytes


def test_demo_options_default_to_the_demo_config() -> None:
    args = build_parser().parse_args(["demo"])
    defaults = DemoConfig()
    assert (tuple(args.seeds), args.steps, args.labeled) == (
        defaults.seeds,
        defaults.steps,
        defaults.labeled,
    )
    assert args.workdir is None
