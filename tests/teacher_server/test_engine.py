"""The teacher engine: output hooks, precision, top-k, log-probs, token-level knowledge."""

# `TeacherEngine.infer` returns `Tensor | list[Tensor]` per field (lists for variable-length
# fields); every field here is dense, a Tensor.
# mypy: disable-error-code="arg-type,union-attr"

from __future__ import annotations

import pytest
import torch
from torch import nn

from lyceum.deploy.examples import digits, teacher_cnn, tiny_lm, token_sequences
from lyceum.proto import TopK, decode, encode
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    ds = digits("test")
    return torch.stack([ds[i][0] for i in range(6)])


def _outputs(*texts: str) -> tuple[OutputSpec, ...]:
    return tuple(OutputSpec.parse(t) for t in texts)


def test_model_output_and_hooked_submodule(images):
    torch.manual_seed(0)
    model = teacher_cnn(width=8).eval()
    engine = TeacherEngine(
        model, EngineConfig(outputs=_outputs("logits=@output", "feat=layer2")), images[0]
    )
    cols = engine.infer(images)
    with torch.no_grad():
        feat = model.layer2(model.layer1(images))
        logits = model(images)
    assert torch.equal(cols["logits"], logits)
    assert torch.equal(cols["feat"], feat)
    assert [f.describe() for f in engine.schema.fields] == [
        "logits: float32 [10] dense logits",
        "feat: float32 [16, 4, 4] dense features",
    ]
    assert engine.input_schema.fields[0].shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_precision_casts_float_outputs(images, precision, dtype):
    torch.manual_seed(0)
    model = teacher_cnn(width=8).eval()
    engine = TeacherEngine(model, EngineConfig(precision=precision), images[0])
    cols = engine.infer(images)
    with torch.no_grad():
        want = model(images).to(dtype)
    assert cols["logits"].dtype == dtype and torch.equal(cols["logits"], want)
    # The codec carries the reduced precision unchanged.
    batch = decode(encode(engine.schema, range(6), cols), engine.schema)
    assert torch.equal(batch.tensors["logits"], want)


def test_topk_of_log_probs_at_temperature(images):
    torch.manual_seed(0)
    model = teacher_cnn(width=8).eval()
    config = EngineConfig(topk=3, values="log_probs", temperature=2.0)
    engine = TeacherEngine(model, config, images[0])
    cols = engine.infer(images)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(images) / 2.0, dim=-1)
    values, indices = torch.topk(log_probs, 3, dim=-1)
    assert torch.allclose(cols["logits.values"], values)
    assert torch.equal(cols["logits.indices"], indices.to(torch.int32))
    field = engine.schema.fields[0]
    assert (
        field.encoding == TopK(k=3, index_bits=8)
        and field.meaning == "log_probs"
        and field.temperature == 2.0
    )
    assert field.shape == (10,)


def test_token_level_topk_for_variable_length_sequences():
    torch.manual_seed(0)
    model = tiny_lm(vocab=40).eval()
    seqs = token_sequences(n=5, vocab=40)
    samples = [seqs[i][0] for i in range(5)]
    engine = TeacherEngine(model, EngineConfig(topk=4, values="log_probs"), samples[0])
    field = engine.schema.fields[0]
    assert field.shape == (None, 40) and field.variable and field.stored_shape == (None, 4)
    assert engine.input_schema.fields[0].shape == (None,)
    cols = engine.infer(engine.collate_batch(samples))
    for i, tokens in enumerate(samples):
        with torch.no_grad():
            alone = torch.log_softmax(model(tokens.unsqueeze(0))[0], dim=-1)
        values, indices = torch.topk(alone, 4, dim=-1)
        assert cols["logits.values"][i].shape == (len(tokens), 4)
        # Padding the batch must not change a causal model's real positions.
        assert torch.allclose(cols["logits.values"][i], values, atol=1e-5)
        assert torch.equal(cols["logits.indices"][i], indices.to(torch.int32))
    decoded = decode(encode(engine.schema, range(5), cols), engine.schema)
    assert decoded.tensors["logits.values"].is_nested


class _DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"logits": h, "hidden": h * 2}


def test_output_key_of_dict_outputs():
    engine = TeacherEngine(
        _DictModel(),
        EngineConfig(outputs=_outputs("z=@output.logits", "h=@output.hidden")),
        torch.zeros(4),
    )
    cols = engine.infer(torch.ones(2, 4))
    assert torch.equal(cols["h"], cols["z"] * 2)
    with pytest.raises(ValueError, match=r"use @output\.KEY"):
        TeacherEngine(_DictModel(), EngineConfig(), torch.zeros(4))


def test_bad_outputs_are_named(images):
    with pytest.raises(ValueError, match=r"no submodule 'layer9'"):
        TeacherEngine(teacher_cnn(width=8), EngineConfig(outputs=_outputs("f=layer9")), images[0])
    with pytest.raises(ValueError, match=r"expected NAME=@output"):
        OutputSpec.parse("just-a-name")
    with pytest.raises(ValueError, match="unique"):
        EngineConfig(outputs=_outputs("a=@output", "a=layer1"))
    with pytest.raises(ValueError, match="top-k needs"):
        TeacherEngine(teacher_cnn(width=8), EngineConfig(topk=11), images[0])
    with pytest.raises(ValueError, match="device 'gpu0'"):
        EngineConfig(device="gpu0")


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.spare = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_output_of_a_module_off_the_forward_path_is_named():
    config = EngineConfig(outputs=_outputs("logits=@output", "h=spare"))
    with pytest.raises(ValueError, match=r"'spare' did not run in the model's forward"):
        TeacherEngine(_Unused(), config, torch.zeros(4))


def test_numpy_samples_are_accepted(images):
    torch.manual_seed(0)
    model = teacher_cnn(width=8).eval()
    engine = TeacherEngine(model, EngineConfig(), images[0].numpy())
    batch = engine.collate_batch([x.numpy() for x in images])
    assert torch.equal(engine.infer(batch)["logits"], engine.infer(images)["logits"])


def test_a_temperature_needs_log_probs():
    """Raw logits have no temperature: one given with them used to be dropped silently (and
    the knowledge said T=1)."""
    with pytest.raises(ValueError) as err:
        EngineConfig(temperature=3.0)
    assert "--temperature 3 applies only to log-probabilities" in str(err.value)
    assert "add --values log_probs" in str(err.value) and "drop --temperature" in str(err.value)
    engine = TeacherEngine(
        teacher_cnn(width=8),
        EngineConfig(values="log_probs", temperature=3.0),
        torch.zeros(1, 8, 8),
    )
    assert engine.schema.fields[0].temperature == 3.0
    assert EngineConfig(temperature=1.0).temperature == 1.0  # the default is no temperature
