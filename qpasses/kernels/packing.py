"""Weight packing for the integer kernels (done once, offline, in the layout the kernel reads).

Layouts
-------
* int8 linear weight: ``pack_int8_weight(w[N, K]) -> int8 [N, Kp]``, K-major ("B transposed",
  what int8 tensor-core MMA wants for both operands), rows zero-padded to ``Kp = roundup(K, 16)``
  so every row starts 16-byte aligned (vectorised loads / TMA). The kernels take K from the
  activation and ignore the padding columns; an unpadded contiguous ``[N, K]`` is accepted too.
* int8 conv weight: ``pack_int8_conv_weight(w[Cout, Cin/g, kh, kw])`` returns the same logical
  shape in ``torch.channels_last`` memory format, i.e. the bytes are ``[Cout, kh, kw, Cin/g]``
  (OHWI). Viewed as ``[Cout, kh*kw*Cin/g]`` this is the K-major B operand of the implicit GEMM
  with the reduction index ordered (kh, kw, cin) -- channel fastest, matching NHWC activations.
* int4: two 4-bit codes per byte along K, ``byte[n, j] = q[n, 2j] | q[n, 2j+1] << 4`` (low nibble
  = even k). Codes ``q`` are unsigned 0..15; the value is ``(q - z) * s`` with per-group scale
  ``s = scales[n, k // group]`` and zero ``z = zeros[n, k // group]`` (in the code domain), or
  ``z = 8`` when no zeros are given (symmetric int4 stored in offset-binary).
* 1-bit: 32 signs per int32 word along K, LSB first: bit ``j`` of word ``i`` is the sign of
  element ``32 i + j``; bit = 1 means -1 (negative), bit = 0 means +1 (zero counts as +1).
  Bits past K are 0. With this convention ``sum_k a_k b_k = K - 2 popcount(A xor B)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "INT8_K_ALIGN", "pack_int8_weight", "unpack_int8_weight", "pack_int8_conv_weight",
    "pack_int4", "unpack_int4", "quantize_int4", "pack_bits", "unpack_bits", "int4_num_groups",
]

INT8_K_ALIGN = 16


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# ----------------------------------------------------------------------------------------- int8
def pack_int8_weight(w: torch.Tensor, align: int = INT8_K_ALIGN) -> torch.Tensor:
    """Pre-pack an int8 linear weight ``[N, K]`` (``nn.Linear`` layout) for ``int8_linear``.

    Returns a contiguous int8 ``[N, roundup(K, align)]`` tensor, zero padded along K.
    """
    if w.dtype != torch.int8 or w.dim() != 2:
        raise ValueError(f"pack_int8_weight expects an int8 [N, K] tensor, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    kp = _round_up(max(k, 1), align)
    out = torch.zeros((n, kp), dtype=torch.int8, device=w.device)
    out[:, :k] = w
    return out


def unpack_int8_weight(w_packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_int8_weight` (drops the padding columns)."""
    return w_packed[:, :K].contiguous()


def pack_int8_conv_weight(w: torch.Tensor) -> torch.Tensor:
    """Pre-pack an int8 conv weight ``[Cout, Cin/groups, kh, kw]`` for ``int8_conv2d``.

    Same logical shape, ``channels_last`` memory (bytes ordered ``[Cout, kh, kw, Cin/groups]``).
    """
    if w.dtype != torch.int8 or w.dim() != 4:
        raise ValueError(f"pack_int8_conv_weight expects int8 [Cout, Cin/g, kh, kw], got {w.dtype} {tuple(w.shape)}")
    return w.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------- int4
def int4_num_groups(K: int, group_size: int) -> int:
    return (K + group_size - 1) // group_size


def pack_int4(w_int4: torch.Tensor, group_size: Optional[int] = None, signed: bool = True) -> torch.Tensor:
    """Pack int4 values ``[N, K]`` two per byte along K -> uint8 ``[N, ceil(K/2)]``.

    ``signed=True``: values in [-8, 7], stored as code ``q = v + 8`` (so the kernels' default zero
    point 8 recovers ``v``). ``signed=False``: codes in [0, 15] stored as they are (pass the zero
    points to the op). ``group_size`` (optional) is only validated (positive multiple of 32, what
    the kernels accept); scales are passed to the op separately, shape ``[N, ceil(K/group)]``.
    An odd K leaves the high nibble of the last byte zero.
    """
    if w_int4.dim() != 2 or w_int4.is_floating_point() or w_int4.is_complex():
        raise ValueError("pack_int4 expects an integer [N, K] tensor")
    if group_size is not None and (group_size <= 0 or group_size % 32):
        raise ValueError(f"group_size must be a positive multiple of 32, got {group_size}")
    v = w_int4.to(torch.int16)
    lo, hi = (-8, 7) if signed else (0, 15)
    if v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
        raise ValueError(f"int4 values out of range [{lo}, {hi}]")
    q = (v + 8) if signed else v
    n, k = q.shape
    if k % 2:
        q = torch.cat([q, q.new_zeros((n, 1))], dim=1)
    q = q.reshape(n, -1, 2)
    return (q[..., 0] | (q[..., 1] << 4)).to(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor, K: Optional[int] = None, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[N, ceil(K/2)]`` -> int8 ``[N, K]`` values
    (signed: ``code - 8`` in [-8, 7]; unsigned: the codes 0..15)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError("unpack_int4 expects a uint8 [N, K/2] tensor")
    p = packed.to(torch.int16)
    q = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(packed.shape[0], -1)
    if K is not None:
        q = q[:, :K]
    if signed:
        q = q - 8
    return q.to(torch.int8)


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = True
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Round-to-nearest group-wise int4 quantization of a float ``[N, K]`` weight.

    Returns ``(w_packed uint8 [N, ceil(K/2)], scales fp32 [N, G], zeros fp32 [N, G] or None)``
    with ``G = ceil(K/group_size)``, ready for ``int4_weight_only_linear``. Symmetric: codes
    ``q = clamp(round(w/s), -8, 7) + 8``, zero None (the kernel uses 8). Asymmetric: ``q = clamp(
    round(w/s) + z, 0, 15)`` with integer ``z``.
    """
    if w.dim() != 2:
        raise ValueError("quantize_int4 expects [N, K]")
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"group_size must be a positive multiple of 32, got {group_size}")
    n, k = w.shape
    g = int4_num_groups(k, group_size)
    wf = w.float()
    pad = g * group_size - k
    wg = torch.cat([wf, wf.new_zeros(n, pad)], 1).reshape(n, g, group_size) if pad else wf.reshape(n, g, group_size)
    if symmetric:
        amax = wg.abs().amax(-1)
        s = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
        q = torch.clamp(torch.round(wg / s[..., None]), -8, 7)
        codes = q.reshape(n, -1)[:, :k].to(torch.int8)
        return pack_int4(codes, group_size, signed=True), s, None
    lo = torch.minimum(wg.amin(-1), torch.zeros(()))
    hi = torch.maximum(wg.amax(-1), torch.zeros(()))
    s = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
    z = torch.clamp(torch.round(-lo / s), 0, 15)
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 15)
    codes = q.reshape(n, -1)[:, :k].to(torch.int8)
    return pack_int4(codes, group_size, signed=False), s, z


# ---------------------------------------------------------------------------------------- 1-bit
def pack_bits(sign_tensor: torch.Tensor) -> torch.Tensor:
    """Pack signs along the last dim, 32 per int32 word, LSB first: ``[..., K] -> int32
    [..., ceil(K/32)]``. Bit = 1 for negative entries (-1), 0 for >= 0 (+1); padding bits are 0."""
    if sign_tensor.dim() < 1:
        raise ValueError("pack_bits expects at least one dimension")
    k = sign_tensor.shape[-1]
    words = (k + 31) // 32
    bits = (sign_tensor < 0).to(torch.int64)
    pad = words * 32 - k
    if pad:
        bits = torch.cat([bits, bits.new_zeros(*bits.shape[:-1], pad)], dim=-1)
    bits = bits.reshape(*bits.shape[:-1], words, 32)
    weights = torch.ones(32, dtype=torch.int64, device=bits.device) << torch.arange(32, device=bits.device)
    v = (bits * weights).sum(-1)                       # unsigned value in [0, 2^32)
    v = torch.where(v >= 2 ** 31, v - 2 ** 32, v)      # reinterpret as two's-complement int32
    return v.to(torch.int32).contiguous()


def unpack_bits(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 ``[..., ceil(K/32)]`` -> int8 ±1 ``[..., K]``."""
    if packed.dtype != torch.int32:
        raise ValueError("unpack_bits expects int32 words")
    if packed.shape[-1] * 32 < K:
        raise ValueError(f"{packed.shape[-1]} words cannot hold K={K} bits")
    shifts = torch.arange(32, device=packed.device)
    bits = (packed.to(torch.int64)[..., None] >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :K]
    return (1 - 2 * bits).to(torch.int8)
