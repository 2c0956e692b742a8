"""Feature maps named by module path: finding a submodule, and a student's maps by hooks.

PaddleSlim's distillers name the maps a loss compares by the variables of each program
(`teacher_feature_map`, `student_feature_map`); in PyTorch the equivalent name is a module's
path in `named_modules()` (`layer3`, `features.6`). A teacher's maps are captured by the
teacher engine's hooks (its `outputs: [layer3]`); a student's by `StudentFeatures`, which
wraps the student so that its forward returns the hooked maps beside its own outputs, with
their gradients: the losses train the student through them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["StudentFeatures", "find_module", "module_paths", "student_features"]


def module_paths(model: nn.Module) -> list[str]:
    """Every submodule's path, in `named_modules()` order (the root, "", left out)."""
    return [name for name, _ in model.named_modules() if name]


def _close_names(path: str, names: list[str]) -> list[str]:
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
    last = path.split(".")[-1]
    close += [n for n in names if n.split(".")[-1] == last and n not in close]
    return close[:8]


def find_module(model: nn.Module, path: str, where: str) -> nn.Module:
    """The submodule at `path`; a ValueError naming `where`, the path and close names if none."""
    modules = dict(model.named_modules())
    if path and path in modules:
        return modules[path]
    names = module_paths(model)
    close = _close_names(path, names)
    hint = (
        f"close names: {close}"
        if close
        else f"its top-level modules are {[n for n in names if '.' not in n][:12]}"
    )
    raise ValueError(
        f"{where}: the {type(model).__name__} has no submodule {path!r}; {hint} (every path "
        f"is in model.named_modules())"
    )


def _first_tensor(value: Any, path: str) -> Tensor:
    # A module returning (output, extras), as recurrent layers do: its output is the first.
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        value = value[0]
    if not isinstance(value, Tensor):
        raise ValueError(
            f"student module {path!r} returns a {type(value).__name__}, not a tensor; hook "
            f"one of its submodules instead"
        )
    return value


class StudentFeatures(nn.Module):
    """The student, whose forward also returns the outputs of the submodules at `paths`.

    `forward(x)` is the student's forward as a mapping (a plain tensor becomes `logits`) plus
    one entry per path, captured by a forward hook (the last call wins when a module runs
    twice); `student_features` picks the paths, never a key of the student's own outputs.
    DDP wraps the wrapper; the optimizer gets the student's parameters and checkpoints save
    the student itself, as without it.
    """

    def __init__(self, student: nn.Module, paths: Iterable[str]) -> None:
        super().__init__()
        self.student = student
        self.paths = tuple(dict.fromkeys(paths))
        self._captured: dict[str, Tensor] = {}
        self._handles = [
            find_module(student, path, f"student module {path!r}").register_forward_hook(
                self._hook(path)
            )
            for path in self.paths
        ]

    def _hook(self, path: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._captured[path] = _first_tensor(output, path)

        return hook

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        self._captured = {}
        out = self.student(*args, **kwargs)
        outputs: dict[str, Tensor] = dict(out) if isinstance(out, Mapping) else {"logits": out}
        missing = [p for p in self.paths if p not in self._captured]
        if missing:
            raise ValueError(
                f"student modules {missing} did not run in the student's forward; pick modules "
                f"on its forward path"
            )
        for path, value in self._captured.items():
            outputs.setdefault(path, value)  # the forward's own output of that name wins
        self._captured = {}
        return outputs

    def close(self) -> None:
        """Remove the hooks: the student runs as it did before the wrapper."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def student_features(
    student: nn.Module, keys: Mapping[str, str], example: Any
) -> StudentFeatures | None:
    """The student wrapped to return the maps of those `keys` (the loss terms' student keys,
    each with the config key that names it, for errors) that are module paths; None when
    no key is one.

    The student's own outputs come first: a key its forward returns is that output (as
    before module paths existed), found by one forward on `example` (a batch of one, in eval
    mode, without gradients: no state of the student changes) when a key other than `logits`
    is asked for. Any other key must be a module path; one that is not is refused before
    training, naming it and close names.
    """
    if all(k == "logits" for k in keys):
        return None
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            out = student(example)
    finally:
        student.train(was_training)
    outputs = list(out) if isinstance(out, Mapping) else ["logits"]
    paths = [k for k in keys if k not in outputs]
    for path in paths:
        try:
            find_module(student, path, f"{keys[path]} {path!r}")
        except ValueError as exc:
            raise ValueError(
                f"{exc}; nor is it an output of the student's forward, which returns {outputs}"
            ) from None
    return StudentFeatures(student, paths) if paths else None
