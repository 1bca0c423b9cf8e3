"""VAE encode+decode of a 512² image and CLIP text forward: ours (jit) vs PyTorch, same weights, one run.

    python benchmarks/vae_clip.py               # SD 1.5 VAE (512² image) and ViT-L/14 text encoder, fp32
    python benchmarks/vae_clip.py --size 256    # smaller image

Prints median times after warm-up (runs alternate between the two), the ratios
(goal: ours / PyTorch <= 1.0), our compile times and the max abs differences.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", type=int, default=512, help="image height = width")
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from diffusers import AutoencoderKL as TorchVAE  # noqa: PLC0415
  from timing import alternate  # noqa: PLC0415

  from magicpose_jax.convert.clip import clip_key_table, normalize_state_dict  # noqa: PLC0415
  from magicpose_jax.convert.vae import vae_key_table  # noqa: PLC0415
  from magicpose_jax.models.clip import CLIP_VARIANTS, CLIPTextModel  # noqa: PLC0415
  from magicpose_jax.models.vae import VAE_VARIANTS, AutoencoderKL  # noqa: PLC0415

  threads = os.cpu_count()  # XLA's CPU client uses every core; PyTorch gets the same
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  rng = np.random.default_rng(0)

  vae_config = VAE_VARIANTS["sd15"]
  tvae = TorchVAE(**{k: v for k, v in vae_config.to_diffusers().items() if not k.startswith("_")}).eval()
  vae_params = jax.device_put(vae_key_table(vae_config).to_flax(
      {k: v.detach().numpy() for k, v in tvae.state_dict().items()}))
  image = rng.uniform(-1, 1, (1, args.size, args.size, 3)).astype(np.float32)
  vae = AutoencoderKL(vae_config)
  roundtrip = lambda p, x: vae.apply({"params": p}, vae.apply({"params": p}, x, method="encode").mode(),
                                     method="decode")
  start = time.perf_counter()
  vae_fn = jax.jit(roundtrip).lower(vae_params, image).compile()
  vae_compile = time.perf_counter() - start
  image_t = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())

  def torch_vae():
    with torch.inference_mode():
      return tvae.decode(tvae.encode(image_t).latent_dist.mode()).sample

  clip_config = CLIP_VARIANTS["sd15"]
  tclip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{
      k: v for k, v in clip_config.to_transformers().items() if k not in ("architectures", "model_type")})).eval()
  clip_params = jax.device_put(clip_key_table(clip_config).to_flax(normalize_state_dict(
      {k: v.detach().numpy() for k, v in tclip.state_dict().items()})))
  ids = rng.integers(0, clip_config.vocab_size - 1, (1, 77)).astype(np.int32)
  clip = CLIPTextModel(clip_config)
  start = time.perf_counter()
  clip_fn = jax.jit(lambda p, i: clip.apply({"params": p}, i)["last_hidden_state"]).lower(clip_params, ids).compile()
  clip_compile = time.perf_counter() - start
  ids_t = torch.from_numpy(ids.astype(np.int64))

  def torch_clip():
    with torch.inference_mode():
      return tclip(ids_t).last_hidden_state

  vae_ours, vae_ref = alternate(lambda: vae_fn(vae_params, image).block_until_ready(), torch_vae, args.iters)
  clip_ours, clip_ref = alternate(lambda: clip_fn(clip_params, ids).block_until_ready(), torch_clip, args.iters)
  vae_err = np.abs(np.asarray(vae_fn(vae_params, image)) - torch_vae().numpy().transpose(0, 2, 3, 1)).max()
  clip_err = np.abs(np.asarray(clip_fn(clip_params, ids)) - torch_clip().numpy()).max()

  print(f"SD 1.5 VAE + CLIP text, fp32, threads={threads} (both), jax {jax.__version__}, torch {torch.__version__}")
  print(f"  VAE encode+decode {args.size}x{args.size}: ours {vae_ours * 1e3:8.1f} ms (compile {vae_compile:.1f} s)"
        f"  PyTorch {vae_ref * 1e3:8.1f} ms  ratio {vae_ours / vae_ref:.2f}x  max|diff| {vae_err:.1e}")
  print(f"  CLIP text 1x77:           ours {clip_ours * 1e3:8.1f} ms (compile {clip_compile:.1f} s)"
        f"  PyTorch {clip_ref * 1e3:8.1f} ms  ratio {clip_ours / clip_ref:.2f}x  max|diff| {clip_err:.1e}")


if __name__ == "__main__":
  main()
