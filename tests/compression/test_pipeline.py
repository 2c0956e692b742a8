"""compress(config) in this process: a sequential train -> prune -> PTQ run writes every
stage's model and the report; one stopped inside the prune's fine-tune and resumed ends
equal to one that was not; a used run directory and a changed config are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lyceum.compression.analysis import count_flops
from lyceum.compression.pipeline import RunState, StageRow, compress, format_report
from lyceum.compression.quantization import load_int8
from lyceum.deploy.examples import digits
from lyceum.proto.evaluation import top1_accuracy
from lyceum.proto.specs import load_model

MODEL = 'lyceum.deploy.examples:student_mlp{"hidden": 16}'


def _config(out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "dataset": "lyceum.deploy.examples:digits",
        "dataset_kwargs": {"limit": 256},
        "batch_size": 32,
        "latency": False,
        "progress": False,
        "checkpoint_every": 3,
        "out_dir": str(out),
        "stages": [
            {"name": "float", "kind": "train", "epochs": 1},
            {
                "name": "pruned",
                "kind": "prune",
                "epochs": 1,
                "strategy": {"kind": "uniform", "flops": -0.5},
            },
            {"name": "int8", "kind": "quantize", "scheme": {"kind": "ptq"}},
        ],
        **extra,
    }


class _Stop(Exception):
    pass


@pytest.mark.integration
def test_sequential_stages_write_their_models_and_the_report(tmp_path: Path) -> None:
    result = compress(_config(tmp_path / "run"))
    out = tmp_path / "run"
    assert [r.stage for r in result.rows] == ["baseline", "float", "pruned", "int8"]
    assert [r.epochs for r in result.rows] == ["-", "0", "1", "-"]
    test = digits("test", limit=256)
    x = test[0][0].unsqueeze(0)
    pruned = load_model(MODEL, out / "stages/pruned/model.safetensors")
    baseline, _, row, int8_row = result.rows
    assert row.flops == count_flops(pruned, x) and baseline.flops is not None
    assert row.flops <= 0.55 * baseline.flops
    assert row.accuracy == top1_accuracy(pruned, test)
    assert row.size_bytes == (out / "stages/pruned/model.safetensors").stat().st_size
    program = load_int8(out / "stages/int8/model_int8.pt2").module()
    assert int8_row.accuracy == top1_accuracy(program, test)
    assert int8_row.flops == row.flops  # int8 keeps its float model's MACs
    assert int8_row.size_bytes == (out / "stages/int8/model_int8.pt2").stat().st_size
    assert "the torch.export archive; its tensors take" in int8_row.note
    saved = json.loads((out / "report.json").read_text())["rows"]
    assert [StageRow(**r) for r in saved] == result.rows
    assert (out / "report.md").read_text() == format_report(result.rows, "test") + "\n"
    assert [e["stages"] for e in result.epochs] == [["float"], ["pruned"]]


@pytest.mark.integration
def test_stopped_in_the_prune_fine_tune_and_resumed_it_ends_equal(tmp_path: Path) -> None:
    # The int8 stage adds nothing here (nothing trains after it) but a minute of export.
    stages = _config(tmp_path)["stages"][:2]
    whole = compress(_config(tmp_path / "whole", stages=stages))

    def stop(folder: Path, state: RunState) -> None:
        # The checkpoint after batch 3 of epoch 1: the model is pruned, its fine-tune half done.
        if state.position == 3 and len(state.epochs) == 1:
            raise _Stop

    with pytest.raises(_Stop):
        compress(_config(tmp_path / "cut", stages=stages), on_checkpoint=stop)
    state = json.loads((tmp_path / "cut/checkpoint/state.json").read_text())
    assert (state["position"], len(state["rows"])) == (3, 2)  # baseline and float written
    resumed = compress(_config(tmp_path / "cut", stages=stages), resume=True)
    assert resumed.epochs == whole.epochs
    assert resumed.rows == whole.rows
    for name in ("float", "pruned"):
        a = load_model(MODEL, tmp_path / f"whole/stages/{name}/model.safetensors").state_dict()
        b = load_model(MODEL, tmp_path / f"cut/stages/{name}/model.safetensors").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_a_used_run_directory_and_a_changed_config_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    one_epoch = _config(out, stages=[{"name": "float", "kind": "train", "epochs": 1}])
    compress(one_epoch)
    with pytest.raises(ValueError, match=r"holds a pipeline run .* continue it with --resume"):
        compress(one_epoch)
    with pytest.raises(ValueError, match=r"other values of \['seed'\]"):
        compress({**one_epoch, "seed": 1}, resume=True)
    with pytest.raises(ValueError, match="--resume: no pipeline checkpoint"):
        compress(one_epoch, resume=True, out_dir=tmp_path / "elsewhere")
    again = compress(one_epoch, resume=True)  # a finished run: its report, its last model
    assert [r.stage for r in again.rows] == ["baseline", "float"]
    loaded = load_model(MODEL, out / "stages/float/model.safetensors").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in again.model.state_dict().items())


@pytest.mark.integration
def test_float_rows_have_their_latency(tmp_path: Path) -> None:
    config = _config(
        tmp_path / "run",
        latency=True,
        latency_runs=3,
        stages=[{"name": "float", "kind": "train", "epochs": 1}],
    )
    rows = compress(config).rows
    assert all(r.latency_ms is not None and r.latency_ms > 0 for r in rows)


def _tuned(out: Path, alpha: float | None) -> dict[str, Any]:
    """Train, prune (a point), then fine-tune: distilled from the unpruned stage's model
    (alpha given) or on the labels alone (None)."""
    tune: dict[str, Any] = {"name": "tune", "kind": "train", "epochs": 1}
    if alpha is not None:
        tune |= {"distill_from": "float", "distillation": {"alpha": alpha, "temperature": 4.0}}
    prune = {"name": "pruned", "kind": "prune", "strategy": {"kind": "uniform", "flops": -0.5}}
    return _config(out, stages=[{"name": "float", "kind": "train", "epochs": 1}, prune, tune])


@pytest.mark.integration
def test_distill_from_an_earlier_stage_mixes_its_soft_labels_in(tmp_path: Path) -> None:
    plain = compress(_tuned(tmp_path / "plain", None))
    weightless = compress(_tuned(tmp_path / "zero", 0.0))
    distilled = compress(_tuned(tmp_path / "half", 0.5))
    # alpha 0 is the task loss alone: the same steps, bit for bit; alpha 0.5 is not.
    assert weightless.epochs == plain.epochs
    a, b = plain.model.state_dict(), weightless.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert distilled.epochs[0] == plain.epochs[0]  # the float epoch, before any teacher
    assert distilled.epochs[1]["loss"] != plain.epochs[1]["loss"]
    assert [r.stage for r in distilled.rows] == ["baseline", "float", "pruned", "tune"]
    assert distilled.rows[3].flops == distilled.rows[2].flops  # the tune stage keeps the pruning


RELABELLED = "tests.deploy.compress_data:relabelled_digits"


@pytest.mark.integration
def test_labeled_hides_the_labels_of_later_ids(tmp_path: Path) -> None:
    """With `labeled: 40`, labels of ids >= 40 change nothing: the same run on digits whose
    later labels are all wrong ends bit for bit equal; without `labeled` it does not."""

    def run(name: str, keep: int, labeled: int | None) -> Any:
        return compress(
            _config(
                tmp_path / name,
                dataset=RELABELLED,
                dataset_kwargs={"limit": 128, "keep": keep},  # keep 128: every label right
                labeled=labeled,
                stages=[{"name": "float", "kind": "train", "epochs": 1}],
            )
        )

    clean, wrong, all_used = run("clean", 128, 40), run("wrong", 40, 40), run("all", 40, None)
    a, b, c = (r.model.state_dict() for r in (clean, wrong, all_used))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert clean.epochs == wrong.epochs
    assert not all(torch.equal(a[k], c[k]) for k in a)
