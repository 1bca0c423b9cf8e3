"""benchmarks/autoencoder_ceiling.py: reconstructions scored with the demo's metrics. A lossless autoencoder (all 48
principal components of the 4 x 4 patches) must give back the ground truth and score perfectly; a lossy one must
not."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from magicpose_jax.configs import apply_overrides, load_config
from magicpose_jax.convert.vae import save_vae
from magicpose_jax.data.synthetic import SyntheticConfig, SyntheticSource
from magicpose_jax.demo.autoencoder import DEMO_VAE, reconstruct, save_autoencoder
from magicpose_jax.models.patch_vae import PatchVAEConfig, fit_patch_vae
from magicpose_jax.models.vae import AutoencoderKL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ceiling():
  spec = importlib.util.spec_from_file_location("autoencoder_ceiling",
                                                os.path.join(ROOT, "benchmarks", "autoencoder_ceiling.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def figures():
  source = SyntheticSource(SyntheticConfig(image_size=64, num_identities=40, frames_per_identity=2, detail="plain"))
  fit = np.stack([source.frame(v, f)["image"] for v in range(32) for f in range(2)])
  frames = [source.frame(v, 1) for v in range(32, 40)]
  return fit, frames, [source.palette(v) for v in range(32, 40)]


def _cells(row: str) -> list[float]:
  return [float(c) for c in row.strip("| ").split(" | ")[2:]]


def test_lossless_autoencoder_scores_the_ground_truth(ceiling, figures):
  fit, frames, palettes = figures
  images = np.stack([f["image"] for f in frames])
  config, params = fit_patch_vae(PatchVAEConfig(latent_channels=48), fit)
  out = reconstruct(config, params, images)
  np.testing.assert_array_equal(out, images)
  psnr, ssim, miou, identity, face, eyes, *regions = _cells(ceiling.score_row("lossless", config, params, frames,
                                                                             palettes))
  assert psnr >= 99 and ssim == 1.0 and miou == 1.0 and identity == 0.0 and face == 0.0 and regions == [0.0] * 4
  assert eyes >= 0.75  # the ground truth's own eye state (adult heads: some eyes too small to show their white)


def test_lossy_autoencoder_scores_below_the_ground_truth(ceiling, figures):
  fit, frames, palettes = figures
  config, params = fit_patch_vae(PatchVAEConfig(latent_channels=3), fit)
  psnr, ssim, miou, identity, face, eyes, *_ = _cells(ceiling.score_row("pca 3", config, params, frames, palettes))
  assert psnr < 30 and ssim < 0.95 and miou < 0.9 and identity > 0.01 and face > 0.01
  assert eyes == 0.5  # 3 components per 4 x 4 patch keep no eye white: every eye reads shut


def test_shifted_truth_rows(ceiling, figures):
  """A whole-pixel move is exact (checked against slicing); the scores fall with the distance moved."""
  _, frames, palettes = figures
  truth = np.stack([f["image"] for f in frames])
  np.testing.assert_array_equal(ceiling.shifted(truth, 2, 0)[:, 2:], truth[:, :-2])
  np.testing.assert_array_equal(ceiling.shifted(truth, 0, 1)[:, :, 1:], truth[:, :, :-1])
  np.testing.assert_array_equal(ceiling.shifted(truth, 0, 0), truth)
  rows = [_cells(ceiling.table_row("s", "-", ceiling.shifted(truth, s, 0), frames, palettes)) for s in (0, 1, 2)]
  assert rows[0][0] >= 99 and rows[0][1:5] == [1.0, 1.0, 0.0, 0.0]
  assert rows[0][0] > rows[1][0] > rows[2][0] and rows[1][2] > rows[2][2] and rows[1][3] < rows[2][3]


def test_vae_folders_of_both_formats_and_config_sets(ceiling, tmp_path):
  """`--vae` reads a pretrain's Flax autoencoder folder and a diffusers VAE folder to the same weights; `--set`
  changes configs/demo.py's data and names a field it does not have."""
  params = AutoencoderKL(DEMO_VAE).init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))["params"]
  save_autoencoder(str(tmp_path / "flax"), DEMO_VAE, params, {})
  save_vae(DEMO_VAE, params, tmp_path / "diffusers")
  (cf, pf), (cd, pd) = ceiling.load_any_vae(str(tmp_path / "flax")), ceiling.load_any_vae(str(tmp_path / "diffusers"))
  assert cf.latent_channels == cd.latent_channels == DEMO_VAE.latent_channels
  for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pd), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config = apply_overrides(load_config("demo"), ["data.synthetic.head_scale=1.5", "data.synthetic.seed=3"])
  assert config.data.synthetic.head_scale == 1.5 and config.data.synthetic.seed == 3
  with pytest.raises(SystemExit, match="no field 'data.synthetic.head_size'"):
    apply_overrides(load_config("demo"), ["data.synthetic.head_size=1.5"])
  with pytest.raises(SystemExit, match="expected KEY=VALUE"):
    apply_overrides(load_config("demo"), ["data.synthetic.head_scale"])
