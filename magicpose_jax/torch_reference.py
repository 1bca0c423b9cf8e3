"""The PyTorch reference of MagicPose, built from diffusers' own classes: what parity tests, benchmarks and
`examples/torch_magicpose_step.py` compare against. Needs the test/reference extra (torch, diffusers,
transformers: `requirements-test.txt`); imports no JAX.

MagicPose needs one thing diffusers does not ship, reference attention, written here as attention processors on
the self-attentions (`attn1`):
  * on the appearance UNet, every `attn1` records its input: the block's normed states, computed on the clean
    reference latent with the same t and text as the main UNet (`Record`, or `RecordProcessor` into a bank);
  * on the main UNet, every `attn1` attends over `[h ; r]` (its own states and the recorded ones of the same
    block), with its own `to_q`/`to_k`/`to_v`: keys/values grow, queries do not (`ConcatKV`, or
    `ReferenceProcessor` reading the bank).
The composition (`model_output`, `guided_output`) adds the pose ControlNet's 12 + 1 residuals to the main UNet
and runs classifier-free guidance as the release does (unconditional branch: plain SD, no reference, no pose).

Layout helpers: `nchw`/`nhwc` move between our NHWC numpy arrays and PyTorch's NCHW tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

if TYPE_CHECKING:  # only for annotations: this module never imports JAX
  from magicpose_jax.models.unet import UNetConfig


# ---------------------------------------------------------------------------------------------------------------
# Random reference networks and layouts.


def torch_unet(config: UNetConfig, seed: int = 0) -> UNet2DConditionModel:
  """diffusers' UNet with the same architecture, randomly initialised with `seed`.

  PyTorch's default init leaves every norm at weight 1 / bias 0, which would hide a
  swapped scale/bias in the converter; those are perturbed too.
  """
  torch.manual_seed(seed)
  kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
  model = UNet2DConditionModel(**kwargs).eval()
  perturb_norms(model, seed)
  return model


def perturb_norms(model: torch.nn.Module, seed: int) -> None:
  """Adds seeded noise to every GroupNorm/LayerNorm weight and bias (PyTorch inits them to 1 and 0)."""
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
        module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=gen))
        module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=gen))


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """The model's state dict as host numpy arrays (PyTorch names and layouts)."""
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def nchw(x: np.ndarray) -> torch.Tensor:
  """NHWC numpy -> NCHW torch."""
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
  """NCHW torch -> NHWC numpy."""
  return x.detach().cpu().numpy().transpose(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------------------------
# Reference attention as processors on any diffusers UNet.


class ConcatKV:
  """`attn1` processor: `softmax(Q(h) K([h; r])ᵀ / √d) V([h; r])`, with `r = source(h)`."""

  def __init__(self, source: Callable[[torch.Tensor], torch.Tensor]):
    self.source = source

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
    h = hidden_states
    return attend(attn, h, torch.cat([h, self.source(h)], dim=1))  # keys/values [B, N + R, C]


class Record:
  """`attn1` processor that appends its input to `store` and otherwise runs `inner` (diffusers' default)."""

  def __init__(self, store: list, inner):
    self.store, self.inner = store, inner

  def __call__(self, attn, hidden_states, *args, **kwargs):
    self.store.append(hidden_states.clone())
    return self.inner(attn, hidden_states, *args, **kwargs)


def set_self_attention(model: torch.nn.Module, make: Callable) -> None:
  """Replaces every `attn1` processor of `model` by `make(old_processor)`; cross-attention stays."""
  procs = {}
  for name, proc in model.attn_processors.items():
    procs[name] = make(proc) if name.endswith("attn1.processor") else proc
  model.set_attn_processor(procs)


# ---------------------------------------------------------------------------------------------------------------
# A MagicPose export in PyTorch: models, reference attention by block name, one guided step.


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


def attend(attn, h: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
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
    return attend(attn, hidden_states, hidden_states)


class ReferenceProcessor:
  """Main UNet `attn1`: attention over `[h ; r]` where the bank is read, plain self-attention elsewhere."""

  def __init__(self, bank: ReferenceBank, name: str):
    self.bank, self.name = bank, name

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
    h = hidden_states
    plain = attend(attn, h, h)
    if not self.bank.reading:
      return plain
    r = self.bank.states[self.name]
    r = r.expand(h.shape[0], *r.shape[1:]) if r.shape[0] == 1 else r  # one reference for every row
    with_ref = attend(attn, h, torch.cat([h, r], dim=1))  # keys/values [B, N + R, C]
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
