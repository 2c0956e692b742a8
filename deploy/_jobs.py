"""What the YAML-driven commands (`prune`, `quantize`) share: reading a job config and
building its model and data splits from specs.

The compression library takes built objects; spec strings and checkpoints are resolved here,
through `lyceum.proto.specs` (imports by name, checkpoints without pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from pydantic import BaseModel, ValidationError
from torch import nn

from lyceum.proto.specs import Spec, load_dataset, load_model

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_job_config(path: str | Path, cls: type[ConfigT], what: str) -> ConfigT:
    """Read a YAML job config (data only: `yaml.safe_load`); errors name the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the config: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']} "
            f"(got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ValueError(f"{path}: invalid {what} config: {problems}") from None


def build_model(target: str, kwargs: dict[str, Any], checkpoint: Path | None) -> nn.Module:
    return load_model(Spec(target=target, kwargs=kwargs), checkpoint)


def build_split(target: str, kwargs: dict[str, Any], split: str) -> torch.utils.data.Dataset:
    """The dataset factory called with `split=...` plus the config's keyword arguments."""
    return load_dataset(Spec(target=target, kwargs={**kwargs, "split": split}))
