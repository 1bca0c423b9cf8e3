"""Full-size SD text encoders vs transformers (slow: `make test-slow`; random init, no download).

SD 1.5's CLIP ViT-L/14 text tower (123M params) and SD 2.x's 23-layer OpenCLIP ViT-H/14
one (340M), at batch 2 and 77 tokens. Same tolerance as the tiny tests: max abs error
<= 1e-4 in float32 on `last_hidden_state`, the penultimate layer (`clip_skip=1`) and the
pooled output.
"""

import time

import jax
import numpy as np
import pytest
import torch
from test_clip import ATOL, _ids, prefixed_state_dict, torch_clip

from magicpose_jax.convert.clip import clip_key_table
from magicpose_jax.models.clip import CLIP_VARIANTS, CLIPTextModel, encode_text

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_text_encoder_matches_transformers(name):
  config = CLIP_VARIANTS[name]
  tmodel = torch_clip(config, seed=0)
  params = clip_key_table(config).to_flax(prefixed_state_dict(tmodel))
  assert sum(x.size for x in jax.tree.leaves(params)) == sum(p.numel() for p in tmodel.parameters())
  ids = _ids(config)[:2]
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(ids).long(), output_hidden_states=True)
    ref_penultimate = tmodel.final_layer_norm(ref.hidden_states[-2]).numpy()
  model = CLIPTextModel(config)
  fn = jax.jit(lambda p, x: (model.apply({"params": p}, x), encode_text(model, p, x, "penultimate")))
  start = time.perf_counter()
  out, penultimate = jax.block_until_ready(fn(params, ids))
  seconds = time.perf_counter() - start
  errors = {
      "last_hidden_state": np.abs(np.asarray(out["last_hidden_state"]) - ref.last_hidden_state.numpy()).max(),
      "penultimate": np.abs(np.asarray(penultimate) - ref_penultimate).max(),
      "pooled_output": np.abs(np.asarray(out["pooled_output"]) - ref.pooler_output.numpy()).max(),
  }
  print(f"{name}: max abs errors {errors}, first call (compile + run) {seconds:.1f}s")
  assert np.std(ref.last_hidden_state.numpy()) > 0.1
  for what, err in errors.items():
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"
