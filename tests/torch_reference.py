"""Helpers to build the PyTorch reference models (diffusers) for parity tests."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from magicpose_jax.models.unet import UNetConfig


def torch_unet(config: UNetConfig, seed: int = 0) -> TorchUNet:
  """diffusers' UNet with the same architecture, randomly initialised with `seed`.

  PyTorch's default init leaves every norm at weight 1 / bias 0, which would hide a
  swapped scale/bias in the converter; those are perturbed too.
  """
  torch.manual_seed(seed)
  kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
  model = TorchUNet(**kwargs).eval()
  perturb_norms(model, seed)
  return model


def perturb_norms(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
        module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=gen))
        module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=gen))


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def nchw(x: np.ndarray) -> torch.Tensor:
  """NHWC numpy -> NCHW torch."""
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
  """NCHW torch -> NHWC numpy."""
  return x.detach().cpu().numpy().transpose(0, 2, 3, 1)
