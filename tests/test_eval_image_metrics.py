"""L1, PSNR and SSIM: SSIM and PSNR against scikit-image (the independent reference), L1 by hand, input checks."""

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from magicpose_jax.eval.image_metrics import PSNR_MAX_DB, image_metrics, l1, psnr, ssim


def _pair(shape, noise, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth content plus noise: SSIM well away from both 0 and 1.
  base = rng.integers(0, 256, (shape[0], shape[1] // 4 + 1, shape[2] // 4 + 1, 3)).repeat(4, 1).repeat(4, 2)
  a = base[:, : shape[1], : shape[2]].astype(np.uint8)
  b = np.clip(a + rng.normal(0, noise, a.shape), 0, 255).astype(np.uint8)
  return a, b


def _skimage_ssim(a, b):
  return structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                               data_range=255)


@pytest.mark.parametrize("shape,noise", [((3, 32, 48, 3), 25.0), ((2, 11, 17, 3), 60.0), ((1, 64, 64, 3), 4.0)])
def test_ssim_matches_skimage(shape, noise):
  a, b = _pair(shape, noise)
  ours = ssim(a, b)
  reference = [_skimage_ssim(a[i], b[i]) for i in range(len(a))]
  assert ours.shape == (len(a),)
  np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)
  assert np.all(ours < 0.999)


def test_psnr_matches_skimage_and_caps_identical_images():
  a, b = _pair((3, 20, 24, 3), 15.0, seed=1)
  np.testing.assert_allclose(psnr(a, b), [peak_signal_noise_ratio(a[i], b[i], data_range=255) for i in range(3)],
                             rtol=1e-12)
  assert psnr(a, a).tolist() == [PSNR_MAX_DB] * 3


def test_l1_on_unit_scale_and_single_images():
  black, white = np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)
  assert l1(black, white).tolist() == [1.0]
  half = black.copy()
  half[:8] = 51  # half the pixels off by 0.2
  np.testing.assert_allclose(l1(half, black), [0.1])
  metrics = image_metrics(white, white)
  assert {k: v.tolist() for k, v in metrics.items()} == {"l1": [0.0], "psnr": [PSNR_MAX_DB], "ssim": [1.0]}


def test_input_errors_name_the_problem():
  a = np.zeros((2, 16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match="shapes differ"):
    l1(a, a[:1])
  with pytest.raises(ValueError, match="pred: expected dtype uint8"):
    psnr(a.astype(np.float32), a)
  with pytest.raises(ValueError, match=r"target: expected uint8 \[H, W, 3\]"):
    psnr(a, a[..., :1])
  with pytest.raises(ValueError, match="at least 11x11"):
    ssim(a[:, :8], a[:, :8])
