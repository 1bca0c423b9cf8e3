"""Reading and writing PyTorch state dicts as numpy arrays.

Formats: safetensors (single file, or sharded with diffusers'/transformers'
`*.safetensors.index.json`), and torch pickles (`.bin`, `.ckpt`, `.pth`, `.th`)
read with `torch.load(weights_only=True)`, so no arbitrary object is ever
unpickled. torch is imported only for pickles. bf16 tensors come back as
`ml_dtypes.bfloat16` numpy arrays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
import safetensors.numpy

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pth", ".th", ".pt")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads one tensor file, or a sharded set through its `.index.json`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  if path.endswith(".index.json"):
    return _read_sharded(path)
  if path.endswith(".safetensors"):
    try:
      return safetensors.numpy.load_file(path)
    except Exception as e:  # SafetensorError and friends: a truncated or foreign file
      raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
  if path.endswith(PICKLE_SUFFIXES):
    return _read_pickle(path)
  raise ValueError(f"{path}: unknown weights format (expected .safetensors, .safetensors.index.json "
                   f"or a torch pickle {PICKLE_SUFFIXES})")


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
  with open(index_path) as f:
    index = json.load(f)
  if "weight_map" not in index:
    raise ValueError(f"{index_path}: no 'weight_map' in the shard index")
  folder = os.path.dirname(index_path)
  out: dict[str, np.ndarray] = {}
  for shard in sorted(set(index["weight_map"].values())):
    tensors = read_state_dict(os.path.join(folder, shard))
    listed = {k for k, v in index["weight_map"].items() if v == shard}
    if set(tensors) != listed:
      raise ValueError(f"{index_path}: shard {shard} holds {sorted(set(tensors) ^ listed)[:5]} "
                       f"contrary to the index")
    out.update(tensors)
  return out


def _read_pickle(path: str) -> dict[str, np.ndarray]:
  import torch  # noqa: PLC0415  (only pickles need torch)

  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError for pickled objects, RuntimeError for corrupt archives
    raise ValueError(f"{path}: cannot be read as a tensor-only torch checkpoint (weights_only=True refuses "
                     f"pickled objects; {type(e).__name__}: {str(e).splitlines()[0]})") from None
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]  # Lightning / LDM checkpoints
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = _torch_to_numpy(v)
  return out


def _torch_to_numpy(t) -> np.ndarray:
  import ml_dtypes  # noqa: PLC0415
  import torch  # noqa: PLC0415

  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    # numpy has no bf16: reinterpret the bits, exactly.
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def write_safetensors(tensors: Mapping[str, np.ndarray], folder: str | os.PathLike, stem: str,
                      max_shard_bytes: int | None = None) -> list[str]:
  """Writes `<stem>.safetensors`, or shards plus `<stem>.safetensors.index.json`. Returns file names."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  # np.require, not np.ascontiguousarray: the latter turns 0-d tensors (e.g. logit_scale) into 1-d.
  tensors = {k: np.require(v, requirements="C") for k, v in tensors.items()}
  total = sum(v.nbytes for v in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    name = f"{stem}.safetensors"
    safetensors.numpy.save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
    return [name]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for k, v in tensors.items():
    if shards[-1] and size + v.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = v
    size += v.nbytes
  names, weight_map = [], {}
  for i, shard in enumerate(shards):
    name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
    names.append(name)
    weight_map.update(dict.fromkeys(shard, name))
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)
  return names + [f"{stem}.safetensors.index.json"]


def write_model_folder(config: Mapping, tensors: Mapping[str, np.ndarray], folder: str | os.PathLike, stem: str,
                       max_shard_bytes: int | None = None) -> list[str]:
  """A Hugging Face-style model folder: `config.json` plus `<stem>.safetensors` (or shards). Returns file names."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dict(config), f, indent=2)
  return ["config.json", *write_safetensors(tensors, folder, stem, max_shard_bytes)]
