"""What a training stage is made of: the networks, the frozen base, and the initial trainable tree.

    stage    trainable                      frozen
    base     {"unet"}                       {"vae", "text"}          plain SD training (demo pre-training)
    stage1   {"appearance"}                 {"unet", "vae", "text"}  Appearance Controller
    stage2   {"appearance", "pose"}         {"unet", "vae", "text"}  + Pose Controller

`frozen["text"]` is the empty prompt's CLIP embedding `[1, L, D]`: MagicPose always trains with the
empty prompt (MAGICPOSE.md, "Training"), so the text encoder runs once at setup, not per step.
The frozen tree is an input of the step that is never differentiated; only `trainable` has
gradients and optimizer state.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from magicpose_jax.convert.controlnet import (
  LDM_CONTROLNET_PREFIX,
  MAGICPOSE_POSE_PREFIX,
  load_controlnet,
  load_ldm_controlnet,
)
from magicpose_jax.convert.stable_diffusion import COMPONENTS, SDConfigs, load_stable_diffusion
from magicpose_jax.diffusion.schedules import SD15_SCHEDULE, ScheduleConfig
from magicpose_jax.models import platforms
from magicpose_jax.models.attention import check_backend_platform
from magicpose_jax.models.clip import CLIP_VARIANTS, CLIPTextModel, abstract_text_encoder_params, encode_text
from magicpose_jax.models.controlnet import ControlNetConfig
from magicpose_jax.models.magicpose import POSE_INITS, MagicPose, MagicPoseConfig, init_params
from magicpose_jax.models.patch_vae import PatchVAE, abstract_autoencoder_params, make_vae
from magicpose_jax.models.random_init import random_params
from magicpose_jax.models.unet import VARIANTS, UNet2DConditionModel, abstract_unet_params
from magicpose_jax.models.vae import VAE_VARIANTS, AutoencoderKL, VAEConfig
from magicpose_jax.tokenizer import CLIPTokenizer
from magicpose_jax.train.checkpoint import is_training_run
from magicpose_jax.train.config import STAGES

Params = dict[str, Any]
TRAINABLE = {"base": ("unet",), "stage1": ("appearance",), "stage2": ("appearance", "pose")}


@dataclasses.dataclass(frozen=True)
class Networks:
  """The static half of a run: architectures and modules (hashable, so jit can close over it)."""

  stage: str
  model: MagicPose
  vae: AutoencoderKL | PatchVAE
  schedule: ScheduleConfig

  @property
  def unet(self) -> UNet2DConditionModel:
    return self.model.unet

  @property
  def latent_factor(self) -> int:
    return self.vae.config.downsample_factor


def check_stage(config: ml_collections.ConfigDict) -> str:
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}; expected one of {STAGES}")
  return config.stage


def _dtype(name: str, field: str) -> Any:
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"config.{field}={name!r} is not a dtype (e.g. 'float32', 'bfloat16')") from e


def variant_configs(config: ml_collections.ConfigDict) -> SDConfigs:
  """The architectures named by `config.model` (for a random-init base)."""
  m = config.model
  for field, table in (("unet", VARIANTS), ("vae", VAE_VARIANTS), ("text_encoder", CLIP_VARIANTS)):
    if m[field] not in table:
      raise ValueError(f"config.model.{field}={m[field]!r}; expected one of {sorted(table)}")
  unet = VARIANTS[m.unet]
  unet = dataclasses.replace(unet, sample_size=m.sample_size)
  return SDConfigs(unet, VAE_VARIANTS[m.vae], CLIP_VARIANTS[m.text_encoder], SD15_SCHEDULE)


def target_platform(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> str:
  """The platform the step's kernels are picked for: `config.target_platform`, else that of `devices` (default:
  `jax.devices()`, the mesh's), never the host's. Checks `config.attention_backend` runs there (before any trace)."""
  explicit = platforms.normalize(config.target_platform, "config.target_platform")
  devices = list(jax.devices() if devices is None else devices)
  platform = explicit or platforms.device_platform(devices[0])
  check_backend_platform(config.attention_backend, platform, "config.attention_backend")
  return platform


def networks(config: ml_collections.ConfigDict, sd: SDConfigs, platform: str = "") -> Networks:
  """Modules for `config.stage` over the base architectures `sd`, with kernels for `platform` (see
  `target_platform`; "": the mesh's or the default devices', resolved at trace time)."""
  stage = check_stage(config)
  m = config.model
  unet = dataclasses.replace(sd.unet, remat_policy=config.remat_policy, attention_backend=config.attention_backend,
                             target_platform=platform)
  if stage == "base":
    mp = MagicPoseConfig(unet, None, use_appearance=False)
  else:
    with_pose = stage == "stage2" and m.use_pose
    use_appearance = stage == "stage1" or m.use_appearance
    pose = ControlNetConfig.from_unet(unet, conditioning_embedding_out_channels=tuple(m.hint_channels)) \
        if with_pose else None
    if pose is not None and pose.downsample_factor != sd.vae.downsample_factor:
      raise ValueError(f"config.model.hint_channels={tuple(m.hint_channels)} downsample by "
                       f"{pose.downsample_factor}, but the VAE downsamples by {sd.vae.downsample_factor}: the pose "
                       f"image must map onto the latent")
    mp = MagicPoseConfig(unet, pose, use_appearance)
  dtype = _dtype(config.dtype, "dtype")
  if m.prediction_type not in ("epsilon", "v_prediction"):
    raise ValueError(f"config.model.prediction_type={m.prediction_type!r}; expected 'epsilon' or 'v_prediction'")
  # The patch autoencoder has no attention: only a VAEConfig carries the target platform.
  vae = dataclasses.replace(sd.vae, target_platform=platform) if isinstance(sd.vae, VAEConfig) else sd.vae
  return Networks(stage, MagicPose(mp, dtype=dtype), make_vae(vae, dtype),
                  sd.scheduler.replace(prediction_type=m.prediction_type))


def empty_prompt_ids(text_config: Any, tokenizer_dir: str | None) -> np.ndarray:
  """`[1, L]` ids of the empty prompt: from the checkpoint's tokenizer, else BOS, EOS and padding.

  Without tokenizer files the padding is EOS for OpenAI CLIP (SD 1.x) and 0 for OpenCLIP (SD 2.x, whose
  tokenizer pads with "!", id 0), which is what their tokenizers produce for "".
  """
  length = text_config.max_position_embeddings
  if tokenizer_dir:
    return np.asarray(CLIPTokenizer.from_folder(tokenizer_dir)([""], max_length=length), np.int32).reshape(1, -1)
  bos, eos = text_config.bos_token_id, text_config.eos_token_id
  pad = 0 if text_config.hidden_act == "gelu" else eos
  ids = np.full((1, length), pad, np.int32)
  ids[0, :2] = (bos, eos)
  return ids


def text_context(sd: SDConfigs, text_params: Params) -> np.ndarray:
  """The empty prompt's CLIP states `[1, L, D]` float32 (SD 2.x reads the penultimate layer)."""
  layer = "last" if sd.text_encoder.hidden_act == "quick_gelu" or sd.text_encoder.num_hidden_layers == 23 \
      else "penultimate"
  ids = empty_prompt_ids(sd.text_encoder, sd.tokenizer)
  states = _encode_text(CLIPTextModel(sd.text_encoder), text_params, jnp.asarray(ids), layer)
  return np.asarray(states, np.float32)


# One program per text encoder (modules hash by their fields) instead of every op compiled and run eagerly.
_encode_text = jax.jit(encode_text, static_argnums=(0, 3))


def random_base(sd: SDConfigs, seed: int) -> Params:
  """A random-init SD `{"unet", "vae", "text_encoder"}` (tests and the demo, which trains its own base)."""
  abstract = {"unet": abstract_unet_params(sd.unet), "vae": abstract_autoencoder_params(sd.vae),
              "text_encoder": abstract_text_encoder_params(sd.text_encoder)}
  return random_params(abstract, seed)


def _cast(tree: Params, dtype: Any) -> Params:
  return jax.tree.map(lambda x: np.asarray(x).astype(dtype) if np.issubdtype(np.asarray(x).dtype, np.floating)
                      else np.asarray(x), tree)


def load_base(config: ml_collections.ConfigDict, read_run: Any = None,
              with_unet: bool = True) -> tuple[SDConfigs, Params, str]:
  """The frozen base as host numpy `{"unet", "vae", "text_encoder"}`, its architectures, and a source label.

  `config.base.path` (or, when empty, an `init_from` that is a "base" run or a run with a base) names it;
  with neither it is a random init from `config.seed` at the `config.model` sizes. `read_run(path)` reads a
  training run (`train.checkpoint.read_run`: `(run_config, trainable params)`, or `(run_config, None)` with
  `with_params=False`), passed in to keep this module free of checkpoint code. `with_unet=False` leaves out
  the UNet (then a pipeline folder's `unet/` and a base run's params are not read).
  """
  path = config.base.path or ""
  if not path and config.init_from and read_run is not None:
    run_config, _ = read_run(config.init_from, with_params=False)
    if run_config.stage == "base":
      return _base_from_run(run_config, config.init_from, read_run, with_unet)
    return load_base(run_config, read_run, with_unet)  # the init run's own base (its trained nets are not needed)
  if not path:
    sd = variant_configs(config)
    label = f"random:unet={config.model.unet},vae={config.model.vae},text={config.model.text_encoder}," \
            f"sample_size={config.model.sample_size},seed={config.seed}"
    params = jax.tree.map(np.asarray, random_base(sd, config.seed))  # drawn whole: the same bytes either way
    return sd, params if with_unet else {k: v for k, v in params.items() if k != "unet"}, label
  if read_run is not None and os.path.isdir(path) and is_training_run(path):
    run_config, _ = read_run(path, with_params=False)
    if run_config.stage != "base":
      raise ValueError(f"config.base.path={path}: a {run_config.stage!r} run; a base must be a 'base' run or an SD "
                       f"checkpoint")
    return _base_from_run(run_config, path, read_run, with_unet)
  components = COMPONENTS if with_unet else tuple(c for c in COMPONENTS if c != "unet")
  sd, params = load_stable_diffusion(path, param_dtype=None, components=components)
  params.pop("extras", None)
  return sd, params, os.path.abspath(path)


def _base_from_run(run_config: ml_collections.ConfigDict, path: str, read_run: Any,
                   with_unet: bool) -> tuple[SDConfigs, Params, str]:
  # The run's trained UNet replaces its base's: that one is never read.
  sd, params, label = load_base(run_config, read_run, with_unet=False)
  if with_unet:
    params["unet"] = read_run(path)[1]["unet"]
  return sd, params, f"run:{os.path.abspath(path)} (trained UNet over {label})"


def load_pose_controlnet(path: str, pose: ControlNetConfig) -> Params:
  """A pretrained ControlNet's params for the pose net `pose` (`pose_init="controlnet"`), as host numpy trees.

  `path`: a diffusers `ControlNetModel` folder, whose config.json must describe `pose`'s architecture (the base
  UNet's, with `config.model.hint_channels`), or an original-layout file whose tensors under `control_model.`
  (ControlNet 1.0/1.1) or else `pose_control_model.` (MagicPose's release) must match it exactly.

  Raises:
    ValueError: the folder's architecture differs from `pose` (every differing field named).
    ConversionError: a file with no tensors under either prefix, or a missing, unexpected or mis-shaped tensor
      (each named).
  """
  runtime = {"attention_backend": pose.attention_backend, "remat_policy": pose.remat_policy,
             "target_platform": pose.target_platform}
  if os.path.isdir(path):
    found, params = load_controlnet(path, param_dtype=np.float32, **runtime)
    if found != pose:
      diff = [f"{f.name}: file {getattr(found, f.name)!r}, run {getattr(pose, f.name)!r}"
              for f in dataclasses.fields(pose) if getattr(found, f.name) != getattr(pose, f.name)]
      raise ValueError(f"config.model.pose_path={path}: this ControlNet is not the run's pose net (the base UNet's "
                       f"architecture with config.model.hint_channels):\n  " + "\n  ".join(diff))
    return params
  return load_ldm_controlnet(path, pose, (LDM_CONTROLNET_PREFIX, MAGICPOSE_POSE_PREFIX), param_dtype=np.float32)


def initial_params(config: ml_collections.ConfigDict, nets: Networks, sd: SDConfigs, base: Params,
                   init: Params | None = None) -> tuple[Params, Params]:
  """`(trainable, frozen)` host trees for the stage. `init`: trainable subtrees of an `init_from` run.

  Stage 2's appearance net comes from `init["appearance"]` (a stage-1 run) or else from the base UNet;
  its pose net follows `config.model.pose_init` over that appearance net.
  """
  stage = nets.stage
  init = init or {}
  frozen: Params = {"vae": _cast(base["vae"], _dtype(config.frozen_dtype, "frozen_dtype")),
                    "text": text_context(sd, base["text_encoder"])}
  if stage == "base":
    trainable = {"unet": init.get("unet", base["unet"])}
    return jax.tree.map(np.asarray, trainable), frozen
  frozen["unet"] = _cast(base["unet"], _dtype(config.frozen_dtype, "frozen_dtype"))
  mp = nets.model.config
  key = jax.random.key(config.seed + 1)
  pose_init = config.model.pose_init
  if pose_init not in POSE_INITS:
    raise ValueError(f"config.model.pose_init={pose_init!r}; expected one of {POSE_INITS}")
  if not mp.use_appearance and pose_init == "appearance":
    pose_init = "sd"
  pose_params = None
  if "pose" in init and mp.pose is not None:
    pose_init, pose_params = "controlnet", init["pose"]  # continuing a stage-2 run
  elif pose_init == "controlnet" and mp.pose is not None:
    pose_params = load_pose_controlnet(config.model.pose_path, mp.pose)
  elif pose_init == "controlnet":
    pose_init = "sd"  # no pose net in this run (stage 1, or use_pose=False): nothing to load
  params = init_params(mp, base["unet"], key, appearance_params=init.get("appearance"), pose_params=pose_params,
                       pose_init=pose_init)
  trainable = {k: params[k] for k in TRAINABLE[stage] if k in params}
  return jax.tree.map(np.asarray, trainable), frozen
