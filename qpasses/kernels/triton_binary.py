"""Triton binary GEMM: 1-bit weights packed 32 per int32 (``packing.pack_bits``).

* ``_binary_dot_kernel`` (int8 activations, or packed ±1 activations at large M): the weight
  words of a tile ``[BLOCK_N, BLOCK_K/32]`` are expanded in registers to int8 ±1
  (``(word >> j) & 1`` broadcast over ``j = 0..31`` and reshaped, the bit order of the packing)
  and fed with the int8 activations to the int8 tensor cores, int32 accumulation. Packed
  activations are unpacked the same way. Positions >= K get weight 0.
* ``_binary_xnor_kernel`` (packed ±1 activations, small M): no multiplies at all, the XNOR-net
  identity ``sum_k a_k b_k = K - 2 popcount(A xor B)`` (Rastegari et al., 2016) on 32-bit
  words, bits past K masked off. Population count is the hardware ``popc`` on GPUs
  (``libdevice.popc``) and the SWAR bit-count (Hacker's Delight, 5-1) under the interpreter.

Epilogue: ``acc * alpha[n] + bias[n]`` in fp32, or the exact int32 accumulator when neither is
given (what ``reference.binary_linear`` computes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_int8 import grouped_tile, Launcher, m_bucket

try:  # GPU-only intrinsic; never traced under the interpreter (USE_HW_POPC is False there)
    from triton.language.extra import libdevice
except Exception:  # pragma: no cover
    libdevice = None

INTERPRET = bool(triton.knobs.runtime.interpret)


@triton.jit
def _popcount32(v):
    """SWAR population count of int32 words (as unsigned)."""
    u = v.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    u = (u * 0x01010101) >> 24
    return u.to(tl.int32)


@triton.jit
def _unpack_signs(words, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 ``[ROWS, BLOCK_K/32]`` -> int32 bits ``[ROWS, BLOCK_K]`` (bit j of word i -> k = 32 i + j)."""
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (ROWS, BLOCK_K))


@triton.jit
def _binary_epilogue(acc, rn_c, alpha_ptr, bias_ptr, alpha_stride,
                     HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr):
    if OUT_FLOAT:
        y = acc.to(tl.float32)
        if HAS_ALPHA:
            y = y * tl.load(alpha_ptr + rn_c * alpha_stride)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn_c)[None, :]
    else:
        y = acc
    return y


@triton.jit
def _binary_dot_kernel(
    x_ptr, w_ptr, alpha_ptr, bias_ptr, out_ptr,
    M, N, K, KW, M_BUCKET,
    stride_xm, stride_wn, stride_om, alpha_stride,
    X_PACKED: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 32 == 0)
    WPB: tl.constexpr = BLOCK_K // 32
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_c = rm % M
    rn_c = rn % N
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, WPB)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kk * BLOCK_K
        w0 = kk * WPB
        kmask = (k0 + rk) < K
        wmask = (w0 + rw) < KW
        words = tl.load(w_ptr + rn_c[:, None] * stride_wn + (w0 + rw)[None, :], mask=wmask[None, :], other=0)
        wbits = _unpack_signs(words, BLOCK_N, BLOCK_K)
        wv = tl.where(kmask[None, :], 1 - 2 * wbits, 0).to(tl.int8)               # [BN, BK] ±1 / 0
        if X_PACKED:
            xw = tl.load(x_ptr + rm_c[:, None] * stride_xm + (w0 + rw)[None, :], mask=wmask[None, :], other=0)
            xv = (1 - 2 * _unpack_signs(xw, BLOCK_M, BLOCK_K)).to(tl.int8)
        else:
            xv = tl.load(x_ptr + rm_c[:, None] * stride_xm + (k0 + rk)[None, :], mask=kmask[None, :], other=0)
        acc = tl.dot(xv, tl.trans(wv), acc, out_dtype=tl.int32)
    y = _binary_epilogue(acc, rn_c, alpha_ptr, bias_ptr, alpha_stride, HAS_ALPHA, HAS_BIAS, OUT_FLOAT)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, y, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _cfg(bm, bn, bk, gm, stages, warps):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm), num_stages=stages, num_warps=warps)


DOT_CONFIGS = [
    _cfg(128, 128, 128, 8, 3, 8), _cfg(128, 256, 128, 8, 3, 8), _cfg(128, 128, 64, 8, 4, 4),
    _cfg(64, 128, 128, 8, 4, 4), _cfg(64, 64, 256, 4, 3, 4),
    _cfg(16, 128, 256, 1, 3, 4), _cfg(32, 64, 256, 1, 3, 4), _cfg(16, 64, 512, 1, 3, 4),
]


def _prune_dot(configs, named_args, **kwargs):
    mb = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 8192))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * mb) and (mb <= 64 or c.kwargs["BLOCK_M"] >= 64)]
    return keep or configs[:1]


_dot = Launcher(_binary_dot_kernel, DOT_CONFIGS,
                key=["M_BUCKET", "N", "K", "X_PACKED", "HAS_ALPHA", "HAS_BIAS", "OUT_FLOAT"],
                interp_meta=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=2), prune=_prune_dot)


@triton.jit
def _binary_xnor_kernel(
    x_ptr, w_ptr, alpha_ptr, bias_ptr, out_ptr,
    M, N, K, KW,
    stride_xm, stride_wn, stride_om, alpha_stride,
    HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr, USE_HW_POPC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_c = rm % M
    rn_c = rn % N
    rw = tl.arange(0, BLOCK_W)
    full = K // 32
    tail_shift = (32 - K % 32) % 32
    tail = (tl.full((BLOCK_W,), 0xFFFFFFFF, tl.uint32) >> tail_shift).to(tl.int32, bitcast=True)
    pc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for w0 in range(0, KW, BLOCK_W):
        widx = w0 + rw
        wm = widx < KW
        keep = tl.where(widx < full, -1, tl.where(widx == full, tail, 0))       # valid-bit mask per word
        xw = tl.load(x_ptr + rm_c[:, None] * stride_xm + widx[None, :], mask=wm[None, :], other=0)
        ww = tl.load(w_ptr + rn_c[:, None] * stride_wn + widx[None, :], mask=wm[None, :], other=0)
        d = (xw[:, None, :] ^ ww[None, :, :]) & keep[None, None, :]
        if USE_HW_POPC:
            cnt = libdevice.popc(d)
        else:
            cnt = _popcount32(d)
        pc += tl.sum(cnt, axis=2)
    acc = K - 2 * pc
    y = _binary_epilogue(acc, rn_c, alpha_ptr, bias_ptr, alpha_stride, HAS_ALPHA, HAS_BIAS, OUT_FLOAT)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, y, mask=(rm[:, None] < M) & (rn[None, :] < N))


XNOR_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_W=bw), num_warps=w, num_stages=s)
                for bn, bw, w, s in [(32, 8, 4, 3), (64, 4, 4, 3), (64, 8, 4, 3), (128, 4, 8, 3), (32, 16, 4, 2),
                                     (16, 16, 2, 3)]]
_xnor = Launcher(_binary_xnor_kernel, XNOR_CONFIGS,
                 key=["M", "N", "K", "HAS_ALPHA", "HAS_BIAS", "OUT_FLOAT", "BLOCK_M"],
                 interp_meta=dict(BLOCK_N=16, BLOCK_W=2))


def linear(x: torch.Tensor, w_packed: torch.Tensor, K: int, alpha, bias, x_packed: bool, *, force_xnor=None
           ) -> torch.Tensor:
    """``x [M, K]`` int8 (or int32 ``[M, ceil(K/32)]`` packed when ``x_packed``) times the packed
    signs ``[N, ceil(K/32)]``. fp32 ``[M, N]`` (int32 when alpha and bias are both None)."""
    M = x.shape[0]
    N, KW = w_packed.shape
    dev = x.device
    out_float = alpha is not None or bias is not None
    out = torch.empty((M, N), dtype=torch.float32 if out_float else torch.int32, device=dev)
    if M == 0 or N == 0:
        return out
    x = x.contiguous()
    w_packed = w_packed.contiguous()
    a_arg = alpha.reshape(-1).to(torch.float32).contiguous() if alpha is not None else out
    b_arg = bias.reshape(-1).to(torch.float32).contiguous() if bias is not None else out
    a_stride = 0 if alpha is None or alpha.numel() == 1 else 1
    from .library import XNOR_MAX_M
    xnor = (x_packed and M <= XNOR_MAX_M) if force_xnor is None else (force_xnor and x_packed)
    if xnor:
        bm = max(1, triton.next_power_of_2(min(M, XNOR_MAX_M)))
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, bm))  # noqa: E731
        _xnor(grid, x, w_packed, a_arg, b_arg, out, M, N, K, KW,
              x.stride(0), w_packed.stride(0), out.stride(0), a_stride,
              HAS_ALPHA=alpha is not None, HAS_BIAS=bias is not None, OUT_FLOAT=out_float,
              USE_HW_POPC=(not INTERPRET) and dev.type == "cuda" and libdevice is not None, BLOCK_M=bm)
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _dot(grid, x, w_packed, a_arg, b_arg, out, M, N, K, KW, m_bucket(M),
         x.stride(0), w_packed.stride(0), out.stride(0), a_stride,
         X_PACKED=x_packed, HAS_ALPHA=alpha is not None, HAS_BIAS=bias is not None, OUT_FLOAT=out_float)
    return out
