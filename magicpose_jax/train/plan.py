"""Compiling for accelerators this host does not have: TPU topologies from libtpu, and the guided sampler's program.

`topology_devices("v5p:2x2x1")` gives TPU device descriptions (no TPU needed: `pip install "jax[tpu]"` brings
libtpu, whose compiler runs on the CPU); a mesh over them and `jax.jit(...).lower(ShapeDtypeStructs).compile()`
compile with the TPU compiler, whose `memory_analysis()` and `cost_analysis()` are the chip's own. The train step
comes from `train.loop.abstract_setup(config, devices)`; `abstract_sampler` here builds the sampler's two programs
(the reference-state cache and the guided DDIM loop over a chunk of frames) the same way.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from magicpose_jax.diffusion.sampler import SamplerConfig, precompute_reference_states, sample, step_times
from magicpose_jax.diffusion.schedules import make_schedule
from magicpose_jax.train import flops, stages
from magicpose_jax.train.loop import abstract_params


def topology_devices(name: str) -> list[jax.Device]:
  """The devices of TPU topology `name` (jax's names: "v5p:2x2x1", "v5e:2x4", "v6e:4x4", "v4:2x2x2").

  Raises a `ValueError` naming the topology when libtpu is missing or does not know it.
  """
  from jax.experimental import topologies  # noqa: PLC0415  (only planners need it)

  # libtpu takes /tmp/libtpu_lockfile so that two processes never drive one TPU; describing a topology drives
  # none, and without this a second compiling process (a pytest-xdist worker, a planner) fails to load libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    try:
      return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:
      # libtpu assumes whole hosts (2x2 chips on v5e/v6e): a slice smaller than one ("v6e:1x1", a one-chip VM)
      # is described with its own shape as the host's.
      if "chips_per_host_bounds" not in str(e) or not (bounds := _slice_shape(name)):
        raise
      return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                               chips_per_host_bounds=bounds).devices)
  except Exception as e:  # jax raises RuntimeError/XlaRuntimeError/ValueError depending on what is missing
    raise ValueError(f"TPU topology {name!r}: cannot describe it ({e}); needs libtpu (`pip install "
                     f"'jax[tpu]==0.10.2'`, pinned in requirements-test.txt) and a name such as 'v5p:2x2x1'") from e


def _slice_shape(name: str) -> tuple[int, int, int] | None:
  """(x, y, z) chips of a topology name such as "v6e:1x1" or "v5p:2x2x1"; None if it has no such shape."""
  dims = name.partition(":")[2].split("x")
  if not 2 <= len(dims) <= 3 or not all(d.isdigit() for d in dims):
    return None
  x, y, *z = (int(d) for d in dims)
  return x, y, z[0] if z else 1


def cores_per_chip(devices: list[jax.Device]) -> int:
  """Devices per TPU chip in `devices`: 1 where a device is a chip (v5e, v5p, v6e), 2 for v4 topologies, whose
  description gives one device per TensorCore, each with half the chip's HBM and FLOPs."""
  coords = [tuple(getattr(d, "coords", ()) or ()) for d in devices]
  if not coords[0]:
    return 1
  return max(1, coords.count(coords[0]))


def device_peak(devices: list[jax.Device]) -> flops.Peak | None:
  """The tabled peak of one of `devices` (`flops.device_peak`), per TensorCore on v4 topologies
  (`cores_per_chip`); None if the kind is not tabled."""
  peak = flops.device_peak(devices[0].device_kind)
  return None if peak is None else peak.per_core(cores_per_chip(devices))


@dataclasses.dataclass(frozen=True)
class HbmExhausted:
  """A TPU compile refused for lack of HBM: what the program needs per chip and what the compiler had."""

  used: int  # bytes the program needs per chip
  capacity: int  # bytes the compiler could give it (the chip's HBM less the runtime's reservation)
  message: str  # the compiler's first line


# libtpu says it in two ways (binary units: G = 2**30):
#   "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 21.95G of
#   15.48G hbm. Exceeded hbm capacity by 6.47G."
#   "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (16.29G) exceeds
#   available HBM (15.25G)." (0.0.42, measured here: a v4 core; the temporaries alone)
_HBM_EXHAUSTED = (
    re.compile(r"Ran out of memory in memory space hbm\.\s*Used\s+([\d.]+)\s*([KMGT]?)i?B?\s+of\s+([\d.]+)\s*"
               r"([KMGT]?)i?B?\s+hbm"),
    re.compile(r"Ran out of memory on HBM, the total memory required for HLO temporaries \(([\d.]+)\s*([KMGT]?)i?B?\)"
               r" exceeds available HBM \(([\d.]+)\s*([KMGT]?)i?B?\)"),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def hbm_exhausted(error: BaseException | str) -> HbmExhausted | None:
  """The HBM the compiler asked for, when `error` is libtpu's out-of-HBM compile error; None for any other error.

  A step that does not fit a chip is a result of planning, not a crash: the compiler stops at buffer assignment
  and says how much it needed.
  """
  text = str(error)
  m = next((m for pattern in _HBM_EXHAUSTED if (m := pattern.search(text))), None)
  if m is None:
    return None
  used = round(float(m.group(1)) * _UNITS[m.group(2)])
  capacity = round(float(m.group(3)) * _UNITS[m.group(4)])
  first = next((line.strip() for line in text.splitlines() if "Ran out of memory" in line), text.strip())
  return HbmExhausted(used=used, capacity=capacity, message=first)


def abstract_sampler(config: ml_collections.ConfigDict, devices: list[jax.Device], frames: int, steps: int = 50,
                     guidance: float = 7.0) -> dict[str, tuple[Any, tuple[Any, ...]]]:
  """The guided sampler's programs for `frames` frames in one chunk, batch-sharded over `devices`, not run.

  Returns {"cache": (jitted `precompute_reference_states`, abstract args), "sample": (jitted `sample` over the
  cached states, abstract args)}: what `diffusion.sampler.sample_video(..., batch_frames=frames, cache=True)`
  runs, for the stage-2 model of `config` (its `model`, `dtype`, `attention_backend`, `target_platform`).
  Params are the config's frozen dtype for the base UNet, float32 for the rest, replicated (inference holds every
  net on every chip); frames are split over all devices when they divide.
  """
  sd = stages.variant_configs(config)
  platform = stages.target_platform(config, devices)
  nets = stages.networks(config, sd, platform)
  model = nets.model
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(-1), ("data",))
  rows = NamedSharding(mesh, P("data")) if frames % len(devices) == 0 else NamedSharding(mesh, P())
  rep = NamedSharding(mesh, P())
  trainable, frozen = abstract_params(config, nets, sd)
  model_params = {**trainable, "unet": frozen["unet"]}  # inference: every net on every chip
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), model_params)
  h = sd.unet.sample_size
  f = sd.vae.downsample_factor
  text_shape = (sd.text_encoder.max_position_embeddings, sd.text_encoder.hidden_size)
  z_ref = jax.ShapeDtypeStruct((1, h, h, sd.unet.in_channels), jnp.float32, sharding=rep)
  text1 = jax.ShapeDtypeStruct((1, *text_shape), jnp.float32, sharding=rep)
  times = step_times(sd.scheduler, steps)[0]
  sampler = SamplerConfig(num_steps=steps, guidance=guidance)
  schedule = make_schedule(sd.scheduler)

  def in_mesh(fn):
    def run(*args):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # splash shard_maps over the mesh it sees
        return fn(*args)
    return run

  cache_fn = jax.jit(in_mesh(lambda p, z, t: precompute_reference_states(model, p, z, t, times)))
  cached = jax.eval_shape(cache_fn, params, z_ref, text1)
  cached = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), cached)
  x_t = jax.ShapeDtypeStruct((frames, h, h, sd.unet.in_channels), jnp.float32, sharding=rows)
  text = jax.ShapeDtypeStruct((frames, *text_shape), jnp.float32, sharding=rows)
  poses = jax.ShapeDtypeStruct((frames, h * f, h * f, 3), jnp.float32, sharding=rows)
  sample_fn = jax.jit(in_mesh(lambda p, x, t, z, pose, c: sample(model, p, schedule, sd.scheduler, sampler, x, t, z,
                                                                  pose, None, c)), out_shardings=rows)
  return {"cache": (cache_fn, (params, z_ref, text1)),
          "sample": (sample_fn, (params, x_t, text, z_ref, poses, cached))}

