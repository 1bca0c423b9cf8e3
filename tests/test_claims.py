"""eval.claims: the paper's ablation claims judged over runs, margins against spreads.

The reports are written by hand, so every expected margin and spread is worked out from the numbers in the test.
"""

import pytest

from magicpose_jax.eval import claims


def _runs(full_identity, other_identity, ssims=(0.83, 0.82, 0.81)):
  """Three runs: the full model at identity error `full_identity` and SSIM `ssims`; every ablation at
  `other_identity`, SSIM 0.5, pose mIoU 0.3 and face L1 0.2 (the full model: 0.6 and 0.14)."""
  full = [{"identity_error": i, "ssim": s, "mean_iou": 0.6, "face_l1": 0.14}
          for i, s in zip(full_identity, ssims, strict=True)]
  other = [{"identity_error": i, "ssim": 0.5, "mean_iou": 0.3, "face_l1": 0.2} for i in other_identity]
  return {"full": full, **{name: list(other) for name in ("no_appearance", "no_pose", "no_cfg", "no_augmentation")}}


def _judge(runs):
  return {j["claim"]: j for j in claims.judge(runs, claims.ABLATION_CLAIMS)}


def test_a_claim_holds_beyond_within_or_not_at_all():
  # identity: margins 0.25-0.07, 0.26-0.08, 0.20-0.075 -> smallest 0.125; ranges 0.01 and 0.06 -> spread 0.06
  judged = _judge(_runs([0.07, 0.08, 0.075], [0.25, 0.26, 0.20]))
  identity = judged["identity: full < no_appearance"]
  assert identity["margin"] == pytest.approx(0.125) and identity["spread"] == pytest.approx(0.06)
  assert identity["verdict"] == "holds beyond the spread"
  # margins 0.05, 0.12, 0.13 -> 0.05; the full model's range 0.13 -> within the spread
  identity = _judge(_runs([0.2, 0.08, 0.07], [0.25, 0.2, 0.2]))["identity: full < no_appearance"]
  assert identity["margin"] == pytest.approx(0.05) and identity["verdict"] == "holds, within the spread"
  # one run where the full model is worse: the claim does not hold, whatever the others say
  identity = _judge(_runs([0.07, 0.08, 0.3], [0.25, 0.26, 0.2]))["identity: full < no_appearance"]
  assert identity["margin"] == pytest.approx(-0.1) and identity["verdict"] == "does not hold"
  # higher-is-better metrics count the other way: SSIM 0.81..0.83 against 0.5 in every run
  assert judged["SSIM: full > no_cfg"]["margin"] == pytest.approx(0.31)
  assert judged["SSIM: full > no_cfg"]["spread"] == pytest.approx(0.02)
  assert judged["pose: full > no_pose (mIoU)"]["margin"] == pytest.approx(0.3)
  assert judged["face: full < no_pose (face L1)"]["margin"] == pytest.approx(0.06)


def test_one_run_has_no_spread():
  judged = claims.judge({"full": [{"identity_error": 0.1}], "no_appearance": [{"identity_error": 0.1001}]},
                        claims.DEMO_CLAIMS[:1])
  assert judged[0]["spread"] == 0 and judged[0]["verdict"] == "holds beyond the spread"
  assert judged[0]["margin"] == pytest.approx(1e-4)
  tie = claims.judge({"full": [{"identity_error": 0.1}], "no_appearance": [{"identity_error": 0.1}]},
                     claims.DEMO_CLAIMS[:1])
  assert tie[0]["verdict"] == "does not hold"  # a tie is not better


def test_the_demo_judges_its_two_ablations_and_the_benchmark_all_four():
  assert {c.ablation for c in claims.DEMO_CLAIMS} == {"no_appearance", "no_pose"}
  assert {c.ablation for c in claims.ABLATION_CLAIMS} == {"no_appearance", "no_pose", "no_cfg", "no_augmentation"}
  assert claims.ABLATION_CLAIMS[:3] == claims.DEMO_CLAIMS


def test_bad_runs_are_named():
  runs = _runs([0.07, 0.08, 0.075], [0.25, 0.26, 0.20])
  runs["no_pose"] = runs["no_pose"][:2]
  with pytest.raises(ValueError, match="3 runs of full but 2 of no_pose"):
    claims.judge(runs, claims.ABLATION_CLAIMS)
  del runs["no_cfg"]
  with pytest.raises(ValueError, match="'SSIM: full > no_cfg' needs runs of 'no_cfg'"):
    claims.judge(runs, claims.ABLATION_CLAIMS[5:6])
  with pytest.raises(ValueError, match="better must be 'lower' or 'higher'"):
    claims.judge(_runs([0.1] * 3, [0.2] * 3), [claims.Claim("x", "ssim", "no_cfg", "more")])
  with pytest.raises(ValueError, match="0 runs of full"):
    claims.judge({"full": [], "no_cfg": []}, claims.ABLATION_CLAIMS[5:6])


def test_verdict_lines_bold_what_does_not_hold():
  lines = claims.verdict_lines(claims.judge(_runs([0.07, 0.08, 0.3], [0.25, 0.26, 0.2]), claims.DEMO_CLAIMS))
  assert lines[0] == ("- **does not hold**: identity: full < no_appearance (smallest margin -0.100, spread "
                      "0.230)")
  assert lines[1].startswith("- holds beyond the spread: pose: full > no_pose (mIoU)")
