"""`compress(config)`: run a pipeline's plan, checkpointing as it goes; `lyceum compress`.

The verb: it reads and validates the config, catches SIGINT and SIGTERM for the run's
graceful stop, and runs the plan (`_run`, where the steps, checkpoints and resume are).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lyceum.compression.pipeline._run import Run
from lyceum.compression.pipeline.report import CompressResult
from lyceum.compression.pipeline.schema import PipelineConfig, load_pipeline, validate_pipeline
from lyceum.compression.pipeline.state import RunState
from lyceum.student_client._train_env import StopSignals

__all__ = ["CompressResult", "compress"]


def compress(
    config: PipelineConfig | Mapping[str, Any] | str | Path,
    *,
    resume: bool = False,
    out_dir: str | Path | None = None,
    on_checkpoint: Callable[[Path, RunState], None] | None = None,
) -> CompressResult:
    """Run the pipeline a config describes; the Python form of `lyceum compress`.

    `config`: a `PipelineConfig`, a mapping (validated) or a YAML path. `resume`: continue
    the run in `out_dir` from its checkpoint. `out_dir` overrides the config's.
    `on_checkpoint(folder, state)` is called after each checkpoint is written (tests).
    A new run is refused where another run's checkpoint is; `ValueError` for what the user
    must fix, `OSError` with its path when a file cannot be written.

    SIGINT and SIGTERM (in the main thread) stop the run gracefully: the batch in progress,
    or the stage boundary (a prune, a conversion), finishes, a checkpoint is written there
    and the result comes back with `signum` set and no report; `resume=True` continues. A
    second signal means now (the last checkpoint stands).
    """
    if isinstance(config, str | Path):
        config = load_pipeline(config)
    elif not isinstance(config, PipelineConfig):
        config = validate_pipeline(config)
    if out_dir is not None:
        config = config.model_copy(update={"out_dir": Path(out_dir)})
    with StopSignals() as stop:
        run = Run(config, on_checkpoint, stop)
        try:
            return run.run(resume)
        finally:
            run.close()
