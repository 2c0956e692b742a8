"""Command-line arguments shared by `lyceum teacher dump` and `lyceum teacher serve`."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from lyceum.proto.specs import Spec, load_dataset, load_model, parse_spec
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine

# The engine's own defaults, so the help and the library never disagree.
_DEFAULTS = EngineConfig()


def add_model_args(parser: argparse.ArgumentParser, dataset_required: bool) -> None:
    g = parser.add_argument_group("model and data")
    g.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="Model factory as 'pkg.module:callable', optionally followed by its keyword "
        "arguments as JSON ('pkg.mod:fn{\"width\": 32}'). Required.",
    )
    g.add_argument(
        "--model-kwargs",
        metavar="JSON",
        help="Keyword arguments for the model factory as a JSON object; merged over inline "
        "ones (default: none).",
    )
    g.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="State dict to load into the model, strictly: .safetensors (a training run's "
        "model.safetensors; a `lyceum prune` out_dir's, whose prune_plan.json beside it "
        "rebuilds the pruned layers of --model), or a torch file read with weights_only=True "
        "(default: none, the factory's own weights).",
    )
    g.add_argument(
        "--dataset",
        required=dataset_required,
        metavar="SPEC",
        help="Map-style dataset factory 'pkg.module:callable' returning (input, label) items; "
        "sample id N is item N. "
        + (
            "Required."
            if dataset_required
            else "With it the teacher serves index mode (students send ids only) and reports "
            "the dataset's fingerprint (default: none, query mode only)."
        ),
    )
    g.add_argument(
        "--dataset-kwargs",
        metavar="JSON",
        help="Keyword arguments for the dataset factory as a JSON object, e.g. "
        '\'{"split": "train"}\' (default: none).',
    )
    k = parser.add_argument_group("knowledge")
    k.add_argument(
        "--output",
        action="append",
        metavar="NAME=SOURCE",
        help="A knowledge field: NAME=@output (the model's output), NAME=@output.KEY (one "
        "entry of a dict or attribute output) or NAME=MODULE (a submodule's output, e.g. "
        "feat=layer3); repeatable (default: logits=@output).",
    )
    k.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16"),
        default=_DEFAULTS.precision,
        help="The dtype of float knowledge values (default: %(default)s).",
    )
    k.add_argument(
        "--topk",
        type=int,
        metavar="K",
        help="Keep only the K largest values of the model output, with their indices, along "
        "its last dimension (default: all values, dense).",
    )
    k.add_argument(
        "--topk-values",
        choices=("float", "uint8"),
        default=_DEFAULTS.topk_values,
        help="How --topk values are stored: 'float', in the --precision dtype; 'uint8', one "
        "byte each plus a float16 offset and scale per position (error at most about "
        "(max - min) / 508 of the position's k values), read back as floats "
        "(default: %(default)s).",
    )
    k.add_argument(
        "--topk-indices",
        choices=("fixed", "elias_fano"),
        default=_DEFAULTS.topk_indices,
        help="How --topk indices are stored, losslessly: 'fixed', each in the fewest bits the "
        "vocabulary allows, largest value first; 'elias_fano', each position's indices "
        "sorted ascending and Elias-Fano coded (k=128 of 1,024 ids: 80 bytes instead of 256), "
        "values in the same order (default: %(default)s).",
    )
    k.add_argument(
        "--values",
        choices=("logits", "log_probs"),
        default=_DEFAULTS.values,
        help="Model output as raw logits, or as log-softmax(logits / --temperature) "
        "(default: %(default)s).",
    )
    k.add_argument(
        "--temperature",
        type=float,
        default=_DEFAULTS.temperature,
        metavar="T",
        help="Temperature T of --values log_probs, which it requires: raw logits have none "
        "(default: %(default)s).",
    )

    k.add_argument(
        "--score",
        metavar="NAME",
        help="Add a knowledge field NAME holding log p_teacher(token) of the 'score_ids' each "
        "dataset item or query carries per position (on-policy distillation: the teacher "
        "scores the student's own samples); with or without --topk (default: no scoring).",
    )
    k.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="The teacher's tokenizer.json (or its directory): the vocabulary's sha256 goes "
        "into the knowledge schema, so a student of another tokenizer is refused (default: "
        "the vocabulary's size only).",
    )
    k.add_argument(
        "--chunk-mib",
        type=int,
        default=_DEFAULTS.chunk_mib,
        metavar="MIB",
        help="Float32 memory of one chunk of positions in the per-token knowledge step "
        "(log-softmax, top-k, scoring), which bounds its extra memory (default: %(default)s).",
    )


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
        topk_values=args.topk_values,
        topk_indices=args.topk_indices,
        values=args.values,
        temperature=args.temperature,
        score=args.score,
        tokenizer=args.tokenizer,
        chunk_mib=args.chunk_mib,
    )


def build_engine(
    args: argparse.Namespace,
    device: str,
    example_input: torch.Tensor | dict[str, Any],
    config: EngineConfig | None = None,
) -> TeacherEngine:
    """The engine the options describe on `device`; `config`: `engine_config(args, device)`
    built earlier (to refuse bad options before loading anything)."""
    # The config first: a bad option is refused before a model is built or loaded.
    config = config if config is not None else engine_config(args, device)
    model = load_model(model_spec(args), args.checkpoint)
    return TeacherEngine(model, config, example_input)


def build_dataset(args: argparse.Namespace) -> torch.utils.data.Dataset | None:
    spec = dataset_spec(args)
    return load_dataset(spec) if spec is not None else None
