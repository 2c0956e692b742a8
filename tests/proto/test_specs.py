"""Model and dataset specs: import by name, kwargs as JSON, checkpoints without pickle."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from lyceum.proto.specs import file_sha256, load_dataset, load_model, load_state_dict, parse_spec


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
        ('lyceum.deploy.examples:teacher_cnn{"widht": 3}', "calling it failed"),
        ("lyceum.deploy.examples:teacher_cnn{oops", "not valid JSON"),
    ],
)
def test_bad_model_specs_name_spec_and_reason(text, message):
    with pytest.raises(ValueError, match=message):
        load_model(text)


def test_dataset_spec_checks_items():
    ds = load_dataset('lyceum.deploy.examples:digits{"split": "val"}')
    assert len(ds) == 180
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
    with pytest.raises(ValueError, match="weights-only"):
        load_state_dict(tmp_path / "evil.pt")


def test_checkpoint_shape_mismatch_names_checkpoint(tmp_path):
    torch.save(load_model("lyceum.deploy.examples:student_mlp").state_dict(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"does not fit model"):
        load_model('lyceum.deploy.examples:student_mlp{"hidden": 7}', tmp_path / "m.pt")
