"""MagicPose models: a training run -> a model (params + configs), the export folders written from one, and
conversion between every format (what `python -m magicpose_jax.convert` runs).

    model = load_run("runs/stage2")              # a workdir (its newest step) or one step's checkpoint folder
    save_diffusers_export(model, "export/")      # plain diffusers folders, for PyTorch users
    model = load_export("export/")               # back (also reads `save_flax_export` folders)

A run's checkpoint holds only the trainable tree (`train.checkpoint`); the frozen base (SD UNet, VAE, text
encoder) is reloaded from the source the run recorded and must hash as it did when the run trained (the check
`Checkpointer.restore` does on resume), so an export never pairs trained nets with a different base.

Export folder (`--to diffusers`; `--to flax` writes the same tree with our orbax `params/` per model):
  unet/              the frozen base SD UNet, the main denoiser       `UNet2DConditionModel`
  appearance_unet/   the Appearance Controller (stages 1 and 2)      `UNet2DConditionModel`
  pose_controlnet/   the Pose Controller (stage 2)                   `ControlNetModel`
  vae/, text_encoder/, tokenizer/ (when the base has one), scheduler/ (DDIM with the run's prediction type),
  model_index.json   so the base also loads as a plain `StableDiffusionPipeline`
  magicpose.json     `MANIFEST_FIELDS`: which folder is what, the run's stage and step, its base source, whether
                     the weights are the EMA, and how to build the (empty-prompt) text states.
Source kinds `convert` detects: the Stable Diffusion kinds of `convert.formats` and
  magicpose-run     a training workdir (its newest step), its checkpoints/ folder, or one step's folder
  magicpose-export  a folder written from one (magicpose.json; diffusers or flax layout)
Destinations for a MagicPose model: `diffusers`, `flax` and `magicpose` (the released single file), `ldm` too for
a "base" run.

An appearance net without an output head (one read from a released MagicPose file) gets the base UNet's head in
`appearance_unet/` so diffusers loads it; MagicPose never computes that head (`magicpose.json` says so).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from magicpose_jax.convert import formats
from magicpose_jax.convert.controlnet import load_controlnet, save_controlnet
from magicpose_jax.convert.diffusers import load_unet, save_unet
from magicpose_jax.convert.flax_checkpoint import is_flax_model, load_flax_params, load_flax_unet, save_flax_model
from magicpose_jax.convert.magicpose import APPEARANCE_PREFIX, STAGE1_APPEARANCE_PREFIX, save_magicpose_checkpoint
from magicpose_jax.convert.stable_diffusion import (
  COMPONENTS,
  SDConfigs,
  load_stable_diffusion,
  save_flax_pipeline,
  save_ldm_checkpoint,
  save_stable_diffusion,
)
from magicpose_jax.convert.vae import load_vae
from magicpose_jax.models.controlnet import ControlNetConfig
from magicpose_jax.models.magicpose import MagicPoseConfig
from magicpose_jax.train import checkpoint as ckpt
from magicpose_jax.train import stages

Params = dict[str, Any]
MANIFEST = "magicpose.json"
FORMAT_NAME = "magicpose_jax export"
APPEARANCE_DIR = "appearance_unet"
POSE_DIR = "pose_controlnet"
_OUTPUT_HEAD = ("conv_norm_out", "conv_out")


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A MagicPose model ready to sample or export.

  Attributes:
    sd: the base architectures; `sd.scheduler` carries the run's prediction type.
    model: the MagicPose composition (`pose=None` / `use_appearance=False` for stages and ablations without them;
      a "base" run has neither).
    params: host numpy trees `{"unet", "vae", "text_encoder", "appearance"?, "pose"?}`.
    info: provenance written to `magicpose.json`: `stage`, `step`, `base_source`, `weights` ("params" or "ema"),
      `source` (the run's step folder or the export folder), `text_clip_skip`, `empty_prompt_ids`.
  """

  sd: SDConfigs
  model: MagicPoseConfig
  params: Params
  info: dict[str, Any]

  @property
  def image_size(self) -> tuple[int, int]:
    """(H, W) of the images the model makes: the UNet's latent sample size times the VAE's factor."""
    side = self.sd.unet.sample_size * self.sd.vae.downsample_factor
    return side, side


def is_export(folder: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(folder, MANIFEST))


# ---------------------------------------------------------------------------------------------------------------
# Training runs.


def _frozen_tree(run_config: ml_collections.ConfigDict, sd: SDConfigs, base: Params) -> Params:
  """The frozen tree the run hashed (`stages.initial_params`), for the base check."""
  dtype = np.dtype(run_config.frozen_dtype)
  cast = lambda tree: jax.tree.map(lambda x: np.asarray(x).astype(dtype)
                                   if np.issubdtype(np.asarray(x).dtype, np.floating) else np.asarray(x), tree)
  frozen = {"vae": cast(base["vae"]), "text": stages.text_context(sd, base["text_encoder"])}
  if run_config.stage != "base":
    frozen["unet"] = cast(base["unet"])
  return frozen


def text_clip_skip(sd: SDConfigs) -> int:
  """diffusers' `clip_skip` of the text states MagicPose uses (`stages.text_context`): 0 = last layer."""
  text = sd.text_encoder
  return 0 if text.hidden_act == "quick_gelu" or text.num_hidden_layers == 23 else 1


def load_run(path: str | os.PathLike, ema: bool = False, check_base: bool = True) -> TrainedModel:
  """A training workdir (its newest step), its `checkpoints/` folder or one step folder -> `TrainedModel`.

  Args:
    ema: take the run's EMA weights (error if it kept none) instead of its raw params.
    check_base: rebuild the run's frozen tree and compare its hash with the checkpoint's, so a base
      checkpoint that changed on disk since training is an error, not a silently different model.

  Raises:
    FileNotFoundError: no checkpoint there. ValueError: unreadable state, another model shape, a changed base.
  """
  step_dir = ckpt.latest_checkpoint_dir(os.fspath(path))
  meta, trainable = ckpt.read_trainable(step_dir, "ema" if ema else "params")
  run_config = ml_collections.ConfigDict(meta["config"])
  sd, base, _ = stages.load_base(run_config, ckpt.read_run)
  nets = stages.networks(run_config, sd)
  if check_base:
    found = ckpt.tree_hash(_frozen_tree(run_config, sd, base))
    if found != meta["base_hash"]:
      raise ValueError(f"{step_dir}: the run trained over the base {meta['base_source']!r} (sha256 "
                       f"{meta['base_hash'][:12]}), but that base now hashes {found[:12]}: it changed since "
                       f"training; restore it (or pass check_base=False to export anyway)")
  params = {name: base[name] for name in COMPONENTS}
  params.update(trainable)  # a "base" run's trained UNet replaces the base's
  mp = nets.model.config
  model = MagicPoseConfig(sd.unet, mp.pose, mp.use_appearance and "appearance" in params)
  sd = dataclasses.replace(sd, scheduler=nets.schedule)
  info = {"stage": run_config.stage, "step": int(meta["step"]), "base_source": meta["base_source"],
          "weights": "ema" if ema else "params", "source": os.path.abspath(step_dir)}
  return TrainedModel(sd, model, params, {**info, **_text_info(sd)})


def _text_info(sd: SDConfigs) -> dict[str, Any]:
  ids = stages.empty_prompt_ids(sd.text_encoder, sd.tokenizer)
  return {"text_clip_skip": text_clip_skip(sd), "empty_prompt_ids": ids[0].tolist()}


# ---------------------------------------------------------------------------------------------------------------
# Export folders.


def _with_head(appearance: Params, unet: Params) -> tuple[Params, bool]:
  """The appearance tree with an output head (the base UNet's when it has none) and whether one was added."""
  if all(k in appearance for k in _OUTPUT_HEAD):
    return appearance, False
  return {**appearance, **{k: unet[k] for k in _OUTPUT_HEAD}}, True


def _manifest(model: TrainedModel, layout: str, head_added: bool) -> dict[str, Any]:
  mp = model.model
  return {
      "format": FORMAT_NAME, "layout": layout, "version": 1,
      "components": {"unet": "the frozen base SD UNet (the main denoiser; reference attention reads into it)",
                     APPEARANCE_DIR: ("the Appearance Controller: run on the clean reference latent; its attn1 "
                                      "inputs are the reference states" if mp.use_appearance else None),
                     POSE_DIR: ("the Pose Controller: down/mid residuals for the main UNet from the pose image"
                                if mp.pose is not None else None),
                     "vae": "the VAE", "text_encoder": "the CLIP text encoder (MagicPose uses the empty prompt)"},
      "appearance_unet": APPEARANCE_DIR if mp.use_appearance else None,
      "pose_controlnet": POSE_DIR if mp.pose is not None else None,
      "appearance_output_head": "copied from unet/ (never computed by MagicPose)" if head_added else "trained tree's",
      "image_size": list(model.image_size),
      "prediction_type": model.sd.scheduler.prediction_type,
      **model.info,
  }


def _write_manifest(manifest: dict[str, Any], folder: str) -> None:
  with open(os.path.join(folder, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)


def _check_empty(folder: str) -> None:
  if os.path.exists(folder) and os.listdir(folder):
    raise FileExistsError(f"{folder} is not empty; choose a new destination folder")


def _cast(params: Params, dtype: Any) -> Params:
  return params if dtype is None else jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)


def save_diffusers_export(model: TrainedModel, folder: str | os.PathLike, dtype: Any = None) -> None:
  """Writes the diffusers export folder (module docstring); `dtype` casts the stored tensors."""
  folder = os.fspath(folder)
  _check_empty(folder)
  p = model.params
  save_stable_diffusion(model.sd, {k: p[k] for k in COMPONENTS}, folder, dtype)
  head_added = False
  if model.model.use_appearance:
    appearance, head_added = _with_head(p["appearance"], p["unet"])
    save_unet(model.sd.unet, appearance, os.path.join(folder, APPEARANCE_DIR), dtype)
  if model.model.pose is not None:
    save_controlnet(model.model.pose, p["pose"], os.path.join(folder, POSE_DIR), dtype)
  _write_manifest(_manifest(model, "diffusers", head_added), folder)


def save_flax_export(model: TrainedModel, folder: str | os.PathLike, dtype: Any = None) -> None:
  """The same tree as `save_diffusers_export` with our orbax folders (`convert.flax_checkpoint`)."""
  folder = os.fspath(folder)
  _check_empty(folder)
  p = _cast(model.params, dtype)
  save_flax_pipeline(model.sd, {k: p[k] for k in COMPONENTS}, folder)
  head_added = False
  if model.model.use_appearance:
    appearance, head_added = _with_head(p["appearance"], p["unet"])
    save_flax_model(model.sd.unet.to_diffusers(), appearance, os.path.join(folder, APPEARANCE_DIR))
  if model.model.pose is not None:
    save_flax_model(model.model.pose.to_diffusers(), p["pose"], os.path.join(folder, POSE_DIR))
  _write_manifest(_manifest(model, "flax", head_added), folder)


def load_export(folder: str | os.PathLike, param_dtype: Any = np.float32) -> TrainedModel:
  """Reads a folder written by `save_diffusers_export` or `save_flax_export` (layout detected)."""
  folder = os.fspath(folder)
  if not is_export(folder):
    raise FileNotFoundError(f"{folder}: no {MANIFEST} (not a magicpose_jax export folder)")
  with open(os.path.join(folder, MANIFEST)) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT_NAME:
    raise ValueError(f"{folder}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
  sd, params = load_stable_diffusion(folder, param_dtype=param_dtype)
  flax_layout = is_flax_model(os.path.join(folder, "unet"))
  pose = None
  if manifest.get("appearance_unet"):
    where = os.path.join(folder, manifest["appearance_unet"])
    params["appearance"] = load_flax_unet(where)[1] if flax_layout else load_unet(where, param_dtype)[1]
  if manifest.get("pose_controlnet"):
    where = os.path.join(folder, manifest["pose_controlnet"])
    if flax_layout:
      pose, params["pose"] = ControlNetConfig.from_diffusers(where), load_flax_params(where)
    else:
      pose, params["pose"] = load_controlnet(where, param_dtype)
  if param_dtype is not None:
    params = _cast(params, param_dtype)
  info = {k: manifest[k] for k in ("stage", "step", "base_source", "weights", "text_clip_skip", "empty_prompt_ids",
                                   "swapped_base") if k in manifest}
  info["source"] = os.path.abspath(folder)
  return TrainedModel(sd, MagicPoseConfig(sd.unet, pose, "appearance" in params), params, info)


def save_magicpose_file(model: TrainedModel, path: str | os.PathLike) -> None:
  """The released MagicPose single-file layout (`convert.magicpose`); stage-1 runs use `control_model.*`."""
  if not model.model.use_appearance:
    raise ValueError(f"{model.info.get('source')}: a {model.info.get('stage')!r} model without an appearance net "
                     f"has no MagicPose single-file layout; use --to diffusers (or --to ldm for a base run)")
  prefix = STAGE1_APPEARANCE_PREFIX if model.model.pose is None else APPEARANCE_PREFIX
  keys = (*COMPONENTS, "appearance", "pose")
  save_magicpose_checkpoint(model.sd, {k: model.params[k] for k in keys if k in model.params}, path,
                            pose=model.model.pose, appearance_prefix=prefix)


def save_ldm_file(model: TrainedModel, path: str | os.PathLike, dtype: Any = None) -> None:
  """The SD part as an original single file; only for models without MagicPose nets (a "base" run)."""
  if model.model.use_appearance or model.model.pose is not None:
    raise ValueError(f"{model.info.get('source')}: --to ldm would drop the appearance/pose nets of this "
                     f"{model.info.get('stage')!r} model; use --to magicpose (single file) or --to diffusers")
  save_ldm_checkpoint(model.sd, {k: model.params[k] for k in COMPONENTS}, path, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Another SD 1.5 as the frozen base.

# Config fields that do not change the weights' meaning: the default size, the kernels and upcasting switches.
_RUNTIME_FIELDS = frozenset({"sample_size", "attention_backend", "remat_policy", "upcast_attention", "force_upcast"})


def _config_mismatch(ours: Any, theirs: Any) -> list[str]:
  """`field: model's value vs base's value` for every architecture field of two UNet/VAE configs that differs."""
  return [f"{f.name}: the model's {getattr(ours, f.name)!r} vs the base's {getattr(theirs, f.name)!r}"
          for f in dataclasses.fields(ours)
          if f.name not in _RUNTIME_FIELDS and getattr(ours, f.name) != getattr(theirs, f.name)]


def _tree_mismatch(ours: Params, theirs: Params) -> list[str]:
  """Missing, unexpected and mis-shaped keys (`a/b/kernel`) of two param trees."""
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): np.shape(v)
                       for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  a, b = flat(ours), flat(theirs)
  return ([f"missing {k} {a[k]}" for k in sorted(a.keys() - b.keys())]
          + [f"unexpected {k} {b[k]}" for k in sorted(b.keys() - a.keys())]
          + [f"{k}: the model's shape {a[k]} vs the base's {b[k]}" for k in sorted(a.keys() & b.keys())
             if a[k] != b[k]])


def _check_same_architecture(name: str, source: str, ours: tuple[Any, Params], theirs: tuple[Any, Params]) -> None:
  problems = _config_mismatch(ours[0], theirs[0]) or _tree_mismatch(ours[1], theirs[1])
  if problems:
    shown = "\n".join(f"    {p}" for p in problems[:12]) + (f"\n    ... {len(problems) - 12} more" if len(problems) > 12
                                                           else "")
    raise ValueError(f"{source}: its {name} is not the architecture this MagicPose model was trained over "
                     f"({len(problems)} differences):\n{shown}")


def _component_folder_class(path: str) -> str | None:
  """`_class_name` of a single-model diffusers folder's config.json (e.g. "AutoencoderKL"), else None."""
  config = os.path.join(path, "config.json")
  if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "model_index.json")) or not os.path.isfile(config):
    return None
  with open(config) as f:
    return json.load(f).get("_class_name")


def read_base_component(path: str | os.PathLike, name: str) -> tuple[Any, Params, SDConfigs | None]:
  """`(config, params, the pipeline's SDConfigs or None)` of the "unet" or "vae" of another Stable Diffusion.

  `path`: a diffusers or our pipeline folder, an LDM single file (read as SD 1.5), or a single-model folder of that
  component (a diffusers UNet or `AutoencoderKL` folder, or our UNet folder). Params keep the file's dtype.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such Stable Diffusion folder or file (for the {name} of the base)")
  component_class = _component_folder_class(path)
  if component_class is not None or is_flax_model(path):
    expected = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}[name]
    if component_class not in (expected, None):
      raise ValueError(f"{path}: its config.json names {component_class!r}, but the base's {name} must be a "
                       f"{expected!r}")
    if name == "vae":
      config, params = load_vae(path, None)
    else:
      config, params = load_flax_unet(path) if is_flax_model(path) else load_unet(path, None)
    return config, params, None
  try:
    sd, params = load_stable_diffusion(path, param_dtype=None, components=(name,))
  except ValueError as e:  # a single file holds no config: it is read as SD 1.5 (or 2.x), strictly
    raise ValueError(f"{path}: not readable as the Stable Diffusion whose {name} the model needs (an LDM single file "
                     f"is read as SD 1.5's architecture): {e}") from None
  return getattr(sd, name), params[name], sd


def with_base(model: TrainedModel, unet: str | os.PathLike | None = None,
              vae: str | os.PathLike | None = None) -> TrainedModel:
  """`model` over another SD 1.5 derivative: its main UNet (and with `vae`, its VAE) read from there.

  The Appearance and Pose Controllers, the text encoder (MagicPose's empty-prompt states) and the schedule stay
  the model's. The swapped component must have the trained base's architecture: a config field that differs
  (`_RUNTIME_FIELDS` aside) or a missing/unexpected/mis-shaped weight is a ValueError naming it; a pipeline folder
  whose scheduler predicts another target (e.g. v) is one too. Weights are cast to the model's dtype per leaf.
  `info["swapped_base"]` records the sources (kept in an export's magicpose.json).
  """
  if unet is None and vae is None:
    return model
  if not model.model.use_appearance and model.model.pose is None:
    raise ValueError(f"{model.info.get('source')}: a {model.info.get('stage')!r} run's UNet is its trained net, "
                     f"not a frozen base; --base applies to MagicPose models (stage 1 or 2)")
  params, swapped = dict(model.params), {}
  for name, given in (("unet", unet), ("vae", vae)):
    if given is None:
      continue
    source = os.path.abspath(os.fspath(given))
    config, tree, sd = read_base_component(source, name)
    _check_same_architecture(name, source, (getattr(model.sd, name), params[name]), (config, tree))
    predicts = model.sd.scheduler.prediction_type
    if name == "unet" and sd is not None and os.path.isdir(source) and sd.scheduler.prediction_type != predicts:
      raise ValueError(f"{source}: its scheduler predicts {sd.scheduler.prediction_type!r}, but the model's UNet "
                       f"and controllers were trained predicting {predicts!r}")
    params[name] = jax.tree.map(lambda ours, theirs: np.asarray(theirs).astype(np.asarray(ours).dtype),
                                params[name], tree)
    swapped[name] = source
  info = {**model.info, "swapped_base": {**model.info.get("swapped_base", {}), **swapped}}
  return dataclasses.replace(model, params=params, info=info)


# ---------------------------------------------------------------------------------------------------------------
# Conversion of any source kind.


def detect_source(src: str | os.PathLike) -> str:
  """`magicpose-export`, `magicpose-run` or one of `convert.formats`' kinds; raises naming what was looked for."""
  src = os.fspath(src)
  if os.path.isdir(src):
    if is_export(src):
      return "magicpose-export"
    if ckpt.is_training_run(src):
      return "magicpose-run"
  try:
    return formats.detect_source(src)
  except ValueError as e:
    raise ValueError(f"{e}; nor a MagicPose export (magicpose.json) or training run (checkpoints/<step>/)") from None


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, dtype: Any = None,
            variant: str | None = None, max_shard_bytes: int | None = None, ema: bool = False,
            prediction_type: str | None = None, base: str | os.PathLike | None = None,
            base_vae: str | os.PathLike | None = None, model_config: str | os.PathLike | None = None) -> str:
  """Reads `src` (kind detected) and writes it to `dst` in format `to`; returns the source kind.

  Stable Diffusion sources go to `convert.formats.convert` (same arguments). For a training run `ema` takes its
  EMA weights; an export holds one set of weights. `base` / `base_vae` write a MagicPose model over another SD 1.5's
  UNet / VAE (`with_base`). Paths may be relative (made absolute here: orbax needs that).
  """
  src, dst = (os.path.abspath(os.path.expanduser(os.fspath(p))) for p in (src, dst))
  kind = detect_source(src)
  if not kind.startswith("magicpose-"):
    if base is not None or base_vae is not None:
      raise ValueError(f"{src}: a {kind} source; --base / --base-vae apply to MagicPose runs and exports")
    return formats.convert(src, dst, to, dtype, variant, max_shard_bytes, ema, prediction_type,
                           model_config)
  if to not in formats.FORMATS:
    raise ValueError(f"unknown destination format {to!r}; expected one of {formats.FORMATS}")
  if variant is not None or max_shard_bytes is not None or prediction_type is not None or model_config is not None:
    raise ValueError(f"{src}: --variant, --max-shard-gb, --prediction-type and --model-config apply to Stable "
                     f"Diffusion sources, not to a {kind}")
  if kind == "magicpose-export" and ema:
    raise ValueError(f"{src}: an export holds one set of weights (its magicpose.json says which); --ema applies "
                     f"to training runs")
  model = load_run(src, ema=ema) if kind == "magicpose-run" else load_export(src, param_dtype=None)
  model = with_base(model, base, base_vae)
  model = dataclasses.replace(model, params=_cast(model.params, dtype))
  save = {"diffusers": save_diffusers_export, "flax": save_flax_export, "magicpose": save_magicpose_file,
          "ldm": save_ldm_file}[to]
  save(model, dst)
  return kind
