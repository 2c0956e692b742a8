"""Accuracy on digits: QAT within 0.5 point of fp32, PTQ within 1.0 point; the demo's MLP path."""

from __future__ import annotations

import pytest
import torch

from lyceum.compression.quantization import PTQ, QAT, load_int8, ptq_int8, qat_int8
from lyceum.deploy.examples import digits, student_cnn, student_mlp, train_classifier
from lyceum.proto.evaluation import top1_accuracy


@pytest.fixture(scope="module")
def trained_cnn():
    torch.manual_seed(0)
    return train_classifier(student_cnn(), digits("train"), epochs=10, seed=0)


@pytest.mark.slow
def test_qat_student_cnn_within_half_a_point(trained_cnn, digits_train, digits_test) -> None:
    x = torch.stack([digits_train[i][0] for i in range(8)])
    _, report = qat_int8(
        trained_cnn,
        digits_train,
        x,
        epochs=2,
        scheme=QAT(weights="channel_wise_abs_max", activations="moving_average_abs_max"),
        eval_dataset=digits_test,
        measure_latency=False,
    )
    assert report.fp32_accuracy is not None and report.int8_accuracy is not None
    assert report.fp32_accuracy > 0.95
    assert report.int8_accuracy >= report.fp32_accuracy - 0.005
    # int8 weights: the tensors of the int8 program are at most 0.3x those of fp32.
    assert report.int8_tensor_bytes <= 0.3 * report.fp32_tensor_bytes
    assert set(report.layers) == {"features.0.0", "features.1.0", "features.2.0", "classifier.1"}


@pytest.mark.slow
@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_ptq_student_cnn_within_one_point(trained_cnn, digits_train, digits_test, observer) -> None:
    x = torch.stack([digits_train[i][0] for i in range(8)])
    _, report = ptq_int8(
        trained_cnn,
        digits_train,
        x,
        num_batches=8,
        scheme=PTQ(observer=observer),
        eval_dataset=digits_test,
        measure_latency=False,
    )
    assert report.int8_accuracy is not None and report.fp32_accuracy is not None
    assert report.int8_accuracy >= report.fp32_accuracy - 0.01


@pytest.mark.slow
def test_demo_mlp_qat_int8_with_latency(digits_train, digits_test, tmp_path) -> None:
    torch.manual_seed(0)
    mlp = train_classifier(student_mlp(), digits_train, epochs=10, seed=0)
    x = torch.stack([digits_train[i][0] for i in range(8)])
    int8, report = qat_int8(
        mlp, digits_train, x, epochs=1, eval_dataset=digits_test, out_dir=tmp_path
    )
    assert report.int8_accuracy is not None and report.fp32_accuracy is not None
    assert report.int8_accuracy >= report.fp32_accuracy - 0.005
    assert report.program_path == str(tmp_path / "model_int8.pt2")
    assert report.fp32_eager_ms and report.fp32_compiled_ms and report.int8_compiled_ms
    assert report.latency_batch == 64
    assert report.threads == torch.get_num_threads()
    reloaded = load_int8(report.program_path).module()
    assert top1_accuracy(reloaded, digits_test) == report.int8_accuracy
    x_test = torch.stack([digits_test[i][0] for i in range(32)])
    torch.testing.assert_close(reloaded(x_test), int8(x_test), rtol=0, atol=0)


@pytest.mark.slow
def test_qat_on_a_pruned_model(trained_cnn, digits_train, digits_test) -> None:
    """A pruned model is just a smaller module: QAT + convert work on it unchanged."""
    import copy

    import torch_pruning as tp

    pruned = copy.deepcopy(trained_cnn)
    x = torch.stack([digits_train[i][0] for i in range(8)])
    pruner = tp.pruner.MagnitudePruner(
        pruned,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[pruned.classifier[1]],
    )
    pruner.step()
    assert pruned.features[0][0].out_channels == 8  # half of width 16
    int8, report = qat_int8(
        pruned, digits_train, x, epochs=2, eval_dataset=digits_test, measure_latency=False
    )
    shapes = sorted(tuple(t.shape) for t in int8.state_dict().values() if t.dtype == torch.int8)
    assert shapes == [(8, 1, 3, 3), (10, 64), (16, 8, 3, 3), (16, 16, 3, 3)]
    assert report.int8_accuracy is not None and report.int8_accuracy > 0.9
