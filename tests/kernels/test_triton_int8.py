"""Triton int8 GEMM / implicit-GEMM conv, run on CPU tensors by the Triton interpreter, against
the integer references: int32 accumulators and requantized outputs bit-exact; float epilogues
to within float rounding of the same fp32 formula."""
import os

os.environ["TRITON_INTERPRET"] = "1"          # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from qpasses.kernels import library as ops  # noqa: E402
from qpasses.kernels import packing as P  # noqa: E402
from qpasses.kernels import reference as R  # noqa: E402

TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 1e-2)}


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    """Force the ops onto their Triton kernels (interpreted) and record that they were used."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    used = []
    real = ops._kmod

    def spy(name):
        used.append(name)
        return real(name)

    monkeypatch.setattr(ops, "_kmod", spy)
    with ops.triton_policy("always"):
        yield used
    assert used, "the Triton path was not taken"
    assert real("triton_int8").INTERPRET


def rand_i8(*shape, g=None):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


LIN_SHAPES = [(1, 1, 1), (1, 13, 37), (7, 13, 37), (33, 40, 70), (5, 3, 300), (17, 16, 32)]


@pytest.mark.parametrize("M,N,K", LIN_SHAPES)
def test_int8_linear_accumulator_exact(M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x, w = rand_i8(M, K, g=g), rand_i8(N, K, g=g)
    one = torch.ones(1)
    y = torch.ops.qpasses.int8_linear(x, one, P.pack_int8_weight(w), one, None, "none", torch.float32)
    acc = R.int8_linear_acc(x, w)
    assert torch.equal(y, acc.to(torch.float32))      # |acc| < 2**24: exact in fp32


def test_int8_linear_extremes():
    x = torch.full((3, 300), -128, dtype=torch.int8)
    w = torch.full((5, 300), -128, dtype=torch.int8)
    w[1] = 127
    one = torch.ones(1)
    y = torch.ops.qpasses.int8_linear(x, one, P.pack_int8_weight(w), one, None, "none", torch.float32)
    assert y[0, 0] == 300 * 16384 and y[0, 1] == -300 * 128 * 127


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("per_row,with_bias", [(True, True), (False, False)])
def test_int8_linear_float_epilogue(out_dtype, activation, per_row, with_bias):
    g = torch.Generator().manual_seed(3)
    M, N, K = 7, 13, 37
    x, w = rand_i8(M, K, g=g), rand_i8(N, K, g=g)
    xs = (torch.rand(M if per_row else 1, generator=g) + 0.5) * 1e-3
    ws = (torch.rand(N, generator=g) + 0.5) * 1e-2
    b = torch.randn(N, generator=g) if with_bias else None
    wp = P.pack_int8_weight(w)
    y = torch.ops.qpasses.int8_linear(x, xs, wp, ws, b, activation, out_dtype)
    yr = R.int8_linear(x, xs, w, ws, b, activation, out_dtype)
    assert y.dtype == out_dtype and y.shape == (M, N)
    rtol, atol = TOL[out_dtype]
    torch.testing.assert_close(y, yr, rtol=rtol, atol=atol)
    if activation != "none":
        assert (y >= 0).all()
    if activation == "relu6":
        assert (y <= 6).all()


def test_int8_linear_leading_dims_and_unpadded_weight():
    g = torch.Generator().manual_seed(4)
    x, w = rand_i8(2, 3, 37, g=g), rand_i8(5, 37, g=g)
    xs = torch.rand(2, 3, generator=g) + 0.1
    ws = torch.rand(5, generator=g)
    y = torch.ops.qpasses.int8_linear(x, xs, w, ws, None, "none", torch.float32)       # [N, K] unpadded
    yr = R.int8_linear(x.reshape(6, 37), xs.reshape(-1), w, ws, None, "none", torch.float32).reshape(2, 3, 5)
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-5)


def _multipliers(n, g, lo=1e-5, hi=2e-3):
    m = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return R.quantize_multipliers(m)


@pytest.mark.parametrize("M,N,K", [(1, 13, 37), (7, 13, 37), (33, 40, 70), (3, 5, 1)])
@pytest.mark.parametrize("x_zp", [0, -128, 37, 127])
def test_int8_linear_requant_exact(M, N, K, x_zp):
    g = torch.Generator().manual_seed(M + N + K + x_zp)
    x, w = rand_i8(M, K, g=g), rand_i8(N, K, g=g)
    b32 = torch.randint(-5000, 5000, (N,), dtype=torch.int32, generator=g)
    M0, sh = _multipliers(N, g)
    y = torch.ops.qpasses.int8_linear_requant(x, x_zp, P.pack_int8_weight(w), b32, M0, sh, -3, -128, 127)
    yr = R.int8_linear_requant(x, x_zp, w, b32, M0, sh, -3, -128, 127)
    assert y.dtype == torch.int8
    assert torch.equal(y, yr)
    assert y.unique().numel() > min(8, y.numel() // 2) or y.numel() < 16   # not all saturated


def test_int8_linear_requant_scalar_multiplier_relu_range_and_left_shift():
    g = torch.Generator().manual_seed(11)
    M, N, K = 7, 13, 37
    x, w = rand_i8(M, K, g=g), rand_i8(N, K, g=g)
    wp = P.pack_int8_weight(w)
    M0, sh = R.quantize_multipliers([4e-4])
    y = torch.ops.qpasses.int8_linear_requant(x, 5, wp, None, M0, sh, -20, -20, 127)   # ReLU folded: qmin = zp
    assert torch.equal(y, R.int8_linear_requant(x, 5, w, None, M0, sh, -20, -20, 127))
    assert (y >= -20).all()
    # multipliers > 1 (negative shift): saturating left shift before the high multiply
    x1, w1 = rand_i8(3, 4, g=g) // 16, rand_i8(6, 4, g=g) // 16
    M0, sh = R.quantize_multipliers([1.5, 3.0, 0.75, 2.0, 5.0, 1.0])
    assert (sh < 0).any()
    y = torch.ops.qpasses.int8_linear_requant(x1, 0, w1, None, M0, sh, 0, -128, 127)
    assert torch.equal(y, R.int8_linear_requant(x1, 0, w1, None, M0, sh, 0, -128, 127))


def test_requant_matches_float_rounding_within_one():
    """The integer-only path agrees with round(acc * M) + zp up to gemmlowp's double rounding."""
    g = torch.Generator().manual_seed(12)
    x, w = rand_i8(9, 50, g=g), rand_i8(11, 50, g=g)
    m = 3e-4
    M0, sh = R.quantize_multipliers([m])
    y = torch.ops.qpasses.int8_linear_requant(x, 9, w, None, M0, sh, 4, -128, 127).long()
    acc = R.int8_linear_acc(x, w, 9).double()
    real = torch.clamp(torch.round(acc * m) + 4, -128, 127)
    assert (y - real).abs().max() <= 1


# ------------------------------------------------------------------------------------------ conv
# (N, C, H, W, Cout, kh, kw, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 3, 7, 9, 5, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (2, 6, 9, 7, 5, 3, 3, (2, 1), (1, 2), (1, 2), 1),
    (1, 4, 5, 5, 6, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    (2, 8, 6, 6, 4, 3, 3, (1, 1), (1, 1), (1, 1), 2),
    (1, 5, 7, 6, 5, 3, 3, (1, 1), (1, 1), (1, 1), 5),          # depthwise
    (1, 3, 6, 5, 6, 3, 3, (2, 2), (1, 1), (1, 1), 3),          # depthwise, channel multiplier 2
    (1, 40, 4, 3, 3, 2, 2, (1, 1), (0, 1), (1, 1), 1),         # Cin > BLOCK_K, channel tail
    (1, 2, 3, 3, 3, 5, 5, (1, 1), (2, 2), (1, 1), 1),          # kernel larger than the image
]
CONV_IDS = ["basic", "stride-dil", "1x1", "grouped", "dw", "dw-mult2", "cin40", "big-kernel"]


def _conv_data(case, seed, channels_last):
    n, c, h, w_, cout, kh, kw, stride, pad, dil, groups = case
    g = torch.Generator().manual_seed(seed)
    x = rand_i8(n, c, h, w_, g=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = rand_i8(cout, c // groups, kh, kw, g=g)
    return g, x, w, dict(stride=list(stride), padding=list(pad), dilation=list(dil), groups=groups)


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_int8_conv2d_accumulator_exact(case):
    g, x, w, geo = _conv_data(case, 5, channels_last=False)
    one = torch.ones(1)
    y = torch.ops.qpasses.int8_conv2d(x, one, P.pack_int8_conv_weight(w), one, None, **geo)
    acc = R.int8_conv2d_acc(x, w, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    assert y.shape == acc.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, acc.to(torch.float32))


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[5]], ids=["stride-dil", "grouped", "dw"])
@pytest.mark.parametrize("out_dtype,activation", [(torch.bfloat16, "relu"), (torch.float16, "relu6"),
                                                  (torch.float32, "none")])
def test_int8_conv2d_float_epilogue(case, out_dtype, activation):
    g, x, w, geo = _conv_data(case, 6, channels_last=True)
    cout = w.shape[0]
    xs = torch.tensor([0.02])
    ws = (torch.rand(cout, generator=g) + 0.5) * 1e-3
    b = torch.randn(cout, generator=g)
    y = torch.ops.qpasses.int8_conv2d(x, xs, P.pack_int8_conv_weight(w), ws, b, activation=activation,
                                      out_dtype=out_dtype, **geo)
    yr = R.int8_conv2d(x, xs, w, ws, b, geo["stride"], geo["padding"], geo["dilation"], geo["groups"], activation,
                       out_dtype)
    rtol, atol = TOL[out_dtype]
    torch.testing.assert_close(y, yr, rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("x_zp", [0, 23])
def test_int8_conv2d_requant_exact(case, x_zp):
    g, x, w, geo = _conv_data(case, 7 + x_zp, channels_last=x_zp == 0)
    cout = w.shape[0]
    b32 = torch.randint(-3000, 3000, (cout,), dtype=torch.int32, generator=g)
    M0, sh = _multipliers(cout, g, 1e-4, 3e-3)
    y = torch.ops.qpasses.int8_conv2d_requant(x, x_zp, P.pack_int8_conv_weight(w), b32, M0, sh, 5, -128, 127, **geo)
    yr = R.int8_conv2d_requant(x, x_zp, w, b32, M0, sh, 5, -128, 127, geo["stride"], geo["padding"], geo["dilation"],
                               geo["groups"])
    assert y.dtype == torch.int8 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, yr)


def test_int8_conv2d_zero_point_padding_differs_from_zero_padding():
    """With x_zp != 0 the border is x_zp (real 0), not integer 0: check against explicit padding."""
    g = torch.Generator().manual_seed(8)
    x, w = rand_i8(1, 3, 4, 4, g=g), rand_i8(2, 3, 3, 3, g=g)
    M0, sh = R.quantize_multipliers([1e-3, 2e-3])
    zp = -50
    y = torch.ops.qpasses.int8_conv2d_requant(x, zp, w, None, M0, sh, 0, -128, 127, padding=[1, 1])
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), value=zp)
    y_explicit = torch.ops.qpasses.int8_conv2d_requant(xp, zp, w, None, M0, sh, 0, -128, 127)
    assert torch.equal(y, y_explicit)


# ----------------------------------------------------------------- affine activations (x_zp) in the float path
@pytest.mark.parametrize("M,N,K", [(1, 5, 33), (3, 40, 100)])
@pytest.mark.parametrize("x_zp", [-128, -3, 90])
def test_int8_linear_float_epilogue_zero_point_exact(M, N, K, x_zp):
    g = torch.Generator().manual_seed(M + K - x_zp)
    x, w = rand_i8(M, K, g=g), rand_i8(N, K, g=g)
    one = torch.ones(1)
    y = torch.ops.qpasses.int8_linear(x, one, P.pack_int8_weight(w), one, None, "none", torch.float32, x_zp)
    acc = (x.long() - x_zp) @ w.long().t()                  # independent of reference.py
    assert torch.equal(y, acc.to(torch.float32))
    xs, ws, b = torch.tensor([0.01]), torch.rand(N, generator=g) * 1e-2, torch.randn(N, generator=g)
    y = torch.ops.qpasses.int8_linear(x, xs, P.pack_int8_weight(w), ws, b, "relu", torch.bfloat16, x_zp)
    yr = R.int8_linear(x, xs, w, ws, b, "relu", torch.bfloat16, x_zp)
    torch.testing.assert_close(y, yr, rtol=TOL[torch.bfloat16][0], atol=TOL[torch.bfloat16][1])


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[1], CONV_CASES[3], CONV_CASES[5]],
                         ids=["basic", "stride-dil", "grouped", "dw-mult2"])
def test_int8_conv2d_float_epilogue_zero_point_pads_with_zp(case):
    """Affine activations: the border is x_zp (real 0); acc = sum (x - zp) * w, exact."""
    g, x, w, geo = _conv_data(case, 9, channels_last=False)
    zp = -77
    one = torch.ones(1)
    y = torch.ops.qpasses.int8_conv2d(x, one, P.pack_int8_conv_weight(w), one, None, x_zp=zp, **geo)
    want = torch.nn.functional.conv2d(x.long() - zp, w.long(), None, geo["stride"], geo["padding"], geo["dilation"],
                                      geo["groups"])
    assert torch.equal(y, want.to(torch.float32))


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[1], CONV_CASES[3], CONV_CASES[6]],
                         ids=["basic", "stride-dil", "grouped", "cin40"])
@pytest.mark.parametrize("flat_k", [True, False])
@pytest.mark.parametrize("x_zp", [0, -21])
def test_int8_conv2d_flat_and_per_tap_reductions_agree_exactly(case, flat_k, x_zp):
    """Both reduction orders (flat (kh, kw, cin) blocks for few channels; per-tap channel blocks)
    give the exact integer result, with zero-point padding, whichever the heuristic would pick."""
    g, x, w, geo = _conv_data(case, 13, channels_last=True)
    cout = w.shape[0]
    b32 = torch.randint(-3000, 3000, (cout,), dtype=torch.int32, generator=g)
    M0, sh = _multipliers(cout, g, 1e-4, 3e-3)
    k8 = ops._kmod("triton_int8")
    y = k8.conv2d(x, None, P.pack_int8_conv_weight(w), None, b32, geo["stride"], geo["padding"], geo["dilation"],
                  geo["groups"], "none", torch.int8, requant=(x_zp, M0, sh, 5, -128, 127), x_zp=x_zp, flat_k=flat_k)
    yr = R.int8_conv2d_requant(x, x_zp, w, b32, M0, sh, 5, -128, 127, geo["stride"], geo["padding"], geo["dilation"],
                               geo["groups"])
    assert torch.equal(y, yr)
    one = torch.ones(1)
    acc = k8.conv2d(x, one, P.pack_int8_conv_weight(w), one, None, geo["stride"], geo["padding"], geo["dilation"],
                    geo["groups"], "none", torch.float32, x_zp=x_zp, flat_k=flat_k)
    want = torch.nn.functional.conv2d(x.long() - x_zp, w.long(), None, geo["stride"], geo["padding"],
                                      geo["dilation"], geo["groups"])
    assert torch.equal(acc, want.to(torch.float32))


# ------------------------------------------------------------------ dynamic int8 linear (per-row zero points)
def _dynamic_reference(x, w, w_scale, bias, a_bits, symmetric, per_token):
    """Written out here: each row (or the whole tensor) quantized from its own min/max, integer sums in int64."""
    xf = x.reshape(-1, x.shape[-1]).double()
    lo = xf.amin(-1, keepdim=True) if per_token else xf.amin().expand(xf.shape[0], 1)
    hi = xf.amax(-1, keepdim=True) if per_token else xf.amax().expand(xf.shape[0], 1)
    lo, hi = lo.clamp(max=0).float(), hi.clamp(min=0).float()
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        qmax = 2 ** (a_bits - 1) - 1
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=eps)
        codes = torch.clamp(torch.round(x.reshape(xf.shape).float() / scale), -qmax, qmax)
        zp = torch.zeros_like(scale)
    else:
        qmax = 2 ** a_bits - 1
        scale = ((hi - lo) / qmax).clamp(min=eps)
        zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
        codes = torch.clamp(torch.round(x.reshape(xf.shape).float() / scale) + zp, 0, qmax)
    acc = (codes.to(torch.int64) - zp.to(torch.int64)) @ w.to(torch.int64).t()     # exact
    y = acc.float() * scale * w_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("M,N,K", [(1, 13, 37), (7, 13, 37), (33, 40, 70), (5, 3, 300)])
@pytest.mark.parametrize("per_token,symmetric,a_bits", [(True, False, 8), (False, False, 8), (True, True, 8),
                                                        (True, False, 4), (False, True, 6)])
def test_dynamic_int8_linear_exact_per_row_zero_points(M, N, K, per_token, symmetric, a_bits):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K + a_bits)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4 + torch.randn(M, 1, generator=g)
    w = rand_i8(N, K, g=g)
    w[w == -128] = -127                                  # symmetric narrow-range weight codes
    w_scale, bias = torch.rand(N, generator=g) * 1e-2, torch.randn(N, generator=g)
    wp = P.pack_int8_weight(w)
    y = torch.ops.qpasses.dynamic_int8_linear(x, wp, w_scale, bias, a_bits, symmetric, per_token)
    with ops.triton_policy("never"):
        y_ref = torch.ops.qpasses.dynamic_int8_linear(x, wp, w_scale, bias, a_bits, symmetric, per_token)
    assert torch.equal(y, y_ref)                         # same integers, same fp32 epilogue: bit-exact
    torch.testing.assert_close(y, _dynamic_reference(x, w, w_scale, bias, a_bits, symmetric, per_token),
                               rtol=1e-5, atol=1e-5)
    # the kernel's integer sums alone (unit scales, no bias; |acc| < 2**24 is exact in fp32) against int64
    x8, xs, xzp = R.dynamic_quantize_int8(x, a_bits, symmetric, per_token)
    acc = ops._kmod("triton_int8").linear(x8, torch.ones(M), wp, torch.ones(1), None, "none", torch.float32,
                                          x_zp_rows=xzp)
    want = (x8.to(torch.int64) - xzp.to(torch.int64)[:, None]) @ w.to(torch.int64).t()
    assert torch.equal(acc, want.to(torch.float32))


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (6, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_kernel_matches_the_reference_bit_for_bit(bits, symmetric, dtype):
    """The fused per-row quantization kernel: range, scale, zero point and codes equal the torch
    reference's, including exact .5 ties (rounded half to even), all-zero rows and one-element rows."""
    g = torch.Generator().manual_seed(bits * 10 + symmetric)
    x = torch.randn(37, 300, generator=g) * torch.rand(37, 1, generator=g) * 5 + torch.randn(37, 1, generator=g)
    x[0] = 0.0
    qmax = 2 ** bits - 1 if not symmetric else 2 ** (bits - 1) - 1
    x[1, :4] = torch.tensor([0.0, float(qmax), 2.5, 3.5])       # scale 1 (affine) / codes on .5 ties
    x[1, 4:] = 1.0
    x[2, :4] = torch.tensor([-float(qmax), float(qmax), -1.5, 0.5])
    x[2, 4:] = 0.0
    x = x.to(dtype)
    got = ops._kmod("triton_int8").quantize_rows(x, bits, symmetric)
    want = R.dynamic_quantize_int8(x, bits, symmetric, True)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    one = ops._kmod("triton_int8").quantize_rows(x[:, :1], bits, symmetric)
    for a, b in zip(one, R.dynamic_quantize_int8(x[:, :1], bits, symmetric, True)):
        assert torch.equal(a, b)
