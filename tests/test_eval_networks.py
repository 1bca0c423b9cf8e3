"""LPIPS and FID networks against PyTorch references (random weights in the released files' layouts: the layouts,
layer tables and pools are what can go wrong), the Fréchet distance against scipy, and the missing-weights
messages."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

from magicpose_jax.eval import fid as fid_lib
from magicpose_jax.eval.fid import (
  WEIGHT_STEM,
  fid_from_features,
  find_inception_weights,
  frechet_distance,
  inception_features,
  random_inception,
)
from magicpose_jax.eval.lpips import (
  _ARCHITECTURES,
  WEIGHT_FILES,
  MissingWeights,
  _convs,
  _tap_channels,
  find_lpips_weights,
  load_lpips,
  lpips,
  random_lpips,
)


def _images(n, size, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return a, np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)


def _nchw(images):
  return torch.tensor(images).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------------------------------------------
# LPIPS


def _torch_lpips(backbone, lins, net, a, b):
  """LPIPS v0.1 as richzhang/PerceptualSimilarity computes it, with torch.nn.functional."""
  shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
  scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]

  def features(x):
    x, out = (x / 127.5 - 1 - shift) / scale, []
    for op in _ARCHITECTURES[net]:
      if op == "tap":
        out.append(x)
      elif op[0] == "conv":
        _, i, _, _, stride, pad = op
        x = F.relu(F.conv2d(x, backbone[f"features.{i}.weight"], backbone[f"features.{i}.bias"], stride, pad))
      else:
        x = F.max_pool2d(x, op[1], op[2])
    return out

  total = 0
  for k, (fa, fb) in enumerate(zip(features(_nchw(a)), features(_nchw(b)), strict=True)):
    na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    total = total + F.conv2d((na - nb) ** 2, lins[f"lin{k}.model.1.weight"]).mean((2, 3))
  return total[:, 0].numpy()


@pytest.mark.parametrize("net,size", [("alex", 64), pytest.param("vgg", 32, marks=pytest.mark.slow)])
def test_lpips_matches_torch_from_files(tmp_path, net, size):
  g = torch.Generator().manual_seed(0)
  backbone = {}
  for i, cin, cout, k, _, _ in _convs(net):
    backbone[f"features.{i}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5
    backbone[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.1
  lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(_tap_channels(net))}
  stem, lin_stem = (s for s, _ in WEIGHT_FILES[net])
  save_file({k: v.numpy() for k, v in backbone.items()}, str(tmp_path / f"{stem}.safetensors"))
  torch.save(lins, tmp_path / f"{lin_stem}.pth")
  model = load_lpips(net, *find_lpips_weights(str(tmp_path), net))
  a, b = _images(3, size)
  ours = lpips(model, a, b, batch_size=2)  # a padded last batch
  np.testing.assert_allclose(ours, _torch_lpips(backbone, lins, net, a, b), rtol=2e-5)
  np.testing.assert_allclose(lpips(model, a, a), 0.0, atol=1e-6)


def test_lpips_random_network_and_errors(tmp_path):
  model = random_lpips("alex")
  a, b = _images(3, 64, seed=1)  # padded to 4 rows: the evaluate CLI's tests use these shapes too, one compile
  assert np.all(lpips(model, a, b) > lpips(model, a, a))
  with pytest.raises(ValueError, match="at least 31x31"):
    lpips(model, a[:, :24, :24], b[:, :24, :24])
  with pytest.raises(MissingWeights, match="alexnet-owt-7be5be79.pth .*download.pytorch.org.* and alex.pth"):
    find_lpips_weights(str(tmp_path), "alex")
  with pytest.raises(MissingWeights, match="no --weights directory"):
    find_lpips_weights(None, "vgg")


# ----------------------------------------------------------------------------------------------------------------
# FID


def _torch_inception(state, images):
  """pytorch-fid's FID InceptionV3 pool3 with torch.nn.functional (blocks as in torchvision + pytorch-fid)."""

  def c(name, x, stride=1, padding=0):
    x = F.conv2d(x, state[f"{name}.conv.weight"], None, stride, padding)
    x = F.batch_norm(x, state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"], state[f"{name}.bn.weight"],
                     state[f"{name}.bn.bias"], eps=1e-3)
    return F.relu(x)

  avg = lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
  x = F.interpolate(_nchw(images) / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
  x = c("Conv2d_2b_3x3", c("Conv2d_2a_3x3", c("Conv2d_1a_3x3", x, 2)), padding=1)
  x = F.max_pool2d(x, 3, 2)
  x = F.max_pool2d(c("Conv2d_4a_3x3", c("Conv2d_3b_1x1", x)), 3, 2)
  for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = torch.cat([c(f"{n}.branch1x1", x), c(f"{n}.branch5x5_2", c(f"{n}.branch5x5_1", x), padding=2),
                   c(f"{n}.branch3x3dbl_3", c(f"{n}.branch3x3dbl_2", c(f"{n}.branch3x3dbl_1", x), padding=1),
                     padding=1), c(f"{n}.branch_pool", avg(x))], 1)
  n = "Mixed_6a"
  x = torch.cat([c(f"{n}.branch3x3", x, 2),
                 c(f"{n}.branch3x3dbl_3", c(f"{n}.branch3x3dbl_2", c(f"{n}.branch3x3dbl_1", x), padding=1), 2),
                 F.max_pool2d(x, 3, 2)], 1)
  row, col = (0, 3), (3, 0)  # paddings of the (1, 7) and (7, 1) convs
  for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    b7 = c(f"{n}.branch7x7_3", c(f"{n}.branch7x7_2", c(f"{n}.branch7x7_1", x), padding=row), padding=col)
    b7d = c(f"{n}.branch7x7dbl_1", x)
    for i, pad in zip(range(2, 6), (col, row, col, row), strict=True):
      b7d = c(f"{n}.branch7x7dbl_{i}", b7d, padding=pad)
    x = torch.cat([c(f"{n}.branch1x1", x), b7, b7d, c(f"{n}.branch_pool", avg(x))], 1)
  n = "Mixed_7a"
  b7 = c(f"{n}.branch7x7x3_3", c(f"{n}.branch7x7x3_2", c(f"{n}.branch7x7x3_1", x), padding=row), padding=col)
  x = torch.cat([c(f"{n}.branch3x3_2", c(f"{n}.branch3x3_1", x), 2), c(f"{n}.branch7x7x3_4", b7, 2),
                 F.max_pool2d(x, 3, 2)], 1)
  for n, pool in (("Mixed_7b", avg), ("Mixed_7c", lambda h: F.max_pool2d(h, 3, 1, 1))):
    b3 = c(f"{n}.branch3x3_1", x)
    b3d = c(f"{n}.branch3x3dbl_2", c(f"{n}.branch3x3dbl_1", x), padding=1)
    x = torch.cat([c(f"{n}.branch1x1", x), c(f"{n}.branch3x3_2a", b3, padding=(0, 1)),
                   c(f"{n}.branch3x3_2b", b3, padding=(1, 0)), c(f"{n}.branch3x3dbl_3a", b3d, padding=(0, 1)),
                   c(f"{n}.branch3x3dbl_3b", b3d, padding=(1, 0)), c(f"{n}.branch_pool", pool(x))], 1)
  return x.mean((2, 3)).numpy()


def test_inception_matches_torch():
  # A narrow network (channels / 16) in the released file's key layout, with non-trivial batch-norm statistics.
  width = 16
  full, full_dims = fid_lib._specs(1)
  assert len(full) == 94 and full_dims == 2048  # torchvision's Inception3 has 94 BasicConv2d; pool3 is 2048-d
  specs, dims = fid_lib._specs(width)
  g = torch.Generator().manual_seed(0)
  state = {}
  for name, (cin, cout, (kh, kw), _, _) in specs.items():
    state[f"{name}.conv.weight"] = torch.randn(cout, cin, kh, kw, generator=g) * (2 / (cin * kh * kw)) ** 0.5
    state[f"{name}.bn.weight"] = 1 + 0.1 * torch.randn(cout, generator=g)
    state[f"{name}.bn.bias"] = 0.1 * torch.randn(cout, generator=g)
    state[f"{name}.bn.running_mean"] = 0.1 * torch.randn(cout, generator=g)
    state[f"{name}.bn.running_var"] = 1 + 0.2 * torch.rand(cout, generator=g)
  params = fid_lib._params_from_state({k: v.numpy() for k, v in state.items()}, "test", width)
  model = fid_lib.Inception(params, width, "test")
  images = np.concatenate([_images(2, 64)[0], _images(1, 64, seed=2)[0]])
  ours = inception_features(model, images, batch_size=4)  # padded to 4 rows
  assert ours.shape == (3, dims)
  np.testing.assert_allclose(ours, _torch_inception(state, images), rtol=1e-4, atol=1e-5)


def test_resize_matches_torch_when_shrinking():
  # pytorch-fid resizes with bilinear, no antialiasing; jax.image.resize antialiases unless told not to.
  import jax  # noqa: PLC0415

  x = np.random.default_rng(0).random((1, 400, 333, 3)).astype(np.float32)
  ours = np.asarray(jax.image.resize(x, (1, 299, 299, 3), "linear", antialias=False))
  ref = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_frechet_distance_matches_scipy():
  from scipy.linalg import sqrtm  # noqa: PLC0415

  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(50, 8)), rng.normal(size=(60, 8)) * 1.5 + 0.3
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  ref = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm(s1 @ s2)).real
  np.testing.assert_allclose(frechet_distance(x.mean(0), s1, y.mean(0), s2), ref, rtol=1e-10)
  assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
  with pytest.raises(ValueError, match="at least 2 images"):
    fid_from_features(x[:1], y)


def test_random_inception_and_missing_weights(tmp_path):
  model = random_inception()  # the same shapes as above: no second compile
  a, b = _images(3, 48)
  features = inception_features(model, np.concatenate([a, b]), batch_size=4)  # batches of 4: 4 + 2 (padded)
  assert np.isfinite(features).all() and features.shape[0] == 6
  with pytest.raises(MissingWeights, match=f"{WEIGHT_STEM}.pth .*github.com/mseitzer"):
    find_inception_weights(str(tmp_path))
  (tmp_path / f"{WEIGHT_STEM}.pth").touch()
  assert find_inception_weights(str(tmp_path)).endswith(".pth")
