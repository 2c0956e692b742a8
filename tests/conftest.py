"""Shared fixtures: tiny models and data sets for every test package."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Two cores: keep intra-op threads low so test processes and the servers they start
# do not oversubscribe the machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_train():
    from lyceum.deploy.examples import digits

    return digits("train")


@pytest.fixture(scope="session")
def digits_test():
    from lyceum.deploy.examples import digits

    return digits("test")


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Records of verified knowledge shards go to this session's own directory (subprocesses
    inherit it), never the user's ~/.cache: every test session starts cold."""
    os.environ["LYCEUM_CACHE_DIR"] = str(tmp_path_factory.mktemp("lyceum-cache"))


@pytest.fixture(autouse=True)
def _cold_shard_cache(
    _private_cache_dir: None,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """... and every test too: a shard another test verified (module-scoped dumps are shared)
    is not skipped by this one's verification, whatever order the tests run in."""
    monkeypatch.setenv("LYCEUM_CACHE_DIR", str(tmp_path_factory.mktemp("lyceum-cache")))
