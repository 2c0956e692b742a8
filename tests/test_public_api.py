"""The public API is what the `__all__`s say: every name listed imports, and every public
module (no leading underscore) is reachable from its package's `__all__`: listed there as a
module, or the source of names listed there. Anything else must be `_private`."""

from __future__ import annotations

import importlib
import pkgutil
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Generated protobuf stubs: their module names are protobuf's, not ours.
GENERATED = "lyceum.v1"


def _installed_packages() -> list[str]:
    setuptools = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    return [p for p in setuptools["packages"] if p != GENERATED]


PACKAGES = _installed_packages()


def _submodules(package: str) -> list[pkgutil.ModuleInfo]:
    return list(pkgutil.iter_modules(importlib.import_module(package).__path__))


def _every_module() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        names += [f"{package}.{m.name}" for m in _submodules(package) if not m.ispkg]
    return names


def _resolve(module: ModuleType, name: str) -> object:
    """`from module import name`: an attribute, or a submodule imported on demand."""
    try:
        return getattr(module, name)
    except AttributeError:
        return importlib.import_module(f"{module.__name__}.{name}")


def test_every_package_on_disk_is_installed() -> None:
    """pyproject lists the packages a wheel installs: a subpackage missing there would work
    in this editable checkout and be absent from a real install."""
    found = [
        f"{package}.{m.name}"
        for package in PACKAGES
        for m in _submodules(package)
        if m.ispkg and not m.name.startswith("_")
    ]
    assert sorted(set(found) - set(PACKAGES)) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_has_an_all_without_repeats(package: str) -> None:
    names = importlib.import_module(package).__all__
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("module", _every_module())
def test_every_name_in_every_all_imports(module: str) -> None:
    mod = importlib.import_module(module)
    missing = []
    for name in getattr(mod, "__all__", ()):
        try:
            _resolve(mod, name)
        except (AttributeError, ModuleNotFoundError):
            missing.append(name)
    assert missing == [], f"{module}.__all__ lists names it does not have"


def _defines(module: ModuleType, value: object) -> bool:
    """`value` is one of `module`'s own objects, not something it imported."""
    owner = getattr(value, "__module__", None)
    if owner is not None and not isinstance(value, ModuleType):
        return owner == module.__name__
    return False


@pytest.mark.parametrize("package", PACKAGES)
def test_no_public_module_is_missing_from_its_package(package: str) -> None:
    pkg = importlib.import_module(package)
    exported = [_resolve(pkg, name) for name in pkg.__all__]
    missing = []
    for info in _submodules(package):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        if info.name in pkg.__all__:
            assert _resolve(pkg, info.name) is module or _defines(
                module, _resolve(pkg, info.name)
            ), f"{package}.{info.name}: the name in __all__ is neither the module nor its own"
            continue
        own = [module.__dict__.get(n) for n in getattr(module, "__all__", ())]
        if not any(v is e for v in own for e in exported) and not any(
            _defines(module, e) for e in exported
        ):
            missing.append(info.name)
    assert missing == [], (
        f"public modules of {package} that its __all__ neither lists nor exports from: "
        f"{missing}; list them (as modules or by their names), or make them _private"
    )
