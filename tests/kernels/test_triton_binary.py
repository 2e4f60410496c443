"""Triton binary GEMM (unpack-to-int8 tensor-core path and XNOR-popcount path) under the
Triton interpreter, exact against K - 2 popcount / the integer reference."""
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


def signs(*shape, g):
    return torch.randint(0, 2, shape, generator=g, dtype=torch.int8) * 2 - 1


SHAPES = [(1, 13, 37), (7, 13, 37), (20, 9, 100), (1, 5, 1), (3, 4, 32), (17, 18, 64)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_binary_int8_activations_exact(M, N, K):
    g = torch.Generator().manual_seed(M + N + K)
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    w = signs(N, K, g=g)
    wp = P.pack_bits(w)
    y = torch.ops.qpasses.binary_linear(x, wp, K, None, None, False)
    assert y.dtype == torch.int32
    assert torch.equal(y.long(), x.long() @ w.long().t())


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("force_xnor", [True, False])
def test_binary_packed_activations_exact(M, N, K, force_xnor):
    g = torch.Generator().manual_seed(M * N + K)
    xs, ws = signs(M, K, g=g), signs(N, K, g=g)
    xp, wp = P.pack_bits(xs), P.pack_bits(ws)
    y = ops._kmod("triton_binary").linear(xp, wp, K, None, None, True, force_xnor=force_xnor)
    want = R.binary_linear_acc_xnor(xp, wp, K)                       # K - 2 popcount(x ^ w)
    assert torch.equal(y.long(), want)
    assert torch.equal(want, xs.long() @ ws.long().t())
    assert torch.equal(torch.ops.qpasses.binary_linear(xp, wp, K, None, None, True), y)


@pytest.mark.parametrize("force_xnor", [True, False])
def test_binary_padding_bits_are_ignored(force_xnor):
    g = torch.Generator().manual_seed(3)
    K = 37
    xs, ws = signs(5, K, g=g), signs(6, K, g=g)
    xp, wp = P.pack_bits(xs), P.pack_bits(ws)
    xp[:, -1] |= torch.tensor(-(1 << 31), dtype=torch.int32)           # garbage beyond K
    wp[:, -1] |= torch.tensor(1 << 20, dtype=torch.int32)
    y = ops._kmod("triton_binary").linear(xp, wp, K, None, None, True, force_xnor=force_xnor)
    assert torch.equal(y.long(), xs.long() @ ws.long().t())


@pytest.mark.parametrize("x_packed,M", [(False, 7), (True, 2), (True, 20)])
def test_binary_alpha_bias(x_packed, M):
    g = torch.Generator().manual_seed(4)
    N, K = 13, 37
    xs, ws = signs(2, M, K, g=g), signs(N, K, g=g)
    x = P.pack_bits(xs) if x_packed else xs
    wp = P.pack_bits(ws)
    alpha = torch.rand(N, generator=g)
    bias = torch.randn(N, generator=g)
    y = torch.ops.qpasses.binary_linear(x, wp, K, alpha, bias, x_packed)
    yr = R.binary_linear(x, wp, K, alpha, bias, x_packed)
    assert y.dtype == torch.float32 and y.shape == (2, M, N)
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-6)
    y1 = torch.ops.qpasses.binary_linear(x, wp, K, torch.tensor([0.5]), None, x_packed)
    assert torch.equal(y1, (xs.long() @ ws.long().t()).float() * 0.5)
