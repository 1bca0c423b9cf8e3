"""VAE encode+decode of a 512² image and CLIP text forward: ours (jit) vs PyTorch, same weights, one run.

    python benchmarks/vae_clip.py               # SD 1.5 VAE (512² image) and ViT-L/14 text encoder, fp32
    python benchmarks/vae_clip.py --size 256    # smaller image
    python benchmarks/vae_clip.py --lax-conv    # also our VAE with every conv on XLA's (MAGICPOSE_CPU_CONV=lax)

Prints median times after warm-up (runs in rounds, each round's order drawn at random), the ratios of the medians
and the paired ratios with their 90% bootstrap intervals (goal: ours / PyTorch <= 1.0), our compile times and
the max abs differences.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", type=int, default=512, help="image height = width")
  parser.add_argument("--iters", type=int, default=3, help="timed VAE rounds")
  parser.add_argument("--clip-iters", type=int, default=21, help="timed CLIP rounds (a 0.1 s run)")
  parser.add_argument("--lax-conv", action="store_true",
                      help="also time our VAE with every conv on XLA's (no im2col/Winograd), in the same rounds")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from diffusers import AutoencoderKL as TorchVAE  # noqa: PLC0415
  from timing import compile_with_xla_convs, paired_ratio, paired_ratio_interval, shuffled_samples  # noqa: PLC0415

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
  vae_fns = {"ours": lambda: vae_fn(vae_params, image).block_until_ready()}
  if args.lax_conv:
    vae_lax = compile_with_xla_convs(roundtrip, vae_params, image)
    vae_fns["ours, XLA convs only"] = lambda: vae_lax(vae_params, image).block_until_ready()
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

  vae_runs = shuffled_samples(vae_fns | {"PyTorch": torch_vae}, args.iters)
  clip_runs = shuffled_samples({"ours": lambda: clip_fn(clip_params, ids).block_until_ready(),
                                "PyTorch": torch_clip}, args.clip_iters)
  vae_err = np.abs(np.asarray(vae_fn(vae_params, image)) - torch_vae().numpy().transpose(0, 2, 3, 1)).max()
  clip_err = np.abs(np.asarray(clip_fn(clip_params, ids)) - torch_clip().numpy()).max()

  print(f"SD 1.5 VAE + CLIP text, fp32, threads={threads} (both), jax {jax.__version__}, torch {torch.__version__}")
  for name, runs, compile_s, err in ((f"VAE encode+decode {args.size}x{args.size}", vae_runs, vae_compile, vae_err),
                                     ("CLIP text 1x77", clip_runs, clip_compile, clip_err)):
    print(f"  {name}: compile {compile_s:.1f} s, max|ours - PyTorch| {err:.1e}, {len(runs['PyTorch'])} rounds")
    for label, times in runs.items():
      print(f"    {label:22s} {statistics.median(times) * 1e3:9.1f} ms  runs (s): "
            + " ".join(f"{t:.2f}" for t in times))
    for label, times in runs.items():
      if label != "PyTorch":
        lo, hi = paired_ratio_interval(times, runs["PyTorch"])
        print(f"    {label} / PyTorch: {statistics.median(times) / statistics.median(runs['PyTorch']):.2f}x of "
              f"medians, {paired_ratio(times, runs['PyTorch']):.2f}x paired (90% interval {lo:.2f}-{hi:.2f})")


if __name__ == "__main__":
  main()
