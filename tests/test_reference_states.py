"""MagicPose's reference-state hook vs an independent PyTorch computation.

The PyTorch side is diffusers' UNet with the processors of `magicpose_jax.torch_reference`: one
records every `attn1` input (the normed states) of an "appearance" UNet, the other
makes the main UNet's `attn1` take keys/values over `[h ; r_i]`. Tolerance as in
the UNet parity tests: max abs error <= 1e-4 in float32.
"""

import jax
import numpy as np
import pytest
import torch
from test_unet_parity import ATOL, CONFIGS, _check, _inputs

from magicpose_jax.convert.diffusers import unet_key_table
from magicpose_jax.models.random_init import random_params
from magicpose_jax.models.unet import UNet2DConditionModel, abstract_unet_params
from magicpose_jax.torch_reference import (
  ConcatKV,
  Record,
  nchw,
  nhwc,
  set_self_attention,
  state_dict_numpy,
  torch_unet,
)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_duplicated_sequence(name):
  """reference_states = the UNet's own normed states == attention over [h; h].

  Duplicating every key/value leaves softmax attention unchanged, so this pins the
  plumbing (state order, shapes, concatenation axis) but cannot tell the hook from a
  no-op; `test_appearance_states_from_another_unet` is the test that can.
  """
  config = CONFIGS[name]
  tmodel = torch_unet(config, seed=10)
  params = unet_key_table(config).to_flax(state_dict_numpy(tmodel))
  sample, t, context = _inputs(config, seed=10)
  set_self_attention(tmodel, lambda _: ConcatKV(lambda h: h))
  with torch.no_grad():
    ref = nhwc(tmodel(nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample)

  model = UNet2DConditionModel(config)
  _, states = model.apply({"params": params}, sample, t, context, return_reference_states=True)
  assert len(states) == config.num_reference_states
  ours = model.apply({"params": params}, sample, t, context, reference_states=states)
  _check(ours, ref)


def test_appearance_states_from_another_unet():
  """MagicPose proper: states written by a second UNet on another latent, read by the main UNet."""
  config = CONFIGS["sd1"]
  tmain, tapp = torch_unet(config, seed=11), torch_unet(config, seed=12)
  table = unet_key_table(config)
  main_params, app_params = table.to_flax(state_dict_numpy(tmain)), table.to_flax(state_dict_numpy(tapp))
  sample, t, context = _inputs(config, seed=11)
  reference, _, _ = _inputs(config, seed=12)

  recorded = []
  set_self_attention(tapp, lambda proc: Record(recorded, proc))
  with torch.no_grad():
    tapp(nchw(reference), torch.from_numpy(t), torch.from_numpy(context))
  queue = list(recorded)
  set_self_attention(tmain, lambda _: ConcatKV(lambda h: queue.pop(0)))
  with torch.no_grad():
    ref = nhwc(tmain(nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample)
  assert not queue, "every recorded state must be consumed exactly once"

  model = UNet2DConditionModel(config)
  _, states = jax.jit(lambda p, x: model.apply({"params": p}, x, t, context, return_reference_states=True))(
      app_params, reference)
  assert len(states) == len(recorded) == config.num_reference_states
  for ours, theirs in zip(states, recorded, strict=True):
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=ATOL)
  ours = jax.jit(lambda p, s: model.apply({"params": p}, sample, t, context, reference_states=s))(
      main_params, states)
  _check(ours, ref)
  plain = model.apply({"params": main_params}, sample, t, context)
  assert np.abs(np.asarray(plain) - ref).max() > 100 * ATOL, "the reference states must change the output"


def test_wrong_number_of_states_is_an_error():
  config = CONFIGS["sd1"]
  sample, t, context = _inputs(config)
  model = UNet2DConditionModel(config)
  params = jax.eval_shape(model.init, jax.random.key(0), sample, t, context)["params"]
  with pytest.raises(ValueError, match=f"expected {config.num_reference_states} arrays"):
    jax.eval_shape(lambda p: model.apply({"params": p}, sample, t, context,
                                         reference_states=[np.zeros((2, 4, 32))] * 3), params)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_reference_mask_drops_the_reference_per_row(remat):
  """Guidance batches rows with and without reference: masked rows must equal the plain UNet."""
  config = CONFIGS["sd1"].replace(remat_policy=remat)
  model = UNet2DConditionModel(config)
  sample, t, context = _inputs(config, seed=13)
  reference, _, _ = _inputs(config, seed=14)
  # Host draws of flax's init rules: a jitted `model.init` compiles for ~40 s (one RNG program per param).
  params, app_params = (random_params(abstract_unet_params(config), seed) for seed in (13, 14))
  apply = jax.jit(model.apply, static_argnames="return_reference_states")
  _, states = apply({"params": app_params}, reference, t, context, return_reference_states=True)
  with_ref = apply({"params": params}, sample, t, context, reference_states=states)
  plain = apply({"params": params}, sample, t, context)
  mixed = apply({"params": params}, sample, t, context, reference_states=states,
                reference_mask=np.array([True, False]))
  assert np.abs(np.asarray(with_ref[1]) - np.asarray(plain[1])).max() > 100 * ATOL  # the reference matters
  np.testing.assert_allclose(np.asarray(mixed[0]), np.asarray(with_ref[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(mixed[1]), np.asarray(plain[1]), atol=1e-5)
