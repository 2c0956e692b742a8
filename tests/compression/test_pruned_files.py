"""A pruned model named by one path: its `model.safetensors`, the plan read beside it.

`lyceum.proto.specs.load_model` (every `--checkpoint` and `checkpoint:`) rebuilds the pruned
architecture through the `lyceum-pruned` weights format; the weights without their plan, a
pruned file read as a plain state dict and a format nobody installed are refused, naming the
fix; a training run that starts from a pruned student writes weights that load the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lyceum.compression.pruning import (
    PruneJobConfig,
    UniformPruning,
    load_pruned,
    prune,
    run_prune_job,
    save_pruned,
)
from lyceum.compression.pruning.plan import PLAN_FILE, PRUNED_FORMAT, PRUNED_WEIGHTS
from lyceum.deploy.examples import digits, resnet_cnn, student_mlp
from lyceum.proto.specs import (
    WEIGHTS_FILE,
    carry_weights_format,
    load_model,
    load_state_dict,
    weights_format,
    weights_metadata,
)

RESNET = 'lyceum.deploy.examples:resnet_cnn{"width": 8}'
MLP = 'lyceum.deploy.examples:student_mlp{"hidden": 32}'


def _pruned(directory: Path, model: torch.nn.Module, example: torch.Tensor) -> Path:
    torch.manual_seed(0)
    result = prune(model, UniformPruning(flops=-0.5), example, progress=False)
    save_pruned(result.model, result.plan, directory)
    return directory / WEIGHTS_FILE


@pytest.fixture(scope="module")
def pruned_resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _pruned(tmp_path_factory.mktemp("resnet"), resnet_cnn(width=8), torch.zeros(1, 1, 8, 8))


@pytest.fixture(scope="module")
def pruned_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _pruned(tmp_path_factory.mktemp("mlp"), student_mlp(hidden=32), torch.zeros(1, 1, 8, 8))


def test_load_model_rebuilds_the_pruned_architecture_from_the_weights_file(
    pruned_resnet: Path,
) -> None:
    model = load_model(RESNET, pruned_resnet)
    reference = load_pruned(resnet_cnn(width=8), pruned_resnet.parent)
    saved = load_file(str(pruned_resnet))
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    # Narrower than the factory's model: the stem's 8 channels went down.
    assert model.stem[0].out_channels < 8  # type: ignore[index,union-attr]
    assert model.stem[0].out_channels == saved["stem.0.weight"].shape[0]  # type: ignore[index,union-attr]
    x = torch.stack([digits("test")[i][0] for i in range(16)])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert weights_format(pruned_resnet) is PRUNED_WEIGHTS
    assert weights_metadata(pruned_resnet)["format"] == PRUNED_FORMAT == "lyceum-pruned"


def test_the_pruned_model_comes_back_in_the_mode_the_factory_built_it(pruned_mlp: Path) -> None:
    """A trainer fine-tunes what load_model returns without calling train(): a plain
    load_state_dict leaves the mode alone, so the pruned format does too."""
    assert load_model(MLP, pruned_mlp).training
    assert not load_pruned(student_mlp(hidden=32), pruned_mlp).training


def test_pruned_weights_without_their_plan_are_refused_naming_the_plan(
    pruned_mlp: Path, tmp_path: Path
) -> None:
    alone = tmp_path / "elsewhere" / WEIGHTS_FILE
    alone.parent.mkdir()
    shutil.copy(pruned_mlp, alone)
    with pytest.raises(ValueError) as err:
        load_model(MLP, alone)
    message = str(err.value)
    assert f"checkpoint {str(alone)!r} holds pruned weights" in message
    assert f"{PLAN_FILE}, is not beside it in {str(alone.parent)!r}" in message
    assert f"copy {PLAN_FILE} from the `lyceum prune` out_dir" in message
    shutil.copy(pruned_mlp.parent / PLAN_FILE, alone.parent / PLAN_FILE)
    assert load_model(MLP, alone).state_dict()["1.weight"].shape == (16, 64)


def test_a_pruned_file_read_as_a_plain_state_dict_names_load_model(pruned_mlp: Path) -> None:
    with pytest.raises(ValueError) as err:
        load_state_dict(pruned_mlp)
    message = str(err.value)
    assert "holds weights of format 'lyceum-pruned'" in message
    assert f"load_model(spec, {str(pruned_mlp)!r})" in message


def test_a_pruned_model_for_another_factory_is_refused_naming_the_layer(
    pruned_mlp: Path,
) -> None:
    with pytest.raises(ValueError, match="is not a prunable group of this model"):
        load_model('lyceum.deploy.examples:teacher_cnn{"width": 8}', pruned_mlp)


def test_a_directory_given_as_checkpoint_names_the_weights_file_in_it(pruned_mlp: Path) -> None:
    with pytest.raises(ValueError) as err:
        load_model(MLP, pruned_mlp.parent)
    assert f"is not a file (a directory?): give {str(pruned_mlp)!r}" in str(err.value)


def test_a_lyceum_format_no_installed_package_reads_is_refused(tmp_path: Path) -> None:
    path = tmp_path / WEIGHTS_FILE
    save_file(student_mlp().state_dict(), str(path), metadata={"format": "lyceum-sparse"})
    with pytest.raises(ValueError) as err:
        load_model(MLP, path)
    message = str(err.value)
    assert "holds weights of format 'lyceum-sparse'" in message
    assert "'lyceum.weights_formats'" in message and "reinstall lyceum-kd" in message


def test_plain_weights_are_plain(tmp_path: Path) -> None:
    path = tmp_path / WEIGHTS_FILE
    save_file(student_mlp().state_dict(), str(path), metadata={"format": "pt"})
    assert weights_format(path) is None
    assert carry_weights_format(path, tmp_path / "run") == {"format": "pt"}
    assert not (tmp_path / "run").exists()
    assert carry_weights_format(None, tmp_path / "run") == {"format": "pt"}


def test_carrying_the_format_copies_the_plan(pruned_mlp: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert carry_weights_format(pruned_mlp, run) == {"format": "lyceum-pruned"}
    assert (run / PLAN_FILE).read_bytes() == (pruned_mlp.parent / PLAN_FILE).read_bytes()
    assert sorted(p.name for p in run.iterdir()) == [PLAN_FILE]  # no temp file left
    # Into the directory the weights came from (a resumed run of its own output): unchanged.
    plan = (pruned_mlp.parent / PLAN_FILE).read_bytes()
    assert carry_weights_format(pruned_mlp, pruned_mlp.parent) == {"format": "lyceum-pruned"}
    assert (pruned_mlp.parent / PLAN_FILE).read_bytes() == plan


def test_student_train_fine_tunes_a_pruned_student_into_weights_that_load_the_same_way(
    pruned_mlp: Path, tmp_path: Path
) -> None:
    from lyceum.student_client import train, validate_config

    run = tmp_path / "run"
    config = validate_config(
        {
            "model": "lyceum.deploy.examples:student_mlp",
            "model_kwargs": {"hidden": 32},
            "checkpoint": str(pruned_mlp),
            "dataset": {
                "train": "lyceum.deploy.examples:digits",
                "validation": "lyceum.deploy.examples:digits",
                "validation_kwargs": {"split": "val"},
            },
            "epochs": 3,
            "seed": 1,
            "checkpoint_dir": str(run),
            "progress": False,
        }
    )
    result = train(config)
    assert result.weights == run / WEIGHTS_FILE
    assert weights_metadata(result.weights)["format"] == "lyceum-pruned"
    assert (run / PLAN_FILE).read_bytes() == (pruned_mlp.parent / PLAN_FILE).read_bytes()
    trained = load_model(MLP, result.weights)
    start = load_file(str(pruned_mlp))
    state = trained.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in start.items()}
    assert not torch.equal(state["1.weight"], start["1.weight"])  # it trained
    assert all(torch.equal(state[k], v.cpu()) for k, v in result.model.state_dict().items())
    # The pruned student learned the digits (16 hidden units; 10% is chance).
    assert result.epochs[-1].val_accuracy is not None and result.epochs[-1].val_accuracy > 0.8


def test_a_pruned_model_is_not_pruned_again(pruned_mlp: Path, tmp_path: Path) -> None:
    config = PruneJobConfig(
        model=MLP,
        checkpoint=pruned_mlp,
        dataset="lyceum.deploy.examples:digits",
        strategy=UniformPruning(flops=-0.5),
        out_dir=tmp_path / "again",
        progress=False,
    )
    data = digits("val")
    with pytest.raises(ValueError) as err:
        run_prune_job(
            config,
            model=load_model(MLP, pruned_mlp),
            train_data=data,
            val_data=data,
            test_data=data,
        )
    message = str(err.value)
    assert "is already a pruned model, and a pruned model is not pruned again" in message
    assert "prune the unpruned model to the combined target" in message
    assert not config.out_dir.exists()


def test_the_plan_file_is_what_the_reader_reads(pruned_mlp: Path) -> None:
    plan = json.loads((pruned_mlp.parent / PLAN_FILE).read_text())
    assert plan["format_version"] == 1 and plan["steps"][0]["layer"] == "1"
    assert PRUNED_WEIGHTS.companions(pruned_mlp) == [pruned_mlp.parent / PLAN_FILE]
