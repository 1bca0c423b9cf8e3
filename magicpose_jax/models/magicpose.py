"""MagicPose: Appearance Controller -> reference states, Pose Controller -> residuals, main SD UNet.

    eps = MagicPose(config).apply(params, z_t, t, text, z_ref, pose_image)

Params are a plain pytree `{"unet": ..., "appearance": ..., "pose": ...}` (the frozen
SD UNet, the trainable appearance UNet, the trainable ControlNet), so a training stage
picks what trains by subtree; absent controllers (the paper's ablations) have no subtree.

* The appearance net is a full SD UNet run on the **clean** reference latent with the
  same `t` and text; it hands over its per-block `norm1` states (16 for SD 1.5) and its
  output head is not computed (MAGICPOSE.md, "Appearance Controller").
* The main UNet's self-attention takes keys/values over `[h_i ; r_i]` with its own
  `to_k`/`to_v`; the pose net's 12 + 1 residuals are added to its skips and mid output.
* Per-row switches `use_reference`/`use_pose` (`[B]` bool) turn either condition off for
  some rows of a batch, which is how guided sampling batches its branches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_params_from_unet
from magicpose_jax.models.unet import UNet2DConditionModel, UNetConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MagicPoseConfig:
  """The three networks. `pose=None` or `use_appearance=False` are the paper's ablations."""

  unet: UNetConfig
  pose: ControlNetConfig | None = None
  use_appearance: bool = True

  @classmethod
  def from_unet(cls, unet: UNetConfig, with_pose: bool = True, use_appearance: bool = True,
                **controlnet_fields: Any) -> MagicPoseConfig:
    pose = ControlNetConfig.from_unet(unet, **controlnet_fields) if with_pose else None
    return cls(unet, pose, use_appearance)


# Where the pose net starts (`init_params`): the paper's, a copy of SD's encoder, or a pretrained ControlNet.
POSE_INITS = ("appearance", "sd", "controlnet")


def init_params(config: MagicPoseConfig, unet_params: Params, key: jax.Array,
                appearance_params: Params | None = None, pose_params: Params | None = None,
                pose_init: str = "appearance") -> Params:
  """MagicPose params from SD's UNet, as host numpy trees (`unet` is `unet_params` itself, the rest new buffers).

  The appearance net is a copy of SD's UNet (or of `appearance_params`, e.g. a stage-1 result). The pose
  net follows `pose_init`: "appearance" (the paper: the appearance net's encoder + mid, zero convs at
  zero), "sd" (the same from SD's UNet), or "controlnet" (the release: `pose_params`, e.g. ControlNet 1.1
  OpenPose loaded with `convert.controlnet.load_ldm_controlnet`).
  """
  if pose_init not in POSE_INITS:
    raise ValueError(f"pose_init={pose_init!r}; expected one of {POSE_INITS}")
  if (pose_init == "controlnet") != (pose_params is not None):
    raise ValueError("pose_params are given exactly when pose_init='controlnet'")
  params: Params = {"unet": unet_params}
  if config.use_appearance:
    source = appearance_params if appearance_params is not None else unet_params
    # New host buffers (training donates the trainable ones). `np.array`, not `jnp.array`: that compiles a copy
    # program per distinct leaf shape (~0.1 s each on a CPU, dozens per UNet).
    params["appearance"] = jax.tree.map(np.array, source)
  if config.pose is not None:
    if pose_init == "controlnet":
      params["pose"] = jax.tree.map(np.array, pose_params)
    else:
      source = params["appearance"] if pose_init == "appearance" and config.use_appearance else unet_params
      params["pose"] = controlnet_params_from_unet(source, config.pose, key)
  return params


@dataclasses.dataclass(frozen=True)
class MagicPose:
  """The composition (a plain object over three linen modules; every method is jit-able)."""

  config: MagicPoseConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def for_platform(self, platform: str) -> MagicPose:
    """This model with its kernels picked for `platform` ("cpu", "gpu", "tpu"; see models/platforms.py)."""
    unet = self.config.unet.replace(target_platform=platform)
    pose = None if self.config.pose is None else self.config.pose.replace(target_platform=platform)
    return dataclasses.replace(self, config=dataclasses.replace(self.config, unet=unet, pose=pose))

  @property
  def unet(self) -> UNet2DConditionModel:
    return UNet2DConditionModel(self.config.unet, self.dtype, self.param_dtype)

  @property
  def pose_net(self) -> ControlNetModel:
    if self.config.pose is None:
      raise ValueError("this MagicPose has no pose controller (MagicPoseConfig.pose is None)")
    return ControlNetModel(self.config.pose, self.dtype, self.param_dtype)

  def reference_states(self, params: Params, z_ref: jax.Array, t: jax.Array,
                       text: jax.Array) -> list[jax.Array]:
    """The appearance net's per-block normed states: `z_ref [B, h, w, 4]` (clean) -> list of `[B, N_i, C_i]`."""
    _, states = self.unet.apply({"params": params["appearance"]}, z_ref, t, text, return_reference_states=True,
                                compute_output=False)
    return states

  def pose_residuals(self, params: Params, z_t: jax.Array, t: jax.Array, text: jax.Array, pose_image: jax.Array,
                     scale: float = 1.0) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """`pose_image [B, 8h, 8w, 3]` in [0, 1] -> (12 down residuals, mid residual)."""
    return self.pose_net.apply({"params": params["pose"]}, z_t, t, text, pose_image, conditioning_scale=scale)

  def denoise(self, params: Params, z_t: jax.Array, t: jax.Array, text: jax.Array,
              reference_states: Sequence[jax.Array] | None = None,
              residuals: tuple[Sequence[jax.Array], jax.Array] | None = None,
              use_reference: jax.Array | None = None, use_pose: jax.Array | None = None) -> jax.Array:
    """The main UNet given precomputed conditions (lets samplers cache reference states). `[B, h, w, 4]`."""
    down = mid = None
    if residuals is not None:
      down, mid = residuals
      if use_pose is not None:
        gate = lambda r: r * use_pose.astype(r.dtype)[:, None, None, None]
        down, mid = [gate(r) for r in down], gate(mid)
    return self.unet.apply({"params": params["unet"]}, z_t, t, text, down, mid, reference_states,
                           reference_mask=use_reference if reference_states is not None else None)

  def apply(self, params: Params, z_t: jax.Array, t: jax.Array, text: jax.Array, z_ref: jax.Array | None = None,
            pose_image: jax.Array | None = None, use_reference: jax.Array | None = None,
            use_pose: jax.Array | None = None, pose_scale: float = 1.0) -> jax.Array:
    """Predicts noise (or v) for `z_t [B, h, w, 4]` at `t [B]` with text `[B, L, D]`.

    `z_ref` (the clean reference latent, `[B, h, w, 4]`) is needed when the config has an appearance
    net, `pose_image` (`[B, 8h, 8w, 3]`) when it has a pose net.
    """
    states = residuals = None
    if self.config.use_appearance:
      if z_ref is None:
        raise ValueError("z_ref (the clean reference latent) is required: the config has an appearance net")
      states = self.reference_states(params, z_ref, t, text)
    if self.config.pose is not None:
      if pose_image is None:
        raise ValueError("pose_image is required: the config has a pose controller")
      residuals = self.pose_residuals(params, z_t, t, text, pose_image, pose_scale)
    return self.denoise(params, z_t, t, text, states, residuals, use_reference, use_pose)
