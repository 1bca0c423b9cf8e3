"""Export of a training run: diffusers folders PyTorch loads, the PyTorch example's step vs ours, round trips.

The run is a tiny stage-2 checkpoint written the way training writes it (`train.checkpoint.Checkpointer`) without
taking a step (no step compile): perturbed trainable params, so the pose net's zero convs are non-zero and the
appearance net differs from the base, and an EMA that differs from the params.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from magicpose_jax import export as tr
from magicpose_jax import torch_reference
from magicpose_jax.configs import load_config
from magicpose_jax.convert.__main__ import main as convert_main
from magicpose_jax.convert.magicpose import STAGE1_APPEARANCE_PREFIX, load_magicpose_checkpoint
from magicpose_jax.export import convert, detect_source
from magicpose_jax.models.magicpose import MagicPose, init_params
from magicpose_jax.torch_reference import nchw, nhwc
from magicpose_jax.train import checkpoint as ckpt
from magicpose_jax.train import stages
from magicpose_jax.train.step import TrainState

ROOT = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-4
EMA_OFFSET = 0.01


def tiny_config(stage: str = "stage2"):
  config = load_config("tiny")
  config.stage = stage
  config.ema_decay = 0.999
  return config


@functools.lru_cache(maxsize=1)
def make_tiny_run() -> str:
  """A tiny stage-2 workdir at step 3 (shared by this file and test_animate.py within one pytest process)."""
  root = tempfile.mkdtemp(prefix="magicpose_tiny_run_")
  atexit.register(shutil.rmtree, root, True)
  config = tiny_config()
  sd, base, source = stages.load_base(config, ckpt.read_run)
  nets = stages.networks(config, sd)
  init = init_params(nets.model.config, base["unet"], jax.random.key(1))
  rng = np.random.default_rng(0)
  params = {k: jax.tree.map(lambda x: np.asarray(x) + 0.02 * rng.standard_normal(x.shape).astype(np.float32),
                            init[k]) for k in stages.TRAINABLE["stage2"]}
  ema = jax.tree.map(lambda x: x + np.float32(EMA_OFFSET), params)
  # The frozen tree training hashes (`stages.initial_params`): float32 base UNet and VAE, empty-prompt states.
  frozen = {"unet": base["unet"], "vae": base["vae"], "text": stages.text_context(sd, base["text_encoder"])}
  state = TrainState(step=np.int32(3), params=params, opt_state={}, ema=ema, rng=np.zeros(2, np.uint32),
                     nonfinite=np.int32(0))
  checkpointer = ckpt.Checkpointer(root, 1, source, ckpt.tree_hash(frozen), config)
  checkpointer.save(state, None, force=True)
  checkpointer.close()
  return root


@functools.lru_cache(maxsize=1)
def loaded_run() -> tr.TrainedModel:
  return tr.load_run(make_tiny_run())


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> pathlib.Path:
  dst = tmp_path_factory.mktemp("export") / "diffusers"
  assert detect_source(make_tiny_run()) == "magicpose-run"
  assert convert(make_tiny_run(), dst, "diffusers") == "magicpose-run"
  return dst


def test_the_pytorch_example_runs_on_an_export(export, capsys):
  """examples/torch_magicpose_step.py end to end (its math is `torch_reference`'s, checked against ours above)."""
  spec = importlib.util.spec_from_file_location("torch_magicpose_step", ROOT / "examples" / "torch_magicpose_step.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main([str(export), "--steps", "10"])
  out = capsys.readouterr().out
  assert "stage2 model, step 3: t=" in out and "model output (1, 4," in out, out


def _assert_bit_equal(a, b):
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, xa), (_, ya) in zip(la, lb, strict=True):
    x, y = np.asarray(xa), np.asarray(ya)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def test_run_loads_with_its_base_and_stage():
  model = loaded_run()
  assert model.info["stage"] == "stage2" and model.info["step"] == 3 and model.info["weights"] == "params"
  assert model.model.use_appearance and model.model.pose is not None
  assert model.image_size == (32, 32)
  # `load_run(ema=True)` differs only in the trainable tree it restores (the base reload is the slow part).
  step_dir = ckpt.latest_checkpoint_dir(make_tiny_run())
  _, ema = ckpt.read_trainable(step_dir, "ema")
  for name in ("appearance", "pose"):
    diff = jax.tree.map(lambda a, b: np.abs(a - b - EMA_OFFSET).max(), ema[name], model.params[name])
    assert max(jax.tree.leaves(diff)) < 1e-6


def test_diffusers_export_loads_and_matches_the_jax_step(export):
  manifest = json.loads((export / tr.MANIFEST).read_text())
  assert manifest["appearance_unet"] == "appearance_unet" and manifest["pose_controlnet"] == "pose_controlnet"
  assert (manifest["stage"], manifest["step"], manifest["weights"]) == ("stage2", 3, "params")
  assert manifest["base_source"].startswith("random:")
  for cls, name in ((UNet2DConditionModel, "unet"), (UNet2DConditionModel, "appearance_unet"),
                    (ControlNetModel, "pose_controlnet"), (AutoencoderKL, "vae"),
                    (transformers.CLIPTextModel, "text_encoder")):
    _, info = cls.from_pretrained(export / name, output_loading_info=True)
    assert not any(info.values()), (name, info)

  example = torch_reference  # what examples/torch_magicpose_step.py runs
  models = example.load_export(str(export))
  bank = example.install_reference_attention(models)
  run = loaded_run()
  sd = run.sd
  text = np.asarray(stages.text_context(sd, run.params["text_encoder"]))
  np.testing.assert_allclose(example.empty_prompt_states(models).numpy(), text, atol=ATOL)

  rng = np.random.default_rng(5)
  b, h = 2, sd.unet.sample_size
  z_t = rng.standard_normal((b, h, h, 4)).astype(np.float32)
  z_ref = rng.standard_normal((b, h, h, 4)).astype(np.float32)
  pose = rng.uniform(size=(b, *run.image_size, 3)).astype(np.float32)
  t = np.array([981, 500], np.int32)
  texts = np.repeat(text, b, axis=0)
  model = MagicPose(run.model)
  params = {k: run.params[k] for k in ("unet", "appearance", "pose")}
  ours = np.asarray(jax.jit(model.apply)(params, z_t, t, texts, z_ref, pose))
  theirs = nhwc(example.model_output(models, bank, nchw(z_t), torch.from_numpy(t), torch.from_numpy(texts),
                                     nchw(z_ref), nchw(pose)))
  assert np.abs(ours - theirs).max() <= ATOL, np.abs(ours - theirs).max()
  plain = np.asarray(model.unet.apply({"params": params["unet"]}, z_t, t, texts))  # eager: faster than a compile
  assert np.abs(ours - plain).max() > 100 * ATOL  # the reference and the pose matter

  # Guided (release): the unconditional branch is the plain UNet.
  theirs = nhwc(example.guided_output(models, bank, nchw(z_t), torch.from_numpy(t), torch.from_numpy(texts),
                                      nchw(z_ref), nchw(pose), guidance=7.0))
  ours = plain + 7.0 * (ours - plain)
  assert np.abs(ours - theirs).max() <= 10 * ATOL, np.abs(ours - theirs).max()


def test_round_trips_are_bit_equal(export, tmp_path):
  run = loaded_run()
  back = tr.load_export(export)
  assert back.model == run.model and back.sd.scheduler == run.sd.scheduler
  assert back.info["empty_prompt_ids"] == run.info["empty_prompt_ids"]
  _assert_bit_equal(back.params, run.params)

  convert(export, tmp_path / "flax", "flax")  # an export converts like a run
  _assert_bit_equal(tr.load_export(tmp_path / "flax").params, run.params)

  assert convert_main(["--src", make_tiny_run(), "--to", "magicpose", "--dst", str(tmp_path / "mp.safetensors")]) == 0
  loaded = load_magicpose_checkpoint(tmp_path / "mp.safetensors", run.sd, run.model.pose)
  head = ("conv_norm_out", "conv_out")
  _assert_bit_equal(loaded["appearance"], {k: v for k, v in run.params["appearance"].items() if k not in head})
  for name in ("unet", "pose", "vae", "text_encoder"):
    _assert_bit_equal(loaded[name], run.params[name])


def test_stage1_single_file_uses_the_release_prefix(tmp_path):
  run = loaded_run()
  stage1 = tr.TrainedModel(run.sd, run.model.__class__(run.sd.unet, None, True),
                           {k: v for k, v in run.params.items() if k != "pose"}, {**run.info, "stage": "stage1"})
  tr.save_magicpose_file(stage1, tmp_path / "s1.safetensors")
  loaded = load_magicpose_checkpoint(tmp_path / "s1.safetensors", run.sd, appearance_prefix=STAGE1_APPEARANCE_PREFIX)
  assert "pose" not in loaded
  with pytest.raises(ValueError, match="has no MagicPose single-file layout"):
    tr.save_magicpose_file(tr.TrainedModel(run.sd, run.model.__class__(run.sd.unet, None, False), run.params,
                                           run.info), tmp_path / "x.safetensors")


def _copy_run(tmp_path) -> pathlib.Path:
  dst = tmp_path / "run"
  shutil.copytree(make_tiny_run(), dst)
  return dst


def _edit_meta(run: pathlib.Path, edit) -> None:
  (meta_path,) = run.glob("checkpoints/*/meta/metadata")
  meta = json.loads(meta_path.read_text())
  edit(meta)
  meta_path.write_text(json.dumps(meta))


def test_strict_errors(tmp_path, capsys):
  with pytest.raises(FileExistsError, match="not empty"):
    convert(make_tiny_run(), make_tiny_run(), "diffusers")
  with pytest.raises(FileNotFoundError, match="no training checkpoint"):
    tr.load_run(tmp_path)

  unreadable = _copy_run(tmp_path / "a")
  (state,) = unreadable.glob("checkpoints/*/state")
  shutil.rmtree(state / "ocdbt.process_0")
  with pytest.raises(ValueError, match="cannot be read as a training state"):
    tr.load_run(unreadable)
  assert convert_main(["--src", str(unreadable), "--to", "diffusers", "--dst", str(tmp_path / "out")]) == 2
  assert "cannot be read as a training state" in capsys.readouterr().err

  other_shape = _copy_run(tmp_path / "b")
  _edit_meta(other_shape, lambda m: m["trainable_shapes"].update({"pose/conv_in/kernel": [3, 3, 4, 64]}))
  with pytest.raises(ValueError, match=r"another model shape(.|\n)*pose/conv_in/kernel"):
    tr.load_run(other_shape)

  other_base = _copy_run(tmp_path / "c")
  _edit_meta(other_base, lambda m: m["config"].update({"seed": 7}))  # the random base regenerates differently
  with pytest.raises(ValueError, match="changed since training"):
    tr.load_run(other_base)

  with pytest.raises(ValueError, match="applies to training runs"):
    convert(_export_dir(tmp_path), tmp_path / "e", "magicpose", ema=True)


def _export_dir(tmp_path) -> pathlib.Path:
  folder = tmp_path / "manifest_only"
  folder.mkdir()
  (folder / tr.MANIFEST).write_text(json.dumps({"format": tr.FORMAT_NAME}))
  return folder
