"""`python -m magicpose_jax.convert --src PATH --dst PATH --to {flax,diffusers,ldm,magicpose}`.

Converts a UNet folder, a whole Stable Diffusion checkpoint, or a MagicPose model (a
training workdir, one step's checkpoint folder, or an export folder); the source kind is
detected from the path (see `magicpose_jax.export` and `magicpose_jax.convert.formats`):
  diffusers  diffusers folders (a UNet's, or a pipeline's with model_index.json); from a
             MagicPose model: unet/, appearance_unet/, pose_controlnet/, vae/, text_encoder/,
             tokenizer/, scheduler/ and magicpose.json (see magicpose_jax.export)
  flax       ours: config.json + orbax params/ per model (see convert.flax_checkpoint)
  ldm        an original SD single file (.safetensors written; .ckpt/.pth read too)
  magicpose  the released MagicPose single file (.safetensors), from a MagicPose model
A training run's raw params are exported unless --ema is given (then its EMA weights).
--base (and --base-vae) write a MagicPose model over another SD 1.5's UNet (and VAE), controllers unchanged.
Single files do not record their architecture: they are read as SD 1.5 (SD 2.x when they
hold an OpenCLIP text encoder); --model-config FOLDER gives another one's config files
(unet/, vae/, text_encoder/, scheduler/: e.g. the pipeline or export the file came from).
SD 2.x single files do not say what their UNet predicts: pass --prediction-type
v_prediction (SD 2.x 768-v) or epsilon (512-base) when reading one.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from magicpose_jax.animate import add_base_arguments, base_sources
from magicpose_jax.convert.formats import FORMATS
from magicpose_jax.diffusion.schedules import PREDICTION_TYPES
from magicpose_jax.export import convert
from magicpose_jax.train.validate import user_path

_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def build_parser() -> argparse.ArgumentParser:
  """The command line (also parsed by the README test)."""
  parser = argparse.ArgumentParser(prog="python -m magicpose_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, type=user_path, help="source folder or single file")
  parser.add_argument("--dst", required=True, type=user_path,
                      help="destination folder (a .safetensors file for --to ldm and --to magicpose)")
  parser.add_argument("--to", required=True, choices=FORMATS, help="destination format")
  parser.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                      help="cast the weights (default: keep the source dtype)")
  parser.add_argument("--variant", default=None, help="diffusers weight variant to read, e.g. fp16")
  parser.add_argument("--max-shard-gb", type=float, default=None,
                      help="diffusers UNet output: shard safetensors above this size")
  parser.add_argument("--ema", action="store_true",
                      help="take the EMA weights: an LDM single file's EMA UNet, or a training run's EMA of its "
                           "trained nets (default: the raw params)")
  parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                      help="LDM single-file source: what the UNet predicts (required for SD 2.x files: "
                           "v_prediction for 768-v, epsilon for 512-base)")
  parser.add_argument("--model-config", type=user_path, default=None,
                      help="LDM single-file source of another architecture than SD 1.5 / 2.x: a folder with its "
                           "unet/, vae/, text_encoder/ and scheduler/ config files (a diffusers pipeline or export)")
  add_base_arguments(parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  base, base_vae = base_sources(parser, args)
  try:
    kind = convert(args.src, args.dst, args.to, _DTYPES[args.dtype] if args.dtype else None, args.variant,
                   int(args.max_shard_gb * 2**30) if args.max_shard_gb else None, args.ema, args.prediction_type,
                   base, base_vae, args.model_config)
  except (FileNotFoundError, FileExistsError, ValueError) as e:  # ConversionError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"read {kind} from {args.src}; wrote {args.to} to {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
