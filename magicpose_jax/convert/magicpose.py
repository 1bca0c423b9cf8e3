"""The released MagicPose checkpoint layout (one LDM/ControlNet-style file) <-> our params.

Prefixes (MAGICPOSE.md, "Checkpoints"): `model.diffusion_model.*` (frozen SD UNet),
`appearance_control_model.*` (stage 2; stage-1 files call it `control_model.*`),
`pose_control_model.*` (ControlNet layout), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.*` (CLIP text), plus DDPM schedule buffers.

The release's appearance net has no output head (`out.*`) but stores an unused hint
encoder (`input_hint_block.*`). Tensors the release stores and never uses — that hint
block and the schedule buffers — come back in `params["extras"]` and are written back,
so import -> export is bit-exact. Our appearance params need no output head either
(`MagicPose.reference_states` skips it); one that has it (e.g. copied from SD) is written
without it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.convert.controlnet import MAGICPOSE_POSE_PREFIX, ldm_controlnet_key_table
from magicpose_jax.convert.keytable import ConversionError, KeyTable
from magicpose_jax.convert.ldm import ldm_unet_key_table
from magicpose_jax.convert.stable_diffusion import EXTRAS, SCHEDULE_BUFFERS, SDConfigs, ldm_tables, torch_keys
from magicpose_jax.convert.tensor_files import read_state_dict, write_safetensors
from magicpose_jax.models.controlnet import ControlNetConfig
from magicpose_jax.models.unet import UNetConfig

APPEARANCE_PREFIX = "appearance_control_model."
STAGE1_APPEARANCE_PREFIX = "control_model."
_OUTPUT_HEAD = ("conv_norm_out", "conv_out")


def appearance_key_table(config: UNetConfig, prefix: str = APPEARANCE_PREFIX) -> KeyTable:
  """The appearance UNet in the release layout: the LDM UNet table without the output head."""
  full = ldm_unet_key_table(config, prefix)
  return KeyTable([e for e in full.entries if e.flax_path[0] not in _OUTPUT_HEAD], f"appearance net ({prefix}*)")


def _tables(configs: SDConfigs, pose: ControlNetConfig | None, appearance_prefix: str) -> dict:
  tables = dict(ldm_tables(configs))
  tables["appearance"] = appearance_key_table(configs.unet, appearance_prefix)
  if pose is not None:
    tables["pose"] = ldm_controlnet_key_table(pose, MAGICPOSE_POSE_PREFIX)
  return tables


def _is_extra(key: str, appearance_prefix: str) -> bool:
  return key in SCHEDULE_BUFFERS or key.startswith(appearance_prefix + "input_hint_block.")


def load_magicpose_checkpoint(path: str | os.PathLike, configs: SDConfigs, pose: ControlNetConfig | None = None,
                              appearance_prefix: str = APPEARANCE_PREFIX,
                              param_dtype: Any = jnp.float32) -> dict:
  """Reads a released MagicPose file (`.ckpt`/`.pth` with `weights_only=True`, or `.safetensors`).

  Args:
    configs: the SD architecture (`SD15` for the release).
    pose: the pose ControlNet's config (default: `ControlNetConfig.from_unet(configs.unet)`) when the file
      has `pose_control_model.*`; a stage-1 file has none.
    appearance_prefix: `appearance_control_model.` (stage 2) or `control_model.` (stage 1).

  Returns:
    `{"unet", "vae", "text_encoder", "appearance", "pose"?, "extras"}` (host numpy trees).
  """
  path = os.fspath(path)
  sd = read_state_dict(path)
  if not any(k.startswith(appearance_prefix) for k in sd):
    found = sorted({k.split(".")[0] + "." for k in sd if k.endswith("control_model") or "control_model." in k})
    hint = (f"; pass appearance_prefix={STAGE1_APPEARANCE_PREFIX!r} to read a stage-1 file's appearance net"
            if any(k.startswith(STAGE1_APPEARANCE_PREFIX) for k in sd) else "")
    raise ConversionError(f"{path}: no {appearance_prefix}* tensors (found prefixes {found}){hint}")
  has_pose = any(k.startswith(MAGICPOSE_POSE_PREFIX) for k in sd)
  if has_pose and pose is None:
    pose = ControlNetConfig.from_unet(configs.unet)
  tables = _tables(configs, pose if has_pose else None, appearance_prefix)
  owners = {key: name for name, table in tables.items() for key in torch_keys(table)}
  groups: dict[str, dict] = {name: {} for name in tables}
  extras, unknown = {}, []
  for key, value in sd.items():
    owner = owners.get(key)
    if owner is not None:
      groups[owner][key] = value
    elif _is_extra(key, appearance_prefix):
      extras[key] = value
    else:
      unknown.append(key)
  if unknown:
    raise ConversionError(f"{path}: unexpected tensors ({len(unknown)}):\n" + "\n".join(f"    {k}" for k in unknown))
  dtype = np.dtype(param_dtype) if param_dtype is not None else None
  params = {name: table.to_flax(groups[name], dtype=dtype, source=path) for name, table in tables.items()}
  params[EXTRAS] = extras
  return params


def save_magicpose_checkpoint(configs: SDConfigs, params: dict, path: str | os.PathLike,
                              pose: ControlNetConfig | None = None,
                              appearance_prefix: str = APPEARANCE_PREFIX) -> None:
  """Writes the release layout as one `.safetensors` (with `params["extras"]` as they came in)."""
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: MagicPose checkpoints are written as .safetensors")
  if "pose" in params and pose is None:
    pose = ControlNetConfig.from_unet(configs.unet)
  tables = _tables(configs, pose if "pose" in params else None, appearance_prefix)
  tensors = {}
  for name, table in tables.items():
    tree = jax.device_get(params[name])
    if name == "appearance":
      tree = {k: v for k, v in tree.items() if k not in _OUTPUT_HEAD}
    tensors.update(table.to_torch(tree))
  tensors.update(params.get(EXTRAS, {}))
  folder, name = os.path.split(os.path.abspath(path))
  write_safetensors(tensors, folder, name[: -len(".safetensors")])
