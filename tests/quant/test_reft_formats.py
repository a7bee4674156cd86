"""reft's int8 per-channel and int4 group-wise weights: round-trip error bounds, code ranges, layout.

Oracles: torch's per-channel int8 quantizer (same scales -> same codes), and the bounds that
round-to-nearest implies (half a step per value, plus the float16 rounding of int4's scale/min).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft.errors import ReftError
from reft.quant.reft_formats import quantize_int4, quantize_int8

EXAMPLES = settings(max_examples=60, deadline=None)


@st.composite
def matrices(draw, cols_multiple=128):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out, n = draw(st.integers(1, 6)), cols_multiple * draw(st.integers(1, 3 * 128 // cols_multiple))
    w = rng.standard_normal((out, n)).astype(np.float32) * np.float32(10.0 ** draw(st.integers(-4, 2)))
    w += np.float32(draw(st.floats(-2, 2)))  # groups that do not straddle zero
    if draw(st.booleans()):
        w[0] = 0  # an all-zero row
    if draw(st.booleans()):
        w[-1, :128] = w[-1, 0]  # constant groups
    return w


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@EXAMPLES
@given(w=matrices(cols_multiple=16))
def test_int8_round_trip_and_torch_codes(w):
    q = quantize_int8(w)
    assert q.q.dtype == np.int8 and q.q.shape == w.shape and q.scale.shape == (w.shape[0],)
    assert np.abs(q.q.astype(int)).max() <= 127
    err = np.abs(q.dequantize() - w)
    assert (err <= q.scale[:, None] * 0.5 * (1 + 1e-5) + 1e-30).all()
    ref = torch.quantize_per_channel(torch.from_numpy(w), torch.from_numpy(q.scale.astype(np.float64)).clamp_min(1e-30),
                                     torch.zeros(w.shape[0], dtype=torch.int64), 0, torch.qint8)
    nonzero = q.scale > 0
    assert np.array_equal(ref.int_repr().numpy()[nonzero], q.q[nonzero])
    assert not q.q[~nonzero].any()


@pytest.mark.parametrize("g", [32, 64, 128])
@EXAMPLES
@given(w=matrices(cols_multiple=32))
def test_int4_round_trip_within_half_a_step(w, g):
    """Rows of any multiple of 32 values: whole groups of g, then a shorter last group if g does not
    divide the row."""
    q = quantize_int4(w, g)
    out, n = w.shape
    ng = -(-n // g)
    assert q.q.shape == (out, n // 2) and q.scale.shape == q.min.shape == (out, ng) and q.shape == w.shape
    codes = q.codes()
    assert codes.max() <= 15
    step, mn = q.scale.astype(np.float32), q.min.astype(np.float32)
    deq = q.dequantize()
    for i in range(ng):
        cols = slice(i * g, min((i + 1) * g, n))
        grp = w[:, cols]
        lo, hi = grp.min(axis=1), grp.max(axis=1)
        slack = np.abs(lo - mn[:, i]) + 15 * np.abs((hi - lo) / 15 - step[:, i]) + 1e-6 * np.abs(grp).max(1)
        assert (np.abs(deq[:, cols] - grp).max(axis=1) <= 0.5 * step[:, i] + slack).all()
        # the codes are the nearest ones for the stored scale and min
        assert np.array_equal(codes[:, cols] * step[:, i:i + 1] + mn[:, i:i + 1], deq[:, cols])


def test_int4_layout_is_ggml_q4_order():
    w = np.tile(np.arange(32, dtype=np.float32) % 16, (1, 2))  # codes 0..15, 0..15 in each 32
    q = quantize_int4(w, 64)
    assert np.array_equal(q.codes()[0], (np.arange(64) % 16).astype(np.uint8))
    row = q.q[0, :16]
    assert np.array_equal(row & 0x0F, np.arange(16)) and np.array_equal(row >> 4, np.arange(16))


def test_int4_beats_a_4x_coarser_grid():
    """Group-wise scales track local ranges: smaller groups, smaller error (on weights with outliers)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    w[:, ::97] *= 20
    errs = [np.sqrt(np.mean((quantize_int4(w, g).dequantize() - w) ** 2)) for g in (32, 64, 128)]
    assert errs[0] < errs[1] < errs[2]
    assert quantize_int4(w, 32).nbytes == 64 * 512 // 2 + 2 * 2 * 64 * 512 // 32


@pytest.mark.parametrize("call, message", [
    (lambda: quantize_int4(np.zeros((2, 64), np.float32), 48), "group size must be one of 32, 64, 128"),
    (lambda: quantize_int4(np.zeros((2, 80), np.float32), 64), "multiple of 32"),
    (lambda: quantize_int8(np.zeros(8, np.float32)), "matrix"),
    (lambda: quantize_int8(np.full((2, 8), np.inf, np.float32)), "inf or NaN"),
])
def test_bad_requests(call, message):
    with pytest.raises(ReftError, match=message):
        call()
