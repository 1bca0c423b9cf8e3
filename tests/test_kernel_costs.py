"""`train.flops.mosaic_kernel_costs`: splash kernels' FLOPs and bytes read from compiled HLO text, times the
trip counts of the loops around them (a hand-written module; the numbers are worked out by hand below)."""

import pytest

from magicpose_jax.train import flops

FWD = ('  %splash_mha_fwd_residuals.7 = (bf16[2,256,40]{2,1,0}, f32[2,256,128]{2,1,0}) '
       'custom-call(%a, %b, %q, %k, %v), '
       'custom_call_target="tpu_custom_call", operand_layout_constraints={s8[1,1,1]{2,1,0}, s8[1,1,1]{2,1,0}, '
       'bf16[2,256,40]{2,1,0}, bf16[2,512,40]{2,1,0}, bf16[2,512,40]{2,1,0}}, frontend_attributes={kernel_metadata={}}')
TRIPS = 'backend_config={"known_trip_count":{"n":"50"}}'
HLO = f"""HloModule jit_sample

%body.1 (p: (s32[], bf16[2,256,40])) -> (s32[], bf16[2,256,40]) {{
{FWD}
  ROOT %t = (s32[], bf16[2,256,40]) tuple(%i, %o)
}}

%cond.1 (p: (s32[], bf16[2,256,40])) -> pred[] {{
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}}

ENTRY %main.2 (x: bf16[2,256,40]) -> bf16[2,256,40] {{
{FWD.replace("fwd_residuals.7", "fwd_residuals.8")}
  %w = (s32[], bf16[2,256,40]) while(%init), condition=%cond.1, body=%body.1, {TRIPS}
  ROOT %r = bf16[2,256,40] get-tuple-element(%w), index=1
}}
"""


def test_splash_kernel_flops_bytes_and_trip_counts():
  costs = sorted(flops.mosaic_kernel_costs(HLO), key=lambda c: c.calls)
  assert [c.calls for c in costs] == [1, 50]
  one = 2 * 2.0 * (2 * 256 * 40) * 512  # QK^T and PV: 2 matmuls x 2 FLOPs x heads x Nq x D x Nk
  nbytes = 2 * (2 * 256 * 40) + 4 * (2 * 256 * 128) + 2 * (2 * 256 * 40) + 2 * 2 * (2 * 512 * 40) + 2 * 1
  for cost in costs:
    assert cost.name == "splash_mha_fwd_residuals"
    assert cost.flops == pytest.approx(one * cost.calls)
    assert cost.mxu_flops == pytest.approx(one * cost.calls * 128 / 40)  # D 40 takes a full 128-row pass
    assert cost.bytes == pytest.approx(nbytes * cost.calls)


def test_roofline_takes_the_slower_of_compute_and_memory():
  peak = flops.device_peak("TPU v5")
  cost = flops.KernelCost("k", flops=0.0, bytes=2765e9, calls=1, mxu_flops=459e12 / 2)
  assert cost.roofline_seconds(peak) == pytest.approx(1.0)  # bytes: 1 s at 2765 GB/s; MXU: 0.5 s
  assert flops.device_peak("TPU v5 lite").hbm_gb == 16.0


def test_while_loops_with_their_trip_counts():
  assert flops.while_loops(HLO) == [("body.1", 50)]
  unknown = HLO.replace(f", {TRIPS}", "")
  assert flops.while_loops(unknown) == [("body.1", None)]
  assert flops.while_loops(HLO.replace(" while(", " call(")) == []


# A convolution [2, 8, 8, 16] x [3, 3, 16, 32] -> [2, 8, 8, 32] (padding 1) in the body of a loop whose count only
# its condition says (`i < 3`, as libtpu prints a lax.scan), and one outside it.
CONV = ("  %c{n} = bf16[2,8,8,32]{{3,2,1,0}} convolution(%x{n}, %w{n}), window={{size=3x3 pad=1_1x1_1}}, "
        "dim_labels=b01f_01io->b01f")
LOOP_HLO = f"""HloModule jit_step

%body.2 (p: (s32[], bf16[2,8,8,16])) -> (s32[], bf16[2,8,8,16]) {{
  %x1 = bf16[2,8,8,16]{{3,2,1,0}} get-tuple-element(%p), index=1
  %w1 = bf16[3,3,16,32]{{3,2,1,0}} constant({{...}})
{CONV.format(n=1)}
  ROOT %t = (s32[], bf16[2,8,8,16]) tuple(%i, %x1)
}}

%cond.2 (p: (s32[], bf16[2,8,8,16])) -> pred[] {{
  %n = s32[]{{:T(128)}} constant(3)
  %i = s32[]{{:T(128)}} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{{:T(512)}} compare(%i, %n), direction=LT
}}

ENTRY %main.3 (x2: bf16[2,8,8,16]) -> bf16[2,8,8,32] {{
  %x2 = bf16[2,8,8,16]{{3,2,1,0}} parameter(0)
  %w2 = bf16[3,3,16,32]{{3,2,1,0}} parameter(1)
{CONV.format(n=2)}
  %w = (s32[], bf16[2,8,8,16]) while(%init), condition=%cond.2, body=%body.2
  ROOT %r = bf16[2,8,8,32] copy(%c2)
}}
"""


def test_convolution_flops_with_trip_counts_read_from_the_loop_condition():
  # Along each spatial dim, 8 outputs x 3 taps, less the 2 taps that fall in the padding at the edges: 22; then
  # x 2 batch x 32 output features x 16 input features, 2 FLOPs per multiply-add (XLA's own way of counting).
  one = 2.0 * (2 * 32) * 16 * 22 * 22
  assert flops.while_loops(LOOP_HLO) == [("body.2", 3)]
  counted = flops.convolution_flops(LOOP_HLO)
  assert counted.once == pytest.approx(2 * one)
  assert counted.executed == pytest.approx(one + 3 * one)


def test_a_loop_whose_condition_is_not_a_counter_has_no_trip_count():
  assert flops.while_loops(LOOP_HLO.replace("direction=LT", "direction=NE")) == [("body.2", None)]
  counted = flops.convolution_flops(LOOP_HLO.replace("direction=LT", "direction=NE"))
  assert counted.executed == counted.once


def test_transposed_convolution_counts_no_dilation_holes():
  """A stride-2 convolution's input gradient runs over the output gradient dilated by 2 (lhs_dilate): 3 of every
  4 input positions are holes, which are not work."""
  hlo = LOOP_HLO.replace("window={size=3x3 pad=1_1x1_1}", "window={size=3x3 pad=1_2x1_2 lhs_dilate=2x2}")
  hlo = hlo.replace("bf16[2,8,8,32]{3,2,1,0} convolution", "bf16[2,16,16,32]{3,2,1,0} convolution")
  # Along each dim the 8 real inputs sit at dilated positions 0, 2, .., 14 and output o's taps read o - 1, o, o + 1
  # (padding 1 below): each real input is read by 3 outputs, except position 0, whose third reader would be
  # output -1: 7 x 3 + 2 = 23 multiply-adds per output feature and batch row, of the 48 pairs.
  one = 2.0 * (2 * 32) * 16 * 23 * 23
  assert flops.convolution_flops(hlo).once == pytest.approx(2 * one)


def test_unsigned_loop_counters_are_read_too():
  """The compiler's own windowed all-gather matmul loops count with an unsigned counter (`u32[] constant(8)`)."""
  hlo = LOOP_HLO.replace("%n = s32[]{:T(128)} constant(3)", "%n = u32[]{:T(128)} constant(3)")
  assert flops.while_loops(hlo) == [("body.2", 3)]


# The shape of libtpu's bidirectional windowed all-gather matmul loops (v6e:4x4 stage 1): an unsigned counter that
# starts from a copied constant, steps by 2 (one shard from each neighbour per trip) and stops at `< 8`.
STEPPED_HLO = f"""HloModule jit_step

%body.4 (p: (u32[], bf16[2,8,8,16])) -> (u32[], bf16[2,8,8,16]) {{
  %two = u32[]{{:T(128)}} constant(2)
  %i = u32[]{{:T(128)}} get-tuple-element(%p), index=0
  %x1 = bf16[2,8,8,16]{{3,2,1,0}} get-tuple-element(%p), index=1
  %w1 = bf16[3,3,16,32]{{3,2,1,0}} constant({{...}})
{CONV.format(n=1)}
  %next = u32[]{{:T(128)S(6)}} add(%i, %two), metadata={{op_name="conv"}}
  ROOT %t = (u32[], bf16[2,8,8,16]) tuple(%next, /*index=1*/%x1)
}}

%cond.4 (p: (u32[], bf16[2,8,8,16])) -> pred[] {{
  %n = u32[]{{:T(128)}} constant(8)
  %i = u32[]{{:T(128)}} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{{:T(512)}} compare(%i, %n), direction=LT
}}

ENTRY %main.5 (x2: bf16[2,8,8,16]) -> bf16[2,8,8,16] {{
  %x2 = bf16[2,8,8,16]{{3,2,1,0}} parameter(0)
  %zero = u32[]{{:T(128)}} constant(0)
  %start = u32[]{{:T(128)}} copy(%zero)
  %init = (u32[], bf16[2,8,8,16]) tuple(%start, %x2)
  %w = (u32[], bf16[2,8,8,16]) while(%init), condition=%cond.4, body=%body.4
  ROOT %r = bf16[2,8,8,16] get-tuple-element(%w), index=1
}}
"""


def test_loop_counters_with_a_start_and_a_step():
  """`counter < 8` from 0 by 2 is 4 trips (counted as 8 before: 2x the FLOPs of every windowed matmul); from 2 by 2,
  3; from 0 by 1 (no add of a constant), 8."""
  one = 2.0 * (2 * 32) * 16 * 22 * 22
  assert flops.while_loops(STEPPED_HLO) == [("body.4", 4)]
  assert flops.convolution_flops(STEPPED_HLO).executed == pytest.approx(4 * one)
  assert flops.while_loops(STEPPED_HLO.replace("constant(0)", "constant(2)")) == [("body.4", 3)]
  assert flops.while_loops(STEPPED_HLO.replace("add(%i, %two)", "negate(%i)")) == [("body.4", 8)]
  assert flops.while_loops(STEPPED_HLO.replace("%w1 = bf16[3,3,16,32]{3,2,1,0} constant({...})",
                                               "%w1 = bf16[3,3,16,32]{3,2,1,0} constant({...})\n  %three = u32[] "
                                               "constant(3)").replace("add(%i, %two)", "add(%three, %i)")) \
      == [("body.4", 3)]
