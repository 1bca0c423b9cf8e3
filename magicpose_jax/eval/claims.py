"""The paper's ablation claims, judged on metric reports of the full model and its ablations.

MagicPose's ablation study: without the Appearance Controller the identity is lost, without the Pose
Controller the pose (and with it the face's expression), and the full model's image quality (SSIM) beats the
model without classifier-free guidance and the one trained without data augmentation. A claim compares one
metric of the full model with one ablation's.

Judged over several runs (sampling seeds, training seeds), a claim's margin is the smallest over the runs, and
it must beat the spread: the larger range (max - min) of the two variants' values over the runs. A margin inside
the spread may be the draw of the seeds rather than the method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np


class Claim(NamedTuple):
  """The full model is better than `ablation` in `metric` (a key of the reports; "lower" or "higher" is better)."""

  name: str
  metric: str
  ablation: str
  better: str


# What `python -m magicpose_jax.demo` checks: its two trained ablations.
DEMO_CLAIMS = (Claim("identity: full < no_appearance", "identity_error", "no_appearance", "lower"),
               Claim("pose: full > no_pose (mIoU)", "mean_iou", "no_pose", "higher"),
               Claim("face: full < no_pose (face L1)", "face_l1", "no_pose", "lower"))

# What benchmarks/fidelity.py checks: the demo's, and image quality against each of the paper's four ablations.
ABLATION_CLAIMS = (*DEMO_CLAIMS, *(Claim(f"SSIM: full > {name}", "ssim", name, "higher")
                                   for name in ("no_appearance", "no_pose", "no_cfg", "no_augmentation")))

VERDICTS = ("holds beyond the spread", "holds, within the spread", "does not hold")


def judge(runs: Mapping[str, Sequence[Mapping[str, float]]], claims: Sequence[Claim]) -> list[dict]:
  """Each claim over index-aligned runs.

  Args:
    runs: variant ("full", "no_appearance", ...) -> its reports, one per run; index k is the same training and
      sampling seed for every variant. A report maps metric names to floats (`retarget.summary`).
    claims: what to judge (`DEMO_CLAIMS`, `ABLATION_CLAIMS`).

  Returns:
    Per claim, in order: {"claim": name, "margin": the smallest over the runs of how much better the full model is
    (< 0: worse in some run), "spread": the larger range of the two variants over the runs (0 for one run),
    "verdict": one of `VERDICTS`: beyond the spread when margin > spread, within it when only margin > 0}.
  """
  out = []
  for claim in claims:
    for variant in ("full", claim.ablation):
      if variant not in runs:
        raise ValueError(f"judge: claim {claim.name!r} needs runs of {variant!r}; have {sorted(runs)}")
    full = np.array([r[claim.metric] for r in runs["full"]], np.float64)
    them = np.array([r[claim.metric] for r in runs[claim.ablation]], np.float64)
    if full.shape != them.shape or not len(full):
      raise ValueError(f"judge: {len(full)} runs of full but {len(them)} of {claim.ablation} (need the same, >= 1)")
    if claim.better not in ("lower", "higher"):
      raise ValueError(f"judge: claim {claim.name!r}: better must be 'lower' or 'higher', got {claim.better!r}")
    margin = float(((them - full) if claim.better == "lower" else (full - them)).min())
    spread = float(max(np.ptp(full), np.ptp(them)))
    verdict = VERDICTS[0] if margin > spread else VERDICTS[1] if margin > 0 else VERDICTS[2]
    out.append({"claim": claim.name, "margin": margin, "spread": spread, "verdict": verdict})
  return out


def verdict_lines(judged: Sequence[dict]) -> list[str]:
  """Markdown bullets of `judge`'s output, a claim that does not hold in bold."""
  return [f"- {'**does not hold**' if j['verdict'] == VERDICTS[2] else j['verdict']}: {j['claim']} "
          f"(smallest margin {j['margin']:.3f}, spread {j['spread']:.3f})" for j in judged]
