"""Where the main UNet's self-attention looks in the reference (synthetic figures, whose body parts are known).

MagicPose copies appearance through attention: a target token's query meets the keys of the Appearance
Controller's states and takes their values. That copies a shirt's colour onto the shirt only if the torso's
queries find the reference's torso. Per reference self-attention layer, over the foreground tokens of the target:

- `reference_mass`: the share of the attention on the reference's tokens (the rest stays on the image's own);
- `entropy`: the entropy of the attention over the reference's tokens over its maximum, log(N) (1: uniform, so
  the layer reads the reference's average, which is mostly background);
- `own_entropy`: the same over the image's own tokens (how sharp the frozen base's self-attention is there);
- `part_match`: the share of the reference attention that lands on tokens of the same body part
  (`data.synthetic.PART_NAMES`, the majority label of each token's pixels), against `chance`, the share those
  tokens have of the reference (what uniform attention gives).

`Attention` sows each reference layer's queries and keys as "reference_qk" when the "intermediates" collection
is mutable: `reference_layers` reads them back in the order the layers ran. `benchmarks/reference_attention.py`
runs it on a trained run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def token_labels(part_mask: np.ndarray, side: int) -> np.ndarray:
  """The majority part label of each token of a `side x side` grid over a `[S, S]` part mask: `[side * side]`."""
  s = part_mask.shape[0]
  if part_mask.shape != (s, s) or s % side:
    raise ValueError(f"part mask of shape {part_mask.shape}: expected a square mask whose side divides by {side}")
  f = s // side
  cells = part_mask.reshape(side, f, side, f).transpose(0, 2, 1, 3).reshape(side * side, f * f)
  return np.array([np.bincount(c).argmax() for c in cells])


def reference_layers(intermediates: Mapping[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
  """`(q [B, N, H, D], k [B, N + R, H, D])` of every reference self-attention, in the order the layers ran
  (flax keeps a module's entries in creation order; `jax.tree` would sort them by name)."""
  out = []
  for key, value in intermediates.items():
    if key == "reference_qk":
      out.extend((np.asarray(q), np.asarray(k)) for q, k in value)
    elif isinstance(value, Mapping):
      out.extend(reference_layers(value))
  return out


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _entropy(p: np.ndarray) -> np.ndarray:
  return -(p * np.log(np.maximum(p, 1e-300))).sum(-1)


def attention_stats(q: np.ndarray, k: np.ndarray, target_labels: np.ndarray,
                    reference_labels: np.ndarray) -> dict[str, float]:
  """Statistics of one layer (module docstring), averaged over heads and the target's foreground tokens.

  Args:
    q: `[B, N, H, D]` queries of the target's tokens.
    k: `[B, N + R, H, D]` keys: the target's own N tokens, then the reference's R.
    target_labels: `[B, N]` part label per target token (0: background, left out).
    reference_labels: `[B, R]` part label per reference token.
  """
  b, n, _, d = q.shape
  r = k.shape[1] - n
  if target_labels.shape != (b, n) or reference_labels.shape != (b, r):
    raise ValueError(f"labels {target_labels.shape} and {reference_labels.shape}: expected {(b, n)} and {(b, r)}")
  logits = np.einsum("bnhd,bmhd->bhnm", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(d)
  mass = _softmax(logits)[..., n:].sum(-1)  # [B, H, N]
  # Each part's own softmax: the attention restricted to it, exact even where the other part holds ~all the mass.
  spread, own = _softmax(logits[..., n:]), _softmax(logits[..., :n])
  entropy = _entropy(spread) / np.log(r)
  own_entropy = _entropy(own) / np.log(n)
  same = (target_labels[:, :, None] == reference_labels[:, None, :]).astype(np.float64)  # [B, N, R]
  match = (spread * same[:, None]).sum(-1)  # [B, H, N]
  chance = np.broadcast_to(same.mean(-1)[:, None], match.shape)
  fg = np.broadcast_to((target_labels > 0)[:, None], match.shape)
  if not fg.any():
    raise ValueError("no foreground token in the target labels")
  return {"reference_mass": float(mass[fg].mean()), "entropy": float(entropy[fg].mean()),
          "own_entropy": float(own_entropy[fg].mean()),
          "part_match": float(match[fg].mean()), "chance": float(chance[fg].mean())}


def query_map(q: np.ndarray, k: np.ndarray, example: int, token: int) -> np.ndarray:
  """One query's attention over the reference's tokens, averaged over heads and renormalised over them: `[R]`
  (q `[B, N, H, D]`, k `[B, N + R, H, D]` as in `attention_stats`)."""
  n, d = q.shape[1], q.shape[-1]
  logits = np.einsum("hd,mhd->hm", q[example, token].astype(np.float64), k[example, n:].astype(np.float64))
  return _softmax(logits / np.sqrt(d)).mean(0)


def part_token(labels: np.ndarray, part: int) -> int | None:
  """The token of `part` nearest its centroid on a square grid of `[side * side]` labels (None if absent)."""
  side = math.isqrt(labels.size)
  ys, xs = np.divmod(np.flatnonzero(labels == part), side)
  if not len(ys):
    return None
  nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
  return int(ys[nearest] * side + xs[nearest])

