"""`lyceum quantize CONFIG.yaml`: parse, build the model and data sets from specs, run, report.

The library (`lyceum.compression.quantization.quantize_job`) takes built objects; resolving the
`module:callable` spec strings happens here so that the library never imports by name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lyceum.compression.quantization import QuantizeJobConfig, QuantReport, quantize_job

__all__ = ["add_parser", "load_config", "main", "resolve_spec", "run_quantize_job"]


def resolve_spec(spec: str) -> Callable[..., Any]:
    """Import `module:callable` (no eval, no pickle) and return the callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"spec {spec!r}: expected 'module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"spec {spec!r}: cannot import module {module_name!r}: {e}") from e
    target = getattr(module, attr, None)
    if not callable(target):
        raise ValueError(f"spec {spec!r}: module {module_name!r} has no callable {attr!r}")
    return target


def load_config(path: str | Path) -> QuantizeJobConfig:
    """Read a YAML job config; errors name the offending key (e.g. 'scheme.qat.wieghts')."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        return QuantizeJobConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in e.errors()
        )
        raise ValueError(f"{path}: invalid quantize config: {problems}") from None


def run_quantize_job(config: QuantizeJobConfig) -> QuantReport:
    """Build the model and the two splits from their specs and run the job."""
    model = resolve_spec(config.model)(**config.model_kwargs)
    dataset = resolve_spec(config.dataset)
    train = dataset(split=config.train_split, **config.dataset_kwargs)
    test = dataset(split=config.test_split, **config.dataset_kwargs)
    return quantize_job(config, model=model, train_data=train, test_data=test)


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


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m lyceum.deploy._cli_quantize CONFIG.yaml`)."""
    top = argparse.ArgumentParser(prog="lyceum")
    add_parser(top.add_subparsers(dest="command", required=True))
    args = top.parse_args(["quantize", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except ValueError as e:
        top.exit(2, f"lyceum quantize: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
