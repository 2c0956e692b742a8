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
