"""The compression pipeline: one YAML that trains (distils), prunes and quantizes a model in
sequence or in PaddleSlim-style epoch windows, resumable, with a report of every stage.

    from lyceum.compression.pipeline import compress
    result = compress("deploy/configs/compress.yaml")   # or a PipelineConfig, a mapping
    print(result.report)

`lyceum compress PIPELINE.yaml [--resume] [--out DIR]` is the same verb from the command line.
"""

from lyceum.compression.pipeline.report import StageRow, format_report
from lyceum.compression.pipeline.runner import CompressResult, compress
from lyceum.compression.pipeline.schema import (
    PipelineConfig,
    PruneStage,
    QuantizeStage,
    Stage,
    TrainStage,
    Window,
    load_pipeline,
    validate_pipeline,
)
from lyceum.compression.pipeline.state import RunState

__all__ = [
    "CompressResult",
    "PipelineConfig",
    "PruneStage",
    "QuantizeStage",
    "RunState",
    "Stage",
    "StageRow",
    "TrainStage",
    "Window",
    "compress",
    "format_report",
    "load_pipeline",
    "validate_pipeline",
]
