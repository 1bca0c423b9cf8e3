"""`train.plan.hbm_exhausted`: libtpu's out-of-HBM compile error read as a planning result (what the program
needs per chip), on error texts libtpu printed in public bug reports; every other error is left alone."""

import pytest

from magicpose_jax.train import plan

GIB = 2**30

# LargeWorldModel/LWM issue 60 (a v3 chip) and EasyDeL issue 166 (v4-32), verbatim apart from the tracebacks.
V3 = ("jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory "
      "in memory space hbm. Used 21.95G of 15.48G hbm.\n Exceeded hbm capacity by 6.47G.\n\nTotal hbm usage >= "
      "22.47G:\n    reserved        530.00M\n    program          21.95G\n    arguments            0B\n")
V4 = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 63.80G of "
      "30.75G hbm. Exceeded hbm capacity by 33.05G.\n\nTotal hbm usage >= 65.05G:\n    reserved          1.25G\n")
# vllm-project/vllm issue 8318: scalar memory, not HBM: not a "does not fit" plan.
SMEM = ("RuntimeError: Bad StatusOr access: RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
        "memory space smem. Used 1.00M of 1.00M smem. Exceeded smem capacity by 1.7K.")


# libtpu 0.0.42 on this project's v4:2x2x2 stage-1 plan (one TensorCore's share of a chip): the temporaries alone.
V4_CORE = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
           "HLO temporaries (16.29G) exceeds available HBM (15.25G).")


@pytest.mark.parametrize("text, used, capacity", [(V3, 21.95, 15.48), (V4, 63.80, 30.75), (V4_CORE, 16.29, 15.25)])
def test_out_of_hbm_gives_what_the_program_needs(text, used, capacity):
  oom = plan.hbm_exhausted(RuntimeError(text))
  assert oom is not None
  assert oom.used == pytest.approx(used * GIB, abs=GIB / 100)
  assert oom.capacity == pytest.approx(capacity * GIB, abs=GIB / 100)
  assert oom.message.startswith(("jax", "RESOURCE_EXHAUSTED")) and "hbm" in oom.message.lower()
  assert "\n" not in oom.message


@pytest.mark.parametrize("text", [SMEM, "INVALID_ARGUMENT: mesh axis 'fsdp' of size 3 does not divide 8", ""])
def test_other_errors_are_not_read_as_hbm(text):
  assert plan.hbm_exhausted(RuntimeError(text)) is None


class _Core:
  def __init__(self, coords, core):
    self.coords, self.core_on_chip = coords, core


def test_cores_per_chip():
  v4 = [_Core([x, 0, 0], c) for x in range(2) for c in range(2)]  # 2 chips x 2 TensorCores: 4 devices
  assert plan.cores_per_chip(v4) == 2
  assert plan.cores_per_chip([_Core([x, 0, 0], 0) for x in range(4)]) == 1
  assert plan.cores_per_chip([object()]) == 1  # no coordinates (a CPU device): one per chip


def test_a_chip_shared_by_two_cores_gives_each_half():
  from magicpose_jax.train import flops  # noqa: PLC0415

  chip = flops.device_peak("TPU v4")
  core = chip.per_core(2)
  assert (core.bf16, core.hbm_gb, core.hbm_gbps) == (chip.bf16 / 2, chip.hbm_gb / 2, chip.hbm_gbps / 2)
  assert chip.per_core(1) is chip
