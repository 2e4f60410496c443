"""fp8 (e4m3) GEMM: ``torch.ops.qpasses.fp8_linear`` / ``dynamic_fp8_linear``, its CPU reference, and the
Triton kernel run on CPU tensors by the Triton interpreter (which supports fp8 ``tl.dot`` in
Triton 3.x by upcasting the operands).

Bit-exactness: with integer-valued fp8 codes (|v| <= 16, every integer there is an e4m3 value) the
fp32 accumulator is an integer below 2**24, exact in every summation order, so kernel and
reference agree bit for bit; with arbitrary codes they agree to fp32 rounding.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"          # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from qpasses.kernels import library as ops  # noqa: E402
from qpasses.kernels import reference as R  # noqa: E402
import qpasses.numerics.fp8  # noqa: E402,F401

F8 = torch.float8_e4m3fn
SHAPES = [(1, 1, 1), (1, 13, 37), (7, 13, 37), (33, 40, 70), (5, 3, 300), (17, 16, 32)]


def int_codes(*shape, g):
    return torch.randint(-16, 17, shape, generator=g).to(torch.float32).to(F8)


def rand_codes(*shape, g):
    return (torch.randn(*shape, generator=g) * 40).clamp(-448, 448).to(F8)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    used = []
    real = ops._kmod

    def spy(name):
        used.append(name)
        return real(name)

    monkeypatch.setattr(ops, "_kmod", spy)
    with ops.triton_policy("always"):
        yield used
    assert "triton_fp8" in used, "the Triton path was not taken"
    assert real("triton_fp8").INTERPRET


def test_schema():
    assert str(torch.ops.qpasses.fp8_linear.default._schema) == (
        "qpasses::fp8_linear(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype=6) -> Tensor")


def test_reference_is_the_dequantized_product():
    g = torch.Generator().manual_seed(0)
    x, w = rand_codes(6, 50, g=g), rand_codes(9, 50, g=g)
    xs, ws, b = torch.rand(6, generator=g), torch.rand(9, generator=g), torch.randn(9, generator=g)
    y = R.fp8_linear(x, xs, w, ws, b, torch.float32)
    want = ((x.float() @ w.float().t()) * xs[:, None]) * ws[None, :] + b
    assert torch.equal(y, want)
    # the op on the CPU (policy auto) is the reference
    with ops.triton_policy("never"):
        assert torch.equal(torch.ops.qpasses.fp8_linear(x, xs, w, ws, b, torch.float32), y)


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_triton_fp8_accumulator_exact(triton_on_cpu, M, N, K):
    g = torch.Generator().manual_seed(M * 100 + N + K)
    x, w = int_codes(M, K, g=g), int_codes(N, K, g=g)
    one = torch.ones(1)
    y = torch.ops.qpasses.fp8_linear(x, one, w, one, None, torch.float32)
    assert torch.equal(y, R.fp8_linear_acc(x, w))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_fp8_epilogue(triton_on_cpu, out_dtype):
    g = torch.Generator().manual_seed(1)
    x, w = int_codes(2, 3, 64, g=g), int_codes(24, 64, g=g)
    xs, ws, b = torch.rand(2, 3, 1, generator=g), torch.rand(24, generator=g), torch.randn(24, generator=g)
    y = torch.ops.qpasses.fp8_linear(x, xs, w, ws, b, out_dtype)
    assert y.shape == (2, 3, 24) and y.dtype == out_dtype
    # exact accumulator, same fp32 epilogue in the same order: bit-exact
    assert torch.equal(y, R.fp8_linear(x.reshape(6, 64), xs, w, ws, b, out_dtype).reshape(2, 3, 24))


def test_triton_fp8_random_codes_close(triton_on_cpu):
    g = torch.Generator().manual_seed(2)
    x, w = rand_codes(19, 333, g=g), rand_codes(21, 333, g=g)
    xs, ws = torch.rand(1, generator=g), torch.rand(21, generator=g)
    y = torch.ops.qpasses.fp8_linear(x, xs, w, ws, None, torch.float32)
    torch.testing.assert_close(y, R.fp8_linear(x, xs, w, ws, None, torch.float32), rtol=1e-5, atol=1e-3)


def test_dynamic_fp8_linear_matches_fake_quant_graph(triton_on_cpu):
    """The deployed op computes the w8a8_fp8 (dynamic) fake-quant linear: same codes, same scales."""
    from qpasses.numerics.fp8 import Fp8FakeQuantize
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(96, 40)
    x = torch.randn(3, 5, 96, generator=g)
    wq = Fp8FakeQuantize.fit(lin.weight, 0)
    with torch.no_grad():
        fake = torch.nn.functional.linear(torch.ops.qpasses.fp8_fake_quant_per_token(x), wq(lin.weight), lin.bias)
        y = torch.ops.qpasses.dynamic_fp8_linear(x, wq.codes(lin.weight), wq.scale, lin.bias, None)
    assert y.shape == fake.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, fake, rtol=1e-5, atol=1e-5)


def test_errors_name_the_cause():
    x = torch.zeros(2, 8, dtype=F8)
    with pytest.raises(ValueError, match="w_q has 4 columns"):
        torch.ops.qpasses.fp8_linear(x, torch.ones(1), torch.zeros(3, 4, dtype=F8), torch.ones(3), None)
    with pytest.raises(ValueError, match="x_q must be float8_e4m3fn"):
        torch.ops.qpasses.fp8_linear(x.float(), torch.ones(1), torch.zeros(3, 8, dtype=F8), torch.ones(3), None)


def test_fake_impl_traces():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(4, 7, 32, dtype=F8)
        y = torch.ops.qpasses.fp8_linear(x, torch.empty(28), torch.empty(5, 32, dtype=F8), torch.empty(5), None,
                                         torch.bfloat16)
        assert y.shape == (4, 7, 5) and y.dtype == torch.bfloat16
