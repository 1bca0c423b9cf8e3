"""Full-size SD 1.5 VAE parity (slow: `make test-slow`; ~84M params, 335 MB of fp32 weights held twice).

Same tolerance as the tiny tests: max abs error <= 1e-4 in float32 for the posterior
mean and log-variance and the decoded image, at batch 1 and a 256×256 image (32×32
latents) to keep RAM small; the process's peak RSS must stay under 16 GiB.
"""

import resource

import jax
import numpy as np
import pytest
import torch
from test_vae import check, images, torch_vae

from magicpose_jax.convert.vae import vae_key_table
from magicpose_jax.models.vae import VAE_VARIANTS, AutoencoderKL
from magicpose_jax.torch_reference import nchw, nhwc

pytestmark = pytest.mark.slow


def test_sd15_vae_matches_diffusers():
  config = VAE_VARIANTS["sd15"]
  tmodel = torch_vae(config, seed=0)
  # .numpy() shares torch's memory: only the converted (transposed) params are a second copy.
  sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  params = vae_key_table(config).to_flax(sd)
  del sd
  assert sum(x.size for x in jax.tree.leaves(params)) == sum(p.numel() for p in tmodel.parameters())
  vae = AutoencoderKL(config)
  x = images(batch=1, height=256, width=256, seed=0)
  z = np.random.default_rng(1).standard_normal((1, 32, 32, 4), dtype=np.float32)
  with torch.no_grad():
    dist = tmodel.encode(nchw(x)).latent_dist
    ref_mean, ref_logvar = nhwc(dist.mean), nhwc(dist.logvar)
    ref_image = nhwc(tmodel.decode(nchw(z)).sample)
  posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))(params, x)
  image = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))(params, z)
  errors = {"mean": check(posterior.mean, ref_mean), "logvar": check(posterior.logvar, ref_logvar),
            "image": check(image, ref_image)}
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"SD 1.5 VAE max abs errors: {errors}; peak RSS {peak_gib:.2f} GiB")
  assert peak_gib < 16, f"peak RSS {peak_gib:.1f} GiB"
