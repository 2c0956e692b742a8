"""QAT / PTQ end to end: prepare, train or calibrate, convert, export, reload, compile."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e.fake_quantize import FakeQuantize

from lyceum.compression.quantization import (
    ACTIVATION_SCHEMES,
    PTQ,
    QAT,
    WEIGHT_SCHEMES,
    calibrate,
    compile_int8,
    convert,
    exact_int8_kernels,
    fused_int8_layers,
    load_int8,
    quantize,
    quantized_layers,
    save_program,
    train_qat,
)
from lyceum.compression.quantization.config import ActivationScheme, Observer, WeightScheme


class _TinyNet(nn.Module):
    """Conv (no BN, so QAT convert is quick) + depthwise conv + linear head on 8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.head(torch.flatten(x, 1))


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("weights", WEIGHT_SCHEMES)
@pytest.mark.parametrize("activations", ACTIVATION_SCHEMES)
def test_qat_scheme_pair_round_trips_through_export(
    weights: WeightScheme, activations: ActivationScheme, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = _TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _batches(4)
    prepared = quantize(model, QAT(weights=weights, activations=activations), data[0][0])
    assert set(quantized_layers(prepared)) == {"conv", "dw", "head"}
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        for x, y in data:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(prepared(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]  # fake-quant training does train
    # The caller's float model is not touched by QAT.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # The fake-quant model in eval mode, static activation scales frozen (weight and dynamic
    # fake-quants keep observing: they take the current weights / batch, as convert does).
    prepared.eval()
    for module in prepared.modules():
        if isinstance(module, FakeQuantize) and module.dtype == torch.uint8:
            module.disable_observer()
    x = torch.rand(5, 1, 8, 8)  # a batch size not seen at capture: the batch dim is dynamic
    fake_quant_out = prepared(x)

    converted = convert(prepared)
    int8 = {k: v for k, v in converted.state_dict().items() if v.dtype == torch.int8}
    assert sorted(tuple(v.shape) for v in int8.values()) == [(8, 1, 3, 3), (8, 1, 3, 3), (10, 128)]
    # No float copy of a quantized weight is left in the converted model.
    assert not any(
        v.dtype == torch.float32 and v.shape in {(8, 1, 3, 3), (10, 128)}
        for v in converted.state_dict().values()
    )

    expected = converted(x)
    size = save_program(converted, data[0][0], tmp_path / "m.pt2")
    assert size == (tmp_path / "m.pt2").stat().st_size
    reloaded = load_int8(tmp_path / "m.pt2").module()
    torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
    # Fake quantization (what training saw) and the converted int8 graph compute the same.
    torch.testing.assert_close(fake_quant_out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_ptq_observer_round_trips(observer: Observer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TinyNet().eval()
    data = _batches(3)
    prepared = quantize(model, PTQ(observer=observer), data[0][0])
    assert calibrate(prepared, data, num_batches=2) == 2
    converted = convert(prepared)
    save_program(converted, data[0][0], tmp_path / "m.pt2")
    x = data[2][0]
    torch.testing.assert_close(
        load_int8(tmp_path / "m.pt2").module()(x), converted(x), rtol=0, atol=0
    )
    # int8 stays close to float on this calibration distribution.
    with torch.no_grad():
        reference = model(x)
        assert float((converted(x) - reference).abs().max()) < 0.05 * float(reference.abs().max())


def test_calibration_progress_counts_the_batches_it_runs(progress_lines) -> None:
    prepared = quantize(_TinyNet().eval(), PTQ(), torch.rand(4, 1, 8, 8))
    assert calibrate(prepared, _batches(5), num_batches=3) == 3
    assert calibrate(prepared, iter(_batches(2))) == 2  # no length: a count without a total
    calibrate(prepared, _batches(1), progress=False)
    assert [line.split(",")[0] for line in progress_lines()] == [
        "calibration: 3/3 batch (100%)",
        "calibration: 2 batch",
    ]


def test_convert_before_calibration_says_what_to_do() -> None:
    prepared = quantize(_TinyNet().eval(), PTQ(), torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match="calibration batches"):
        convert(prepared)


def test_load_refuses_pickled_entries(tmp_path: Path) -> None:
    model = _TinyNet().eval()
    prepared = quantize(model, PTQ(), torch.rand(4, 1, 8, 8))
    calibrate(prepared, [torch.rand(4, 1, 8, 8)])
    good = tmp_path / "good.pt2"
    save_program(convert(prepared), torch.rand(4, 1, 8, 8), good)
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(ValueError, match="stored pickled"):
        load_int8(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_int8(tmp_path / "missing.pt2")


@pytest.mark.slow
def test_compiled_int8_lowers_to_onednn_kernels_where_they_are_exact() -> None:
    torch.manual_seed(0)
    model = _TinyNet().eval()
    x = torch.rand(8, 1, 8, 8)
    # By default oneDNN's int8 kernels are used only where this CPU computes them exactly.
    fused_by_default = 3 if exact_int8_kernels() else 0
    for weights in WEIGHT_SCHEMES:
        prepared = quantize(model, PTQ(weights=weights), x)  # type: ignore[arg-type]  # WEIGHT_SCHEMES: str
        calibrate(prepared, [x])
        converted = convert(prepared)
        # Static activations: all three layers (per-tensor weights included) lower to oneDNN.
        assert fused_int8_layers(converted, x, int8_kernels=True) == 3
        assert fused_int8_layers(converted, x) == fused_by_default
        torch.testing.assert_close(compile_int8(converted)(x), converted(x), rtol=0, atol=1e-5)
        torch._dynamo.reset()  # dynamo's cache does not key on the freezing setting
        reference = compile_int8(converted, int8_kernels=False)(x)
        torch.testing.assert_close(reference, converted(x), rtol=0, atol=1e-5)
    dynamic = quantize(model, PTQ(activations="abs_max"), x)
    calibrate(dynamic, [x])
    converted = convert(dynamic)
    # Dynamic activations: inductor fuses only the linear layer (dynamic qlinear).
    assert fused_int8_layers(converted, x, int8_kernels=True) == 1
    torch._dynamo.reset()
    torch.testing.assert_close(compile_int8(converted)(x), converted(x), rtol=0, atol=1e-5)


def test_a_cpu_without_vnni_gets_the_exact_graph_and_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On AVX2 (no VNNI, no AMX) oneDNN's uint8 x int8 products saturate in int16: there the
    default compile must not use them, and says so."""
    caps = {**torch.cpu.get_capabilities(), "avx512_vnni": False, "avx_vnni": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**caps, "amx_int8": False})
    assert not exact_int8_kernels()
    model = _TinyNet().eval()
    x = torch.rand(4, 1, 8, 8)
    prepared = quantize(model, PTQ(), x)
    calibrate(prepared, [x])
    converted = convert(prepared)
    with caplog.at_level(logging.WARNING, logger="lyceum.compression"):
        assert fused_int8_layers(converted, x) == 0
    assert "oneDNN's int8 kernels saturate on it" in caplog.text
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**caps, "avx512_vnni": True})
    assert exact_int8_kernels()


def test_distillation_loss_callable_drives_qat() -> None:
    torch.manual_seed(0)
    teacher = _TinyNet().eval()
    student = _TinyNet()
    calls: list[tuple[int, ...]] = []

    def kd_loss(outputs: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(outputs.shape))
        with torch.no_grad():
            soft = torch.softmax(teacher(inputs) / 2.0, dim=1)
        return nn.functional.kl_div(
            torch.log_softmax(outputs / 2.0, dim=1), soft, reduction="batchmean"
        )

    data = _batches(4, seed=1)
    dataset = torch.utils.data.TensorDataset(
        torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    )
    prepared = quantize(student, QAT(), data[0][0])
    with torch.no_grad():
        before = float(
            kd_loss(prepared(dataset.tensors[0]), dataset.tensors[0], dataset.tensors[1])
        )
    calls.clear()
    train_qat(prepared, dataset, epochs=3, loss_fn=kd_loss, lr=1e-2, batch_size=16)
    assert calls == [(16, 10)] * 12  # 4 batches x 3 epochs
    with torch.no_grad():
        after = float(kd_loss(prepared(dataset.tensors[0]), dataset.tensors[0], dataset.tensors[1]))
    assert after < 0.5 * before


@pytest.mark.slow
def test_importing_quantization_imports_nothing_of_the_service() -> None:
    import subprocess
    import sys

    # lyceum.proto is the contract every side shares (compression reports progress through
    # lyceum.proto.display), so it may come along; the service packages may not.
    code = (
        "import sys, lyceum.compression.quantization; "
        "bad = [m for m in sys.modules if m.startswith(('lyceum.deploy', 'lyceum.teacher_server', "
        "'lyceum.student_client'))]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_onnx_qdq_export_matches_when_onnx_is_installed(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from lyceum.compression.quantization import export_onnx

    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    prepared = quantize(_TinyNet().eval(), PTQ(), x)
    calibrate(prepared, [x])
    converted = convert(prepared)
    export_onnx(converted, x, tmp_path / "m.onnx")
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    # Unoptimised: run the QDQ graph as written (ORT's fused int8 kernels round differently).
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), options)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), converted(x), rtol=0, atol=1e-5)

    dynamic = quantize(_TinyNet().eval(), PTQ(activations="abs_max"), x)
    calibrate(dynamic, [x])
    with pytest.raises(ValueError, match="activations='abs_max'"):
        export_onnx(convert(dynamic), x, tmp_path / "d.onnx")
