"""Test session setup: CPU JAX, deterministic torch, shared fixtures."""

import os

import pytest

# Before JAX is imported anywhere: tests run on the CPU, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# ... and XLA compiles fast (the tests' tiny models compile for far longer than they run): LLVM at -O0, XLA's older
# elemental emitters instead of the MLIR fusion emitters, one LLVM module per program. These change code generation,
# not semantics; every tolerance holds under both. `make test` ran in 10.0 min with them (and two tests' jitted flax
# inits replaced by host draws) against 16.7 min before both (2-core CI-class machine, the same slow period).
# Subprocesses inherit them; the user's own XLA_FLAGS come after. MAGICPOSE_XLA_DEFAULTS=1 (`make test-slow`: the
# full-size models run for minutes) keeps XLA's defaults.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                "--xla_cpu_parallel_codegen_split_count=1")
if not os.environ.get("MAGICPOSE_XLA_DEFAULTS"):
  os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()


@pytest.fixture(autouse=True)
def _torch_determinism():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  yield
