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


@pytest.mark.parametrize("text, used, capacity", [(V3, 21.95, 15.48), (V4, 63.80, 30.75)])
def test_out_of_hbm_gives_what_the_program_needs(text, used, capacity):
  oom = plan.hbm_exhausted(RuntimeError(text))
  assert oom is not None
  assert oom.used == pytest.approx(used * GIB, abs=GIB / 100)
  assert oom.capacity == pytest.approx(capacity * GIB, abs=GIB / 100)
  assert oom.message.startswith(("jaxlib", "RESOURCE_EXHAUSTED")) and "hbm" in oom.message
  assert "\n" not in oom.message


@pytest.mark.parametrize("text", [SMEM, "INVALID_ARGUMENT: mesh axis 'fsdp' of size 3 does not divide 8", ""])
def test_other_errors_are_not_read_as_hbm(text):
  assert plan.hbm_exhausted(RuntimeError(text)) is None
