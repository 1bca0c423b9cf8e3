"""Preprocessed frames on disk: the example format, ArrayRecord shards and the manifest.

One ArrayRecord record holds one frame (pairs are formed at read time, so a frame is stored once however many
pairs use it). A record is a small explicit binary format, not a pickle:

  b"MPJX" | uint32 little-endian header length | header (JSON, utf-8) | payload

The header lists every field as `{"name", "kind", ...}`: `kind` "str" keeps its value in the header; "bytes" and
"array" point into the payload (`offset`, `size`), arrays with a little-endian `dtype` and a `shape`. Field order
is sorted, so the same fields give the same bytes.

Fields written by `magicpose_jax.preprocess` (see `data/preprocessing.py`):
  video, frame, path: str                   the video's name, the frame's file stem, the image's path under --src
  image: bytes                              PNG (or JPEG) of the frame, RGB, [size, size, 3] once decoded
  latent: float32 [size/f, size/f, 2C]      instead of `image` with --vae: the VAE's moments (mean ++ logvar)
  pose_image: bytes                         PNG of the pose render (or the released pose map), [size, size, 3]
  pose_body, pose_hands, pose_face          float32 [P, 18, 3], [P, 2, 21, 3], [P, 70, 3]: the keypoints of the
                                            P people of the frame's OpenPose JSON, in the stored image's pixels
                                            (absent when the frame has a pose map only)

A preprocessed folder holds `frames-SSSSS-of-NNNNN.array_record` shards, a `.done` marker per finished shard and
`manifest.json` (see `preprocessing.build_manifest`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np

MAGIC = b"MPJX"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "magicpose_jax.frames/1"
# group_size 1: every record is its own chunk, so grain reads any record without decoding its neighbours.
WRITER_OPTIONS = "group_size:1"

Field = np.ndarray | bytes | str


class RecordError(ValueError):
  """A record or a preprocessed folder that cannot be read: the message names the file or field."""


def encode_example(fields: Mapping[str, Field]) -> bytes:
  """Serialises a dict of numpy arrays, bytes and strings (deterministic: same fields -> same bytes)."""
  header, chunks, offset = [], [], 0
  for name in sorted(fields):
    value = fields[name]
    if isinstance(value, str):
      header.append({"name": name, "kind": "str", "value": value})
      continue
    if isinstance(value, bytes | bytearray | memoryview):
      data, entry = bytes(value), {"name": name, "kind": "bytes"}
    elif isinstance(value, np.ndarray | np.generic):
      array = np.asarray(value)
      if array.dtype.kind not in "biuf":
        raise RecordError(f"field {name!r}: only bool/int/float arrays are stored, got dtype {array.dtype}")
      array = array.astype(array.dtype.newbyteorder("<"), copy=False)
      data = array.tobytes(order="C")
      entry = {"name": name, "kind": "array", "dtype": array.dtype.str, "shape": list(array.shape)}
    else:
      raise RecordError(f"field {name!r}: expected a numpy array, bytes or str, got {type(value).__name__}")
    entry.update(offset=offset, size=len(data))
    header.append(entry)
    chunks.append(data)
    offset += len(data)
  head = json.dumps({"fields": header}, sort_keys=True, separators=(",", ":")).encode()
  return MAGIC + struct.pack("<I", len(head)) + head + b"".join(chunks)


def decode_example(data: bytes) -> dict[str, Field]:
  """Inverse of `encode_example`. Arrays are read-only views of `data`."""
  if data[:4] != MAGIC:
    raise RecordError(f"not a magicpose_jax record (starts with {data[:4]!r}, expected {MAGIC!r})")
  (length,) = struct.unpack("<I", data[4:8])
  try:
    header = json.loads(data[8:8 + length])
  except (ValueError, UnicodeDecodeError) as e:
    raise RecordError(f"record header is not valid JSON ({e})") from None
  payload = memoryview(data)[8 + length:]
  out: dict[str, Field] = {}
  for entry in header["fields"]:
    name, kind = entry["name"], entry["kind"]
    if kind == "str":
      out[name] = entry["value"]
      continue
    start, size = entry["offset"], entry["size"]
    if start + size > len(payload):
      raise RecordError(f"field {name!r}: {size} bytes at {start} run past the payload ({len(payload)} bytes)")
    chunk = payload[start:start + size]
    if kind == "bytes":
      out[name] = bytes(chunk)
    elif kind == "array":
      out[name] = np.frombuffer(chunk, dtype=np.dtype(entry["dtype"])).reshape(entry["shape"])
    else:
      raise RecordError(f"field {name!r}: unknown kind {kind!r}")
  return out


def encode_image(image: np.ndarray, image_format: str = "png") -> bytes:
  """uint8 RGB [H, W, 3] -> PNG (lossless) or JPEG (quality 95) bytes."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"encode_image: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
  params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format in ("jpg", "jpeg") else []
  ok, buffer = cv2.imencode(".jpg" if params else ".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
  if not ok:
    raise ValueError(f"encode_image: OpenCV could not encode a {image.shape} image as {image_format}")
  return buffer.tobytes()


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
  """PNG/JPEG bytes -> uint8 RGB [H, W, 3] (grey images are expanded, alpha is dropped)."""
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise RecordError(f"{what}: {len(data)} bytes that OpenCV cannot decode as an image")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def shard_name(index: int, count: int) -> str:
  """`frames-00002-of-00008.array_record`."""
  return f"frames-{index:05d}-of-{count:05d}.array_record"


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> int:
  """Writes records to an ArrayRecord file atomically (a temporary file renamed at the end); returns the count."""
  from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415  (a C extension)

  path = os.fspath(path)
  tmp = path + ".tmp"
  writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
  count = 0
  try:
    for record in records:
      writer.write(record)
      count += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return count


def read_shard(path: str | os.PathLike) -> list[bytes]:
  """Every record of one ArrayRecord file, in order (for tests and inspection; training reads through grain)."""
  from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

  reader = ArrayRecordReader(os.fspath(path))
  try:
    return list(reader.read_all())
  finally:
    reader.close()


def read_manifest(folder: str | os.PathLike) -> dict:
  """`folder/manifest.json`, checked for the fields readers rely on."""
  path = os.path.join(os.fspath(folder), MANIFEST)
  if not os.path.isfile(path):
    raise RecordError(f"{path}: no manifest; write the folder with `python -m magicpose_jax.preprocess`")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != MANIFEST_FORMAT:
    raise RecordError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
  missing = [k for k in ("shards", "videos", "counts", "size") if k not in manifest]
  if missing:
    raise RecordError(f"{path}: missing fields {missing}")
  return manifest


def shard_paths(folder: str | os.PathLike, manifest: Mapping) -> list[str]:
  """The manifest's shard files in order (global record id = position in their concatenation); checks they exist."""
  paths = [os.path.join(os.fspath(folder), shard["file"]) for shard in manifest["shards"]]
  absent = [p for p in paths if not os.path.isfile(p)]
  if absent:
    raise RecordError(f"{folder}: shard files listed in {MANIFEST} are missing: {absent[:3]}")
  return paths


def pose_fields(poses: Sequence) -> dict[str, np.ndarray]:
  """`Pose`s -> `pose_body` [P, 18, 3], `pose_hands` [P, 2, 21, 3], `pose_face` [P, 70, 3] float32 arrays."""
  return {
      "pose_body": np.stack([p.body for p in poses]) if poses else np.zeros((0, 18, 3), np.float32),
      "pose_hands": np.stack([p.hands for p in poses]) if poses else np.zeros((0, 2, 21, 3), np.float32),
      "pose_face": np.stack([p.face for p in poses]) if poses else np.zeros((0, 70, 3), np.float32),
  }


def poses_from_fields(fields: Mapping[str, Field]) -> list | None:
  """Inverse of `pose_fields`; None when the record has no keypoints (a pose map only)."""
  if "pose_body" not in fields:
    return None
  from magicpose_jax.pose.keypoints import Pose  # noqa: PLC0415  (keeps the format readable without pose/)

  body, hands, face = (np.asarray(fields[k], np.float32) for k in ("pose_body", "pose_hands", "pose_face"))
  return [Pose(body=body[i], hands=hands[i], face=face[i]) for i in range(body.shape[0])]
