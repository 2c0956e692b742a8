"""Int8 quantization with PaddleSlim's schemes on torchao's PT2E flow (QAT and PTQ).

    from lyceum.compression.quantization import QAT, quantize, convert, save_program
    prepared = quantize(model, QAT(weights="channel_wise_abs_max",
                                   activations="moving_average_abs_max"), example_inputs)
    ...train prepared with any loss...
    int8 = convert(prepared)
    save_program(int8, example_inputs, "model_int8.pt2")

`qat_int8` / `ptq_int8` do the whole run and return a `QuantReport`.
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
    export_onnx,
    export_program,
    fused_int8_layers,
    load_int8,
    save_program,
)
from .job import REPORT_FILE, QuantizeJobConfig, quantize_job
from .observers import AbsMaxObserver, HistogramAbsMaxObserver, MovingAverageAbsMaxObserver
from .quantizer import PaddleSlimQuantizer, quantizable_layers
from .workflow import (
    LossFn,
    QuantReport,
    evaluate,
    median_latency_ms,
    ptq_int8,
    qat_int8,
    report,
    tensor_bytes,
    train_qat,
)

__all__ = [
    "ACTIVATION_SCHEMES",
    "PTQ",
    "QAT",
    "REPORT_FILE",
    "WEIGHT_SCHEMES",
    "AbsMaxObserver",
    "ActivationScheme",
    "HistogramAbsMaxObserver",
    "LayerOverride",
    "LossFn",
    "MovingAverageAbsMaxObserver",
    "Observer",
    "PaddleSlimQuantizer",
    "QuantReport",
    "QuantizeJobConfig",
    "WeightScheme",
    "calibrate",
    "capture",
    "compile_int8",
    "convert",
    "evaluate",
    "export_onnx",
    "export_program",
    "fused_int8_layers",
    "load_int8",
    "median_latency_ms",
    "ptq_int8",
    "qat_int8",
    "quantizable_layers",
    "quantize",
    "quantize_job",
    "quantized_layers",
    "report",
    "save_program",
    "tensor_bytes",
    "train_qat",
]
