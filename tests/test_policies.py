"""Remat policy and compute dtype as training-config fields: they reach every network, and bf16 compute gives the
float32 loss within bf16's precision on the tiny config (remat's exactness is in test_unet_options)."""

import functools

import jax
import numpy as np
import pytest
from test_train_step import tiny

from magicpose_jax.diffusion.schedules import make_schedule
from magicpose_jax.models.unet import REMAT_POLICIES
from magicpose_jax.train import stages
from magicpose_jax.train.step import loss_fn

# bf16 keeps 8 significant bits: each rounding is off by up to 2^-9 ~ 2e-3 relative. The loss is a mean over
# 4 x 16 x 16 x 4 squared errors, so independent roundings average out and what is left is the drift of the
# prediction through ~30 bf16 layers (measured: 7e-4 relative at stage 2, grads' cosine similarity 0.9999).
# 1e-2 leaves 10x margin; a float32 tensor left in bf16 where it must not be (conv_out, the loss) or a
# wrong cast shows as a larger error or a non-finite loss.
BF16_LOSS_RTOL = 1e-2


@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_remat_policy_and_dtype_reach_every_network(policy):
  config = tiny(stage="stage2", remat_policy=policy, dtype="bfloat16")
  nets = stages.networks(config, stages.variant_configs(config))
  mp = nets.model.config
  assert mp.unet.remat_policy == policy and mp.pose.remat_policy == policy
  assert nets.model.dtype == np.dtype("bfloat16") and nets.vae.dtype == np.dtype("bfloat16")


def test_unknown_policy_and_dtype_are_named():
  config = tiny(remat_policy="sometimes")
  with pytest.raises(ValueError, match="remat_policy: 'sometimes'"):
    stages.networks(config, stages.variant_configs(config))
  config = tiny(dtype="bfloat17")
  with pytest.raises(ValueError, match="config.dtype='bfloat17'"):
    stages.networks(config, stages.variant_configs(config))


def test_bf16_compute_gives_the_fp32_loss_within_bf16_precision():
  config = tiny(stage="stage1")
  sd, base, _ = stages.load_base(config)  # a random base on the host: no init to compile
  nets = stages.networks(config, sd)
  trainable, frozen = stages.initial_params(config, nets, sd, base)  # float32 masters, whatever the compute dtype
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for k in ("reference", "target", "pose")}
  losses = {}
  for dtype in ("float32", "bfloat16"):
    c = tiny(stage="stage1", dtype=dtype)
    nets = stages.networks(c, stages.variant_configs(c))
    fn = functools.partial(loss_fn, nets=nets, schedule=make_schedule(nets.schedule), drop_reference=0.0,
                           drop_pose=0.0)
    losses[dtype] = float(jax.jit(fn)(trainable, frozen, batch, jax.random.key(3)))
  assert np.isfinite(losses["bfloat16"])
  assert losses["bfloat16"] != losses["float32"]  # the switch took effect
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=BF16_LOSS_RTOL)
