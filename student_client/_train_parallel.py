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

FSDP's modules (and torch.distributed.checkpoint's) are imported by the runs that shard:
they take seconds to import, which every other command would pay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lyceum.student_client._objective import DistillObjective
from lyceum.student_client._train_env import Distributed

__all__ = ["Placement", "distribute"]


def distribute(
    net: nn.Module,
    model: nn.Module,
    env: Distributed,
    parallel: str,
    objective: DistillObjective | None,
) -> nn.Module:
    """What the run steps through: `net` (the student, or it wrapped to return feature
    maps) as is in one process, else wrapped in DDP, or with `model` sharded in place.
    FSDP refuses an `objective` whose terms learn adapters: they would not be sharded."""
    if not env.enabled:
        return net
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        learned = [] if objective is None else _learning_terms(objective)
        if learned:
            raise ValueError(
                f"config key 'parallel': fsdp shards the student, not the learned adapters of "
                f"losses.terms {learned}; use parallel: ddp, or terms without learned "
                f"parameters (mse without student_channels, no hint)"
            )
        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return net
    cuda = env.device.type == "cuda"
    return nn.parallel.DistributedDataParallel(net, device_ids=[env.device.index] if cuda else None)


def _learning_terms(objective: DistillObjective) -> list[str]:
    return [n for n, loss in objective.losses.items() if next(loss.parameters(), None) is not None]


def _blocks(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    return [c for c in model.children() if next(c.parameters(), None) is not None]


def _full(gathered: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=gathered)


class Placement:
    """Where the student's state lives, whole or sharded (`distribute` sharded `model`): the
    state dicts a checkpoint holds (see the module docstring), when the ranks reduce the
    gradients, and their norm. Under FSDP the optimizer covers the student's parameters
    only."""

    def __init__(
        self, net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool
    ) -> None:
        self.net, self.model, self.optimizer, self.sharded = net, model, optimizer, sharded
        self._names = [name for name, _ in model.named_parameters()]

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """The ranks reduce the gradients of the backward in this context only if `sync` (the
        last batch of an accumulation group); before it each rank accumulates its own."""
        if sync:
            return contextlib.nullcontext()
        if isinstance(self.net, nn.parallel.DistributedDataParallel):
            return self.net.no_sync()
        if self.sharded:
            return self._fsdp_no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _fsdp_no_sync(self) -> Iterator[None]:
        from torch.distributed.fsdp import FSDPModule

        assert isinstance(self.model, FSDPModule)  # distribute sharded it
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def total_norm(self, norm: Tensor) -> float:
        """A norm `clip_grad_norm_` returned, as a number (under FSDP a DTensor of shards)."""
        if self.sharded:
            from torch.distributed.tensor import DTensor

            if isinstance(norm, DTensor):
                return float(norm.full_tensor())
        return float(norm)

    def model_state(self) -> dict[str, Tensor]:
        """The full state dict (under FSDP: on rank 0, empty on the others)."""
        if not self.sharded:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state: Any = get_model_state_dict(self.model, options=_full(gathered=True))
        return state  # tensors only: a module's state dict

    def optimizer_state(self) -> dict[str, Any]:
        """`Optimizer.state_dict()`'s form (under FSDP: on rank 0, empty on the others)."""
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        by_name: Any = get_optimizer_state_dict(
            self.model, self.optimizer, options=_full(gathered=True)
        )
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
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        full: Any = state  # torch types it as nested values; a module's holds tensors
        set_model_state_dict(self.model, full, options=_full(gathered=False))

    def load_optimizer(self, state: dict[str, Any]) -> None:
        """Load `Optimizer.state_dict()`'s form (every rank passes the whole of it)."""
        if not self.sharded:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        names = self._names
        by_name: Any = {
            "state": {names[int(i)]: value for i, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [names[int(i)] for i in group["params"]]}
                for group in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=_full(gathered=False))
        # It turns tuples (Adam's betas) into lists; keep the saved values, as
        # Optimizer.load_state_dict does, so the next checkpoint is written as DDP's is.
        for group, saved in zip(self.optimizer.param_groups, state["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
