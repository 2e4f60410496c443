"""The fp8 Triton GEMM compiled for a real GPU (sm_89+; skipped elsewhere: CI never has one).

Same contract as ``test_fp8_gemm.py`` under the interpreter, on shapes that reach every autotune bucket
and the real fp8 tensor-core path: with integer-valued codes the accumulator is exact in any
order, so kernel and reference (computed on the GPU in float64, then rounded once to fp32) agree
bit for bit; the dynamic op agrees with the fake-quant linear to fp32 rounding.

Run on a GPU machine with ``python -m pytest tests/kernels/test_fp8_gpu.py``.
"""
import pytest
import torch

from qpasses.kernels import library as ops
from qpasses.kernels import reference as R
import qpasses.numerics.fp8  # noqa: F401

F8 = torch.float8_e4m3fn
CUDA = "cuda"

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < ops.FP8_MIN_CAPABILITY,
    reason="needs a CUDA GPU with fp8 tensor cores (sm_89+)")

SHAPES = [(1, 4096, 4096), (4, 14336, 4096), (17, 1000, 1024), (64, 3072, 768), (333, 1024, 1024),
          (2048, 4096, 4096)]


@pytest.fixture(autouse=True)
def compiled_triton(monkeypatch):
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


def int_codes(*shape, g):
    return torch.randint(-16, 17, shape, generator=g).to(torch.float32).to(F8).to(CUDA)


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_gpu_fp8_accumulator_exact(M, N, K):
    g = torch.Generator().manual_seed(M + N + K)
    x, w = int_codes(M, K, g=g), int_codes(N, K, g=g)
    one = torch.ones(1, device=CUDA)
    y = torch.ops.qpasses.fp8_linear(x, one, w, one, None, torch.float32)
    acc = (x.double() @ w.double().t()).float()             # exact: |acc| <= 256 K < 2**24
    assert torch.equal(y, acc)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gpu_fp8_epilogue_bit_exact(out_dtype):
    g = torch.Generator().manual_seed(5)
    M, N, K = 300, 1000, 512
    x, w = int_codes(M, K, g=g), int_codes(N, K, g=g)
    xs, ws = torch.rand(M, generator=g).to(CUDA), torch.rand(N, generator=g).to(CUDA)
    b = torch.randn(N, generator=g).to(CUDA)
    y = torch.ops.qpasses.fp8_linear(x, xs, w, ws, b, out_dtype)
    acc = (x.double() @ w.double().t()).float()
    assert torch.equal(y, R.float_epilogue(acc, xs, ws, b, "none", out_dtype))


def test_gpu_dynamic_fp8_linear_matches_fake_quant():
    from qpasses.numerics.fp8 import Fp8FakeQuantize
    g = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(4096, 1024).to(CUDA)
    x = torch.randn(8, 4096, generator=g).to(CUDA)
    wq = Fp8FakeQuantize.fit(lin.weight, 0).to(CUDA)
    with torch.no_grad():
        fake = torch.nn.functional.linear(torch.ops.qpasses.fp8_fake_quant_per_token(x), wq(lin.weight), lin.bias)
        y = torch.ops.qpasses.dynamic_fp8_linear(x, wq.codes(lin.weight), wq.scale, lin.bias, None)
    torch.testing.assert_close(y, fake, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_gpu_lowered_w8a8_fp8_graph(activations):
    """``w8a8_fp8`` then ``lower`` (default device: CUDA) on a CUDA model: every linear becomes
    ``fp8_linear`` / ``dynamic_fp8_linear`` on float8_e4m3fn weight buffers, the compiled Triton GEMM
    runs them, and the output agrees with the fake-quant graph (same codes and scales; fp32
    summation order differs). A layer with integer codes (scales 1) is bit-exact vs the reference."""
    import torch.nn as nn
    import qpasses
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 512, bias=False)).eval().to(CUDA)
    x = torch.randn(2, 8, 1024, device=CUDA)                          # [batch, tokens, features]
    fq = qpasses.PassManager("w8a8_fp8", activations=activations).run(qpasses.trace(model, (x,)), data=[x])
    pm = qpasses.PassManager("lower")
    low = pm.run(fq)
    st = pm.report["lower_fp8_linear"]
    assert st.rewrites == 2 and st.n_refused == 0, st.refused
    f8 = [b for b in low.buffers() if b.dtype == F8]
    assert len(f8) == 2 and all(b.is_cuda for b in f8)
    xt = torch.randn(3, 5, 1024, device=CUDA)
    with torch.no_grad():
        want, got = fq(xt), low(xt)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())

    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(512, 256)
    w = torch.randint(-16, 17, (256, 512), generator=g).float()
    w[:, 0] = 448.0
    lin.weight.data.copy_(w)
    lin.bias.data.copy_(torch.randint(-8, 9, (256,), generator=g).float())     # integer sums: exact in any order
    lin = lin.eval().to(CUDA)
    xi = torch.randint(-16, 17, (4, 512), generator=g).float()
    xi[:, 7] = 448.0
    xi = xi.to(CUDA)
    fqi = qpasses.PassManager("w8a8_fp8", activations=activations).run(qpasses.trace(lin, (xi,)), data=[xi])
    lowi = qpasses.PassManager("lower").run(fqi)
    with torch.no_grad():
        tri = lowi(xi)
        with ops.triton_policy("never"):
            ref = lowi(xi)
    assert torch.equal(tri, ref)
    assert torch.equal(ref, fqi(xi))
