"""Full-size SD 1.5 UNet parity (slow: `make test-slow`; ~3.4 GB of weights held twice).

Same tolerance as the tiny tests: max abs error <= 1e-4 in float32 at batch 1,
64×64 latents; the process's peak RSS must stay under 16 GiB.
"""

import resource

import jax
import numpy as np
import pytest
import torch
from test_unet_parity import ATOL, _inputs

from magicpose_jax.convert.diffusers import unet_key_table
from magicpose_jax.models.unet import VARIANTS, UNet2DConditionModel
from magicpose_jax.torch_reference import nchw, nhwc, torch_unet

pytestmark = pytest.mark.slow


def test_sd15_unet_matches_diffusers():
  config = VARIANTS["sd15"]
  tmodel = torch_unet(config, seed=0)
  # .numpy() shares torch's memory: only the converted (transposed) params are a second copy.
  sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  params = unet_key_table(config).to_flax(sd)
  del sd
  assert sum(x.size for x in jax.tree.leaves(params)) == sum(p.numel() for p in tmodel.parameters())
  sample, t, _ = _inputs(config, batch=1, height=64, width=64, seed=0)
  context = np.random.default_rng(1).standard_normal((1, 77, 768), dtype=np.float32)  # CLIP length
  with torch.no_grad():
    ref = nhwc(tmodel(nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample)
  ours = np.asarray(jax.jit(UNet2DConditionModel(config).apply)({"params": params}, sample, t, context))
  err = np.abs(ours - ref).max()
  assert np.std(ref) > 0.05
  assert err <= ATOL, f"max abs error {err:.3g} > {ATOL}"
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  assert peak_gib < 16, f"peak RSS {peak_gib:.1f} GiB"
