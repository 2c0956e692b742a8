"""Model and dataset specs: `package.module:callable` strings, loaded without pickle.

A spec names a callable by import path; keyword arguments come as JSON, either separately
(`--model-kwargs '{"width": 32}'`) or appended to the spec (`pkg.mod:factory{"width": 32}`).
Checkpoints are state dicts read with `torch.load(weights_only=True)` or safetensors: never
an unpickled module, so a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn


class Spec(BaseModel):
    """A callable named by `module:attribute`, with keyword arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="`package.module:callable`, e.g. lyceum.deploy.examples:digits")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments (JSON).")

    @field_validator("target")
    @classmethod
    def _check_target(cls, target: str) -> str:
        module, sep, attr = target.partition(":")
        if not sep or not module or not attr:
            raise ValueError(
                f"spec {target!r}: expected 'package.module:callable' (a colon between the module "
                f"path and the callable name), e.g. 'lyceum.deploy.examples:teacher_cnn'"
            )
        return target

    def __str__(self) -> str:
        return self.target + (json.dumps(self.kwargs, sort_keys=True) if self.kwargs else "")

    def resolve(self) -> Callable[..., Any]:
        """Import the module and return the callable; errors name the spec and the reason."""
        module_name, _, attr_path = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(
                f"spec {self.target!r}: cannot import module {module_name!r}: {exc}"
            ) from exc
        for part in attr_path.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ValueError(
                    f"spec {self.target!r}: module {module_name!r} has no attribute {attr_path!r}"
                ) from None
        if not callable(obj):
            raise ValueError(
                f"spec {self.target!r}: {attr_path!r} is a {type(obj).__name__}, not callable"
            )
        return obj

    def build(self) -> Any:
        fn = self.resolve()
        try:
            return fn(**self.kwargs)
        except TypeError as exc:
            raise ValueError(f"spec {self}: calling it failed: {exc}") from exc


def parse_spec(text: str, kwargs: str | Mapping[str, Any] | None = None) -> Spec:
    """Parse `module:callable`, `module:callable{json kwargs}`, plus optional extra kwargs."""
    target, brace, rest = text.partition("{")
    inline: dict[str, Any] = {}
    if brace:
        inline = _parse_kwargs("{" + rest, text)
    extra = _parse_kwargs(kwargs, text) if isinstance(kwargs, str) else dict(kwargs or {})
    return Spec(target=target.strip(), kwargs={**inline, **extra})


def _parse_kwargs(raw: str, spec: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"spec {spec!r}: keyword arguments are not valid JSON ({exc}): {raw!r}"
        ) from exc
    if not isinstance(value, dict):
        raise ValueError(f"spec {spec!r}: keyword arguments must be a JSON object, got {raw!r}")
    return value


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors (`.safetensors`) or a torch file, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"checkpoint {str(path)!r}: cannot be read as a weights-only state dict ({exc}); "
            f"save it with torch.save(model.state_dict(), path) or as .safetensors"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {str(path)!r}: expected a dict of tensors (a state dict)")
    return state


def load_model(spec: Spec | str, checkpoint: str | Path | None = None) -> nn.Module:
    """Build the model a spec names and load its checkpoint, if any, strictly."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    model = spec.build()
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model spec {spec}: returned a {type(model).__name__}, not a torch.nn.Module"
        )
    if checkpoint is not None:
        try:
            model.load_state_dict(load_state_dict(checkpoint))
        except RuntimeError as exc:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} does not fit model {spec}: {exc}"
            ) from exc
    return model


def load_dataset(spec: Spec | str) -> torch.utils.data.Dataset:
    """Build a map-style dataset whose items are `(input, label)` pairs."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    dataset = spec.build()
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise ValueError(
            f"dataset spec {spec}: returned a {type(dataset).__name__}, not a map-style dataset "
            f"(needs __len__ and __getitem__)"
        )
    if len(dataset) > 0:
        item = dataset[0]
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(
                f"dataset spec {spec}: items must be (input, label) pairs, item 0 is a "
                f"{type(item).__name__}"
            )
    return dataset


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
