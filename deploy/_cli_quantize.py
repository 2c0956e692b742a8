"""`lyceum quantize CONFIG.yaml`: parse, build the model and data sets from specs, run, report.

The library (`lyceum.compression.quantization.quantize_job`) takes built objects; specs and
the checkpoint are resolved here (lyceum.deploy._jobs) so that the library never imports by
name.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lyceum.deploy._jobs import build_model, build_split, load_job_config
from lyceum.student_client.losses import soft_label_kd

if TYPE_CHECKING:
    from lyceum.compression.quantization import QuantizeJobConfig, QuantReport


def load_config(path: str | Path) -> QuantizeJobConfig:
    from lyceum.compression.quantization import QuantizeJobConfig

    return load_job_config(path, QuantizeJobConfig, "quantize")


def run_quantize_job(config: QuantizeJobConfig) -> QuantReport:
    """Build the model and the two splits from their specs and run the job."""
    # Imported here: torchao is heavy (and noisy on import); only this command needs it.
    from lyceum.compression.quantization import quantize_job

    model = build_model(config.model, config.model_kwargs, config.checkpoint)
    train = build_split(config.dataset, config.dataset_kwargs, config.train_split)
    test = build_split(config.dataset, config.dataset_kwargs, config.test_split)
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


def _summary(report: QuantReport, out_dir: Path) -> str:
    rows = [
        ("", "fp32", "int8"),
        ("accuracy", _acc(report.fp32_accuracy), _acc(report.int8_accuracy)),
        ("program bytes", f"{report.fp32_bytes:,}", f"{report.int8_bytes:,}"),
        ("tensor bytes", f"{report.fp32_tensor_bytes:,}", f"{report.int8_tensor_bytes:,}"),
        ("compiled ms", _ms(report.fp32_compiled_ms), _ms(report.int8_compiled_ms)),
    ]
    lines = [f"{r[0]:<15}{r[1]:>14}{r[2]:>14}" for r in rows]
    lines.append(
        f"{report.mode} weights={report.weights} activations={report.activations}; "
        f"eager fp32 {_ms(report.fp32_eager_ms)} ms (batch {report.latency_batch}, "
        f"{report.threads} threads); "
        f"written to {out_dir}"
    )
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    report = run_quantize_job(config)
    print(_summary(report, config.out_dir))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `quantize` on the `lyceum` CLI's subparsers; dispatch with `args.func(args)`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "quantize",
        help="int8 quantization (QAT or PTQ, PaddleSlim schemes) to a torch.export program",
        description="Quantize a model to int8 as described by a YAML job config "
        "(lyceum.compression.quantization.QuantizeJobConfig); writes model_int8.pt2 and report.json.",
    )
    parser.add_argument("config", type=Path, help="YAML job config")
    parser.set_defaults(func=_command)
    return parser
