"""The channel plan: what was removed, as JSON, so a pruned model is rebuilt without pickle.

A plan lists, for each pruned coupling group, the layer it is keyed by and the output-channel
indices removed from it (numbered as in the unpruned layer), plus every coupled layer's removed
indices for reference. Saving writes the plan next to the pruned state dict (safetensors);
loading applies the plan to a fresh, unpruned instance from the model's factory and then loads
the weights, which gives the same module structure and bit-identical outputs. The state dict's
per-module metadata (the `version` that modules such as torchvision's MNASNet check in their
`_load_from_state_dict`) travels in the safetensors header, since safetensors keeps tensors only.

The header also says `format: lyceum-pruned`, and `PRUNED_WEIGHTS` is registered under that
name in the `lyceum.weights_formats` entry points: so `lyceum.proto.specs.load_model(spec,
"out/model.safetensors")`, and with it every `--checkpoint` and `checkpoint:` of the commands,
rebuilds the pruned model from the one path of its weights file (the plan read beside it).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lyceum.compression._io import write_bytes_atomic
from lyceum.proto.specs import WEIGHTS_FILE

__all__ = [
    "PLAN_FILE",
    "PRUNED_FORMAT",
    "PRUNED_WEIGHTS",
    "WEIGHTS_FILE",
    "PlanStep",
    "PrunePlan",
    "load_pruned",
    "read_plan",
    "save_pruned",
]

PLAN_FILE = "prune_plan.json"
PRUNED_FORMAT = "lyceum-pruned"
"""The `format` in a pruned weights file's header: its entry point in `lyceum.weights_formats`."""
_PLAN_VERSION = 1
_STATE_METADATA = "state_dict_metadata"


class PlanStep(BaseModel):
    """Output channels removed from one coupling group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: str = Field(description="Qualified name of the layer the group is keyed by.")
    removed: list[int] = Field(description="Output-channel indices removed from `layer`.")
    members: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Every coupled layer whose outputs lose channels, with the indices removed.",
    )


class PrunePlan(BaseModel):
    """A complete pruning plan for one model architecture and input shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(default=_PLAN_VERSION, description="Plan file format version.")
    input_shape: list[int] = Field(description="Shape of the example input used for tracing.")
    input_dtype: str = Field(
        default="float32", description="dtype of the example input (torch name)."
    )
    steps: list[PlanStep] = Field(default_factory=list, description="Groups, in pruning order.")

    def example_input(self) -> torch.Tensor:
        dtype = getattr(torch, self.input_dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"plan: unknown input_dtype {self.input_dtype!r}")
        return torch.zeros(self.input_shape, dtype=dtype)


def save_pruned(model: nn.Module, plan: PrunePlan, directory: str | Path) -> Path:
    """Write `prune_plan.json` and `model.safetensors` (the pruned state dict) into `directory`.

    Both are written atomically with the umask's mode (`lyceum.compression._io`), not through
    safetensors' `save_file`, whose files are 0600 since safetensors 0.8.
    """
    from safetensors.torch import save

    out = Path(directory)
    write_bytes_atomic(out / PLAN_FILE, plan.model_dump_json(indent=1).encode())
    state_dict = model.state_dict()
    state = {k: v.detach().contiguous() for k, v in state_dict.items()}
    versions = json.dumps(getattr(state_dict, "_metadata", {}))
    header = {"format": PRUNED_FORMAT, _STATE_METADATA: versions}
    write_bytes_atomic(out / WEIGHTS_FILE, save(state, metadata=header))
    return out


def read_plan(path: str | Path) -> PrunePlan:
    """Read and validate a plan file, refusing unknown format versions."""
    raw = json.loads(Path(path).read_text())
    version = raw.get("format_version")
    if version != _PLAN_VERSION:
        raise ValueError(
            f"{path}: prune plan format_version {version!r} is not supported "
            f"(this reader handles {_PLAN_VERSION}); re-export the plan"
        )
    return PrunePlan.model_validate(raw)


def _weights_and_plan(path: str | Path) -> tuple[Path, Path]:
    """The weights file and the plan of a pruned model given by its directory or weights file;
    a plan that is not beside the weights is refused, naming the fix."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise ValueError(f"pruned model {str(path)!r}: {str(weights)!r} does not exist")
    plan = weights.parent / PLAN_FILE
    if not plan.is_file():
        raise ValueError(
            f"checkpoint {str(weights)!r} holds pruned weights (narrower layers than the "
            f"model's factory builds), and the plan that rebuilds them, {PLAN_FILE}, is not "
            f"beside it in {str(weights.parent)!r}: copy {PLAN_FILE} from the `lyceum prune` "
            f"out_dir that wrote these weights next to the file (or give the model.safetensors "
            f"in that out_dir)"
        )
    return weights, plan


def load_pruned(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild a pruned model: apply the saved plan to fresh `model`, then load the weights.

    `path` is the directory `save_pruned` wrote, or the weights file in it (the plan is read
    beside it). `model` must be a new, unpruned instance from the same factory and arguments
    as the model that was pruned (`resnet_cnn(width=16)`, say). It is modified in place and
    returned.
    """
    from safetensors import safe_open

    from lyceum.compression.pruning._graph import apply_plan

    weights, plan_file = _weights_and_plan(path)
    plan = read_plan(plan_file)
    apply_plan(model, plan)
    with safe_open(str(weights), framework="pt") as f:
        state = OrderedDict((key, f.get_tensor(key)) for key in f.keys())  # noqa: SIM118
        header = f.metadata() or {}
    # Files written before the metadata was kept have none; modules then see no version.
    state._metadata = OrderedDict(json.loads(header.get(_STATE_METADATA, "{}")))  # type: ignore[attr-defined]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: weights do not match the model rebuilt with {plan_file} (missing "
            f"{missing}, unexpected {unexpected}); was the model built with the same factory "
            f"arguments, and is the plan the one written with these weights?"
        )
    return model.eval()


class PrunedWeights:
    """`lyceum.proto.specs.WeightsFormat` of pruned models: the plan beside the weights."""

    def load(self, model: nn.Module, weights: Path) -> nn.Module:
        # In the mode it came in, as a plain load_state_dict leaves it: the trainer fine-tunes
        # the model it gets without calling train() (load_pruned's callers want eval mode).
        training = model.training
        return load_pruned(model, weights).train(training)

    def companions(self, weights: Path) -> list[Path]:
        return [_weights_and_plan(weights)[1]]


PRUNED_WEIGHTS = PrunedWeights()
"""What the `lyceum-pruned` entry point names (pyproject.toml, `lyceum.weights_formats`)."""
