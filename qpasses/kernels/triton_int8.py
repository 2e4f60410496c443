"""Triton int8 x int8 -> int32 GEMM and implicit-GEMM conv2d with fused epilogues.

Kernels (host wrappers at the bottom; ``qpasses.kernels.library`` validates arguments first):

* ``_int8_gemm_kernel``: ``x[M, K] @ w[N, K]^T`` with int8 tensor-core dots and an int32
  accumulator, tiles visited in grouped ("super-grouping") order for L2 reuse (the technique of
  the Triton matmul tutorial). Out-of-range rows/columns are handled by wrapping the load indices
  (``rm % M``) and masking only the K tail and the store.
* ``_int8_conv_kernel``: conv2d as an implicit GEMM (cuDNN's "implicit precomputed GEMM" idea;
  Chetlur et al. 2014): GEMM rows are output pixels ``(n, oh, ow)`` of the NHWC input, columns
  are output channels of one group, and the reduction runs over ``(kh, kw, cin)`` straight from
  the activation tensor -- no im2col buffer. Spatial padding is a masked load whose fill value is
  the input zero point. Groups are a second grid axis.
* ``_int8_dwconv_kernel``: depthwise conv (``Cin/groups == 1``, any channel multiplier) as a
  direct, vectorised-over-channels multiply-accumulate; a K=kh*kw GEMM would waste the tensor cores.

Epilogues (shared, fused, applied to the int32 tile in registers):

* float: ``act(((acc * x_scale[m]) * w_scale[n]) + bias[n])`` in fp32, stored as bf16/fp16/fp32,
  after the same exact zero-point correction ``acc -= x_zp * colsum(w)`` for affine activations;
* requant (integer-only, Jacob et al. 2018): ``acc -= x_zp * colsum(w)`` (zero-point
  correction, gemmlowp's "offset" trick, colsum accumulated from the very tiles fed to the dot),
  ``+ bias_int32``, gemmlowp fixed-point multiply ``M0 * 2**-31 * 2**-shift`` per output column
  (SaturatingRoundingDoublingHighMul + RoundingDivideByPOT in int64), ``+ out_zp``, clamp, int8.

Under ``TRITON_INTERPRET=1`` a single small configuration is used instead of autotuning.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)   # how this module's kernels were built

ACT_CODES = {"none": 0, "relu": 1, "relu6": 2}
# The interpreter rounds fp32 -> bf16 by truncation; GPUs round to nearest even. Under the
# interpreter the kernels therefore round bf16 in integer arithmetic (same result as the GPU).
SOFT_BF16 = tl.constexpr(INTERPRET)


# ============================================================================ launch helpers
def m_bucket(m: int) -> int:
    """Autotuning key for the (activation-dependent) M dimension: next power of two, capped."""
    return min(triton.next_power_of_2(max(int(m), 1)), 8192)


class Launcher:
    """Runs a ``@triton.jit`` kernel through ``triton.autotune`` on a GPU, or with one fixed small
    configuration under the interpreter (autotuning there would only multiply the run time)."""

    def __init__(self, kernel, configs: List[triton.Config], key: List[str], interp_meta: Dict[str, int],
                 prune=None):
        self.kernel = kernel
        self.interp_meta = dict(interp_meta)
        self.configs = configs
        if INTERPRET:
            self.tuned = None
        else:
            prune = _sharded(prune)
            self.tuned = triton.autotune(configs=configs, key=key,
                                         prune_configs_by={"early_config_prune": prune} if prune else None)(kernel)

    def __call__(self, grid, *args, **kwargs):
        if self.tuned is None:
            meta = dict(self.interp_meta)
            meta.update(kwargs)
            return self.kernel[grid](*args, **meta)
        return self.tuned[grid](*args, **kwargs)


def _sharded(prune):
    """``QPASSES_AUTOTUNE_SHARD=i/J`` (read when the kernel modules load): autotune over every J-th
    surviving configuration only, starting at the i-th. J processes with i = 0..J-1 then compile
    all candidates between them into Triton's on-disk cache, in parallel -- the way
    ``benchmarks/kernels.py --prewarm`` warms a cold GPU machine. Unset: all configurations."""
    spec = os.environ.get("QPASSES_AUTOTUNE_SHARD", "").strip()
    if not spec:
        return prune
    i, j = (int(v) for v in spec.split("/"))
    if not 0 <= i < j:
        raise ValueError(f"QPASSES_AUTOTUNE_SHARD must be i/J with 0 <= i < J, got {spec!r}")

    def shard(configs, named_args, **kwargs):
        keep = prune(configs, named_args, **kwargs) if prune else list(configs)
        return keep[i::j] or keep[:1]
    return shard


def _cfg(bm, bn, bk, gm, stages, warps, **extra):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, **extra),
                         num_stages=stages, num_warps=warps)


# Valid on sm_80/sm_90 (int8 MMA needs BLOCK_K >= 32; wgmma is used for BLOCK_M >= 64 on H100).
GEMM_CONFIGS = [
    # large M: compute-bound tiles
    _cfg(128, 256, 128, 8, 3, 8), _cfg(256, 128, 128, 8, 3, 8), _cfg(128, 128, 128, 8, 4, 8),
    _cfg(128, 128, 64, 8, 4, 4), _cfg(128, 64, 128, 8, 4, 4), _cfg(64, 128, 128, 8, 4, 4),
    _cfg(64, 256, 128, 8, 3, 8),
    # small M: weight-bandwidth-bound, narrow rows, many column tiles, deep K
    _cfg(16, 64, 256, 1, 4, 4), _cfg(16, 128, 128, 1, 4, 4), _cfg(32, 64, 256, 1, 4, 4),
    _cfg(32, 128, 128, 1, 4, 4), _cfg(64, 64, 256, 4, 4, 4), _cfg(64, 128, 64, 4, 5, 4),
]
INTERP_META = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)


def _prune_gemm(configs, named_args, **kwargs):
    mb = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 8192))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * mb) and
            (mb <= 64 or c.kwargs["BLOCK_M"] >= 64)]
    return keep or configs[:1]


# Implicit-GEMM conv tiles: the reduction block must fit the channels of one tap (or, with the
# flat-K path for few channels, the whole kh*kw*cin reduction) and the column block the output
# channels of one group, so narrower tiles than the GEMM's are needed.
CONV_CONFIGS = [
    _cfg(128, 128, 64, 8, 4, 8), _cfg(128, 64, 64, 8, 4, 4), _cfg(64, 128, 64, 8, 4, 4), _cfg(64, 64, 64, 8, 4, 4),
    _cfg(128, 128, 32, 8, 4, 4), _cfg(128, 64, 32, 8, 4, 4), _cfg(128, 32, 64, 8, 4, 4), _cfg(64, 32, 32, 8, 4, 4),
    _cfg(128, 256, 64, 8, 3, 8), _cfg(256, 128, 64, 8, 3, 8), _cfg(128, 128, 128, 8, 3, 8),
    _cfg(16, 64, 64, 1, 4, 4), _cfg(32, 64, 64, 1, 4, 4), _cfg(32, 32, 32, 1, 4, 4), _cfg(16, 128, 128, 1, 4, 4),
]
FLAT_K_MAX_CIN = 32      # fewer input channels per group than this: reduce over the flat (kh, kw, cin) index


def _prune_conv(configs, named_args, **kwargs):
    keep = _prune_gemm(configs, named_args, **kwargs)
    get = lambda name: named_args.get(name, kwargs.get(name, 1 << 20))  # noqa: E731
    cin_g, cout_g = get("CIN_G"), get("COUT_G")
    kdim = get("KH") * get("KW") * cin_g if get("FLAT_K") else cin_g
    kmax, nmax = max(32, triton.next_power_of_2(kdim)), max(32, triton.next_power_of_2(cout_g))
    k2 = [c for c in keep if c.kwargs["BLOCK_K"] <= kmax and c.kwargs["BLOCK_N"] <= nmax]
    if k2:
        return k2
    # nothing fits both: the smallest tiles waste least
    return [min(keep, key=lambda c: (c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], -c.kwargs["BLOCK_M"]))]


# ============================================================================ device helpers
@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M row tiles sweep the column
    tiles together, so the weight tiles they read stay in L2 (the usual Triton GEMM ordering;
    every GEMM kernel of qpasses uses it)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _f32_to_bf16_rne(y):
    """fp32 -> bf16, round to nearest even, via the bit pattern (NaN/inf kept)."""
    b = y.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_to(y, DT: tl.constexpr):
    """``y.to(DT)`` with GPU rounding semantics also under the interpreter."""
    if SOFT_BF16 and DT == tl.bfloat16:
        return _f32_to_bf16_rne(y.to(tl.float32))
    else:
        return y.to(DT)


@triton.jit
def _requant_tile(acc, m0, sh, out_zp, qmin, qmax):
    """gemmlowp MultiplyByQuantizedMultiplier on an int32 tile, per-column M0/shift (int64 [BN])."""
    x = acc.to(tl.int64)
    left = tl.maximum(-sh, 0)
    right = tl.maximum(sh, 0)
    x = x << left[None, :]
    x = tl.minimum(tl.maximum(x, -2147483648), 2147483647)
    b = m0[None, :]
    ab = x * b
    nudge = tl.where(ab >= 0, 1073741824, -1073741823).to(tl.int64)
    v = ab + nudge
    hm = tl.where(v >= 0, v >> 31, -((-v) >> 31))               # division by 2**31 truncating to 0
    hm = tl.where((x == -2147483648) & (b == -2147483648), 2147483647, hm)
    e = right[None, :]
    mask = (tl.full(e.shape, 1, tl.int64) << e) - 1
    rem = hm & mask
    thr = (mask >> 1) + (hm < 0).to(tl.int64)
    y = (hm >> e) + (rem > thr).to(tl.int64)
    y = y + out_zp
    y = tl.minimum(tl.maximum(y, qmin), qmax)
    return y.to(tl.int32)


@triton.jit
def _epilogue(acc, wsum, rm_c, rn_c, xs_ptr, ws_ptr, bias_ptr, m0_ptr, sh_ptr, xs_stride, ws_stride, q_stride,
              x_zp, out_zp, qmin, qmax,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, REQUANT: tl.constexpr, HAS_XZP: tl.constexpr):
    if REQUANT:
        if HAS_XZP:
            acc = acc - x_zp * wsum[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn_c)[None, :]
        m0 = tl.load(m0_ptr + rn_c * q_stride).to(tl.int64)
        sh = tl.load(sh_ptr + rn_c * q_stride).to(tl.int64)
        y = _requant_tile(acc, m0, sh, out_zp, qmin, qmax)
    else:
        if HAS_XZP:
            acc = acc - x_zp * wsum[None, :]
        xs = tl.load(xs_ptr + rm_c * xs_stride)
        ws = tl.load(ws_ptr + rn_c * ws_stride)
        y = acc.to(tl.float32) * xs[:, None]
        y = y * ws[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn_c)[None, :]
        if ACTIVATION == 1:
            y = tl.maximum(y, 0.0)
        elif ACTIVATION == 2:
            y = tl.minimum(tl.maximum(y, 0.0), 6.0)
    return y


# ============================================================================ GEMM
@triton.jit
def _int8_gemm_kernel(
    x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr, m0_ptr, sh_ptr, xzp_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_om,
    xs_stride, ws_stride, q_stride,
    x_zp, out_zp, qmin, qmax,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, REQUANT: tl.constexpr, HAS_XZP: tl.constexpr,
    XZP_ROWS: tl.constexpr,
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    wsum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kk * BLOCK_K
        a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0)
        b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if HAS_XZP or XZP_ROWS:
            wsum += tl.sum(b.to(tl.int32), axis=0)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if XZP_ROWS:
        # one zero point per row (dynamic per-token activations): acc -= x_zp[m] * colsum(w)[n], exact
        acc = acc - tl.load(xzp_ptr + rm_c)[:, None] * wsum[None, :]
    y = _epilogue(acc, wsum, rm_c, rn_c, xs_ptr, ws_ptr, bias_ptr, m0_ptr, sh_ptr, xs_stride, ws_stride, q_stride,
                  x_zp, out_zp, qmin, qmax, HAS_BIAS, ACTIVATION, REQUANT, HAS_XZP)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, cast_to(y, out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


_gemm = Launcher(_int8_gemm_kernel, GEMM_CONFIGS,
                 key=["M_BUCKET", "N", "K", "HAS_BIAS", "ACTIVATION", "REQUANT", "HAS_XZP", "XZP_ROWS"],
                 interp_meta=INTERP_META, prune=_prune_gemm)


# ============================================================================ implicit-GEMM conv
@triton.jit
def _int8_conv_kernel(
    x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr, m0_ptr, sh_ptr,
    M, H, W, C, OH, OW, COUT, CIN_G, COUT_G, KH, KW, SH, SW, PH, PW, DH, DW, M_BUCKET,
    xs_stride, ws_stride, q_stride,
    x_zp, out_zp, qmin, qmax,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, REQUANT: tl.constexpr, HAS_XZP: tl.constexpr,
    FLAT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, COUT_G, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # channel within the group
    rm_c = rm % M
    oc = g * COUT_G + (rn % COUT_G)                         # absolute output channel (in range)
    ow = rm_c % OW
    t = rm_c // OW
    oh = t % OH
    nb = t // OH
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_base = nb * (H * W * C) + g * CIN_G
    KDIM = KH * KW * CIN_G
    w_base = oc * KDIM
    rk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    wsum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    if FLAT_K:
        # few channels (e.g. an RGB stem): the reduction index k = (r * KW + s) * CIN_G + c runs
        # over all taps at once, so a 7x7x3 kernel takes 5 blocks of 32 instead of 49 mostly
        # masked ones; the weight row (OHWI) is contiguous in k
        for k0 in range(0, KDIM, BLOCK_K):
            kidx = k0 + rk
            kmask = kidx < KDIM
            c = kidx % CIN_G
            rs = kidx // CIN_G
            r = rs // KW
            s = rs - r * KW
            ih = ih0[:, None] + (r * DH)[None, :]
            iw = iw0[:, None] + (s * DW)[None, :]
            ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & kmask[None, :]
            a = tl.load(x_ptr + x_base[:, None] + (ih * W + iw) * C + c[None, :], mask=ok, other=x_zp)
            b = tl.load(w_ptr + w_base[None, :] + kidx[:, None], mask=kmask[:, None], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            if HAS_XZP:
                wsum += tl.sum(b.to(tl.int32), axis=0)
    else:
        # one flat (and therefore software-pipelinable) loop over (kh, kw, channel block)
        num_c = tl.cdiv(CIN_G, BLOCK_K)
        for kk in range(0, KH * KW * num_c):
            rs = kk // num_c
            c0 = (kk - rs * num_c) * BLOCK_K
            r = rs // KW
            s = rs - r * KW
            ih = ih0 + r * DH
            iw = iw0 + s * DW
            ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = x_base + (ih * W + iw) * C
            c = c0 + rk
            cmask = c < CIN_G
            a = tl.load(x_ptr + pix[:, None] + c[None, :], mask=ok[:, None] & cmask[None, :], other=x_zp)
            b = tl.load(w_ptr + w_base[None, :] + (rs * CIN_G + c)[:, None], mask=cmask[:, None], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            if HAS_XZP:
                wsum += tl.sum(b.to(tl.int32), axis=0)

    y = _epilogue(acc, wsum, rm_c, oc, xs_ptr, ws_ptr, bias_ptr, m0_ptr, sh_ptr, xs_stride, ws_stride, q_stride,
                  x_zp, out_zp, qmin, qmax, HAS_BIAS, ACTIVATION, REQUANT, HAS_XZP)
    out_ptrs = out_ptr + rm[:, None] * COUT + oc[None, :]
    tl.store(out_ptrs, cast_to(y, out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < COUT_G))


_conv = Launcher(_int8_conv_kernel, CONV_CONFIGS,
                 key=["M_BUCKET", "COUT_G", "CIN_G", "KH", "KW", "SH", "HAS_BIAS", "ACTIVATION", "REQUANT", "HAS_XZP",
                      "FLAT_K"],
                 interp_meta=INTERP_META, prune=_prune_conv)


@triton.jit
def _int8_dwconv_kernel(
    x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr, m0_ptr, sh_ptr,
    M, H, W, C, OH, OW, COUT, MULT, KH, KW, SH, SW, PH, PW, DH, DW, M_BUCKET,
    xs_stride, ws_stride, q_stride,
    x_zp, out_zp, qmin, qmax,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, REQUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rm_c = rm % M
    oc = rc % COUT
    ic = oc // MULT
    ow = rm_c % OW
    t = rm_c // OW
    oh = t % OH
    nb = t // OH
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_base = nb * (H * W * C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
    for r in range(0, KH):
        ih = ih0 + r * DH
        ok_h = (ih >= 0) & (ih < H)
        for s in range(0, KW):
            iw = iw0 + s * DW
            ok = ok_h & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + (x_base + (ih * W + iw) * C)[:, None] + ic[None, :], mask=ok[:, None], other=x_zp)
            wv = tl.load(w_ptr + oc * (KH * KW) + r * KW + s).to(tl.int32)
            acc += (a.to(tl.int32) - x_zp) * wv[None, :]
    wsum = tl.zeros((BLOCK_C,), dtype=tl.int32)
    y = _epilogue(acc, wsum, rm_c, oc, xs_ptr, ws_ptr, bias_ptr, m0_ptr, sh_ptr, xs_stride, ws_stride, q_stride,
                  x_zp, out_zp, qmin, qmax, HAS_BIAS, ACTIVATION, REQUANT, False)
    out_ptrs = out_ptr + rm[:, None] * COUT + rc[None, :]
    tl.store(out_ptrs, cast_to(y, out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rc[None, :] < COUT))


DW_CONFIGS = [triton.Config(dict(BLOCK_M=bm, BLOCK_C=bc), num_warps=w, num_stages=2)
              for bm, bc, w in [(32, 64, 4), (64, 64, 4), (32, 128, 4), (64, 128, 8), (128, 32, 4), (16, 256, 4)]]
_dwconv = Launcher(_int8_dwconv_kernel, DW_CONFIGS,
                   key=["M_BUCKET", "COUT", "KH", "KW", "SH", "HAS_BIAS", "ACTIVATION", "REQUANT"],
                   interp_meta=dict(BLOCK_M=16, BLOCK_C=16))


# ============================================================================ host wrappers
_CONSTS: Dict[tuple, torch.Tensor] = {}


def _const(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 1-element device tensor (placeholder pointer for an unused argument): creating
    one per call costs an allocation and a fill kernel on the host's critical path."""
    key = (value, dtype, device)
    t = _CONSTS.get(key)
    if t is None:
        t = _CONSTS[key] = torch.full((1,), value, dtype=dtype, device=device)
    return t


def _common_requant(M0, shift, device):
    m0 = M0.reshape(-1).to(device=device, dtype=torch.int64).contiguous()
    sh = shift.reshape(-1).to(device=device, dtype=torch.int64).contiguous()
    return m0, sh, (0 if m0.numel() == 1 else 1)


def linear(x_q: torch.Tensor, x_scale: Optional[torch.Tensor], w_q: torch.Tensor, w_scale: Optional[torch.Tensor],
           bias: Optional[torch.Tensor], activation: str, out_dtype: torch.dtype, *, requant=None,
           x_zp: int = 0, x_zp_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x_q [M, K]`` (int8, unit stride along K) times prepacked ``w_q [N, Kp]``; float epilogue,
    or ``requant=(x_zp, M0, shift, out_zp, qmin, qmax)`` for the integer-only epilogue (then
    ``bias`` is int32).  ``x_zp_rows``: int32 ``[M]``, one activation zero point per row (float
    epilogue only), in place of the scalar ``x_zp``."""
    M, K = x_q.shape
    N = w_q.shape[0]
    if x_q.stride(1) != 1:
        x_q = x_q.contiguous()
    if w_q.stride(1) != 1:
        w_q = w_q.contiguous()
    dev = x_q.device
    dummy = _const(0.0, torch.float32, dev)
    if requant is None:
        out = torch.empty((M, N), dtype=out_dtype, device=dev)
        xs = x_scale.reshape(-1).to(torch.float32).contiguous()
        ws = w_scale.reshape(-1).to(torch.float32).contiguous()
        b = bias.reshape(-1).to(torch.float32).contiguous() if bias is not None else dummy
        m0 = sh = _const(0, torch.int64, dev)
        q_stride, out_zp, qmin, qmax = 0, 0, -128, 127
        xs_stride, ws_stride = (0 if xs.numel() == 1 else 1), (0 if ws.numel() == 1 else 1)
        act = ACT_CODES[activation]
    else:
        x_zp, M0, shift, out_zp, qmin, qmax = requant
        out = torch.empty((M, N), dtype=torch.int8, device=dev)
        xs = ws = dummy
        xs_stride = ws_stride = 0
        b = bias.reshape(-1).to(torch.int32).contiguous() if bias is not None else _const(0, torch.int32, dev)
        m0, sh, q_stride = _common_requant(M0, shift, dev)
        act = 0
    if M == 0 or N == 0:
        return out
    if K == 0:
        x_q = torch.zeros((M, 1), dtype=torch.int8, device=dev)
        w_q = torch.zeros((N, 1), dtype=torch.int8, device=dev)
    if x_zp_rows is not None:
        if requant is not None or int(x_zp) != 0:
            raise ValueError("x_zp_rows replaces x_zp, and only with the float epilogue")
        xzp = x_zp_rows.reshape(-1).to(device=dev, dtype=torch.int32).contiguous()
        if xzp.numel() != M:
            raise ValueError(f"x_zp_rows has {xzp.numel()} values for {M} rows")
    else:
        xzp = _const(0, torch.int32, dev)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemm(grid, x_q, w_q, out, xs, ws, b, m0, sh, xzp,
          M, N, K, m_bucket(M),
          x_q.stride(0), w_q.stride(0), out.stride(0),
          xs_stride, ws_stride, q_stride,
          int(x_zp), int(out_zp), int(qmin), int(qmax),
          HAS_BIAS=bias is not None, ACTIVATION=act, REQUANT=requant is not None,
          HAS_XZP=int(x_zp) != 0, XZP_ROWS=x_zp_rows is not None)
    return out


def conv2d(x_q: torch.Tensor, x_scale, w_q: torch.Tensor, w_scale, bias, stride, padding, dilation, groups: int,
           activation: str, out_dtype: torch.dtype, *, requant=None, x_zp: int = 0,
           flat_k: Optional[bool] = None) -> torch.Tensor:
    """Implicit-GEMM conv2d. ``x_q``: int8 [N, C, H, W] (any memory format; made channels-last);
    ``w_q``: int8 [Cout, C/groups, kh, kw] (made channels-last = OHWI). Returns
    [N, Cout, OH, OW] in channels-last memory. ``flat_k`` forces (True) or forbids (False) the
    flat-reduction path; by default it is used below ``FLAT_K_MAX_CIN`` channels per group."""
    x_cl = x_q.contiguous(memory_format=torch.channels_last)
    w_cl = w_q.contiguous(memory_format=torch.channels_last)
    nb, c, h, w = x_cl.shape
    cout, cin_g, kh, kw = w_cl.shape
    sh_, sw_ = stride
    ph, pw = padding
    dh, dw = dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh_ + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw_ + 1
    dev = x_q.device
    dummy = _const(0.0, torch.float32, dev)
    out_dt = torch.int8 if requant is not None else out_dtype
    out = torch.empty((nb, cout, oh, ow), dtype=out_dt, device=dev, memory_format=torch.channels_last)
    M = nb * oh * ow
    if M == 0 or cout == 0:
        return out
    if requant is None:
        xs = x_scale.reshape(-1).to(torch.float32).contiguous()
        ws = w_scale.reshape(-1).to(torch.float32).contiguous()
        b = bias.reshape(-1).to(torch.float32).contiguous() if bias is not None else dummy
        m0 = shf = _const(0, torch.int64, dev)
        q_stride, out_zp, qmin, qmax = 0, 0, -128, 127
        xs_stride, ws_stride = 0, (0 if ws.numel() == 1 else 1)
        act = ACT_CODES[activation]
    else:
        x_zp, M0, shift, out_zp, qmin, qmax = requant
        xs = ws = dummy
        xs_stride = ws_stride = 0
        b = bias.reshape(-1).to(torch.int32).contiguous() if bias is not None else _const(0, torch.int32, dev)
        m0, shf, q_stride = _common_requant(M0, shift, dev)
        act = 0
    common = (M, h, w, c, oh, ow, cout)
    geo = (kh, kw, sh_, sw_, ph, pw, dh, dw, m_bucket(M), xs_stride, ws_stride, q_stride,
           int(x_zp), int(out_zp), int(qmin), int(qmax))
    if cin_g == 1 and groups > 1:
        mult = cout // groups
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_C"]))  # noqa: E731
        _dwconv(grid, x_cl, w_cl, out, xs, ws, b, m0, shf, *common, mult, *geo,
                HAS_BIAS=bias is not None, ACTIVATION=act, REQUANT=requant is not None)
        return out
    cout_g = cout // groups
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]), groups)  # noqa: E731
    _conv(grid, x_cl, w_cl, out, xs, ws, b, m0, shf, *common, cin_g, cout_g, *geo,
          HAS_BIAS=bias is not None, ACTIVATION=act, REQUANT=requant is not None,
          HAS_XZP=int(x_zp) != 0, FLAT_K=bool(cin_g < FLAT_K_MAX_CIN if flat_k is None else flat_k))
    return out


# ============================================================================ dynamic per-row quantization
@triton.jit
def _rint(v):
    """Round half to even for |v| < 2**22, in plain fp32 adds (no libdevice, so the interpreter runs it)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, z_ptr, K, stride_x, stride_q, qmax_u, qmax_s, eps,
                       SYM: tl.constexpr, SHIFT: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: its min/max (range holding 0), then codes clamp(rint(x / s) + z) - SHIFT.
    Divisions are IEEE round-to-nearest (``div_rn``; a plain ``/`` is approximate on the GPU), so
    scales and codes equal torch's bit for bit."""
    row = tl.program_id(0).to(tl.int64)
    xr = x_ptr + row * stride_x
    lo = tl.full((), float("inf"), tl.float32)
    hi = tl.full((), float("-inf"), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        m = offs < K
        v = tl.load(xr + offs, mask=m, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(m, v, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(m, v, float("-inf")), axis=0))
    lo = tl.minimum(lo, 0.0)
    hi = tl.maximum(hi, 0.0)
    if SYM:
        scale = tl.maximum(tl.math.div_rn(tl.maximum(-lo, hi), qmax_s), eps)
        zp = scale * 0.0
        qlo = -qmax_s
        qhi = qmax_s
    else:
        scale = tl.maximum(tl.math.div_rn(hi - lo, qmax_u), eps)
        zp = tl.minimum(tl.maximum(_rint(0.0 - tl.math.div_rn(lo, scale)), 0.0), qmax_u)
        qlo = qmax_u * 0.0
        qhi = qmax_u
    qr = q_ptr + row * stride_q
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        m = offs < K
        v = tl.load(xr + offs, mask=m, other=0.0).to(tl.float32)
        c = tl.minimum(tl.maximum(_rint(tl.math.div_rn(v, scale)) + zp, qlo), qhi) - SHIFT
        tl.store(qr + offs, c.to(tl.int8), mask=m)
    tl.store(s_ptr + row, scale)
    tl.store(z_ptr + row, (zp - SHIFT).to(tl.int32))


def quantize_rows(x2: torch.Tensor, bits: int, symmetric: bool):
    """Per-row dynamic quantization of ``x2 [M, K]`` in one kernel (two reads of each row, one
    int8 write): the same ``(x8, scale [M], x_zp [M])`` as
    :func:`qpasses.kernels.reference.dynamic_quantize_int8` with ``per_token=True``."""
    M, K = x2.shape
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    dev = x2.device
    q = torch.empty((M, K), dtype=torch.int8, device=dev)
    s = torch.empty((M,), dtype=torch.float32, device=dev)
    z = torch.empty((M,), dtype=torch.int32, device=dev)
    if M == 0:
        return q, s, z
    qmax_u, qmax_s = float(2 ** bits - 1), float(2 ** (bits - 1) - 1)
    shift = 128 if (not symmetric and bits == 8) else 0
    block = 64 if INTERPRET else min(max(triton.next_power_of_2(max(K, 1)), 128), 2048)
    _quant_rows_kernel[(M,)](x2, q, s, z, K, x2.stride(0), q.stride(0), qmax_u, qmax_s,
                             float(torch.finfo(torch.float32).eps), SYM=bool(symmetric), SHIFT=shift, BLOCK_K=block)
    return q, s, z
