"""`python -m magicpose_jax.demo [--out DIR]`: the end-to-end example (also `make demo`).

Until the full demo lands (train both stages on synthetic figures, then animate),
this runs the pieces that exist on a tiny SD-shaped UNet pair:
  1. exports the main UNet to a diffusers folder and reads it back (strict converter);
  2. runs an "appearance" UNet on a reference latent to collect its per-block
     reference states, then the main UNet reading them (MagicPose's hook);
  3. if the PyTorch reference is installed, checks the main UNet against diffusers.
It writes DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from magicpose_jax.convert.diffusers import load_unet, save_unet
from magicpose_jax.models.unet import VARIANTS, UNet2DConditionModel


def run(out: str) -> dict:
  config = VARIANTS["tiny"]
  model = UNet2DConditionModel(config)
  rng = np.random.default_rng(0)
  z_t = rng.standard_normal((1, 16, 16, 4), dtype=np.float32)
  z_ref = rng.standard_normal((1, 16, 16, 4), dtype=np.float32)
  text = rng.standard_normal((1, 77, config.cross_attention_dim), dtype=np.float32)
  t = np.array([500.0], np.float32)
  init = jax.jit(model.init)
  main_params = init(jax.random.key(0), z_t, t, text)["params"]
  appearance_params = init(jax.random.key(1), z_t, t, text)["params"]

  folder = os.path.join(out, "unet_diffusers")
  files = save_unet(config, main_params, folder)
  config2, loaded = load_unet(folder)
  exact = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(main_params), strict=True))

  apply = jax.jit(model.apply, static_argnames="return_reference_states")
  start = time.perf_counter()
  _, states = apply({"params": appearance_params}, z_ref, t, text, return_reference_states=True)
  eps_plain = apply({"params": loaded}, z_t, t, text)
  eps_ref = apply({"params": loaded}, z_t, t, text, reference_states=states)
  elapsed = time.perf_counter() - start
  summary = {
      "unet": "tiny", "params": int(sum(x.size for x in jax.tree.leaves(main_params))),
      "files_written": files, "config_round_trip": config2 == config, "weights_round_trip_exact": exact,
      "reference_states": [list(s.shape) for s in states],
      "reference_effect_mean_abs": float(np.abs(np.asarray(eps_ref - eps_plain)).mean()),
      "seconds_incl_compile": round(elapsed, 2),
  }
  try:
    import torch  # noqa: PLC0415
    from diffusers import UNet2DConditionModel as TorchUNet  # noqa: PLC0415

    tmodel = TorchUNet.from_pretrained(folder).eval()
    with torch.no_grad():
      ref = tmodel(torch.from_numpy(z_t.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                   torch.from_numpy(text)).sample.numpy().transpose(0, 2, 3, 1)
    summary["max_abs_error_vs_diffusers"] = float(np.abs(np.asarray(eps_plain) - ref).max())
  except ImportError:
    summary["max_abs_error_vs_diffusers"] = "PyTorch reference not installed"
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="outputs/demo")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  for key, value in run(args.out).items():
    print(f"{key:>28}: {value}")
  print(f"wrote {os.path.join(args.out, 'summary.json')}")


if __name__ == "__main__":
  main()
