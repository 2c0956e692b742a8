"""Command-line arguments shared by `lyceum teacher dump` and `lyceum teacher serve`."""

from __future__ import annotations

import argparse

import torch

from lyceum.proto.specs import Spec, load_dataset, load_model, parse_spec
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine


def add_model_args(parser: argparse.ArgumentParser, dataset_required: bool) -> None:
    g = parser.add_argument_group("model and data")
    g.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="model factory 'pkg.module:callable' (optionally followed by JSON kwargs)",
    )
    g.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for the model factory")
    g.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="state dict to load: .safetensors, or a torch file read with weights_only=True",
    )
    g.add_argument(
        "--dataset",
        required=dataset_required,
        metavar="SPEC",
        help="map-style dataset factory 'pkg.module:callable' returning (input, label) items",
    )
    g.add_argument("--dataset-kwargs", metavar="JSON", help="keyword arguments for the dataset")
    k = parser.add_argument_group("knowledge")
    k.add_argument(
        "--output",
        action="append",
        metavar="NAME=SOURCE",
        help="a knowledge field: NAME=@output (the model output), NAME=@output.KEY, or "
        "NAME=MODULE (a submodule's output, e.g. feat=layer3); repeatable; default logits=@output",
    )
    k.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    k.add_argument("--topk", type=int, metavar="K", help="keep the top-k of the model output")
    k.add_argument(
        "--values",
        choices=("logits", "log_probs"),
        default="logits",
        help="model output as raw logits or log-softmax(logits / --temperature)",
    )
    k.add_argument("--temperature", type=float, default=1.0)


def model_spec(args: argparse.Namespace) -> Spec:
    return parse_spec(args.model, args.model_kwargs)


def dataset_spec(args: argparse.Namespace) -> Spec | None:
    return parse_spec(args.dataset, args.dataset_kwargs) if args.dataset else None


def engine_config(args: argparse.Namespace, device: str) -> EngineConfig:
    outputs = tuple(OutputSpec.parse(o) for o in (args.output or ["logits=@output"]))
    return EngineConfig(
        outputs=outputs,
        device=device,
        precision=args.precision,
        topk=args.topk,
        values=args.values,
        temperature=args.temperature,
    )


def build_engine(
    args: argparse.Namespace, device: str, example_input: torch.Tensor
) -> TeacherEngine:
    model = load_model(model_spec(args), args.checkpoint)
    return TeacherEngine(model, engine_config(args, device), example_input)


def build_dataset(args: argparse.Namespace) -> torch.utils.data.Dataset | None:
    spec = dataset_spec(args)
    return load_dataset(spec) if spec is not None else None
