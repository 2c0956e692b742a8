"""Model and dataset specs: `package.module:callable` strings, loaded without pickle.

A spec names a callable by import path; keyword arguments come as JSON, either separately
(`--model-kwargs '{"width": 32}'`) or appended to the spec (`pkg.mod:factory{"width": 32}`).
Checkpoints are state dicts read with `torch.load(weights_only=True)` or safetensors: never
an unpickled module, so a checkpoint cannot run code. A `lyceum student train` checkpoint
(`last.pt`: weights with optimizer, loader and run state) is refused as weights, naming the
`model.safetensors` the run wrote beside it: one kind of weights file for every command.

Some weights do not fit the architecture their factory builds: a pruned model's layers are
narrower. Such a safetensors file names its format in its header (`format: lyceum-pruned`),
and `load_model` hands it to the package that wrote it, which rebuilds the architecture on a
fresh instance (from the plan beside the file) and loads the weights. That package is found
through the `lyceum.weights_formats` entry points declared in pyproject.toml, never imported
here: proto imports nothing above it, and a file can only pick one of the installed formats.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

# A zip-format torch file starts "PK"; a plain pickle (or a legacy torch file) with its
# protocol opcode: refused by the weights-only reader, it holds objects, it is not damaged.
_PICKLE_PROTO = b"\x80"
# A trainer checkpoint (`lyceum student train`'s last.pt, epoch-NNN.pt) holds these, and the
# student's weights alone in WEIGHTS_FILE beside it: one kind of weights file for every command.
_TRAINER_KEYS = frozenset({"version", "model", "optimizer", "loader"})
WEIGHTS_FILE = "model.safetensors"
# The entry-point group of weights formats, and the prefix of the formats Lyceum writes: a
# `lyceum-*` format no installed package reads is refused rather than loaded as plain weights.
FORMATS_GROUP = "lyceum.weights_formats"
_LYCEUM_FORMAT = "lyceum-"
_PLAIN_METADATA = {"format": "pt"}


class WeightsFormat(Protocol):
    """A kind of weights file whose architecture differs from the one its factory builds.

    Why it exists: a pruned model is the factory's model with narrower layers, and only the
    package that pruned it (`lyceum.compression.pruning`) can narrow a fresh instance the same
    way. It registers an object of this shape under its format name in the
    `lyceum.weights_formats` entry points; `load_model` calls it for files of that format.
    """

    def load(self, model: nn.Module, weights: Path) -> nn.Module:
        """Rebuild the derived architecture on `model` (fresh from the factory) and load
        `weights` into it; a `ValueError` names what is missing and the fix."""
        ...

    def companions(self, weights: Path) -> list[Path]:
        """The files beside `weights` that `load` reads (a pruned model's plan)."""
        ...


class Spec(BaseModel):
    """A callable named by `module:attribute`, with keyword arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="`package.module:callable`, e.g. lyceum.deploy.examples:digits")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments (JSON).")

    @field_validator("target")
    @classmethod
    def _check_target(cls, target: str) -> str:
        return check_target(target)

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
        except Exception as exc:  # the user's module failed while it was being imported
            raise ValueError(
                f"spec {self.target!r}: importing module {module_name!r} raised {_raised(exc)}"
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

    def build(self, what: str = "spec") -> Any:
        """Call the factory with the keyword arguments. Whatever it raises (a wrong keyword, or
        an error of the user's own code) becomes a `ValueError` naming `what` spec it was, with
        the factory's exception type, message and line; the original stays chained."""
        fn = self.resolve()
        try:
            return fn(**self.kwargs)
        except Exception as exc:
            raise ValueError(f"{what} {self}: calling it raised {_raised(exc)}") from exc


def _raised(exc: BaseException) -> str:
    """`RuntimeError: no GPU (at my_models.py:12)`: the exception and the line that raised it."""
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    # Not when it was the call itself that failed (a wrong keyword): that line is this module's.
    if frames and frames[-1].filename != __file__:
        text += f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})"
    return text


def check_target(target: str) -> str:
    """`target` if it reads `module:callable`, else a `ValueError` that shows the form."""
    module, sep, attr = target.partition(":")
    if not sep or not module.strip() or not attr.strip():
        raise ValueError(
            f"spec {target!r}: expected 'package.module:callable' (a colon between the module "
            f"path and the callable name), e.g. 'lyceum.deploy.examples:teacher_cnn'"
        )
    return target


def check_spec(text: str) -> str:
    """`text` if `parse_spec` reads it (`module:callable`, the attribute maybe dotted, maybe
    with `{json kwargs}` appended), else its `ValueError`: the check of config fields that
    keep a spec as a string and resolve it later."""
    parse_spec(text)
    return text


def parse_spec(text: str, kwargs: str | Mapping[str, Any] | None = None) -> Spec:
    """Parse `module:callable`, `module:callable{json kwargs}`, plus optional extra kwargs."""
    target, brace, rest = text.partition("{")
    inline: dict[str, Any] = {}
    if brace:
        inline = _parse_kwargs("{" + rest, text)
    extra = _parse_kwargs(kwargs, text) if isinstance(kwargs, str) else dict(kwargs or {})
    # Checked before the model is built: a plain ValueError, not a pydantic error about `target`.
    return Spec(target=check_target(target.strip()), kwargs={**inline, **extra})


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
    """Read a state dict from safetensors (`.safetensors`) or a torch file, never unpickling code.

    A truncated or foreign file, or a torch file of pickled objects (a whole module, a training
    checkpoint with more than tensors), is a `ValueError` that names the file and says how to
    re-create or convert it.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist: check the path")
    if not path.is_file():
        inside = path / WEIGHTS_FILE
        fix = f"give {str(inside)!r}" if inside.is_file() else "give a file"
        raise ValueError(f"checkpoint {str(path)!r} is not a file (a directory?): {fix}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        name = weights_metadata(path).get("format", "")
        if name.startswith(_LYCEUM_FORMAT):
            raise ValueError(
                f"checkpoint {str(path)!r} holds weights of format {name!r} (a pruned model's "
                f"narrower layers), not a state dict of the model as its factory builds it: "
                f"load it with lyceum.proto.specs.load_model(spec, {str(path)!r}), which "
                f"rebuilds that architecture first"
            )
        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise ValueError(
                f"checkpoint {str(path)!r} is not a readable safetensors file ({exc}): it is "
                f"truncated, damaged or of another format; re-create it with "
                f"safetensors.torch.save_file(model.state_dict(), {str(path)!r})"
            ) from exc
    with path.open("rb") as f:  # opened here: a missing permission is an OSError with the path
        first = f.read(1)
        f.seek(0)
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # whatever the content did to torch's reader (even an OSError)
            if "GLOBAL " in str(exc) or first == _PICKLE_PROTO:
                raise ValueError(_pickled_objects(path, exc)) from exc
            raise ValueError(
                f"checkpoint {str(path)!r} is not a readable torch file ({type(exc).__name__}: "
                f"{str(exc).split('. ')[0]}): it is truncated, damaged or of another format; "
                f"re-create it with torch.save(model.state_dict(), path), or save it as "
                f".safetensors"
            ) from exc
    if isinstance(state, dict) and state.keys() >= _TRAINER_KEYS:
        raise ValueError(_trainer_checkpoint(path, state))
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(
            f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a state dict (a dict "
            f"of tensors): save it with torch.save(model.state_dict(), path)"
        )
    others = [
        f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)
    ]
    if others:
        raise ValueError(
            f"checkpoint {str(path)!r} is not a state dict: besides tensors it holds "
            f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''}; save the model's "
            f"tensors alone, torch.save(model.state_dict(), path)"
        )
    return state


def _trainer_checkpoint(path: Path, state: Mapping[str, Any]) -> str:
    """Why a `lyceum student train` checkpoint is refused as weights, and the file to give."""
    keys = ", ".join(str(k) for k in state)
    weights = path.parent / WEIGHTS_FILE
    if weights.is_file():
        fix = f"give the weights file the run wrote beside it instead: {weights}"
    else:
        fix = (
            f"a run writes its weights beside it as {WEIGHTS_FILE}, and {str(path.parent)!r} "
            f"has none: extract them once, safetensors.torch.save_file(torch.load("
            f"{str(path)!r}, weights_only=True)['model'], {str(weights)!r}), and give that file"
        )
    return (
        f"checkpoint {str(path)!r} is a resumable trainer checkpoint ({keys}: what `lyceum "
        f"student train --resume` reads), not model weights; {fix}"
    )


def _pickled_objects(path: Path, exc: Exception) -> str:
    """Why a file that needs unpickling (a torch file of objects, a plain pickle) is refused and
    how to convert it, without torch's own advice to load it with `weights_only=False` here."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"pickled Python objects ({found.group(1)})" if found else "pickled Python objects"
    return (
        f"checkpoint {str(path)!r} holds {what}, not just tensors, and Lyceum never unpickles "
        f"a file (unpickling can run any code). Convert it once, in a Python process you "
        f"trust with that file: obj = torch.load({str(path)!r}, weights_only=False), then "
        f"torch.save(obj.state_dict(), 'model.pt') (or safetensors.torch.save_file("
        f"obj.state_dict(), 'model.safetensors')) for a whole model, or save only the state "
        f"dict a training checkpoint holds; give that file instead"
    )


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The metadata in a safetensors file's header (`{}` for a torch file or none at all)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError:
        return {}  # load_state_dict names the damage


def weights_format(path: str | Path) -> WeightsFormat | None:
    """The installed format that reads the weights file `path`, or None for plain weights
    (a state dict that fits the model its factory builds)."""
    name = weights_metadata(path).get("format", "")
    if not name.startswith(_LYCEUM_FORMAT):
        return None  # "pt", or another library's tag: plain tensors
    found = [ep for ep in importlib.metadata.entry_points(group=FORMATS_GROUP) if ep.name == name]
    if not found:
        raise ValueError(
            f"checkpoint {str(path)!r} holds weights of format {name!r}, and no installed "
            f"package reads that format (entry points {FORMATS_GROUP!r}): reinstall lyceum-kd "
            f"(pip install -e . in a clone) so that its formats are registered"
        )
    fmt: WeightsFormat = found[0].load()
    return fmt


def carry_weights_format(checkpoint: str | Path | None, directory: Path) -> dict[str, str]:
    """For a run that starts from `checkpoint` and writes its own weights into `directory`:
    copy the files its format rebuilds from (a pruned model's plan) into `directory`, so the
    new weights load the same way, and return the safetensors metadata to write with them."""
    fmt = weights_format(checkpoint) if checkpoint is not None else None
    if fmt is None or checkpoint is None:
        return dict(_PLAIN_METADATA)
    directory.mkdir(parents=True, exist_ok=True)
    for companion in fmt.companions(Path(checkpoint)):
        target = directory / companion.name
        if target.resolve() != companion.resolve():
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(companion.read_bytes())
            os.replace(tmp, target)
    return {"format": weights_metadata(checkpoint)["format"]}


def load_model(spec: Spec | str, checkpoint: str | Path | None = None) -> nn.Module:
    """Build the model a spec names and load its checkpoint, if any, strictly; weights of a
    derived architecture (a pruned model, see `WeightsFormat`) are loaded by their format."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    model = spec.build("model spec")
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model spec {spec}: returned a {type(model).__name__}, not a torch.nn.Module"
        )
    if checkpoint is None:
        return model
    fmt = weights_format(checkpoint)
    try:
        if fmt is not None:
            return fmt.load(model, Path(checkpoint))
        model.load_state_dict(load_state_dict(checkpoint))
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} does not fit model {spec}: {exc}"
        ) from exc
    return model


def load_dataset(spec: Spec | str) -> torch.utils.data.Dataset:
    """Build a map-style dataset whose items are `(input, label)` pairs or mappings of named
    tensors (`{"input_ids", "attention_mask", "labels"}`, see `lyceum.proto.items`)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    dataset = spec.build("dataset spec")
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise ValueError(
            f"dataset spec {spec}: returned a {type(dataset).__name__}, not a map-style dataset "
            f"(needs __len__ and __getitem__)"
        )
    if len(dataset) > 0:
        item = dataset[0]
        pair = isinstance(item, tuple | list) and len(item) == 2
        if not (pair or isinstance(item, Mapping)):
            raise ValueError(
                f"dataset spec {spec}: items must be (input, label) pairs or dicts of named "
                f"tensors, item 0 is a {type(item).__name__}"
            )
    return dataset
