"""One MagicPose denoising step in PyTorch, from a magicpose_jax export, with diffusers' own classes.

    python -m magicpose_jax.convert --src runs/stage2 --to diffusers --dst export/
    python examples/torch_magicpose_step.py export/ [--reference image.png] [--pose pose.png] [--steps 50]

The export folder holds `unet/` (the frozen SD UNet), `appearance_unet/` (a `UNet2DConditionModel`),
`pose_controlnet/` (a `ControlNetModel`), `vae/`, `text_encoder/`, `scheduler/` and `magicpose.json`.
MagicPose needs one thing diffusers does not ship, reference attention: `magicpose_jax.torch_reference` writes it
as attention processors (the appearance UNet's self-attentions record their inputs; the main UNet's attend over
`[h ; r]`) and composes the step with the pose ControlNet's residuals and classifier-free guidance. Needs torch,
diffusers and transformers (`requirements-test.txt`) and this package installed; it imports no JAX.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from magicpose_jax.torch_reference import empty_prompt_states, guided_output, install_reference_attention, load_export


def _image(path: str | None, size: tuple[int, int], seed: int) -> torch.Tensor:
  """`[1, 3, H, W]` in [0, 1] from an image file (resized) or, without one, random pixels."""
  if path is None:
    return torch.rand((1, 3, *size), generator=torch.Generator().manual_seed(seed))
  from PIL import Image  # noqa: PLC0415  (only for --reference/--pose)

  image = Image.open(path).convert("RGB").resize(size[::-1])
  return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("folder", help="a diffusers export (python -m magicpose_jax.convert --to diffusers)")
  parser.add_argument("--reference", help="reference image (default: random pixels)")
  parser.add_argument("--pose", help="pose image (default: random pixels)")
  parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the schedule the step is taken from")
  parser.add_argument("--guidance", type=float, default=7.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  models = load_export(args.folder)
  bank = install_reference_attention(models)
  size = tuple(models.manifest["image_size"])
  vae = models.vae
  with torch.no_grad():
    reference = _image(args.reference, size, args.seed) * 2 - 1
    z_ref = vae.encode(reference).latent_dist.mode() * vae.config.scaling_factor
  pose = _image(args.pose, size, args.seed + 1)
  scheduler = models.scheduler
  scheduler.set_timesteps(args.steps)
  t = scheduler.timesteps[:1]
  z_t = torch.randn(z_ref.shape, generator=torch.Generator().manual_seed(args.seed + 2))
  text = empty_prompt_states(models)
  eps = guided_output(models, bank, z_t, t, text, z_ref, pose if models.pose_controlnet else None, args.guidance)
  z_prev = scheduler.step(eps, t[0], z_t).prev_sample
  print(f"{models.manifest.get('stage')} model, step {models.manifest.get('step')}: t={int(t[0])} -> "
        f"{int(t[0]) - scheduler.config.num_train_timesteps // args.steps}")
  print(f"model output {tuple(eps.shape)}: mean {eps.mean():.5f}, std {eps.std():.5f}")
  print(f"z_prev {tuple(z_prev.shape)}: mean {z_prev.mean():.5f}, std {z_prev.std():.5f}")


if __name__ == "__main__":
  main()
