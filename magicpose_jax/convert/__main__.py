"""`python -m magicpose_jax.convert --src PATH --dst PATH --to {flax,diffusers}`.

Formats of a UNet:
  diffusers  a diffusers model folder (config.json + safetensors / sharded / .bin)
  flax       our folder: config.json + orbax `params/` (see convert.flax_checkpoint)
The source format is detected from the folder's contents.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from magicpose_jax.convert.formats import FORMATS, convert_unet

_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m magicpose_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="source model folder (diffusers or flax)")
  parser.add_argument("--dst", required=True, help="destination folder")
  parser.add_argument("--to", required=True, choices=FORMATS, help="destination format")
  parser.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                      help="cast the weights (default: keep the source dtype)")
  parser.add_argument("--variant", default=None, help="diffusers weight variant to read, e.g. fp16")
  parser.add_argument("--max-shard-gb", type=float, default=None,
                      help="diffusers output: shard safetensors above this size")
  args = parser.parse_args(argv)
  try:
    convert_unet(args.src, args.dst, args.to, _DTYPES[args.dtype] if args.dtype else None, args.variant,
                 int(args.max_shard_gb * 2**30) if args.max_shard_gb else None)
  except (FileNotFoundError, FileExistsError, ValueError) as e:  # ConversionError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.to} UNet to {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
