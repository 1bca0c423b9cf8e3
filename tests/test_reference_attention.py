"""`eval.reference_attention` against attention patterns whose statistics are known in closed form, and the sown
queries/keys against the main UNet's reference states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magicpose_jax.eval.reference_attention import (
  attention_stats,
  part_token,
  query_map,
  reference_layers,
  token_labels,
)
from magicpose_jax.models.random_init import random_params
from magicpose_jax.models.unet import VARIANTS, UNet2DConditionModel, abstract_unet_params

N = 16  # tokens of the target and of the reference (a 4 x 4 grid)


def _labels(seed):
  labels = np.random.default_rng(seed).integers(0, 4, size=(1, N))
  labels[0, :3] = (1, 2, 3)  # every part present; some background (0) too
  return labels


def test_uniform_attention_reads_the_average():
  """q = 0: every key weighs the same, so half the mass is on the reference (N own + N reference keys), the
  entropies are 1 and the share on the same part is that part's area of the reference (chance)."""
  target, ref = _labels(0), _labels(1)
  q = np.zeros((1, N, 2, 4))
  k = np.random.default_rng(2).normal(size=(1, 2 * N, 2, 4))
  s = attention_stats(q, k, target, ref)
  assert s["reference_mass"] == pytest.approx(0.5)
  assert s["entropy"] == pytest.approx(1.0) and s["own_entropy"] == pytest.approx(1.0)
  fg = target[0] > 0
  chance = np.mean([(ref[0] == label).mean() for label in target[0][fg]])
  assert s["chance"] == pytest.approx(chance) and s["part_match"] == pytest.approx(chance)


def test_part_aligned_keys_match_the_part():
  """Queries and reference keys as scaled one-hot codes of their part: each query puts all its reference
  attention on its own part's tokens, spread evenly over them."""
  target, ref = _labels(3), _labels(4)
  eye = np.eye(4)
  q = 50.0 * eye[target[0]][None, :, None, :]  # [1, N, 1, 4]
  own = np.zeros((1, N, 1, 4))
  k = np.concatenate([own, eye[ref[0]][None, :, None, :]], axis=1)
  s = attention_stats(q, k, target, ref)
  assert s["part_match"] == pytest.approx(1.0, abs=1e-6)
  fg = target[0] > 0
  expected = np.mean([np.log((ref[0] == label).sum()) / np.log(N) for label in target[0][fg]])
  assert s["entropy"] == pytest.approx(expected, abs=1e-6)
  assert s["part_match"] > 3 * s["chance"]
  # ~all the mass is on the reference; the own keys (all zero) still tie, so that part's entropy is exactly 1
  assert s["reference_mass"] > 1 - 1e-9 and s["own_entropy"] == pytest.approx(1.0)


def test_query_map_and_part_token():
  """A query aligned with one reference key puts (almost) all its reference attention there; a zero query spreads
  it evenly. The part's token nearest its centroid is the middle of a 3 x 3 block."""
  k = np.zeros((1, 2 * N, 1, 4))
  k[0, N + 5, 0] = (1, 0, 0, 0)
  q = np.zeros((1, N, 1, 4))
  q[0, 2, 0] = (100, 0, 0, 0)
  assert query_map(q, k, 0, 2).argmax() == 5 and query_map(q, k, 0, 2)[5] > 0.99
  np.testing.assert_allclose(query_map(q, k, 0, 0), np.full(N, 1 / N))
  labels = np.zeros((6, 6), int)
  labels[1:4, 2:5] = 7
  assert part_token(labels.reshape(-1), 7) == 2 * 6 + 3 and part_token(labels.reshape(-1), 1) is None


def test_token_labels_take_each_cells_majority():
  mask = np.zeros((8, 8), np.uint8)
  mask[:4, :4] = 2  # top-left cell of a 2 x 2 grid
  mask[:3, 4:] = 5  # 12 of the top-right cell's 16 pixels
  mask[6:, 6:] = 1  # 4 of the bottom-right's: background wins
  np.testing.assert_array_equal(token_labels(mask, 2), [2, 5, 0, 0])
  with pytest.raises(ValueError, match="divides by 3"):
    token_labels(mask, 3)


def test_sown_queries_and_keys_follow_the_reference_states():
  """One (q, k) per reference state, in the states' order: k holds the layer's own tokens, then the state's
  projected by the layer's `to_k` (a linear map of that state: least squares fits it exactly, as it would not fit
  another layer's state of the same shape)."""
  config = VARIANTS["tiny"]
  unet = UNet2DConditionModel(config)
  params = random_params(abstract_unet_params(config), seed=0)
  z = jax.random.normal(jax.random.key(0), (1, 16, 16, 4))
  t = jnp.array([500])
  text = jax.random.normal(jax.random.key(1), (1, 77, config.cross_attention_dim))
  _, states = unet.apply({"params": params}, z, t, text, return_reference_states=True, compute_output=False)
  _, sown = unet.apply({"params": params}, z, t, text, None, None, states, mutable=["intermediates"])
  layers = reference_layers(sown["intermediates"])
  assert len(layers) == len(states) > 1
  for (q, k), r in zip(layers, states, strict=True):
    n = q.shape[1]
    assert k.shape[1] == n + r.shape[1]
    x = np.asarray(r[0], np.float64)
    y = k[0, n:].reshape(r.shape[1], -1).astype(np.float64)
    w = np.linalg.lstsq(x, y, rcond=None)[0]
    assert np.abs(x @ w - y).max() < 1e-4 * np.abs(y).max()
  x, y = np.asarray(states[0][0], np.float64), layers[-1][1][0, -states[0].shape[1]:].reshape(states[0].shape[1], -1)
  w = np.linalg.lstsq(x, y, rcond=None)[0]
  assert np.abs(x @ w - y).max() > 1e-2 * np.abs(y).max()  # the last layer's keys are not a map of the first state
  # Without the collection, sowing is a no-op: the plain call returns the prediction alone.
  assert unet.apply({"params": params}, z, t, text, None, None, states).shape == z.shape
