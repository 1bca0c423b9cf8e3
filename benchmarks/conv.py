"""3x3 convolutions on this machine: XLA's `lax` conv vs our im2col and Winograd paths vs PyTorch, forward and
forward+backward.

    python benchmarks/conv.py                 # the SD 1.5 UNet's 3x3 conv shapes at 64x64 latents, batch 1
    python benchmarks/conv.py --batch 2 --shapes mid

Prints one row per shape (median ms of runs after warm-up, each round in a random, seeded order) and which path
`magicpose_jax.models.conv` picks (`use_im2col`, `use_winograd`); the rules' thresholds come from this table.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.models.conv import im2col_conv, use_im2col, use_winograd, winograd_conv

# (H = W, C_in, C_out) of every distinct 3x3 stride-1 conv in the SD 1.5 UNet at 64x64 latents.
SD15 = [(64, 320, 320), (64, 640, 320), (64, 960, 320), (64, 640, 640), (32, 320, 640), (32, 640, 640),
        (32, 960, 640), (32, 1280, 640), (32, 1920, 640), (32, 1280, 1280), (16, 640, 1280), (16, 1280, 1280),
        (16, 1920, 1280), (16, 2560, 1280), (8, 1280, 1280), (8, 2560, 1280)]
# benchmarks/train_step.py's "mid" model (widths 64/128/256) at 32x32 latents.
# The ControlNet hint encoder's stride-1 convs (channels 16/32/96/256) on a 256 px pose image (the "mid" model).
HINT = [(256, 3, 16), (256, 16, 16), (128, 32, 32), (64, 96, 96), (32, 256, 320)]
MID = [(32, 64, 64), (16, 128, 128), (16, 256, 128), (8, 256, 256), (8, 512, 256), (4, 256, 256), (4, 512, 256)]
# The SD VAE decoder's 3x3 convs on a 512 px image (latents 64x64), where only lax and Winograd are candidates.
VAE = [(64, 512, 512), (128, 512, 512), (256, 512, 512), (256, 512, 256), (256, 256, 256), (512, 256, 128),
       (512, 128, 128)]


def lax_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def im2col(x: jax.Array, w: jax.Array) -> jax.Array:
  return im2col_conv(x, w, ((1, 1), (1, 1)))


def winograd(x: jax.Array, w: jax.Array) -> jax.Array:
  return winograd_conv(x, w, ((1, 1), (1, 1)))


def with_grads(conv):
  """Forward + backward (gradients wrt input and kernel), as in training."""
  return jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))


def _time(fn, runs: int) -> list[float]:
  out = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def measure(h: int, cin: int, cout: int, batch: int, runs: int, torch=None, paths=("lax", "im2col", "winograd"),
            backward: bool = True) -> dict[str, float]:
  """Median seconds of each variant for one `[batch, h, h, cin]` x `[3, 3, cin, cout]` conv."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, h, h, cin), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * (9 * cin) ** -0.5)
  convs = {"lax": lax_conv, "im2col": im2col, "winograd": winograd}
  variants = [(name, convs[name]) for name in paths]
  variants += [(f"{name}_fb", with_grads(convs[name])) for name in paths] if backward else []
  calls = {name: functools.partial(jax.jit(f), x, w) for name, f in variants}
  if torch is not None:
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).requires_grad_(True)

    def torch_fwd():
      with torch.no_grad():
        return torch.nn.functional.conv2d(tx, tw, padding=1)

    def torch_fb():
      (torch.nn.functional.conv2d(tx, tw, padding=1) ** 2).sum().backward()
      tx.grad = tw.grad = None
      return tx

    calls |= {"torch": torch_fwd} | ({"torch_fb": torch_fb} if backward else {})
  for f in calls.values():  # compile / warm up
    jax.block_until_ready(f())
  times = {name: [] for name in calls}
  order = random.Random(0)
  for _ in range(runs):  # alternate, so load changes hit every variant alike; shuffled, so no variant always
    names = list(calls)  # runs right after the same other one (and pays for the caches it left cold)
    order.shuffle(names)
    for name in names:
      times[name] += _time(calls[name], 1)
  return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", choices=("sd15", "mid", "hint", "vae"), default="sd15",
                      help="vae: the SD VAE decoder's shapes, lax and Winograd only (im2col's buffer would be GiBs)")
  parser.add_argument("--forward-only", dest="backward", action="store_false", help="skip forward+backward")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  args = parser.parse_args()
  torch = None
  if args.torch:
    import torch  # noqa: PLC0415

  shapes = {"sd15": SD15, "mid": MID, "hint": HINT, "vae": VAE}[args.shapes]
  paths = ("lax", "winograd") if args.shapes == "vae" else ("lax", "im2col", "winograd")
  print(f"{jax.default_backend()} {jax.devices()[0].device_kind}, batch {args.batch}, fp32, median of {args.runs} ms")
  print("| H=W | C_in | C_out | lax fwd | im2col fwd | Winograd fwd | torch fwd | lax f+b | im2col f+b "
        "| Winograd f+b | torch f+b | picks |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for h, cin, cout in shapes:
    t = measure(h, cin, cout, args.batch, args.runs, torch, paths, args.backward)
    ms = lambda k, t=t: f"{t[k] * 1e3:.1f}" if k in t else "-"
    x_shape, k_shape = (args.batch, h, h, cin), (3, 3, cin, cout)
    pick = ("im2col" if use_im2col(x_shape, k_shape) else
            "Winograd" if use_winograd(x_shape, k_shape, ((1, 1), (1, 1))) else "lax")
    print(f"| {h} | {cin} | {cout} | {ms('lax')} | {ms('im2col')} | {ms('winograd')} | {ms('torch')} "
          f"| {ms('lax_fb')} | {ms('im2col_fb')} | {ms('winograd_fb')} | {ms('torch_fb')} | {pick} |", flush=True)


if __name__ == "__main__":
  main()
