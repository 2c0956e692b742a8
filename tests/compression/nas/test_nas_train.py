"""Full training of a found architecture, saved as model.safetensors + tokens.json and rebuilt
without pickle by every path that loads a model (`load_model` through the weights format)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lyceum.compression.analysis import count_flops
from lyceum.compression.nas import (
    NAS_FORMAT,
    TOKENS_FILE,
    Architecture,
    FinalTraining,
    NASNetwork,
    lightnas_space,
    load_architecture,
    nas_model,
    train_architecture,
)
from lyceum.deploy.examples import digits
from lyceum.proto.evaluation import top1_accuracy
from lyceum.proto.specs import (
    WEIGHTS_FILE,
    carry_weights_format,
    load_model,
    weights_metadata,
)

NAS_MODEL = "lyceum.compression.nas:nas_model"
# A small candidate: expansion 3, the narrowest channels, one repeat fewer, in every stage.
TOKENS = [0, 0, 0, 0, 1, 0] * 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("nas")
    test = digits("test", limit=64)
    report = train_architecture(
        Architecture(tokens=TOKENS),
        FinalTraining(epochs=1, batch_size=32, out_dir=out, latency_runs=3, progress=False),
        train_data=digits("train", limit=64),
        test_data=test,
    )
    assert report.out_dir == out and report.architecture.tokens == TOKENS
    space = lightnas_space()
    assert report.flops == count_flops(space.build(TOKENS), test[0][0].unsqueeze(0))
    assert report.latency_ms > 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"] == report.accuracy
    return out, report.accuracy


def test_the_saved_network_is_rebuilt_from_tokens_json_by_load_model(
    trained: tuple[Path, float],
) -> None:
    out, accuracy = trained
    assert weights_metadata(out / WEIGHTS_FILE)["format"] == NAS_FORMAT
    assert json.loads((out / TOKENS_FILE).read_text())["tokens"] == TOKENS
    test = digits("test", limit=64)
    direct = load_architecture(out)
    via_spec = load_model(NAS_MODEL, out / WEIGHTS_FILE).eval()
    assert isinstance(via_spec, NASNetwork) and via_spec.architecture.tokens == TOKENS
    x = torch.stack([test[i][0] for i in range(8)])
    with torch.no_grad():
        assert torch.equal(direct(x), via_spec(x))
    assert top1_accuracy(via_spec, test) == accuracy
    # The same tokens given explicitly load too; other tokens are refused, naming both.
    load_model(f'{NAS_MODEL}{{"tokens": {TOKENS}}}', out / WEIGHTS_FILE)
    other = [3, 1, 1, 0, 1, 0] * 5
    with pytest.raises(ValueError, match=r"asked for \{'tokens': \[3, 1, 1"):
        load_model(f'{NAS_MODEL}{{"tokens": {other}}}', out / WEIGHTS_FILE)


def test_a_nas_checkpoint_with_another_model_spec_or_without_tokens_json_is_refused(
    trained: tuple[Path, float], tmp_path: Path
) -> None:
    out, _ = trained
    with pytest.raises(
        ValueError, match=re.escape("give the model as lyceum.compression.nas:nas_model")
    ):
        load_model("lyceum.deploy.examples:student_mlp", out / WEIGHTS_FILE)
    alone = tmp_path / WEIGHTS_FILE
    alone.write_bytes((out / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match=f"{TOKENS_FILE}, is not beside it"):
        load_model(NAS_MODEL, alone)
    # A run that starts from the checkpoint carries tokens.json to its own directory.
    run = tmp_path / "run"
    assert carry_weights_format(out / WEIGHTS_FILE, run) == {"format": NAS_FORMAT}
    assert (run / TOKENS_FILE).read_bytes() == (out / TOKENS_FILE).read_bytes()


def test_weights_that_do_not_fit_the_tokens_and_unknown_versions_are_refused(
    trained: tuple[Path, float], tmp_path: Path
) -> None:
    out, _ = trained
    (tmp_path / TOKENS_FILE).write_text(
        Architecture(tokens=[3, 1, 1, 0, 1, 0] * 5).model_dump_json()
    )
    state = load_architecture(out).state_dict()
    save_file(state, str(tmp_path / WEIGHTS_FILE), metadata={"format": NAS_FORMAT})
    with pytest.raises(ValueError, match="weights do not fit the network"):
        load_architecture(tmp_path)
    (tmp_path / TOKENS_FILE).write_text(json.dumps({"format_version": 9, "tokens": TOKENS}))
    with pytest.raises(ValueError, match="format_version 9 is not supported"):
        load_architecture(tmp_path)


def test_nas_model_without_tokens_is_the_space_initial_network() -> None:
    model = nas_model()
    space = lightnas_space()
    assert model.architecture.tokens == space.init_tokens() and model.requested == {}
    with pytest.raises(ValueError, match="token 0 is 7, outside its range"):
        nas_model(tokens=[7] * 30)
