"""Triton W4A16 kernels (GEMM and GEMV/split-K paths) under the Triton interpreter."""
import os

os.environ["TRITON_INTERPRET"] = "1"          # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from qpasses.kernels import library as ops  # noqa: E402
from qpasses.kernels import packing as P  # noqa: E402
from qpasses.kernels import reference as R  # noqa: E402


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.triton_policy("always"):
        yield


def kernel():
    return ops._kmod("triton_int4")


def exact_problem(M, N, K, group, with_zeros, dtype, seed):
    """Data whose every product and partial sum is exactly representable: small-integer
    activations, power-of-two scales, integer zeros. Any indexing/unpacking slip changes bits."""
    g = torch.Generator().manual_seed(seed)
    G = (K + group - 1) // group
    codes = torch.randint(0, 16, (N, K), dtype=torch.int8, generator=g)
    wp = P.pack_int4(codes, group, signed=False)
    scales = 2.0 ** torch.randint(-2, 2, (N, G), generator=g).float()
    zeros = torch.randint(0, 16, (N, G), generator=g).float() if with_zeros else None
    x = torch.randint(-4, 5, (M, K), generator=g).to(dtype)
    bias = torch.randint(-8, 8, (N,), generator=g).float()
    return x, wp, scales, zeros, bias


@pytest.mark.parametrize("M,N,K", [(1, 13, 37), (7, 13, 37), (3, 20, 130), (20, 17, 64)])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("with_zeros", [False, True])
def test_int4_exact(M, N, K, group, with_zeros):
    dtype = torch.float16 if (M + group) % 2 else torch.bfloat16
    x, wp, s, z, b = exact_problem(M, N, K, group, with_zeros, dtype, M * 7 + K + group)
    y = torch.ops.qpasses.int4_weight_only_linear(x, wp, s, z, group, b)
    yr = R.int4_weight_only_linear(x, wp, s, z, group, b)
    assert y.dtype == dtype and y.shape == (M, N)
    assert torch.equal(y, yr)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 7])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_random_data(dtype, M, symmetric):
    g = torch.Generator().manual_seed(1)
    N, K, group = 13, 75, 32
    w = torch.randn(N, K, generator=g)
    wp, s, z = P.quantize_int4(w, group, symmetric=symmetric)
    x = torch.randn(2, M, K, generator=g).to(dtype)                  # leading dims
    b = torch.randn(N, generator=g)
    y = torch.ops.qpasses.int4_weight_only_linear(x, wp, s.to(dtype), z, group, b)
    yr = R.int4_weight_only_linear(x, wp, s.to(dtype), z, group, b)
    assert y.shape == (2, M, N) and y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.float(), yr.float(), rtol=tol, atol=tol * 4)
    # and it is a good approximation of the float layer
    dense = x.float() @ w.t() + b
    assert (y.float() - dense).abs().max() < 0.25 * dense.abs().max()


@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("M", [1, 3])
def test_int4_gemv_split_k_exact(split_k, M):
    x, wp, s, z, b = exact_problem(M, 11, 200, 32, True, torch.bfloat16, 40 + split_k)
    y = kernel().linear(x, wp, s, z, 32, b, split_k=split_k, force_gemv=True)
    assert torch.equal(y, R.int4_weight_only_linear(x, wp, s, z, 32, b))


def test_int4_gemm_path_at_m1_and_gemv_path_at_m9():
    x, wp, s, z, b = exact_problem(1, 9, 70, 64, False, torch.float16, 5)
    assert torch.equal(kernel().linear(x, wp, s, z, 64, b, force_gemv=False), R.int4_weight_only_linear(x, wp, s, z, 64, b))
    x, wp, s, z, b = exact_problem(9, 9, 70, 64, True, torch.float16, 6)
    assert torch.equal(kernel().linear(x, wp, s, z, 64, None, force_gemv=True),
                       R.int4_weight_only_linear(x, wp, s, z, 64, None))
