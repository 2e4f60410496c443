"""Dynamic quantization modules: int8 weights quantized once, activations quantized per batch.

* :class:`DynamicQuantLinear` -- *not a graph form*: no rule produces it.  The ``dynamic`` family
  writes PT2E's dynamic form instead, ``linear(dyn_q(x), fq_w(W), b)`` (graph nodes; see
  :func:`dynamic_linear_quantizers`), and ``lower`` turns that into ``dynamic_int8_linear``.  It is
  kept as an eager, exact-integer reference of the same numbers: ``benchmarks/kernels.py`` times
  it as the eager baseline of ``dynamic_int8_linear``, and tests compare the graph form with it.
  A linear layer whose weight is stored as an integer tensor
  (per-output-channel symmetric, narrow range, e.g. ``[-127, 127]``) with one fp32 scale per
  channel, computed once when the module is built.  At every call the activation's range is
  measured on the batch itself (per tensor, or per token = per row of the ``[..., K]`` input),
  the activation is quantized to ``a_bits`` (affine with a zero-point by default), and the
  product is accumulated exactly on integers:
  ``y[m, n] = s_x[m] * s_w[n] * sum_k (x_q[m, k] - z[m]) * w_q[n, k] + b[n]``.
  The activation is quantized by one ``torch.ops.qpasses.quantize_per_token`` call (per tensor:
  on the input flattened to one row), the op :mod:`qpasses.numerics.qops` defines.
* :func:`dynamic_fake_quant` -- quantize-dequantize on the fly, with qparams taken from the
  current tensor, as the graph's dynamic quantizer node computes it (one custom op call, see
  :func:`~qpasses.qnodes.dynamic_quantizer_call`; no module holds it): ``reduce_dim=None`` is per
  tensor (``qpasses::fake_quant_dynamic_per_tensor``), ``reduce_dim=-1`` one range per row
  (``qpasses::fake_quant_per_token``), ``reduce_dim=-2`` one range per column, the right operand
  of a matmul (``qpasses::fake_quant_dynamic_per_slice``).  Used on both inputs of activation x
  activation ``matmul`` / ``bmm``: a row scale of the left operand and a column scale of the right
  one factor out of the sum over ``k``, so the emulation equals an integer GEMM with a float
  epilogue.

Exactness of the accumulation. On the CPU (and on CUDA where cuBLASLt accepts the shape) the
product is ``torch._int_mm``: int8 x int8 -> int32, exact -- where it is. On CPUs without
AVX-512 VNNI it is not (torch 2.13, oneDNN at ``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` or ``AVX2``:
results off by thousands, as from pairs of u8 x s8 products summed in saturating int16).
:func:`int_mm_is_exact` probes the running process once with operands that saturate such a
kernel; where it fails, the float route below is used instead. Affine 8-bit activations (codes
0..255) are fed as ``x_q - 128`` and the offset is added back through the weight's column sums,
``sum_k (x_q - z) w = sum_k (x_q - 128) w + (128 - z) sum_k w``, in int64. Elsewhere the integer
operands are held in fp32 and multiplied with the float GEMM; every partial sum is an integer of
magnitude at most ``K * 2**(a_bits) * 2**(w_bits-1)``, exact in fp32 while it stays below
``2**24`` (``K <= 512`` at 8/8 bits). Larger ``K`` are split into chunks of at most that size,
each an exact fp32 GEMM, summed in fp64 (exact below ``2**53``). Both routes compute the same
integer GEMM and apply the same float epilogue, so they give identical outputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ...numerics.qparams import dynamic_qparams  # noqa: F401  re-exported here (its home is numerics)

__all__ = ["DynamicQuantLinear", "dynamic_fake_quant", "dynamic_linear_quantizers", "LINEAR_TARGETS", "dynamic_qparams", "quantize_dynamic", "dynamic_range",
           "quantize_weight_per_channel", "GRANULARITIES", "int_mm_is_exact"]

GRANULARITIES = ("per_tensor", "per_token")
_FP32_EXACT = float(2 ** 24)
_INT_MM_EXACT = {}
_QOPS = torch.ops.qpasses


def dynamic_range(bits: int, symmetric: bool):
    """``(qmin, qmax)`` of dynamic activations: signed narrow when symmetric, else unsigned."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def quantize_dynamic(x: torch.Tensor, bits: int, symmetric: bool, per_token: bool):
    """``(codes, scale, zero_point, qmin, qmax)`` of ``x`` quantized with qparams measured on itself.

    One ``torch.ops.qpasses.quantize_per_token`` call: per token (one range per row of the last
    dim; scale and zero point ``[..., 1]``), or per tensor (the whole tensor as one row; 0-d
    scale and zero point).  Codes are int32, the qparams float32 -- the numbers of
    :func:`~qpasses.numerics.qparams.dynamic_qparams` and ``clamp(round(x / scale) + zp, qmin, qmax)``.
    """
    qmin, qmax = dynamic_range(bits, symmetric)
    if per_token:
        codes, scale, zp = _QOPS.quantize_per_token.default(x, qmin, qmax, symmetric)
        return codes, scale, zp.float(), qmin, qmax
    codes, scale, zp = _QOPS.quantize_per_token.default(x.reshape(1, -1), qmin, qmax, symmetric)
    return codes.reshape(x.shape), scale.reshape(()), zp.float().reshape(()), qmin, qmax


def int_mm_is_exact(device: str = "cpu") -> bool:
    """Whether ``torch._int_mm`` gives exact int32 products on ``device`` in this process.

    Checked once per device type against an int64 reference, on operands with the extreme
    codes (-128 and 127 side by side, where a kernel that sums u8 x s8 pairs in int16
    saturates) and random ones, at a few shapes (a single row, odd rows, a longer K).
    """
    hit = _INT_MM_EXACT.get(device)
    if hit is None:
        hit = True
        g = torch.Generator().manual_seed(0)
        try:
            for m, k, n in ((1, 64, 32), (17, 64, 48), (33, 256, 64)):
                a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
                b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
                a[0, 0::2], a[0, 1::2] = 127, -128
                b[0::2, 0], b[1::2, 0] = 127, -128
                b[:, -1] = 127
                got = torch._int_mm(a.to(device), b.to(device)).cpu().to(torch.int64)
                if not torch.equal(got, a.to(torch.int64) @ b.to(torch.int64)):
                    hit = False
                    break
        except RuntimeError:  # no int8 GEMM for these shapes here
            hit = False
        _INT_MM_EXACT[device] = hit
    return hit


def quantize_weight_per_channel(w: torch.Tensor, bits: int = 8):
    """Symmetric narrow-range per-output-channel (axis 0) quantization: (int8 weight, fp32 scale [N])."""
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be in [2, 8] for an int8 container, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w2 = w.detach().float().reshape(w.shape[0], -1)
    scale = torch.clamp(w2.abs().amax(dim=1) / qmax, min=torch.finfo(torch.float32).eps)
    q = torch.clamp(torch.round(w2 / scale[:, None]), -qmax, qmax).to(torch.int8)
    return q.reshape(w.shape), scale


class DynamicQuantLinear(nn.Module):
    """``y = x W^T + b`` with an integer weight (quantized once) and per-batch activation qparams.

    Args:
        weight: float ``[N, K]`` weight; quantized here and not kept.
        bias: float ``[N]`` or None.
        w_bits / a_bits: bit-widths (2..8).
        granularity: ``"per_tensor"`` (one activation scale per call) or ``"per_token"`` (one per row).
        symmetric: symmetric signed activations instead of affine unsigned ones.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], w_bits: int = 8, a_bits: int = 8,
                 granularity: str = "per_token", symmetric: bool = False):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"DynamicQuantLinear needs a 2-D weight, got {tuple(weight.shape)}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if not 2 <= a_bits <= 8:
            raise ValueError(f"a_bits must be in [2, 8], got {a_bits}")
        q, s = quantize_weight_per_channel(weight, w_bits)
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", s)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        self.granularity = granularity
        self.symmetric = bool(symmetric)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_q.float() * self.weight_scale[:, None]

    def quantize_input(self, x: torch.Tensor):
        """(x_q as integer-valued float, scale, zero_point) with this module's granularity."""
        codes, scale, zp, _, _ = quantize_dynamic(x.float(), self.a_bits, self.symmetric,
                                                  self.granularity == "per_token")
        return codes.float(), scale, zp

    def _weight_t(self) -> torch.Tensor:
        """The integer weight, transposed, as fp32 (cached; exact: |w_q| <= 127)."""
        cache = self.__dict__.get("_wt_cache")
        if cache is None or cache[0] is not self.weight_q or cache[1].device != self.weight_q.device:
            cache = (self.weight_q, self.weight_q.t().float().contiguous())
            self.__dict__["_wt_cache"] = cache
        return cache[1]

    def _int8_operands(self):
        """The int8 weight as the ``[K, N]`` right operand of ``torch._int_mm`` and its column
        sums (int64 ``[N]``), cached."""
        cache = self.__dict__.get("_i8_cache")
        if cache is None or cache[0] is not self.weight_q or cache[1].device != self.weight_q.device:
            cache = (self.weight_q, self.weight_q.t().contiguous(), self.weight_q.sum(1, dtype=torch.int64))
            self.__dict__["_i8_cache"] = cache
        return cache[1], cache[2]

    def _use_int_mm(self, rows: int) -> bool:
        dev = self.weight_q.device.type
        if dev == "cpu":
            return int_mm_is_exact("cpu")
        # cuBLASLt's int8 GEMM: more than 16 rows, K and N multiples of 8
        return dev == "cuda" and rows > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        codes, scale, zp, qmin, qmax = quantize_dynamic(xf, self.a_bits, self.symmetric,
                                                        self.granularity == "per_token")
        bound = self.in_features * float(2 ** self.a_bits) * float(2 ** (self.w_bits - 1))
        lead = xf.shape[:-1]
        rows = xf.numel() // max(self.in_features, 1)
        if self.in_features > 0 and self._use_int_mm(rows):
            # codes in [qmin, qmax]; shifted into int8 when they are unsigned 8-bit
            shift = 128 if qmax > 127 else 0
            x8 = (codes - shift).to(torch.int8).reshape(rows, self.in_features)
            w8t, colsum = self._int8_operands()
            acc = torch._int_mm(x8, w8t)                                # int32 [rows, N], exact
            offset = (shift - zp).reshape(-1, 1)                        # [1 or rows, 1], integers
            if bound < _FP32_EXACT:                                     # everything below 2**24: fp32 exact
                y = acc.float()
                y += offset * colsum.float()
            elif self.in_features * (128 * 127 + 255 * 127) < 2 ** 31:   # int32 cannot overflow
                acc += offset.to(torch.int32) * colsum.to(torch.int32)
                y = acc.float()
            else:
                y = (acc.to(torch.int64) + offset.to(torch.int64) * colsum).float()
            y = y.reshape(*lead, self.out_features)
            y *= scale * self.weight_scale                             # in place: one pass per step
            if self.bias is not None:
                y += self.bias
            return y.to(x.dtype)
        # x_q - z: integers in [-(2^a - 1), 2^a - 1], exact in fp32
        centred = codes.float() - zp
        if bound < _FP32_EXACT:
            acc = torch.matmul(centred, self._weight_t())            # exact integer sums in fp32
            y = acc * (scale * self.weight_scale)
        else:
            # split K so that every fp32 partial GEMM stays exact; sum the partials in fp64 (exact)
            chunk = max(1, int(_FP32_EXACT // (float(2 ** self.a_bits) * float(2 ** (self.w_bits - 1)))) - 1)
            wt = self._weight_t()
            acc = None
            for k0 in range(0, self.in_features, chunk):
                part = torch.matmul(centred[..., k0:k0 + chunk], wt[k0:k0 + chunk]).double()
                acc = part if acc is None else acc + part
            y = acc.float() * (scale * self.weight_scale)       # one rounding of the exact sum
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, granularity={self.granularity!r}, symmetric={self.symmetric}")


def dynamic_fake_quant(x: torch.Tensor, bits: int = 8, symmetric: bool = False,
                       reduce_dim: Optional[int] = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with qparams measured on itself (eagerly): the one op call
    :func:`~qpasses.qnodes.dynamic_quantizer_call` puts in a graph -- per tensor
    (``reduce_dim=None``), per token (``-1``: one range per row) or one range per slice reduced over
    ``reduce_dim`` (``-2``: per column of a matmul's right operand)."""
    from ...qnodes import dynamic_quantizer_call
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    op, consts = dynamic_quantizer_call(int(bits), bool(symmetric), reduce_dim)
    return op(x, *consts)


#: the call targets of a functional linear (the graph form of ``dynamic_int8``'s linears)
LINEAR_TARGETS = (torch.nn.functional.linear, torch.ops.aten.linear.default)


def dynamic_linear_quantizers(modules, node):
    """``(DynamicQuantizer, weight FakeQuantize, input node, weight node)`` when ``node`` is
    ``dynamic_int8``'s linear -- ``linear(dyn_q(x), fq_w(W), b)`` with ``dyn_q`` a dynamic quantizer
    op node (:func:`~qpasses.qnodes.is_dynamic_quantizer`) and ``fq_w`` a holder-backed (or module)
    ``FakeQuantize`` -- else None.  ``modules``: a GraphModule or its ``named_modules()`` dict."""
    from ...numerics import FakeQuantize
    from ...qnodes import is_dynamic_quantizer, quantizer_module
    if getattr(node, "op", None) != "call_function" or node.target not in LINEAR_TARGETS:
        return None
    x = node.args[0] if node.args else node.kwargs.get("input")
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    dq = is_dynamic_quantizer(x)
    wq = quantizer_module(modules, w, (FakeQuantize,)) if w is not None else None
    if dq is None or not isinstance(wq, FakeQuantize):
        return None
    return dq, wq, x, w
