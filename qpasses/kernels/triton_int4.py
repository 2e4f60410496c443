"""Triton W4A16 kernels: float activations x group-wise int4 weights (two codes per byte).

* ``_int4_gemm_kernel`` (M > ``GEMV_MAX_M``): each weight tile ``[BLOCK_N, BLOCK_K/2]`` bytes is
  loaded once, split into low/high nibbles and interleaved back to K order in registers
  (``tl.join`` + ``reshape``), dequantized ``(q - z) * s`` in fp32 with one scale/zero per
  (column, group) -- ``BLOCK_K`` divides the group size, so a tile never straddles groups --,
  rounded to the activation dtype and fed to the fp16/bf16 tensor cores with an fp32
  accumulator (the "dequantize in registers, then MMA" scheme of Marlin / torchao's
  tinygemm, written here for Triton).
* ``_int4_gemv_kernel`` (small M, memory bound): no MMA; each program streams ``BLOCK_N`` packed
  weight rows, multiplies the even/odd activations with the low/high nibbles separately (no
  interleave needed) and reduces over K at the end; optional split-K over a second grid axis
  when there are too few column tiles to fill the GPU. Scales are gathered per element, so
  ``BLOCK_K`` may exceed the group size.

Both compute ``out = sum_k x[m, k] * dtype((q[n, k] - z) * s) + bias`` with fp32 accumulation --
the operand definition of ``reference.int4_weight_only_linear``.

Interpreter note: ``tl.dot`` on bf16 operands is wrong in the Triton 3.x CPU interpreter (it
multiplies the raw 16-bit patterns), so under ``TRITON_INTERPRET=1`` the dot runs on the same
values upcast to fp32 (exact products, so only the summation order can differ from the GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_int8 import grouped_tile, Launcher, cast_to, m_bucket

INTERPRET = bool(triton.knobs.runtime.interpret)
GEMV_MAX_M = 4


def _cfg(bm, bn, bk, gm, stages, warps):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm), num_stages=stages, num_warps=warps)


GEMM_CONFIGS = [
    _cfg(128, 128, 64, 8, 4, 8), _cfg(128, 256, 64, 8, 3, 8), _cfg(64, 128, 64, 8, 4, 4), _cfg(128, 128, 32, 8, 4, 4),
    _cfg(64, 256, 32, 8, 4, 8), _cfg(128, 64, 128, 8, 3, 4), _cfg(64, 64, 128, 4, 4, 4),
    _cfg(16, 128, 128, 1, 4, 4), _cfg(32, 128, 64, 1, 4, 4), _cfg(16, 64, 128, 1, 5, 4), _cfg(32, 64, 32, 1, 5, 4),
]
GEMV_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
                for bn, bk, w, s in [(16, 256, 4, 3), (32, 256, 4, 3), (16, 512, 4, 2), (32, 128, 4, 4),
                                     (64, 128, 4, 3), (8, 512, 2, 3), (64, 256, 8, 3)]]


def _prune_gemm(configs, named_args, **kwargs):
    group = kwargs.get("GROUP", named_args.get("GROUP"))
    mb = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 8192))
    keep = [c for c in configs if group % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_M"] <= max(16, 2 * mb)]
    return keep or [triton.Config(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1), num_warps=4, num_stages=3)]


@triton.jit
def _int4_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_om,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tl.static_assert(GROUP % BLOCK_K == 0)
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_c = rm % M
    rn_c = rn % N
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_K // 2)
    KB = (K + 1) // 2
    x_ptrs = x_ptr + rm_c[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn_c[:, None] * stride_wn + rb[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kk * BLOCK_K
        a = tl.load(x_ptrs, mask=rk[None, :] < K - k0, other=0.0)
        b = tl.load(w_ptrs, mask=rb[None, :] < KB - k0 // 2, other=0)
        q = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K))      # K order: lo(2j), hi(2j+1)
        g = k0 // GROUP
        s = tl.load(s_ptr + rn_c * stride_sn + g).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + rn_c * stride_zn + g).to(tl.float32)
        else:
            z = tl.full((BLOCK_N,), 8.0, tl.float32)
        wq = cast_to((q.to(tl.float32) - z[:, None]) * s[:, None], x_ptr.dtype.element_ty)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), tl.trans(wq.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(wq), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, cast_to(acc, out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


_gemm = Launcher(_int4_gemm_kernel, GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "HAS_ZEROS", "HAS_BIAS"],
                 interp_meta=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2), prune=_prune_gemm)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_zn,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    sk = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = rn % N
    rb = tl.arange(0, BLOCK_K // 2)
    KB = (K + 1) // 2
    xdt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    k_start = sk * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    for k0 in range(k_start, k_end, BLOCK_K):
        ke = k0 + 2 * rb                                         # even k of each byte
        xe = tl.load(x_ptr + m * stride_xm + ke, mask=ke < K, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + m * stride_xm + ke + 1, mask=ke + 1 < K, other=0.0).to(tl.float32)
        byte = k0 // 2 + rb
        b = tl.load(w_ptr + rn_c[:, None] * stride_wn + byte[None, :], mask=byte[None, :] < KB, other=0)
        g = ke // GROUP                                          # both nibbles of a byte share a group
        s = tl.load(s_ptr + rn_c[:, None] * stride_sn + g[None, :], mask=ke[None, :] < K, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + rn_c[:, None] * stride_zn + g[None, :], mask=ke[None, :] < K,
                        other=0.0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N, BLOCK_K // 2), 8.0, tl.float32)
        wl = cast_to(((b & 0xF).to(tl.float32) - z) * s, xdt).to(tl.float32)
        wh = cast_to(((b >> 4).to(tl.float32) - z) * s, xdt).to(tl.float32)
        acc += wl * xe[None, :] + wh * xo[None, :]
    y = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn_c).to(tl.float32)
        tl.store(out_ptr + m * N + rn, cast_to(y, out_ptr.dtype.element_ty), mask=rn < N)
    else:
        tl.store(out_ptr + (sk * M + m) * N + rn, y, mask=rn < N)


_gemv = Launcher(_int4_gemv_kernel, GEMV_CONFIGS, key=["M", "N", "K", "GROUP", "HAS_ZEROS", "HAS_BIAS", "SPLIT_K"],
                 interp_meta=dict(BLOCK_N=16, BLOCK_K=64))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _split_k(M: int, N: int, K: int, device, split_k=None) -> int:
    if split_k is not None:
        return max(1, int(split_k))
    tiles = triton.cdiv(N, 32) * M
    target = 2 * _num_sms(device)
    if tiles >= target:
        return 1
    return max(1, min(triton.next_power_of_2(triton.cdiv(target, tiles)), K // 1024, 16))


def linear(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros, group_size: int, bias,
           *, split_k=None, force_gemv=None) -> torch.Tensor:
    """``x [M, K]`` (bf16/fp16/fp32) times the packed int4 weight ``[N, ceil(K/2)]``; returns
    ``[M, N]`` in ``x.dtype``. ``split_k``/``force_gemv`` override the heuristics (tests)."""
    M, K = x.shape
    N = w_packed.shape[0]
    dev = x.device
    out = torch.empty((M, N), dtype=x.dtype, device=dev)
    if M == 0 or N == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    w_packed = w_packed.contiguous()
    scales = scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    z_arg = zeros if zeros is not None else scales
    b_arg = bias.contiguous() if bias is not None else scales
    gemv = (M <= GEMV_MAX_M) if force_gemv is None else force_gemv
    if gemv:
        split = _split_k(M, N, K, dev, split_k)
        bk = 64 if INTERPRET else 512      # every config's BLOCK_K divides the split length
        k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk if split > 1 else max(K, 1)
        split = triton.cdiv(K, k_per_split) if split > 1 else 1
        tgt = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=dev)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M, split)  # noqa: E731
        _gemv(grid, x, w_packed, scales, z_arg, b_arg, tgt, M, N, K, k_per_split,
              x.stride(0), w_packed.stride(0), scales.stride(0), z_arg.stride(0),
              GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SPLIT_K=split)
        if split == 1:
            return out
        y = tgt.sum(0)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype)
    dot_f32 = INTERPRET or x.dtype == torch.float32
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemm(grid, x, w_packed, scales, z_arg, b_arg, out, M, N, K, m_bucket(M),
          x.stride(0), w_packed.stride(0), scales.stride(0), z_arg.stride(0), out.stride(0),
          GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, DOT_F32=dot_f32)
    return out
