"""Int8 quantization with PaddleSlim's schemes on torchao's PT2E flow (QAT and PTQ).

    from lyceum.compression.quantization import QAT, quantize, convert, save_program, load_int8
    prepared = quantize(model, QAT(weights="channel_wise_abs_max",
                                   activations="moving_average_abs_max"), example_inputs)
    ...train prepared with any loss...
    int8 = convert(prepared)
    save_program(int8, example_inputs, "model_int8.pt2")
    program = load_int8("model_int8.pt2")   # elsewhere: import torchao, then torch.export.load

`qat_int8` / `ptq_int8` do the whole run and return a `QuantReport`. The helpers they measure
with (`workflow.tensor_bytes`, `workflow.report`; accuracy is `lyceum.proto.evaluation.
top1_accuracy`, latency `lyceum.compression.analysis.measure_latency`) are not part of this
package's API.
"""

from ._quiet import quiet_import_logs

with quiet_import_logs():
    import torchao  # noqa: F401  (imported first, quietly; the modules below use it)

from .api import calibrate, capture, convert, quantize, quantized_layers
from .config import (
    ACTIVATION_SCHEMES,
    PTQ,
    QAT,
    WEIGHT_SCHEMES,
    ActivationScheme,
    LayerOverride,
    Observer,
    WeightScheme,
)
from .export import (
    compile_int8,
    exact_int8_kernels,
    export_onnx,
    export_program,
    fused_int8_layers,
    load_int8,
    save_program,
)
from .job import REPORT_FILE, QuantizeJobConfig, describe_quantize_job, quantize_job
from .observers import AbsMaxObserver, HistogramAbsMaxObserver, MovingAverageAbsMaxObserver
from .quantizer import PaddleSlimQuantizer, quantizable_layers
from .workflow import LossFn, QuantReport, ptq_int8, qat_int8, train_qat

__all__ = [
    # the verbs and their configs: quantize, (train or) calibrate, convert
    "quantize",
    "calibrate",
    "convert",
    "QAT",
    "PTQ",
    "LayerOverride",
    # a whole run in one call, or the `lyceum quantize CONFIG.yaml` job
    "qat_int8",
    "ptq_int8",
    "train_qat",
    "QuantReport",
    "LossFn",
    "quantize_job",
    "describe_quantize_job",
    "QuantizeJobConfig",
    "REPORT_FILE",
    # the int8 program: save, load, export, compile
    "save_program",
    "load_int8",
    "export_program",
    "export_onnx",
    "compile_int8",
    "exact_int8_kernels",
    # PaddleSlim's schemes and the observers and quantizer behind them
    "WEIGHT_SCHEMES",
    "ACTIVATION_SCHEMES",
    "WeightScheme",
    "ActivationScheme",
    "Observer",
    "AbsMaxObserver",
    "MovingAverageAbsMaxObserver",
    "HistogramAbsMaxObserver",
    "PaddleSlimQuantizer",
    # inspecting a model: its graph, and which layers are (or can be) int8
    "capture",
    "quantizable_layers",
    "quantized_layers",
    "fused_int8_layers",
]
