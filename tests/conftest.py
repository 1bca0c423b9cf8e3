"""Test session setup: CPU JAX, deterministic torch, shared fixtures."""

import os

# Before JAX is imported anywhere: tests run on the CPU, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest


@pytest.fixture(autouse=True)
def _torch_determinism():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  yield
