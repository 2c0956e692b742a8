"""`lyceum quantize CONFIG.yaml`: parse, build the model and data sets from specs, run, report.

The library (`lyceum.compression.quantization.quantize_job`) takes built objects; specs and
the checkpoint are resolved here (lyceum.deploy._jobs) so that the library never imports by
name. The output is a plan line before the work, the fp32/int8 table and a Python snippet
that loads the int8 program.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lyceum.deploy._jobs import add_job_parser, build_model, build_split, load_job_config
from lyceum.student_client.losses import soft_label_kd

if TYPE_CHECKING:
    from pydantic import BaseModel

    from lyceum.compression.quantization import QuantizeJobConfig, QuantReport


def load_config(path: str | Path) -> QuantizeJobConfig:
    from lyceum.compression.quantization import QuantizeJobConfig

    return load_job_config(path, QuantizeJobConfig, "quantize")


def run_quantize_job(config: QuantizeJobConfig, *, plan: bool = False) -> QuantReport:
    """Build the model and the two splits from their specs and run the job; with `plan`,
    print the plan line first (flushed: the job can run for minutes)."""
    # Imported here: torchao is heavy (and noisy on import); only this command needs it.
    from lyceum.compression.quantization import describe_quantize_job, quantize_job

    model = build_model(config.model, config.model_kwargs, config.checkpoint)
    train = build_split(config.dataset, config.dataset_kwargs, config.train_split)
    test = build_split(config.dataset, config.dataset_kwargs, config.test_split)
    if plan:
        print(describe_quantize_job(config, train_data=train, test_data=test), flush=True)
    teacher, distill_loss = None, None
    if config.teacher is not None:
        spec = config.teacher
        teacher = build_model(spec.model, spec.model_kwargs, spec.checkpoint)
        distill_loss = partial(soft_label_kd, temperature=spec.temperature)
    return quantize_job(
        config,
        model=model,
        train_data=train,
        test_data=test,
        teacher=teacher,
        distill_loss=distill_loss,
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def load_snippet(program: str | Path) -> str:
    """Python that loads the int8 program (checked first: it refuses archives that unpickle)."""
    return "\n".join(
        [
            "from lyceum.compression.quantization import load_int8",
            f"model = load_int8({str(program)!r}).module()",
        ]
    )


def summary(config: QuantizeJobConfig, report: QuantReport) -> str:
    """The fp32/int8 table, the settings it was measured with, and how to load the result."""
    rows = [
        ("", "fp32", "int8"),
        (f"{config.test_split} accuracy", _acc(report.fp32_accuracy), _acc(report.int8_accuracy)),
        ("program bytes", f"{report.fp32_bytes:,}", f"{report.int8_bytes:,}"),
        ("tensor bytes", f"{report.fp32_tensor_bytes:,}", f"{report.int8_tensor_bytes:,}"),
        ("compiled ms", _ms(report.fp32_compiled_ms), _ms(report.int8_compiled_ms)),
    ]
    lines = [f"{r[0]:<15}{r[1]:>14}{r[2]:>14}" for r in rows]
    lines.append(
        f"{report.mode} weights={report.weights} activations={report.activations}; "
        f"eager fp32 {_ms(report.fp32_eager_ms)} ms (batch {report.latency_batch}, "
        f"{report.threads} threads); "
        f"written to {config.out_dir}"
    )
    note = config.untrained_note()
    if note is not None:
        lines.append(note)
    lines.append(
        "Load the int8 program in Python (plain torch.export.load works too, after "
        "`import torchao`: it registers the quantized_decomposed ops the program calls):"
    )
    # quantize_job always saves into out_dir, so the report has the program's path.
    lines.append(load_snippet(str(report.program_path)))
    return "\n".join(lines)


def _run(path: Path) -> str:
    config = load_config(path)
    return summary(config, run_quantize_job(config, plan=True))


def _config_class() -> type[BaseModel]:
    from lyceum.compression.quantization import QuantizeJobConfig

    return QuantizeJobConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `quantize` on the `lyceum` CLI's subparsers; dispatch with `args.func(args)`."""
    return add_job_parser(
        subparsers,
        "quantize",
        help="int8 quantization (QAT or PTQ, PaddleSlim schemes) to a torch.export program",
        description="Quantize a model to int8 as described by a YAML job config: prints the\n"
        "plan, shows progress on stderr, then prints the fp32/int8 table and the Python that\n"
        "loads the result. Writes model_int8.pt2, model_fp32.pt2 and report.json to out_dir.\n"
        "Python: lyceum.compression.quantization.quantize_job.",
        config=(_config_class, "lyceum.compression.quantization.QuantizeJobConfig"),
        run=_run,
    )
