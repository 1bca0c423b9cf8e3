"""Per-image reconstruction metrics: L1, PSNR and SSIM, as DisCo and MagicPose report them.

Images are uint8 RGB, one `[H, W, 3]` or a batch `[N, H, W, 3]`; every function returns float64 `[N]` (one value
per image; `[1]` for a single image). NumPy float64 throughout: SSIM's variances are differences of large sums, and
float32 would move SSIM in the fourth decimal.
"""

from __future__ import annotations

import functools

import numpy as np

DATA_RANGE = 255.0  # uint8 images
SSIM_SIGMA = 1.5  # Wang et al. 2004: gaussian window, sigma 1.5, 11 taps (radius = int(3.5 * sigma + 0.5))
SSIM_TRUNCATE = 3.5  # scikit-image's default; sets the 11-tap window
SSIM_K1, SSIM_K2 = 0.01, 0.03
PSNR_MAX_DB = 100.0  # identical images have MSE 0; a cap keeps means finite


def as_batch(images: np.ndarray, name: str = "images") -> np.ndarray:
  """uint8 `[H, W, 3]` or `[N, H, W, 3]` -> `[N, H, W, 3]`, with an error that names `name` otherwise."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name}: expected uint8 [H, W, 3] or [N, H, W, 3] RGB, got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"{name}: expected dtype uint8 (0..255), got {images.dtype}")
  return images


def check_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both as `[N, H, W, 3]` uint8 batches of the same shape."""
  pred, target = as_batch(pred, "pred"), as_batch(target, "target")
  if pred.shape != target.shape:
    raise ValueError(f"pred and target: shapes differ, {pred.shape} vs {target.shape}")
  return pred, target


def l1(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Mean absolute error on the [0, 1] scale (as DisCo reports L1): float64 [N] in [0, 1], 0 = identical."""
  pred, target = check_pair(pred, target)
  diff = np.abs(pred.astype(np.float64) - target.astype(np.float64))
  return diff.mean(axis=(1, 2, 3)) / DATA_RANGE


def psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Peak signal-to-noise ratio, data range 255, over all pixels and channels: float64 [N] in dB.

  Higher is better; identical images give `PSNR_MAX_DB` (100 dB) instead of infinity.
  """
  pred, target = check_pair(pred, target)
  mse = np.square(pred.astype(np.float64) - target.astype(np.float64)).mean(axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    db = 10.0 * np.log10(DATA_RANGE**2 / mse)
  return np.minimum(db, PSNR_MAX_DB)


@functools.cache
def _gaussian_taps(sigma: float, truncate: float) -> np.ndarray:
  """Normalised 1D gaussian [2r + 1], r = int(truncate * sigma + 0.5) (scipy.ndimage's window)."""
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 * (x / sigma) ** 2)
  return taps / taps.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
  """Separable correlation over axes 1 and 2 of [N, H, W, C], keeping only full windows: [N, H-2r, W-2r, C]."""
  k = len(taps)
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  rows = sum(t * x[:, i:i + h] for i, t in enumerate(taps))
  return sum(t * rows[:, :, i:i + w] for i, t in enumerate(taps))


def ssim(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Structural similarity (Wang et al. 2004), the mean over pixels and RGB channels: float64 [N] in [-1, 1].

  Gaussian window (sigma 1.5, 11 taps), K1 = 0.01, K2 = 0.03, data range 255, population covariances. Matches
  `skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255)`: like it, the mean leaves out the 5-pixel border where the window
  does not fit, so the border mode never matters. 1 = identical.
  """
  pred, target = check_pair(pred, target)
  taps = _gaussian_taps(SSIM_SIGMA, SSIM_TRUNCATE)
  if min(pred.shape[1:3]) < len(taps):
    raise ValueError(f"ssim: images must be at least {len(taps)}x{len(taps)} pixels, got {pred.shape[1:3]}")
  x, y = pred.astype(np.float64), target.astype(np.float64)
  mx, my = _filter_valid(x, taps), _filter_valid(y, taps)
  vx = _filter_valid(x * x, taps) - mx * mx
  vy = _filter_valid(y * y, taps) - my * my
  cxy = _filter_valid(x * y, taps) - mx * my
  c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
  s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return s.mean(axis=(1, 2, 3))


def image_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
  """{"l1", "psnr", "ssim"} -> float64 [N] per-image values (see each function for ranges)."""
  return {"l1": l1(pred, target), "psnr": psnr(pred, target), "ssim": ssim(pred, target)}
