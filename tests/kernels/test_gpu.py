"""The Triton kernels compiled for a real GPU (skipped where there is none: CI never has one).

Same contract as the interpreter tests, on shapes large enough to reach every autotune bucket
and the real tensor-core / popcount code paths: integer accumulators and requantized outputs
bit-exact against the integer references (computed on the GPU in float64, exact below 2**53),
float epilogues within float rounding, and a lowered network that agrees with its CPU lowering.

Run on a GPU machine with ``python -m pytest tests/kernels/test_gpu.py``.
"""
import os

import pytest
import torch

from qpasses.kernels import library as ops
from qpasses.kernels import packing as P
from qpasses.kernels import reference as R

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")

CUDA = "cuda"


@pytest.fixture(autouse=True)
def compiled_triton(monkeypatch):
    """Compiled (not interpreted) kernels, and a record that every op took its Triton path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    used = []
    real = ops._kmod

    def spy(name):
        mod = real(name)
        used.append(mod)
        return mod

    monkeypatch.setattr(ops, "_kmod", spy)
    with ops.triton_policy("always"):
        yield
    assert used, "the Triton path was not taken"
    assert not any(m.INTERPRET for m in used), "kernels ran interpreted"


def rand_i8(*shape, g):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g).to(CUDA)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# M spans the m-buckets of the autotuner (1, small, medium, large); N, K odd and aligned
GEMM_SHAPES = [(1, 4096, 4096), (5, 768, 3072), (17, 1000, 1001), (64, 3072, 768), (333, 1024, 1024),
               (1024, 4096, 4096), (2048, 11008, 4096)]


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_gpu_int8_linear_accumulator_exact(M, N, K):
    g = gen(M + N + K)
    x, w = rand_i8(M, K, g=g), rand_i8(N, K, g=g)
    one = torch.ones(1, device=CUDA)
    y = torch.ops.qpasses.int8_linear(x, one, P.pack_int8_weight(w), one, None, "none", torch.float32)
    acc = R.int8_linear_acc(x, w)
    # one rounding of the exact int32 accumulator to fp32 (exact while |acc| < 2**24)
    assert torch.equal(y, acc.to(torch.float32))


@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (64, 3072, 768), (1024, 4096, 4096)])
@pytest.mark.parametrize("x_zp", [0, -7])
def test_gpu_int8_linear_requant_exact(M, N, K, x_zp):
    g = gen(M * 3 + K + x_zp)
    x, w = rand_i8(M, K, g=g), rand_i8(N, K, g=g)
    b32 = torch.randint(-50000, 50000, (N,), dtype=torch.int32, generator=g).to(CUDA)
    # |acc| has a spread of about 74**2 * sqrt(K): scale it to tens of output steps
    m = (0.5 + torch.rand(N, generator=g, dtype=torch.float64)) * 30 / (74 ** 2 * K ** 0.5)
    M0, sh = (t.to(CUDA) for t in R.quantize_multipliers(m))
    y = torch.ops.qpasses.int8_linear_requant(x, x_zp, P.pack_int8_weight(w), b32, M0, sh, 3, -128, 127)
    yr = R.int8_linear_requant(x, x_zp, w, b32, M0, sh, 3, -128, 127)
    assert y.dtype == torch.int8 and torch.equal(y, yr)
    assert y.unique().numel() > 64                                   # a spread, not all saturated


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["none", "relu6"])
def test_gpu_int8_linear_float_epilogue(out_dtype, activation):
    g = gen(7)
    M, N, K = 300, 1000, 1024
    x, w = rand_i8(M, K, g=g), rand_i8(N, K, g=g)
    xs = ((torch.rand(M, generator=g) + 0.5) * 1e-3).to(CUDA)
    ws = ((torch.rand(N, generator=g) + 0.5) * 1e-3).to(CUDA)
    b = torch.randn(N, generator=g).to(CUDA)
    y = torch.ops.qpasses.int8_linear(x, xs, P.pack_int8_weight(w), ws, b, activation, out_dtype, -3)
    yr = R.int8_linear(x, xs, w, ws, b, activation, out_dtype, -3)
    tol = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 1e-2)}[out_dtype]
    torch.testing.assert_close(y, yr, rtol=tol[0], atol=tol[1])


# (N, C, H, W, Cout, k, stride, padding, dilation, groups)
CONV_CASES = [
    (8, 64, 56, 56, 64, 3, 1, 1, 1, 1),
    (4, 128, 28, 28, 256, 1, 1, 0, 1, 1),
    (2, 3, 224, 224, 64, 7, 2, 3, 1, 1),
    (3, 96, 17, 19, 96, 3, 2, 1, 1, 96),           # depthwise, odd spatial size
    (2, 64, 15, 15, 128, 3, 1, 2, 2, 4),           # grouped, dilated
    (1, 512, 7, 7, 2048, 1, 1, 0, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"c{i}" for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("x_zp", [0, 19])
def test_gpu_int8_conv2d_requant_and_accumulator_exact(case, x_zp):
    n, c, h, w_, cout, k, s, p, d, gr = case
    g = gen(sum(case) + x_zp)
    x = rand_i8(n, c, h, w_, g=g).contiguous(memory_format=torch.channels_last)
    w = rand_i8(cout, c // gr, k, k, g=g)
    wp = P.pack_int8_conv_weight(w)
    geo = dict(stride=[s, s], padding=[p, p], dilation=[d, d], groups=gr)
    one = torch.ones(1, device=CUDA)
    y = torch.ops.qpasses.int8_conv2d(x, one, wp, one, None, x_zp=x_zp, **geo)
    want = R.int_conv2d(x.double() - x_zp, w, geo["stride"], geo["padding"], geo["dilation"], gr)
    assert torch.equal(y, want.to(torch.float32))
    b32 = torch.randint(-3000, 3000, (cout,), dtype=torch.int32, generator=g).to(CUDA)
    m = 1e-5 + 1e-4 * torch.rand(cout, generator=g, dtype=torch.float64)
    M0, sh = (t.to(CUDA) for t in R.quantize_multipliers(m))
    y = torch.ops.qpasses.int8_conv2d_requant(x, x_zp, wp, b32, M0, sh, -4, -128, 127, **geo)
    yr = R.int8_conv2d_requant(x, x_zp, w, b32, M0, sh, -4, -128, 127, geo["stride"], geo["padding"],
                               geo["dilation"], gr)
    assert torch.equal(y, yr)


@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (7, 4096, 11008), (16, 11008, 4096), (256, 4096, 4096),
                                   (2048, 4096, 4096)])
@pytest.mark.parametrize("with_zeros", [False, True])
def test_gpu_int4_exact(M, N, K, with_zeros):
    """Power-of-two scales and small-integer activations: every product and partial sum is exact,
    so any unpacking or group-indexing slip changes bits."""
    g = gen(M + K + with_zeros)
    group = 128
    G = K // group
    codes = torch.randint(0, 16, (N, K), dtype=torch.int8, generator=g)
    wp = P.pack_int4(codes, group, signed=False).to(CUDA)
    scales = (2.0 ** torch.randint(-3, 0, (N, G), generator=g).float()).to(torch.bfloat16).to(CUDA)
    zeros = torch.randint(0, 16, (N, G), generator=g).to(torch.bfloat16).to(CUDA) if with_zeros else None
    x = torch.randint(-2, 3, (M, K), generator=g).to(torch.bfloat16).to(CUDA)
    y = torch.ops.qpasses.int4_weight_only_linear(x, wp, scales, zeros, group, None)
    z = (zeros.double() if with_zeros else torch.full((N, G), 8.0, dtype=torch.float64, device=CUDA))
    wd = (codes.to(CUDA).double().view(N, G, group) - z[..., None]) * scales.double()[..., None]
    exact = x.double() @ wd.view(N, K).t()          # multiples of 1/8 below 2**16: exact in fp32
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, exact.float().to(torch.bfloat16))        # one rounding, at the end


@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (33, 1000, 1001), (512, 4096, 4096), (4096, 1024, 2048)])
def test_gpu_binary_exact(M, N, K):
    g = gen(M * N + K)
    xs = (torch.randint(0, 2, (M, K), generator=g, dtype=torch.int8) * 2 - 1).to(CUDA)
    ws = (torch.randint(0, 2, (N, K), generator=g, dtype=torch.int8) * 2 - 1).to(CUDA)
    want = torch.round(xs.double() @ ws.double().t()).long()
    wp, xp = P.pack_bits(ws), P.pack_bits(xs)
    kb = ops._kmod("triton_binary")
    for force_xnor in (True, False):
        y = kb.linear(xp, wp, K, None, None, True, force_xnor=force_xnor)
        assert torch.equal(y.long(), want), f"packed activations, force_xnor={force_xnor}"
    x8 = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g).to(CUDA)
    y = torch.ops.qpasses.binary_linear(x8, wp, K, None, None, False)
    assert torch.equal(y.long(), torch.round(x8.double() @ ws.double().t()).long())


@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (17, 1000, 1001), (333, 768, 3072), (1024, 4096, 4096)])
@pytest.mark.parametrize("per_token,symmetric", [(True, False), (False, False), (True, True)])
def test_gpu_dynamic_int8_linear_matches_cpu_reference(M, N, K, per_token, symmetric):
    """The dynamic op on CUDA: activation codes from the same torch formula, the GEMM with per-row
    zero points on the Triton kernel; its integer sums equal the CPU reference's, bit for bit."""
    g = gen(M + 3 * N + K)
    x = torch.randn(M, K, generator=g) * 3 + 0.5
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    ws, b = torch.rand(N, generator=g) * 1e-2, torch.randn(N, generator=g)
    wp = P.pack_int8_weight(w)
    with ops.triton_policy("never"):
        want = torch.ops.qpasses.dynamic_int8_linear(x, wp, ws, b, 8, symmetric, per_token)
    got = torch.ops.qpasses.dynamic_int8_linear(x.to(CUDA), wp.to(CUDA), ws.to(CUDA), b.to(CUDA), 8, symmetric,
                                                per_token).cpu()
    # codes can differ only where the GPU's x / scale rounds across a .5 tie; the sums, not the codes,
    # are what the kernel owns: check them exactly on codes computed once
    x8, xs, xzp = R.dynamic_quantize_int8(x, 8, symmetric, per_token)
    kmod = ops._kmod("triton_int8")
    acc = kmod.linear(x8.to(CUDA), torch.ones(M, device=CUDA), wp.to(CUDA), torch.ones(1, device=CUDA), None,
                      "none", torch.float32, x_zp_rows=xzp.to(CUDA)).cpu().double()
    exact = ((x8.long() - xzp.long()[:, None]) @ w.long().t()).double()
    assert torch.equal(acc, exact) if exact.abs().max() < 2 ** 24 else torch.allclose(acc, exact, rtol=1e-7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_quantize_rows_bit_exact(bits, symmetric, dtype):
    """The fused per-row quantization kernel compiled for the GPU: range, scale, zero point and
    codes equal the CPU reference's bit for bit (IEEE fp32 division, round half to even)."""
    g = gen(bits + symmetric)
    x = (torch.randn(333, 4096, generator=g) * torch.rand(333, 1, generator=g) * 5 + torch.randn(333, 1, generator=g))
    x[0] = 0.0
    x = x.to(dtype)
    got = ops._kmod("triton_int8").quantize_rows(x.to(CUDA), bits, symmetric)
    want = R.dynamic_quantize_int8(x, bits, symmetric, True)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


def test_gpu_lowered_network_matches_cpu_lowering():
    """ptq_int8 + lower on the CPU, then the same GraphModule on the GPU: the Triton kernels and
    the CPU reference kernels compute the same integer accumulators, so outputs agree to fp32
    rounding and every prediction is the same."""
    import qpasses
    from qpasses import datasets

    torch.manual_seed(0)
    model = datasets.train_digits_cnn().eval()
    x, _ = datasets.load_digits_tensors("test")
    gm = qpasses.trace(model, (x[:8],))
    low = qpasses.PassManager(["ptq_int8", "lower"], device="cpu").run(gm, data=datasets.calib_batches(n=64))
    assert any(str(n.target).startswith("qpasses.int8_conv2d") for n in low.graph.nodes)
    with ops.triton_policy("never"), torch.no_grad():
        y_cpu = low(x)
    low_gpu = low.to(CUDA)
    with torch.no_grad():
        y_gpu = low_gpu(x.to(CUDA)).cpu()
    assert torch.equal(y_cpu.argmax(1), y_gpu.argmax(1))
    assert float((y_cpu - y_gpu).abs().max() / y_cpu.abs().max()) < 1e-5
    # the same model replayed as one CUDA graph gives the eager GPU result, for new inputs too
    from qpasses.kernels import cuda_graph
    xg = x.to(CUDA)
    run = cuda_graph(low_gpu, xg[:64])
    for lo in (0, 64, 128):
        with torch.no_grad():
            want = low_gpu(xg[lo:lo + 64])
        assert torch.equal(run(xg[lo:lo + 64]), want)
    with pytest.raises(ValueError, match="captured for"):
        run(xg[:32])


def test_gpu_not_interpreted():
    assert os.environ.get("TRITON_INTERPRET") == "0"
    mod = ops._kmod("triton_int8")
    assert not mod.INTERPRET
