"""The channel plan: what was removed, as JSON, so a pruned model is rebuilt without pickle.

A plan lists, for each pruned coupling group, the layer it is keyed by and the output-channel
indices removed from it (numbered as in the unpruned layer), plus every coupled layer's removed
indices for reference. Saving writes the plan next to the pruned state dict (safetensors);
loading applies the plan to a fresh, unpruned instance from the model's factory and then loads
the weights, which gives the same module structure and bit-identical outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

__all__ = [
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "PlanStep",
    "PrunePlan",
    "load_pruned",
    "read_plan",
    "save_pruned",
]

PLAN_FILE = "prune_plan.json"
WEIGHTS_FILE = "model.safetensors"
_PLAN_VERSION = 1


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
    """Write `prune_plan.json` and `model.safetensors` (the pruned state dict) into `directory`."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(plan.model_dump_json(indent=1))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "lyceum-pruned"})
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


def load_pruned(model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild a pruned model: apply the saved plan to fresh `model`, then load the weights.

    `model` must be a new, unpruned instance from the same factory and arguments as the model
    that was pruned (`resnet_cnn(width=16)`, say). It is modified in place and returned.
    """
    from safetensors.torch import load_file

    from lyceum.compression.pruning._graph import apply_plan

    directory = Path(directory)
    plan = read_plan(directory / PLAN_FILE)
    apply_plan(model, plan)
    state = load_file(str(directory / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not match the rebuilt model (missing {missing}, "
            f"unexpected {unexpected}); was the model built with the same factory arguments?"
        )
    return model.eval()
