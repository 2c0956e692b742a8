"""How the student is spread over torchrun ranks (`parallel`), and how its state reaches the
checkpoint and comes back.

- `ddp`: every rank holds the whole model; DDP all-reduces the gradients.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards the parameters, gradients and
  optimizer state over the ranks, for a student that does not fit one device. Each block is
  sharded on its own (the classes a Hugging Face model names in `_no_split_modules`, else
  every child module holding parameters), then the root, so a forward gathers one block's
  parameters at a time. Runs on CPU with gloo as on CUDA with nccl.

Checkpoints hold full, unsharded state dicts either way: under FSDP they are gathered to
rank 0 (a collective: every rank calls `model_state` and `optimizer_state`), the
optimizer's keyed by parameter index as `Optimizer.state_dict()` keys it. So an FSDP run's
`last.pt` and `model.safetensors` are the files a DDP run writes: either resumes the other's,
and `prune`, `quantize` and `teacher serve` read its weights as any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from lyceum.student_client._train_env import Distributed

__all__ = ["ModelStates", "distribute", "gradient_sync", "total_norm"]

_GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL = StateDictOptions(full_state_dict=True)


def distribute(net: nn.Module, model: nn.Module, env: Distributed, parallel: str) -> nn.Module:
    """What the run steps through: `net` (the student, or it wrapped to return feature
    maps) as is in one process, else wrapped in DDP, or with `model` sharded in place."""
    if not env.enabled:
        return net
    if parallel == "fsdp":
        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return net
    cuda = env.device.type == "cuda"
    return nn.parallel.DistributedDataParallel(net, device_ids=[env.device.index] if cuda else None)


def _blocks(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    return [c for c in model.children() if any(True for _ in c.parameters())]


def gradient_sync(
    net: nn.Module, model: nn.Module, sync: bool
) -> contextlib.AbstractContextManager[Any]:
    """The ranks reduce the gradients of the backward in this context only if `sync` (the
    last batch of an accumulation group); before it each rank accumulates its own."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(net, nn.parallel.DistributedDataParallel):
        return net.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def total_norm(norm: Tensor) -> float:
    """A norm `clip_grad_norm_` returned, as a number (under FSDP a DTensor of the shards)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


class ModelStates:
    """The student's and its optimizer's state as the checkpoint holds it (see the module
    docstring); the optimizer covers the student's parameters only under FSDP."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.sharded = isinstance(model, FSDPModule)
        self._names = [name for name, _ in model.named_parameters()]

    def model_state(self) -> dict[str, Tensor]:
        """The full state dict (under FSDP: on rank 0, empty on the others)."""
        if not self.sharded:
            return self.model.state_dict()
        return get_model_state_dict(self.model, options=_GATHERED)

    def optimizer_state(self) -> dict[str, Any]:
        """`Optimizer.state_dict()`'s form (under FSDP: on rank 0, empty on the others)."""
        if not self.sharded:
            return self.optimizer.state_dict()
        by_name = get_optimizer_state_dict(self.model, self.optimizer, options=_GATHERED)
        if not by_name:
            return {}
        index = {name: i for i, name in enumerate(self._names)}
        return {
            "state": {index[name]: value for name, value in by_name["state"].items()},
            "param_groups": [
                {**group, "params": [index[name] for name in group["params"]]}
                for group in by_name["param_groups"]
            ],
        }

    def load_model(self, state: dict[str, Tensor]) -> None:
        """Load a full state dict (every rank passes the whole of it)."""
        if not self.sharded:
            self.model.load_state_dict(state)
            return
        set_model_state_dict(self.model, state, options=_FULL)

    def load_optimizer(self, state: dict[str, Any]) -> None:
        """Load `Optimizer.state_dict()`'s form (every rank passes the whole of it)."""
        if not self.sharded:
            self.optimizer.load_state_dict(state)
            return
        names = self._names
        by_name = {
            "state": {names[int(i)]: value for i, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [names[int(i)] for i in group["params"]]}
                for group in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=_FULL)
        # It turns tuples (Adam's betas) into lists; keep the saved values, as
        # Optimizer.load_state_dict does, so the next checkpoint is written as DDP's is.
        for group, saved in zip(self.optimizer.param_groups, state["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
