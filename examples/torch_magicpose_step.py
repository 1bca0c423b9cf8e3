"""One MagicPose denoising step in PyTorch, from a magicpose_jax export, with diffusers' own classes.

    python -m magicpose_jax.convert --src runs/stage2 --to diffusers --dst export/
    python examples/torch_magicpose_step.py export/ [--reference image.png] [--pose pose.png] [--steps 50]

The export folder holds `unet/` (the frozen SD UNet), `appearance_unet/` (a `UNet2DConditionModel`),
`pose_controlnet/` (a `ControlNetModel`), `vae/`, `text_encoder/`, `scheduler/` and `magicpose.json`.
MagicPose needs one thing diffusers does not ship, reference attention, written here as two attention
processors:
  * on the appearance UNet, every self-attention (`attn1`) records its input: the block's normed states,
    computed on the clean reference latent with the same t and text as the main UNet;
  * on the main UNet, every `attn1` attends over `[h ; r]` (its own states and the recorded ones of the
    same-named block), with its own `to_q`/`to_k`/`to_v`: keys/values grow, queries do not.
The ControlNet runs on the noisy latent and the pose image (RGB in [0, 1]) and its 12 + 1 residuals go to the
main UNet as `down_block_additional_residuals` / `mid_block_additional_residual`. Classifier-free guidance
(MagicPose's release): the unconditional branch is the plain SD UNet (no reference, no pose).
Needs torch, diffusers and transformers only (no JAX).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel


@dataclasses.dataclass
class MagicPoseModels:
  unet: UNet2DConditionModel
  appearance_unet: UNet2DConditionModel | None
  pose_controlnet: ControlNetModel | None
  vae: AutoencoderKL
  text_encoder: CLIPTextModel
  scheduler: DDIMScheduler
  manifest: dict


def load_export(folder: str, dtype: torch.dtype = torch.float32) -> MagicPoseModels:
  """Every model of the export folder (eval mode), and its `magicpose.json`."""
  with open(os.path.join(folder, "magicpose.json")) as f:
    manifest = json.load(f)
  load = lambda cls, name: cls.from_pretrained(os.path.join(folder, name), torch_dtype=dtype).eval()
  appearance = manifest.get("appearance_unet")
  pose = manifest.get("pose_controlnet")
  return MagicPoseModels(
      unet=load(UNet2DConditionModel, "unet"),
      appearance_unet=load(UNet2DConditionModel, appearance) if appearance else None,
      pose_controlnet=load(ControlNetModel, pose) if pose else None,
      vae=load(AutoencoderKL, "vae"),
      text_encoder=load(CLIPTextModel, "text_encoder"),
      scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
      manifest=manifest)


# ---------------------------------------------------------------------------------------------------------------
# Reference attention.


class ReferenceBank:
  """The appearance UNet's recorded `attn1` inputs, by processor name, and which rows of the main batch read them."""

  def __init__(self):
    self.states: dict[str, torch.Tensor] = {}
    self.use_reference: torch.Tensor | None = None  # [B] bool; None: every row reads the reference
    self.reading = False


def _attention(attn, h: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
  """diffusers' scaled-dot-product self-attention with keys/values from `kv` (SD blocks: no norms, no residual)."""
  b = h.shape[0]
  q, k, v = attn.to_q(h), attn.to_k(kv), attn.to_v(kv)
  head_dim = k.shape[-1] // attn.heads
  split = lambda x: x.view(b, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, N, d]
  out = F.scaled_dot_product_attention(split(q), split(k), split(v))
  out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim)  # [B, N, C]
  return attn.to_out[1](attn.to_out[0](out))


class RecordProcessor:
  """Appearance UNet `attn1`: stores its input (the normed states) and attends as usual."""

  def __init__(self, bank: ReferenceBank, name: str):
    self.bank, self.name = bank, name

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
    self.bank.states[self.name] = hidden_states
    return _attention(attn, hidden_states, hidden_states)


class ReferenceProcessor:
  """Main UNet `attn1`: attention over `[h ; r]` where the bank is read, plain self-attention elsewhere."""

  def __init__(self, bank: ReferenceBank, name: str):
    self.bank, self.name = bank, name

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
    h = hidden_states
    plain = _attention(attn, h, h)
    if not self.bank.reading:
      return plain
    r = self.bank.states[self.name]
    r = r.expand(h.shape[0], *r.shape[1:]) if r.shape[0] == 1 else r  # one reference for every row
    with_ref = _attention(attn, h, torch.cat([h, r], dim=1))  # keys/values [B, N + R, C]
    mask = self.bank.use_reference
    return with_ref if mask is None else torch.where(mask[:, None, None], with_ref, plain)


def install_reference_attention(models: MagicPoseModels) -> ReferenceBank:
  """Sets the processors on both UNets (only `attn1`, the self-attentions); returns their shared bank."""
  bank = ReferenceBank()
  for unet, make in ((models.appearance_unet, RecordProcessor), (models.unet, ReferenceProcessor)):
    unet.set_attn_processor({name: make(bank, name) if name.endswith("attn1.processor") else proc
                             for name, proc in unet.attn_processors.items()})
  return bank


# ---------------------------------------------------------------------------------------------------------------
# The step.


@torch.no_grad()
def empty_prompt_states(models: MagicPoseModels) -> torch.Tensor:
  """The empty prompt's text states `[1, L, D]` MagicPose conditions on (ids and layer from magicpose.json)."""
  ids = torch.tensor([models.manifest["empty_prompt_ids"]], dtype=torch.long)
  skip = models.manifest.get("text_clip_skip", 0)
  out = models.text_encoder(ids, output_hidden_states=skip > 0)
  if skip == 0:
    return out.last_hidden_state
  return models.text_encoder.text_model.final_layer_norm(out.hidden_states[-(skip + 1)])


@torch.no_grad()
def model_output(models: MagicPoseModels, bank: ReferenceBank, z_t: torch.Tensor, t: torch.Tensor,
                 text: torch.Tensor, z_ref: torch.Tensor | None, pose_image: torch.Tensor | None,
                 use_reference: torch.Tensor | None = None, use_pose: torch.Tensor | None = None) -> torch.Tensor:
  """MagicPose's noise (or v) prediction, NCHW.

  Args:
    z_t: `[B, 4, h, w]` noisy latents; t: `[B]` timesteps; text: `[B, L, D]`.
    z_ref: `[1 or B, 4, h, w]` the clean (scaled) reference latent, when the export has an appearance net.
    pose_image: `[B, 3, f*h, f*w]` RGB in [0, 1], when it has a pose ControlNet.
    use_reference, use_pose: `[B]` bool row switches (guidance batches rows without either).
  """
  bank.reading = False
  if models.appearance_unet is not None:
    bank.states.clear()
    n = z_ref.shape[0]
    models.appearance_unet(z_ref, t[:n], text[:n])  # its output is unused: only the recorded states matter
    bank.reading, bank.use_reference = True, use_reference
  down = mid = None
  if models.pose_controlnet is not None:
    down, mid = models.pose_controlnet(z_t, t, encoder_hidden_states=text, controlnet_cond=pose_image,
                                       return_dict=False)
    if use_pose is not None:
      gate = use_pose.to(mid.dtype)[:, None, None, None]
      down, mid = [d * gate for d in down], mid * gate
  out = models.unet(z_t, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
  bank.reading = False
  return out


def guided_output(models: MagicPoseModels, bank: ReferenceBank, z_t: torch.Tensor, t: torch.Tensor,
                  text: torch.Tensor, z_ref: torch.Tensor | None, pose_image: torch.Tensor | None,
                  guidance: float = 7.0) -> torch.Tensor:
  """`uncond + guidance * (cond - uncond)`, both branches in one batch (uncond: plain SD, no reference or pose)."""
  b = z_t.shape[0]
  on, off = torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
  switches = torch.cat([on, off])
  pose2 = None if pose_image is None else torch.cat([pose_image, pose_image])
  ref2 = None if z_ref is None or z_ref.shape[0] == 1 else torch.cat([z_ref, z_ref])
  out = model_output(models, bank, torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([text, text]),
                     z_ref if ref2 is None else ref2, pose2,
                     use_reference=switches, use_pose=switches)
  cond, uncond = out.chunk(2)
  return uncond + guidance * (cond - uncond)


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
