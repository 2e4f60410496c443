"""Triton fp8 (e4m3) GEMM with a fused float epilogue: ``torch.ops.qpasses.fp8_linear`` on CUDA.

``_fp8_gemm_kernel`` computes ``x[M, K] @ w[N, K]^T`` with float8_e4m3fn operands on the fp8
tensor cores (Ada / Hopper, sm_89+) and a float32 accumulator, tiles visited in grouped order for
L2 reuse (as the int8 GEMM, :mod:`.triton_int8`), then ``(acc * x_scale[m]) * w_scale[n] + bias[n]``
in float32 and a cast to the output dtype.  The weight tile is loaded K-contiguous ([BLOCK_K,
BLOCK_N] from the ``[N, K]`` row-major weight), the operand layout Hopper's fp8 wgmma wants.

Under ``TRITON_INTERPRET=1`` the kernel runs in the interpreter, which computes fp8 dots by
upcasting the operands (the tests run it there against :func:`qpasses.kernels.reference.fp8_linear`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_int8 import grouped_tile, INTERP_META, Launcher, _cfg, _const, cast_to, m_bucket

INTERPRET = bool(triton.knobs.runtime.interpret)

# fp8 MMA needs BLOCK_K >= 32; small-M tiles are weight-bandwidth bound (deep K, narrow M)
FP8_GEMM_CONFIGS = [
    _cfg(128, 256, 128, 8, 3, 8), _cfg(256, 128, 128, 8, 3, 8), _cfg(128, 128, 128, 8, 4, 8),
    _cfg(128, 128, 64, 8, 4, 4), _cfg(128, 64, 128, 8, 4, 4), _cfg(64, 128, 128, 8, 4, 4),
    _cfg(64, 256, 128, 8, 3, 8),
    _cfg(16, 64, 256, 1, 4, 4), _cfg(16, 128, 128, 1, 4, 4), _cfg(32, 64, 256, 1, 4, 4),
    _cfg(32, 128, 128, 1, 4, 4), _cfg(64, 64, 256, 4, 4, 4), _cfg(64, 128, 64, 4, 5, 4),
]


def _prune(configs, named_args, **kwargs):
    mb = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 8192))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * mb) and
            (mb <= 64 or c.kwargs["BLOCK_M"] >= 64)]
    return keep or configs[:1]


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_om, xs_stride, ws_stride,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_c = rm % M
    rn_c = rn % N
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm_c[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn_c[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kk * BLOCK_K
        a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    xs = tl.load(xs_ptr + rm_c * xs_stride)
    ws = tl.load(ws_ptr + rn_c * ws_stride)
    y = acc * xs[:, None]
    y = y * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn_c)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, cast_to(y, out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


_gemm = Launcher(_fp8_gemm_kernel, FP8_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_BIAS"],
                 interp_meta=INTERP_META, prune=_prune)


def linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
           bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """``x_q [M, K] @ w_q[N, K]^T`` (float8_e4m3fn, unit stride along K), float epilogue."""
    M, K = x_q.shape
    N = w_q.shape[0]
    if x_q.stride(1) != 1:
        x_q = x_q.contiguous()
    if w_q.stride(1) != 1:
        w_q = w_q.contiguous()
    dev = x_q.device
    out = torch.empty((M, N), dtype=out_dtype, device=dev)
    if M == 0 or N == 0:
        return out
    if K == 0:
        x_q = torch.zeros((M, 1), dtype=x_q.dtype, device=dev)
        w_q = torch.zeros((N, 1), dtype=w_q.dtype, device=dev)
    xs = x_scale.reshape(-1).to(torch.float32).contiguous()
    ws = w_scale.reshape(-1).to(torch.float32).contiguous()
    b = bias.reshape(-1).to(torch.float32).contiguous() if bias is not None else _const(0.0, torch.float32, dev)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemm(grid, x_q, w_q, out, xs, ws, b, M, N, K, m_bucket(M),
          x_q.stride(0), w_q.stride(0), out.stride(0), 0 if xs.numel() == 1 else 1, 0 if ws.numel() == 1 else 1,
          HAS_BIAS=bias is not None)
    return out
