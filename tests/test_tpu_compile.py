"""TPU programs compiled by libtpu on this CPU host (no TPU): the tiny stage-2 step and the tiny guided sampler,
compiled for `v5e:2x2` with `splash`, hold the Mosaic kernel and no CPU-only kernel; an explicit backend that cannot
run on the target is an error before anything compiles.

libtpu comes with `jax[tpu]` (requirements-test.txt). Each compile takes 1-2 minutes on 2 cores, so each program is
compiled once per module (module-scoped fixtures) and every check reads its text.
"""

import importlib.util

import jax
import pytest
from test_train_step import tiny

from magicpose_jax.models import conv, cpu_attention, platforms
from magicpose_jax.train import loop, plan, sharding

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -r requirements-test.txt)")
TOPOLOGY = "v5e:2x2"
MOSAIC = 'custom_call_target="tpu_custom_call"'


def tiny_tpu_config(**changes):
  """The tiny stage-2 config in bfloat16 (what a TPU runs), `splash` attention."""
  return tiny(**{"stage": "stage2", "dtype": "bfloat16", "attention_backend": "splash", **changes})


def custom_call_targets(hlo: str) -> set[str]:
  return {part.split('"', 1)[0] for part in hlo.split('custom_call_target="')[1:]}


@pytest.fixture(scope="module")
def devices():
  return plan.topology_devices(TOPOLOGY)


@pytest.fixture(scope="module")
def step_compiled(devices):
  step_fn, args = loop.abstract_setup(tiny_tpu_config(remat_policy="full"), devices)  # stage 1/2's remat
  return step_fn.lower(*args).compile()


@pytest.fixture(scope="module")
def step_hlo(step_compiled):
  return step_compiled.as_text()


@pytest.fixture(scope="module")
def sampler_hlo(devices):
  programs = plan.abstract_sampler(tiny_tpu_config(), devices, frames=4, steps=2)
  fn, args = programs["sample"]
  return fn.lower(*args).compile().as_text()


def test_topology_devices_are_tpus(devices):
  assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
  assert jax.default_backend() == "cpu"  # the host stays a CPU: the target must come from the devices


@pytest.mark.parametrize(("name", "kind"), [("v6e:1x1", "TPU v6 lite"), ("v5e:1x1", "TPU v5 lite")])
def test_a_slice_smaller_than_a_host_is_described(name, kind):
  """libtpu assumes whole 2x2-chip hosts for v5e/v6e; a one-chip slice is described with its own shape."""
  (device,) = plan.topology_devices(name)
  assert device.platform == "tpu" and device.device_kind == kind
  # ... and the mesh is built over it, not over the host's one CPU device (as many devices, not the same ones)
  mesh = sharding.make_mesh(tiny_tpu_config().mesh, [device])
  assert [d.platform for d in mesh.devices.flat] == ["tpu"]


@pytest.mark.parametrize("program", ["step_hlo", "sampler_hlo"])
def test_tpu_program_holds_the_splash_kernel_and_no_cpu_kernel(program, request):
  hlo = request.getfixturevalue(program)
  assert MOSAIC in hlo, "no Mosaic kernel: splash was not compiled in"
  assert "splash_mha_fwd" in hlo
  targets = custom_call_targets(hlo)
  assert cpu_attention.FFI_TARGET not in targets, targets


def test_step_holds_the_splash_backward_kernels(step_hlo):
  assert "splash_mha_dq" in step_hlo and "splash_mha_dkv" in step_hlo


def test_convolution_flops_read_from_the_tpu_program_match_the_compilers_count(step_compiled, step_hlo):
  """`flops.convolution_flops` (what `memory_plan` scales XLA's count by when a program has loops) against XLA's
  own cost analysis of the same loop-free program: every matmul is a convolution on TPU, so the two agree up to
  the elementwise work it does not count (measured: -10 % on these tiny nets, -0.8 % on SD 1.5's stage 2)."""
  from magicpose_jax.train import flops  # noqa: PLC0415

  counted = flops.convolution_flops(step_hlo)
  assert flops.while_loops(step_hlo) == [] and counted.executed == counted.once
  assert counted.once == pytest.approx(flops.compiled_flops(step_compiled), rel=0.15)


def test_step_flops_with_the_kernels_match_the_analytic_count(step_compiled, step_hlo, devices):
  """XLA's count plus the splash kernels' own (read from the program) against `train.flops`' analytic count of
  the step, which adds splash's backward recomputation (`SPLASH_BACKWARD_EXTRA`) and, under remat, its re-run
  forward. Measured 1.045; without the kernel terms the analytic count gives 1.129, outside the tolerance."""
  from magicpose_jax.train import flops, stages  # noqa: PLC0415

  config = tiny_tpu_config(remat_policy="full")
  kernels = sum(k.flops for k in flops.mosaic_kernel_costs(step_hlo))
  assert kernels > 0 and flops.while_loops(step_hlo) == []
  nets = stages.networks(config, stages.variant_configs(config), stages.target_platform(config, devices))
  analytic = flops.config_step_flops(config, nets).hardware * config.global_batch_size / len(devices)
  assert flops.compiled_flops(step_compiled) + kernels == pytest.approx(analytic, rel=0.10)


@pytest.mark.parametrize(("backend", "target"), [("cpu_fused", "tpu"), ("cudnn", "tpu"), ("splash", "cpu")])
def test_explicit_backend_that_cannot_run_on_the_target_raises_before_compiling(backend, target, devices):
  config = tiny_tpu_config(attention_backend=backend)
  run_on = devices if target == "tpu" else jax.devices("cpu")
  with pytest.raises(ValueError, match=f"config.attention_backend='{backend}' cannot run on platform '{target}'"):
    loop.abstract_setup(config, run_on)


def test_explicit_target_platform_overrides_the_devices(devices):
  with pytest.raises(ValueError, match="cannot run on platform 'gpu'"):
    loop.abstract_setup(tiny_tpu_config(target_platform="gpu"), devices)
  with pytest.raises(ValueError, match="config.target_platform='npu'"):
    loop.abstract_setup(tiny_tpu_config(target_platform="npu"), devices)


def test_cpu_convolution_paths_follow_the_target_platform():
  """SD's 16x16 and 32x32 levels take im2col / Winograd on a CPU target only; a TPU target keeps XLA's conv."""
  small_map, large_map, kernel = (2, 16, 16, 1280), (2, 32, 32, 640), (3, 3, 640, 640)
  with platforms.target_platform("cpu"):
    assert conv.use_im2col(small_map, (3, 3, 1280, 1280))
    assert conv.use_winograd(large_map, kernel, ((1, 1), (1, 1)))
  with platforms.target_platform("tpu"):
    assert not conv.use_im2col(small_map, (3, 3, 1280, 1280))
    assert not conv.use_winograd(large_map, kernel, ((1, 1), (1, 1)))


def test_the_cpu_kernel_check_finds_the_cpu_kernel_where_there_is_one():
  """Positive control of the 'no CPU-only kernel' assertion: a CPU program with `cpu_fused` shows its target."""
  import jax.numpy as jnp  # noqa: PLC0415

  from magicpose_jax.models import attention  # noqa: PLC0415

  q = jnp.ones((1, 96, 1, 8), jnp.float32)
  if attention.backend_supports("cpu_fused", q, q, q, "cpu") is not None:
    pytest.skip("the fused CPU kernel cannot be built here")
  with platforms.target_platform("cpu"):
    hlo = jax.jit(lambda x: attention.attend(x, x, x, "cpu_fused")).lower(q).compile().as_text()
  assert cpu_attention.FFI_TARGET in custom_call_targets(hlo)


def test_a_sampler_model_can_be_pointed_at_a_target():
  """`MagicPose.for_platform` sets every net's target (what `sample_video` callers compiling for a TPU use)."""
  from magicpose_jax.train import stages  # noqa: PLC0415

  config = tiny_tpu_config()
  model = stages.networks(config, stages.variant_configs(config)).model.for_platform("tpu")
  assert model.config.unet.target_platform == model.config.pose.target_platform == "tpu"
  with pytest.raises(ValueError, match="UNetConfig.attention_backend='cpu_fused' cannot run on platform 'tpu'"):
    model.config.unet.replace(attention_backend="cpu_fused")
