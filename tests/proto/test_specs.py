"""Model and dataset specs: import by name, kwargs as JSON, checkpoints without pickle."""

from __future__ import annotations

import pickle
import random
import re

import pytest
import torch
from safetensors.torch import save_file

from lyceum.proto.checksum import file_sha256
from lyceum.proto.specs import load_dataset, load_model, load_state_dict, parse_spec


def test_parse_inline_and_separate_kwargs():
    spec = parse_spec('lyceum.deploy.examples:teacher_cnn{"width": 8}', '{"num_classes": 3}')
    assert spec.target == "lyceum.deploy.examples:teacher_cnn"
    assert spec.kwargs == {"width": 8, "num_classes": 3}
    model = load_model(spec)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lyceum.deploy.examples", "expected 'package.module:callable'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("lyceum.deploy.examples:nothing", "has no attribute 'nothing'"),
        ("lyceum.deploy.examples:_N_TEST", "not callable"),
        ("lyceum.deploy.examples:digits", "not a torch.nn.Module"),
        (
            'lyceum.deploy.examples:teacher_cnn{"widht": 3}',
            "calling it raised TypeError: .*unexpected keyword argument 'widht'$",
        ),
        ("lyceum.deploy.examples:teacher_cnn{oops", "not valid JSON"),
    ],
)
def test_bad_model_specs_name_spec_and_reason(text, message):
    with pytest.raises(ValueError, match=message):
        load_model(text)


def test_dataset_spec_checks_items():
    ds = load_dataset('lyceum.deploy.examples:digits{"split": "val"}')
    assert len(ds) == 180  # type: ignore[arg-type]  # Dataset declares no __len__; Digits has one
    with pytest.raises(ValueError, match="not a map-style dataset"):
        load_dataset("lyceum.deploy.examples:teacher_cnn")
    with pytest.raises(ValueError, match=r"\(input, label\) pairs"):
        load_dataset('collections:UserList{"initlist": [1, 2]}')


def test_checkpoints_torch_and_safetensors(tmp_path):
    model = load_model("lyceum.deploy.examples:student_mlp")
    state = model.state_dict()
    torch.save(state, tmp_path / "m.pt")
    save_file(state, str(tmp_path / "m.safetensors"))
    for name in ("m.pt", "m.safetensors"):
        loaded = load_model("lyceum.deploy.examples:student_mlp", tmp_path / name)
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, state[k])
    assert len(file_sha256(tmp_path / "m.pt")) == 64


def test_checkpoint_that_needs_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(ValueError, match=r"holds pickled Python objects.*never unpickles"):
        load_state_dict(tmp_path / "evil.pt")


def test_pickled_whole_module_says_how_to_convert_without_torch_advice(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(load_model("lyceum.deploy.examples:student_mlp"), path)
    with pytest.raises(ValueError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert f"checkpoint {str(path)!r} holds pickled Python objects" in message
    assert "(torch.nn.modules.container.Sequential)" in message  # what student_mlp returns
    assert "Lyceum never unpickles a file" in message
    assert "torch.save(obj.state_dict(), 'model.pt')" in message
    # torch's own advice (re-run torch.load with weights_only=False here, allow-list globals)
    # is not passed on: only the conversion in a process the user trusts.
    assert "In PyTorch 2.6" not in message and "add_safe_globals" not in message
    assert "\n" not in message


def _state_bytes(tmp_path, name):
    model = load_model("lyceum.deploy.examples:student_mlp")
    if name.endswith(".safetensors"):
        save_file(model.state_dict(), str(tmp_path / name))
    else:
        torch.save(model.state_dict(), tmp_path / name)
    return (tmp_path / name).read_bytes()


@pytest.mark.parametrize(
    ("name", "damage", "phrase"),
    [
        ("m.safetensors", lambda b: b[: len(b) // 2], "not a readable safetensors file"),
        (
            "m.safetensors",
            lambda b: random.Random(0).randbytes(len(b)),
            "not a readable safetensors",
        ),
        ("m.safetensors", lambda b: b"", "not a readable safetensors file"),
        ("m.pt", lambda b: b[: len(b) // 2], "not a readable torch file"),
        ("m.pt", lambda b: random.Random(0).randbytes(len(b)), "not a readable torch file"),
    ],
)
def test_corrupt_checkpoint_names_file_and_how_to_recreate(tmp_path, name, damage, phrase):
    path = tmp_path / name
    path.write_bytes(damage(_state_bytes(tmp_path, name)))
    with pytest.raises(ValueError) as err:
        load_model("lyceum.deploy.examples:student_mlp", path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {str(path)!r} is {phrase}"), message
    assert "truncated, damaged or of another format; re-create it with" in message
    assert ("save_file(" if name.endswith(".safetensors") else "torch.save(") in message


def test_checkpoint_with_more_than_tensors_names_the_other_keys(tmp_path):
    state = load_model("lyceum.deploy.examples:student_mlp").state_dict()
    torch.save({"model": state, "epoch": 3}, tmp_path / "train.pt")
    with pytest.raises(
        ValueError, match=r"besides tensors it holds 'model' \(OrderedDict\), 'epoch' \(int\)"
    ):
        load_state_dict(tmp_path / "train.pt")
    with pytest.raises(ValueError, match="does not exist: check the path"):
        load_state_dict(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="is not a file"):
        load_state_dict(tmp_path)


def test_factory_that_raises_shows_its_own_error_and_the_spec():
    with pytest.raises(ValueError) as err:
        load_model('tests._support.broken_factories:model_that_raises{"width": 3}')
    message = str(err.value)
    assert message.startswith(
        'model spec tests._support.broken_factories:model_that_raises{"width": 3}: calling it raised '
        "RuntimeError: width 3 needs a GPU (at broken_factories.py:"
    ), message
    assert isinstance(err.value.__cause__, RuntimeError)  # chained, for --debug
    with pytest.raises(
        ValueError,
        match=re.escape(
            "dataset spec tests._support.broken_factories:dataset_that_raises: "
            "calling it raised KeyError: 'split'"
        ),
    ):
        load_dataset("tests._support.broken_factories:dataset_that_raises")


def test_module_that_fails_to_import_is_named():
    with pytest.raises(ValueError) as err:
        load_model("tests._support.broken_factories_import:anything")
    message = str(err.value)
    assert message.startswith(
        "spec 'tests._support.broken_factories_import:anything': importing module 'tests._support.broken_factories_import' "
        "raised ZeroDivisionError: division by zero (at broken_factories_import.py:"
    ), message


def test_spec_without_colon_is_a_plain_value_error():
    with pytest.raises(ValueError) as err:
        parse_spec("nocolon")
    assert type(err.value) is ValueError  # not a pydantic dump about a field 'target'
    assert str(err.value).startswith("spec 'nocolon': expected 'package.module:callable'")


def test_checkpoint_shape_mismatch_names_checkpoint(tmp_path):
    torch.save(load_model("lyceum.deploy.examples:student_mlp").state_dict(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"does not fit model"):
        load_model('lyceum.deploy.examples:student_mlp{"hidden": 7}', tmp_path / "m.pt")
