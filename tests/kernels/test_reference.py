"""The integer references themselves: gemmlowp fixed point against a scalar transcription of
the C code, exact accumulators against float64, the XNOR identity (pure torch, no Triton)."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from qpasses.kernels import packing as P
from qpasses.kernels import reference as R

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


# scalar transcription of gemmlowp/fixedpoint/fixedpoint.h (C integer semantics with Python ints)
def srdhm_scalar(a, b):
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else (1 - (1 << 30))
    v = ab + nudge
    return int(v / (1 << 31)) if abs(v) < 2 ** 52 else (abs(v) >> 31) * (1 if v >= 0 else -1)


def rdbpot_scalar(x, e):
    mask = (1 << e) - 1
    rem = x & mask
    thr = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if rem > thr else 0)


def mbqm_scalar(acc, m0, shift):
    left, right = max(-shift, 0), max(shift, 0)
    x = min(max(acc << left, INT32_MIN), INT32_MAX)
    return rdbpot_scalar(srdhm_scalar(x, m0), right)


int32s = st.integers(INT32_MIN, INT32_MAX)


@settings(max_examples=300, deadline=None)
@given(a=int32s, b=int32s)
def test_srdhm_matches_scalar(a, b):
    got = int(R.saturating_rounding_doubling_high_mul(torch.tensor([a]), torch.tensor([b]))[0])
    assert got == srdhm_scalar(a, b)


@settings(max_examples=300, deadline=None)
@given(x=int32s, e=st.integers(0, 31))
def test_rounding_divide_by_pot_matches_scalar(x, e):
    assert int(R.rounding_divide_by_pot(torch.tensor([x]), torch.tensor([e]))[0]) == rdbpot_scalar(x, e)


def test_fixed_point_edge_cases():
    assert int(R.saturating_rounding_doubling_high_mul(torch.tensor([INT32_MIN]), torch.tensor([INT32_MIN]))) == INT32_MAX
    # round half away from zero
    assert R.rounding_divide_by_pot(torch.tensor([5, -5, 6, -6, 7, -7]), torch.tensor(1)).tolist() == [3, -3, 3, -3, 4, -4]


@settings(max_examples=200, deadline=None)
@given(acc=st.integers(-(2 ** 24), 2 ** 24), m=st.floats(1e-6, 4.0), zp=st.integers(-128, 127))
def test_requantize_is_rounded_real_multiplication(acc, m, zp):
    m0, shift = R.quantize_multiplier(m)
    assert 2 ** 30 <= m0 < 2 ** 31
    got = int(R.requantize(torch.tensor([acc]), torch.tensor([m0]), torch.tensor([shift]), zp, -128, 127)[0])
    assert got == max(-128, min(127, mbqm_scalar(acc, m0, shift) + zp))
    exact = acc * m0 * 2.0 ** (-31 - shift)
    # two roundings (gemmlowp's documented behaviour): within one unit of the real product
    assert abs(mbqm_scalar(acc, m0, shift) - exact) <= 1.0


def test_quantize_multiplier_close():
    for m in [1e-5, 0.1234, 0.5, 0.999999, 1.0, 3.7]:
        m0, sh = R.quantize_multiplier(m)
        assert math.isclose(m0 * 2.0 ** (-31 - sh), m, rel_tol=2 ** -30)


def test_cross_check_with_numerics_fixed_point_if_present():
    try:
        fp = importlib.import_module("qpasses.numerics.fixed_point")
    except Exception:
        pytest.skip("qpasses.numerics.fixed_point not available")
    torch.manual_seed(0)
    acc = torch.randint(-(2 ** 20), 2 ** 20, (64,), dtype=torch.int32)
    for m in [0.0003, 0.02, 0.7]:
        m0, shift = fp.quantize_multiplier(m)
        r0, rs = R.quantize_multiplier(m)
        assert (int(m0), int(shift)) == (r0, rs)
        theirs = fp.requantize(acc, m0, shift, 3, -128, 127)
        ours = R.requantize(acc, torch.tensor([r0]), torch.tensor([rs]), 3, -128, 127)
        assert torch.equal(torch.as_tensor(theirs).to(torch.int64), ours.to(torch.int64))


def test_int_matmul_and_conv_exact():
    torch.manual_seed(0)
    a = torch.randint(-128, 128, (5, 37), dtype=torch.int8)
    b = torch.randint(-128, 128, (6, 37), dtype=torch.int8)
    assert torch.equal(R.int_matmul(a, b), (a.double() @ b.double().t()).long())
    x = torch.randint(-128, 128, (2, 4, 7, 6), dtype=torch.int8)
    w = torch.randint(-128, 128, (6, 2, 3, 2), dtype=torch.int8)
    ref = F.conv2d(x.double(), w.double(), None, (2, 1), (1, 1), (1, 2), 2).round().long()
    assert torch.equal(R.int_conv2d(x, w, (2, 1), (1, 1), (1, 2), 2), ref)


def test_conv_zero_point_padding_semantics():
    """Padding with x_zp == subtracting zp everywhere and padding with 0."""
    torch.manual_seed(1)
    x = torch.randint(-128, 128, (1, 2, 4, 4), dtype=torch.int8)
    w = torch.randint(-128, 128, (3, 2, 3, 3), dtype=torch.int8)
    zp = 17
    xp = F.pad(x.long(), (1, 1, 1, 1), value=zp)
    manual = F.conv2d(xp - zp, w.long())
    assert torch.equal(R.int8_conv2d_acc(x, w, (1, 1), (1, 1), (1, 1), 1, zp), manual)


@settings(max_examples=50, deadline=None)
@given(m=st.integers(1, 4), n=st.integers(1, 4), k=st.integers(1, 100), seed=st.integers(0, 2 ** 16))
def test_xnor_identity(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randint(0, 2, (m, k), generator=g) * 2 - 1
    ws = torch.randint(0, 2, (n, k), generator=g) * 2 - 1
    want = xs.long() @ ws.long().t()
    xp, wp = P.pack_bits(xs), P.pack_bits(ws)
    assert torch.equal(R.binary_linear_acc_xnor(xp, wp, k), want)
    assert torch.equal(R.binary_linear_acc(xp, wp, k, True), want)
    # garbage in the padding bits of x must not matter for the XNOR form
    if k % 32:
        xg = xp.clone()
        xg[:, -1] |= torch.tensor(-(1 << 31), dtype=torch.int32)
        assert torch.equal(R.binary_linear_acc_xnor(xg, wp, k), want)


def test_popcount32():
    v = torch.tensor([0, 1, -1, INT32_MIN, 0x0F0F0F0F, -2], dtype=torch.int32)
    assert R.popcount32(v).tolist() == [0, 1, 32, 1, 16, 31]
