"""``torch.library`` custom ops (namespace ``qpasses``) for the integer kernels.

Every op has
* a fake (meta) implementation, so graphs that call it trace, ``torch.export`` and
  ``torch.compile`` without running it;
* a reference implementation in pure torch integer arithmetic (``qpasses.kernels.reference``),
  used on the CPU and on any device where Triton is not used, so a lowered graph runs everywhere;
* a Triton implementation (``triton_int8`` / ``triton_int4`` / ``triton_binary``), used on CUDA.

Which one runs is decided per call by :func:`use_triton` (device + policy):

=================  =====================================================================
policy             behaviour
=================  =====================================================================
``auto`` (default) Triton on CUDA tensors when Triton imports; reference elsewhere
``always``/``1``   also run the Triton kernels on CPU tensors -- needs ``TRITON_INTERPRET=1``
                   (the Triton interpreter); used by the tests
``never``/``0``    reference everywhere
=================  =====================================================================

The policy is the environment variable ``QPASSES_TRITON`` (read at each call), overridden in
process by the :func:`triton_policy` context manager / :func:`set_triton_policy`.

Ops (``torch.ops.qpasses.<name>``), exact schemas in ``SCHEMAS``:

``int8_linear``, ``int8_linear_requant``, ``int8_conv2d``, ``int8_conv2d_requant``,
``dynamic_int8_linear``, ``int4_weight_only_linear``, ``binary_linear``, ``fp8_linear``,
``dynamic_fp8_linear`` (float8 e4m3 operands; the Triton kernel needs an sm_89+ GPU, older
GPUs run the reference).
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference as ref

__all__ = [
    "int8_linear", "int8_linear_requant", "int8_conv2d", "int8_conv2d_requant", "dynamic_int8_linear",
    "int4_weight_only_linear",
    "binary_linear", "fp8_linear", "dynamic_fp8_linear", "use_triton", "triton_policy", "set_triton_policy", "triton_available", "SCHEMAS",
    "MAX_K_INT8", "MAX_K_INT8_ZP", "XNOR_MAX_M",
]

# int32 accumulator bounds: |x| <= 128 (255 with a zero point), |w| <= 128.
MAX_K_INT8 = (2 ** 31 - 1) // (128 * 128)
MAX_K_INT8_ZP = (2 ** 31 - 1) // (255 * 128)
XNOR_MAX_M = 16          # packed ±1 activations with M <= this use the XNOR-popcount kernel

SCHEMAS = {
    "int8_linear": "(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, "
                   "str activation=\"none\", ScalarType out_dtype=float, int x_zp=0) -> Tensor",
    "int8_linear_requant": "(Tensor x_q, int x_zp, Tensor w_q, Tensor? bias_int32, Tensor M0, Tensor shift, "
                           "int out_zp=0, int qmin=-128, int qmax=127) -> Tensor",
    "int8_conv2d": "(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, int[2] stride=1, "
                   "int[2] padding=0, int[2] dilation=1, int groups=1, str activation=\"none\", "
                   "ScalarType out_dtype=float, int x_zp=0) -> Tensor",
    "int8_conv2d_requant": "(Tensor x_q, int x_zp, Tensor w_q, Tensor? bias_int32, Tensor M0, Tensor shift, "
                           "int out_zp=0, int qmin=-128, int qmax=127, int[2] stride=1, int[2] padding=0, "
                           "int[2] dilation=1, int groups=1) -> Tensor",
    "dynamic_int8_linear": "(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, int a_bits=8, "
                           "bool symmetric=False, bool per_token=True, ScalarType? out_dtype=None) -> Tensor",
    "int4_weight_only_linear": "(Tensor x, Tensor w_packed, Tensor scales, Tensor? zeros, int group_size, "
                               "Tensor? bias=None) -> Tensor",
    "binary_linear": "(Tensor x, Tensor w_packed, int K, Tensor? alpha=None, Tensor? bias=None, "
                     "bool x_packed=False) -> Tensor",
    "fp8_linear": "(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, "
                  "ScalarType out_dtype=float) -> Tensor",
    "dynamic_fp8_linear": "(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, ScalarType? out_dtype=None) -> Tensor",
}

# ================================================================================ dispatch policy
_POLICY_OVERRIDE: Optional[str] = None
_ALWAYS = ("1", "always", "on", "true", "yes")
_NEVER = ("0", "never", "off", "false", "no")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _policy() -> str:
    p = _POLICY_OVERRIDE if _POLICY_OVERRIDE is not None else os.environ.get("QPASSES_TRITON", "auto")
    p = str(p).strip().lower()
    if p in _ALWAYS:
        return "always"
    if p in _NEVER:
        return "never"
    return "auto"


def set_triton_policy(policy: Optional[str]) -> None:
    """Set the in-process policy (``"auto"``, ``"always"``, ``"never"``); ``None`` returns to the
    ``QPASSES_TRITON`` environment variable."""
    global _POLICY_OVERRIDE
    _POLICY_OVERRIDE = policy


@contextlib.contextmanager
def triton_policy(policy: Optional[str]):
    """Context manager form of :func:`set_triton_policy`."""
    global _POLICY_OVERRIDE
    old = _POLICY_OVERRIDE
    _POLICY_OVERRIDE = policy
    try:
        yield
    finally:
        _POLICY_OVERRIDE = old


def use_triton(device) -> bool:
    """Whether an op called on tensors on ``device`` runs its Triton kernel (see module doc).

    Raises if the policy forces Triton on a CPU tensor without ``TRITON_INTERPRET=1``."""
    policy = _policy()
    if policy == "never":
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return triton_available()
    if dev.type == "cpu" and policy == "always":
        if not triton_available():
            raise RuntimeError("QPASSES_TRITON=always but triton is not installed")
        if not _interpreter_on():
            raise RuntimeError("running the Triton kernels on CPU tensors needs the Triton interpreter: "
                               "set TRITON_INTERPRET=1 (or use QPASSES_TRITON=auto for the CPU reference)")
        return True
    return False


def _kmod(name: str):
    """The Triton kernel module ``name``, (re)built for the current interpreter setting: Triton
    decides interpreted-vs-compiled when a kernel is decorated, so a module imported in the other
    mode is reloaded."""
    mod = importlib.import_module(f"{__package__}.{name}")
    import triton
    if bool(getattr(mod, "INTERPRET", None)) != bool(triton.knobs.runtime.interpret):
        if name != "triton_int8":
            _kmod("triton_int8")
        mod = importlib.reload(mod)
    return mod


# ================================================================================ validation
def _check(cond, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _act(activation: str) -> None:
    _check(activation in ref.ACTIVATIONS, f"activation must be one of {ref.ACTIVATIONS}, got {activation!r}")


def _float_out(out_dtype) -> None:
    _check(out_dtype in ref.FLOAT_OUT_DTYPES, f"out_dtype must be one of {ref.FLOAT_OUT_DTYPES}, got {out_dtype}")


def _vec(t: Tensor, n, name: str, allow_scalar: bool = True) -> None:
    ok = t.numel() == n or (allow_scalar and t.numel() == 1)
    _check(ok, f"{name} must have {n}{' or 1' if allow_scalar else ''} elements, got shape {tuple(t.shape)}")


def _requant_args(M0: Tensor, shift: Tensor, n, qmin: int, qmax: int, out_zp: int) -> None:
    _check(not M0.is_floating_point() and not shift.is_floating_point(), "M0 and shift must be integer tensors")
    _vec(M0, n, "M0")
    _vec(shift, n, "shift")
    _check(M0.numel() == shift.numel(), "M0 and shift must have the same number of elements")
    _check(-128 <= qmin <= qmax <= 127, f"need -128 <= qmin <= qmax <= 127, got [{qmin}, {qmax}]")
    _check(-128 <= out_zp <= 127, f"out_zp must be in [-128, 127], got {out_zp}")


def _linear_common(x_q: Tensor, w_q: Tensor, zp_path: bool):
    _check(x_q.dtype == torch.int8, f"x_q must be int8, got {x_q.dtype}")
    _check(x_q.dim() >= 1, "x_q must have at least one dimension")
    _check(w_q.dtype == torch.int8 and w_q.dim() == 2, f"w_q must be a prepacked int8 [N, Kp] tensor, got "
                                                       f"{w_q.dtype} {tuple(w_q.shape)}")
    K = x_q.shape[-1]
    _check(w_q.shape[1] >= K, f"w_q has {w_q.shape[1]} columns < K={K}")
    limit = MAX_K_INT8_ZP if zp_path else MAX_K_INT8
    _check(K <= limit, f"K={K} exceeds {limit}: the int32 accumulator could overflow")
    return K, w_q.shape[0]


def _conv_common(x_q: Tensor, w_q: Tensor, stride, padding, dilation, groups: int, zp_path: bool):
    _check(x_q.dtype == torch.int8 and x_q.dim() == 4, f"x_q must be int8 [N, C, H, W], got {x_q.dtype} "
                                                       f"{tuple(x_q.shape)}")
    _check(w_q.dtype == torch.int8 and w_q.dim() == 4, "w_q must be int8 [Cout, Cin/groups, kh, kw]")
    _check(len(stride) == 2 and len(padding) == 2 and len(dilation) == 2, "stride/padding/dilation need 2 values")
    _check(min(stride) >= 1 and min(dilation) >= 1 and min(padding) >= 0, "bad stride/padding/dilation")
    n, c, h, w = x_q.shape
    cout, cin_g, kh, kw = w_q.shape
    _check(groups >= 1 and c % groups == 0 and cout % groups == 0, f"groups={groups} must divide C={c} and Cout={cout}")
    _check(cin_g == c // groups, f"weight has {cin_g} input channels per group, expected {c // groups}")
    K = cin_g * kh * kw
    limit = MAX_K_INT8_ZP if zp_path else MAX_K_INT8
    _check(K <= limit, f"reduction size {K} exceeds {limit}: the int32 accumulator could overflow")
    oh = ref.conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = ref.conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    _check(oh >= 1 and ow >= 1, "convolution output would be empty")
    return n, cout, oh, ow


def _conv_out(x_q: Tensor, shape, dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=x_q.device, memory_format=torch.channels_last)


# ================================================================================ int8 linear
def _scaled_rows(x_q: Tensor, K: int, N: int, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor]):
    """Check a scaled GEMM's per-row / per-column vectors; ``(leading dims, x as [M, K])``."""
    lead = x_q.shape[:-1]
    M = math.prod(lead)
    _vec(x_scale, M, "x_scale")
    _vec(w_scale, N, "w_scale")
    if bias is not None:
        _vec(bias, N, "bias", allow_scalar=False)
    return lead, x_q.reshape(M, K)


@torch.library.custom_op("qpasses::int8_linear", mutates_args=(), schema=SCHEMAS["int8_linear"])
def int8_linear(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                activation: str = "none", out_dtype: torch.dtype = torch.float32, x_zp: int = 0) -> Tensor:
    """int8 x int8 -> int32 GEMM with a fused float epilogue.

    Args:
        x_q: int8 ``[..., K]`` quantized activations (``M`` = product of leading dims).
        x_scale: fp32 ``[M]`` (per row / per token, may also be shaped like ``x_q.shape[:-1]``) or
            ``[1]`` (per tensor).
        w_q: prepacked int8 weight ``[N, Kp]``, ``Kp >= K`` (``packing.pack_int8_weight``); only
            the first K columns are read.
        w_scale: fp32 ``[N]`` (per output channel) or ``[1]``.
        bias: fp32 ``[N]`` or None.
        activation: ``"none"``, ``"relu"`` or ``"relu6"``.
        out_dtype: ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``.
        x_zp: activation zero point in [-128, 127] (affine activations; default 0 = symmetric).

    Returns ``act(acc[m, n] * x_scale[m] * w_scale[n] + bias[n])`` as ``out_dtype [..., N]``, with
    ``acc = sum_k (x_q[m, k] - x_zp) * w_q[n, k]`` exact in int32 (K <= ``MAX_K_INT8``, or
    ``MAX_K_INT8_ZP`` with a zero point); the epilogue is fp32 in that order.
    """
    _check(-128 <= x_zp <= 127, f"x_zp must be in [-128, 127], got {x_zp}")
    K, N = _linear_common(x_q, w_q, x_zp != 0)
    _act(activation)
    _float_out(out_dtype)
    lead, x2 = _scaled_rows(x_q, K, N, x_scale, w_scale, bias)
    if use_triton(x_q.device):
        y = _kmod("triton_int8").linear(x2, x_scale, w_q, w_scale, bias, activation, out_dtype, x_zp=x_zp)
    else:
        y = ref.int8_linear(x2, x_scale, w_q, w_scale, bias, activation, out_dtype, x_zp)
    return y.reshape(*lead, N)


@int8_linear.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, activation="none", out_dtype=torch.float32, x_zp=0):
    K, N = _linear_common(x_q, w_q, x_zp != 0)
    _act(activation)
    _float_out(out_dtype)
    return x_q.new_empty((*x_q.shape[:-1], N), dtype=out_dtype)


# ================================================================================ dynamic int8 linear
def _dynamic_common(x: Tensor, w_q: Tensor, a_bits: int, out_dtype):
    _check(x.is_floating_point(), f"x must be a floating-point tensor, got {x.dtype}")
    _check(x.dim() >= 1, "x must have at least one dimension")
    _check(w_q.dtype == torch.int8 and w_q.dim() == 2, f"w_q must be a prepacked int8 [N, Kp] tensor, got "
                                                       f"{w_q.dtype} {tuple(w_q.shape)}")
    _check(2 <= int(a_bits) <= 8, f"a_bits must be in [2, 8], got {a_bits}")
    K = x.shape[-1]
    _check(w_q.shape[1] >= K, f"w_q has {w_q.shape[1]} columns < K={K}")
    _check(K <= MAX_K_INT8_ZP, f"K={K} exceeds {MAX_K_INT8_ZP}: the int32 accumulator could overflow")
    od = x.dtype if out_dtype is None else out_dtype
    _float_out(od)
    return K, w_q.shape[0], od


@torch.library.custom_op("qpasses::dynamic_int8_linear", mutates_args=(), schema=SCHEMAS["dynamic_int8_linear"])
def dynamic_int8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], a_bits: int = 8,
                        symmetric: bool = False, per_token: bool = True,
                        out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Dynamic quantization's linear: activations quantized from their own range at every call.

    Args:
        x: float ``[..., K]`` activations (``M`` = product of leading dims).
        w_q: prepacked int8 weight ``[N, Kp]`` (``packing.pack_int8_weight``), symmetric codes.
        w_scale: fp32 ``[N]`` or ``[1]``.
        bias: fp32 ``[N]`` or None.
        a_bits: activation bits (2..8).
        symmetric: signed narrow-range activations (zero point 0) instead of affine unsigned ones.
        per_token: one activation range per row of ``x`` (else one for the whole tensor).
        out_dtype: output dtype (default: ``x.dtype``).

    Each row is quantized as :func:`~qpasses.methods.dynamic.lib.dynamic_fake_quant` quantizes it
    (:func:`~qpasses.kernels.reference.dynamic_quantize_int8`), then
    ``y[m, n] = (acc[m, n] * x_scale[m]) * w_scale[n] + bias[n]`` with
    ``acc = sum_k (x_q[m, k] - x_zp[m]) * w_q[n, k]`` exact in int32; on CUDA the GEMM is the
    Triton int8 kernel with one zero point per row.
    """
    K, N, od = _dynamic_common(x, w_q, a_bits, out_dtype)
    _vec(w_scale, N, "w_scale")
    if bias is not None:
        _vec(bias, N, "bias", allow_scalar=False)
    lead = x.shape[:-1]
    M = math.prod(lead)
    if M == 0 or K == 0:            # nothing to measure a range on: the product is empty / zero
        y = torch.zeros((M, N), dtype=torch.float32, device=x.device)
        if bias is not None:
            y = y + bias.reshape(-1).to(torch.float32)
        return y.to(od).reshape(*lead, N)
    kmod = _kmod("triton_int8") if use_triton(x.device) else None
    if kmod is not None and per_token:   # one fused pass: row range, scale, zero point, codes
        x8, xs, xzp = kmod.quantize_rows(x.reshape(M, K), int(a_bits), bool(symmetric))
    else:
        x8, xs, xzp = ref.dynamic_quantize_int8(x.reshape(M, K), a_bits, symmetric, per_token)
    if kmod is not None:
        y = kmod.linear(x8, xs, w_q, w_scale, bias, "none", od, x_zp_rows=xzp)
    else:
        y = ref.int8_linear_rows_zp(x8, xs, w_q, w_scale, bias, "none", od, xzp)
    return y.reshape(*lead, N)


@dynamic_int8_linear.register_fake
def _(x, w_q, w_scale, bias, a_bits=8, symmetric=False, per_token=True, out_dtype=None):
    K, N, od = _dynamic_common(x, w_q, a_bits, out_dtype)
    return x.new_empty((*x.shape[:-1], N), dtype=od)


@torch.library.custom_op("qpasses::int8_linear_requant", mutates_args=(), schema=SCHEMAS["int8_linear_requant"])
def int8_linear_requant(x_q: Tensor, x_zp: int, w_q: Tensor, bias_int32: Optional[Tensor], M0: Tensor,
                        shift: Tensor, out_zp: int = 0, qmin: int = -128, qmax: int = 127) -> Tensor:
    """Integer-only int8 linear (Jacob et al. 2018 / gemmlowp / TFLite semantics).

    Args:
        x_q: int8 ``[..., K]`` activations with zero point ``x_zp`` (in [-128, 127]).
        w_q: prepacked int8 ``[N, Kp]`` symmetric weights (zero point 0).
        bias_int32: int32 ``[N]`` in the accumulator scale (``s_x * s_w``) or None.
        M0, shift: integer ``[N]`` (per output channel) or ``[1]``: the real multiplier
            ``s_x * s_w / s_out = M0 * 2**-31 * 2**-shift`` (``M0`` in [2**30, 2**31)).
        out_zp, qmin, qmax: output zero point and clamp range (fold ReLU/ReLU6 into qmin/qmax).

    Returns int8 ``[..., N]``: ``clamp(MBQM(acc + bias, M0, shift) + out_zp, qmin, qmax)`` with
    ``acc = sum_k (x_q - x_zp) * w_q`` in int32 (K <= ``MAX_K_INT8_ZP``) and MBQM the gemmlowp
    SaturatingRoundingDoublingHighMul + RoundingDivideByPOT (negative shift = saturating left shift).
    """
    K, N = _linear_common(x_q, w_q, True)
    _requant_args(M0, shift, N, qmin, qmax, out_zp)
    _check(-128 <= x_zp <= 127, f"x_zp must be in [-128, 127], got {x_zp}")
    if bias_int32 is not None:
        _check(bias_int32.dtype == torch.int32, "bias_int32 must be int32")
        _vec(bias_int32, N, "bias_int32", allow_scalar=False)
    lead = x_q.shape[:-1]
    x2 = x_q.reshape(-1, K)
    if use_triton(x_q.device):
        y = _kmod("triton_int8").linear(x2, None, w_q, None, bias_int32, "none", torch.int8,
                                        requant=(x_zp, M0, shift, out_zp, qmin, qmax))
    else:
        y = ref.int8_linear_requant(x2, x_zp, w_q, bias_int32, M0, shift, out_zp, qmin, qmax)
    return y.reshape(*lead, N)


@int8_linear_requant.register_fake
def _(x_q, x_zp, w_q, bias_int32, M0, shift, out_zp=0, qmin=-128, qmax=127):
    K, N = _linear_common(x_q, w_q, True)
    return x_q.new_empty((*x_q.shape[:-1], N), dtype=torch.int8)


# ================================================================================ int8 conv2d
@torch.library.custom_op("qpasses::int8_conv2d", mutates_args=(), schema=SCHEMAS["int8_conv2d"])
def int8_conv2d(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
                groups: int = 1, activation: str = "none", out_dtype: torch.dtype = torch.float32,
                x_zp: int = 0) -> Tensor:
    """int8 conv2d (implicit GEMM on channels-last data) with the float epilogue of ``int8_linear``.

    Args:
        x_q: int8 ``[N, C, H, W]`` in NCHW or channels-last (NHWC) memory; converted to
            channels-last internally (free when already so).
        x_scale: fp32 ``[1]`` (per-tensor activation scale).
        w_q: int8 ``[Cout, C/groups, kh, kw]``, ideally prepacked by
            ``packing.pack_int8_conv_weight`` (channels-last = OHWI bytes).
        w_scale: fp32 ``[Cout]`` or ``[1]``; bias: fp32 ``[Cout]`` or None.
        stride, padding, dilation: two ints each; groups: any divisor of C and Cout
            (depthwise, ``C/groups == 1``, uses a direct kernel; other groups the implicit GEMM
            with groups as a grid axis). Zero padding.
        activation, out_dtype: as for ``int8_linear``.
        x_zp: activation zero point; the border is padded with ``x_zp`` (real 0), so
            ``acc = sum (x_q - x_zp) * w_q`` over the receptive field.

    Returns ``[N, Cout, OH, OW]`` of ``out_dtype`` in channels-last memory format.
    """
    _check(-128 <= x_zp <= 127, f"x_zp must be in [-128, 127], got {x_zp}")
    n, cout, oh, ow = _conv_common(x_q, w_q, stride, padding, dilation, groups, x_zp != 0)
    _act(activation)
    _float_out(out_dtype)
    _vec(x_scale, 1, "x_scale")
    _vec(w_scale, cout, "w_scale")
    if bias is not None:
        _vec(bias, cout, "bias", allow_scalar=False)
    if use_triton(x_q.device):
        y = _kmod("triton_int8").conv2d(x_q, x_scale, w_q, w_scale, bias, list(stride), list(padding),
                                        list(dilation), groups, activation, out_dtype, x_zp=x_zp)
    else:
        y = ref.int8_conv2d(x_q, x_scale, w_q, w_scale, bias, stride, padding, dilation, groups, activation, out_dtype,
                            x_zp)
    out = _conv_out(x_q, (n, cout, oh, ow), out_dtype)
    return out.copy_(y) if y.stride() != out.stride() else y


@int8_conv2d.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
      activation="none", out_dtype=torch.float32, x_zp=0):
    n, cout, oh, ow = _conv_common(x_q, w_q, stride, padding, dilation, groups, x_zp != 0)
    _act(activation)
    _float_out(out_dtype)
    return _conv_out(x_q, (n, cout, oh, ow), out_dtype)


@torch.library.custom_op("qpasses::int8_conv2d_requant", mutates_args=(), schema=SCHEMAS["int8_conv2d_requant"])
def int8_conv2d_requant(x_q: Tensor, x_zp: int, w_q: Tensor, bias_int32: Optional[Tensor], M0: Tensor,
                        shift: Tensor, out_zp: int = 0, qmin: int = -128, qmax: int = 127,
                        stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                        dilation: Sequence[int] = (1, 1), groups: int = 1) -> Tensor:
    """Integer-only int8 conv2d (requantizing epilogue of ``int8_linear_requant``).

    The input is padded with its zero point ``x_zp`` (the quantized value of real 0), so
    ``acc = sum (x_q - x_zp) * w_q`` over the receptive field, padding contributing nothing.
    Other arguments as ``int8_conv2d`` / ``int8_linear_requant`` (M0/shift per output channel or
    scalar). Returns int8 ``[N, Cout, OH, OW]`` in channels-last memory format.
    """
    n, cout, oh, ow = _conv_common(x_q, w_q, stride, padding, dilation, groups, True)
    _requant_args(M0, shift, cout, qmin, qmax, out_zp)
    _check(-128 <= x_zp <= 127, f"x_zp must be in [-128, 127], got {x_zp}")
    if bias_int32 is not None:
        _check(bias_int32.dtype == torch.int32, "bias_int32 must be int32")
        _vec(bias_int32, cout, "bias_int32", allow_scalar=False)
    if use_triton(x_q.device):
        y = _kmod("triton_int8").conv2d(x_q, None, w_q, None, bias_int32, list(stride), list(padding),
                                        list(dilation), groups, "none", torch.int8,
                                        requant=(x_zp, M0, shift, out_zp, qmin, qmax))
    else:
        y = ref.int8_conv2d_requant(x_q, x_zp, w_q, bias_int32, M0, shift, out_zp, qmin, qmax, stride, padding,
                                    dilation, groups)
    out = _conv_out(x_q, (n, cout, oh, ow), torch.int8)
    return out.copy_(y) if y.stride() != out.stride() else y


@int8_conv2d_requant.register_fake
def _(x_q, x_zp, w_q, bias_int32, M0, shift, out_zp=0, qmin=-128, qmax=127, stride=(1, 1), padding=(0, 0),
      dilation=(1, 1), groups=1):
    n, cout, oh, ow = _conv_common(x_q, w_q, stride, padding, dilation, groups, True)
    return _conv_out(x_q, (n, cout, oh, ow), torch.int8)


# ================================================================================ int4 weight-only
def _int4_common(x: Tensor, w_packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                 bias: Optional[Tensor]):
    _check(x.dtype in ref.FLOAT_OUT_DTYPES, f"x must be fp32/fp16/bf16, got {x.dtype}")
    _check(x.dim() >= 1, "x must have at least one dimension")
    _check(w_packed.dtype == torch.uint8 and w_packed.dim() == 2, "w_packed must be uint8 [N, ceil(K/2)]")
    _check(group_size > 0 and group_size % 32 == 0, f"group_size must be a positive multiple of 32, got {group_size}")
    K = x.shape[-1]
    N = w_packed.shape[0]
    G = (K + group_size - 1) // group_size
    _check(w_packed.shape[1] == (K + 1) // 2, f"w_packed has {w_packed.shape[1]} bytes per row, expected "
                                              f"ceil(K/2)={(K + 1) // 2}")
    _check(scales.is_floating_point() and tuple(scales.shape) == (N, G), f"scales must be float [N, ceil(K/group)]"
                                                                         f"=[{N}, {G}], got {tuple(scales.shape)}")
    if zeros is not None:
        _check(zeros.is_floating_point() and tuple(zeros.shape) == (N, G), "zeros must be float [N, ceil(K/group)]")
    if bias is not None:
        _vec(bias, N, "bias", allow_scalar=False)
    return K, N


@torch.library.custom_op("qpasses::int4_weight_only_linear", mutates_args=(),
                         schema=SCHEMAS["int4_weight_only_linear"])
def int4_weight_only_linear(x: Tensor, w_packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                            bias: Optional[Tensor] = None) -> Tensor:
    """W4A16 linear: float activations times group-wise int4 weights, dequantized in registers.

    Args:
        x: bf16 / fp16 / fp32 ``[..., K]`` (K any size; odd K allowed).
        w_packed: uint8 ``[N, ceil(K/2)]`` from ``packing.pack_int4`` (low nibble = even k).
        scales: float ``[N, ceil(K/group_size)]``.
        zeros: float ``[N, ceil(K/group_size)]`` zero points in the code domain [0, 15], or None
            for symmetric weights (zero point 8, i.e. signed int4 packed with ``signed=True``).
        group_size: positive multiple of 32 (32 / 64 / 128 typical).
        bias: ``[N]`` or None.

    Returns ``x @ W^T + bias`` in ``x.dtype`` ``[..., N]`` where ``W[n, k] = dtype((q - z) * s)``
    (fp32 dequantization rounded to the activation dtype, fp32 accumulation).
    """
    K, N = _int4_common(x, w_packed, scales, zeros, group_size, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if use_triton(x.device):
        y = _kmod("triton_int4").linear(x2, w_packed, scales, zeros, group_size, bias)
    else:
        y = ref.int4_weight_only_linear(x2, w_packed, scales, zeros, group_size, bias)
    return y.reshape(*lead, N)


@int4_weight_only_linear.register_fake
def _(x, w_packed, scales, zeros, group_size, bias=None):
    K, N = _int4_common(x, w_packed, scales, zeros, group_size, bias)
    return x.new_empty((*x.shape[:-1], N))


# ================================================================================ binary
def _binary_common(x: Tensor, w_packed: Tensor, K: int, alpha, bias, x_packed: bool):
    _check(w_packed.dtype == torch.int32 and w_packed.dim() == 2, "w_packed must be int32 [N, ceil(K/32)]")
    _check(K >= 1, f"K must be positive, got {K}")
    words = (K + 31) // 32
    _check(w_packed.shape[1] == words, f"w_packed has {w_packed.shape[1]} words per row, expected ceil(K/32)={words}")
    _check(x.dim() >= 1, "x must have at least one dimension")
    if x_packed:
        _check(x.dtype == torch.int32 and x.shape[-1] == words, f"packed x must be int32 [..., {words}]")
    else:
        _check(x.dtype == torch.int8 and x.shape[-1] == K, f"x must be int8 [..., K={K}] (or packed int32 with "
                                                            f"x_packed=True), got {x.dtype} {tuple(x.shape)}")
        _check(K <= MAX_K_INT8, f"K={K} exceeds {MAX_K_INT8}: the int32 accumulator could overflow")
    N = w_packed.shape[0]
    if alpha is not None:
        _vec(alpha, N, "alpha")
    if bias is not None:
        _vec(bias, N, "bias", allow_scalar=False)
    out_dtype = torch.int32 if alpha is None and bias is None else torch.float32
    return N, out_dtype


@torch.library.custom_op("qpasses::binary_linear", mutates_args=(), schema=SCHEMAS["binary_linear"])
def binary_linear(x: Tensor, w_packed: Tensor, K: int, alpha: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  x_packed: bool = False) -> Tensor:
    """Binary-weight GEMM (1-bit weights, ±1 or int8 activations).

    Args:
        x: int8 ``[..., K]`` (±1 for a fully binary layer, or any int8 for binary-weight only),
            or, with ``x_packed=True``, int32 ``[..., ceil(K/32)]`` packed ±1 signs
            (``packing.pack_bits``).
        w_packed: int32 ``[N, ceil(K/32)]`` packed weight signs (``packing.pack_bits``; bit 1 = -1).
        K: the reduction length (the packing hides it).
        alpha: fp32 per-output-channel scale ``[N]`` (or ``[1]``), e.g. XNOR-net's mean |w|; optional.
        bias: fp32 ``[N]``; optional.

    Returns ``acc * alpha + bias`` (fp32 ``[..., N]``) with ``acc = sum_k x[k] * sign(w)[n, k]``
    exact; for packed activations ``acc = K - 2 * popcount(x xor w)``. With neither alpha nor bias
    the exact accumulator is returned as int32. Kernels: XNOR-popcount for packed x with
    M <= ``XNOR_MAX_M``, otherwise bits unpacked in registers to int8 ±1 for the int8 tensor cores.
    """
    N, out_dtype = _binary_common(x, w_packed, K, alpha, bias, x_packed)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if use_triton(x.device):
        y = _kmod("triton_binary").linear(x2, w_packed, K, alpha, bias, x_packed)
    else:
        y = ref.binary_linear(x2, w_packed, K, alpha, bias, x_packed)
    return y.reshape(*lead, N)


@binary_linear.register_fake
def _(x, w_packed, K, alpha=None, bias=None, x_packed=False):
    N, out_dtype = _binary_common(x, w_packed, K, alpha, bias, x_packed)
    return x.new_empty((*x.shape[:-1], N), dtype=out_dtype)


# ================================================================================ fp8 (e4m3) linear
FP8_MIN_CAPABILITY = (8, 9)      # fp8 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards


def _fp8_triton(device) -> bool:
    """Triton for an fp8 op on ``device``: the usual policy, and on CUDA an sm_89+ GPU."""
    if not use_triton(device):
        return False
    dev = torch.device(device)
    return dev.type != "cuda" or torch.cuda.get_device_capability(dev) >= FP8_MIN_CAPABILITY


def _fp8_common(x_q: Tensor, w_q: Tensor):
    _check(x_q.dtype == torch.float8_e4m3fn, f"x_q must be float8_e4m3fn, got {x_q.dtype}")
    _check(x_q.dim() >= 1, "x_q must have at least one dimension")
    _check(w_q.dtype == torch.float8_e4m3fn and w_q.dim() == 2,
           f"w_q must be a float8_e4m3fn [N, K] tensor, got {w_q.dtype} {tuple(w_q.shape)}")
    K = x_q.shape[-1]
    _check(w_q.shape[1] == K, f"w_q has {w_q.shape[1]} columns, x_q has K={K}")
    return K, w_q.shape[0]


@torch.library.custom_op("qpasses::fp8_linear", mutates_args=(), schema=SCHEMAS["fp8_linear"])
def fp8_linear(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
               out_dtype: torch.dtype = torch.float32) -> Tensor:
    """float8 e4m3 GEMM with a fused float epilogue (W8A8 fp8).

    Args:
        x_q: float8_e4m3fn ``[..., K]`` activations (``M`` = product of leading dims).
        x_scale: fp32 ``[M]`` (per token, may be shaped ``[..., 1]``) or ``[1]`` (per tensor).
        w_q: float8_e4m3fn ``[N, K]`` weight (row-major, as ``nn.Linear`` stores it).
        w_scale: fp32 ``[N]`` (per output channel) or ``[1]``.
        bias: fp32 ``[N]`` or None.
        out_dtype: ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``.

    Returns ``(acc[m, n] * x_scale[m]) * w_scale[n] + bias[n]`` with ``acc = sum_k x[m, k] w[n, k]``
    accumulated in fp32 (each product exact; the order of the sum is the kernel's own).
    """
    K, N = _fp8_common(x_q, w_q)
    _float_out(out_dtype)
    lead, x2 = _scaled_rows(x_q, K, N, x_scale, w_scale, bias)
    if _fp8_triton(x_q.device):
        y = _kmod("triton_fp8").linear(x2, x_scale, w_q, w_scale, bias, out_dtype)
    else:
        y = ref.fp8_linear(x2, x_scale, w_q, w_scale, bias, out_dtype)
    return y.reshape(*lead, N)


@fp8_linear.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, out_dtype=torch.float32):
    K, N = _fp8_common(x_q, w_q)
    _float_out(out_dtype)
    return x_q.new_empty((*x_q.shape[:-1], N), dtype=out_dtype)


def _dynamic_fp8_common(x: Tensor, w_q: Tensor, out_dtype):
    _check(x.is_floating_point() and x.dtype != torch.float8_e4m3fn, f"x must be a float tensor, got {x.dtype}")
    _check(x.dim() >= 1, "x must have at least one dimension")
    _check(w_q.dtype == torch.float8_e4m3fn and w_q.dim() == 2,
           f"w_q must be a float8_e4m3fn [N, K] tensor, got {w_q.dtype} {tuple(w_q.shape)}")
    _check(w_q.shape[1] == x.shape[-1], f"w_q has {w_q.shape[1]} columns, x has K={x.shape[-1]}")
    od = x.dtype if out_dtype is None else out_dtype
    _float_out(od)
    return w_q.shape[0], od


@torch.library.custom_op("qpasses::dynamic_fp8_linear", mutates_args=(), schema=SCHEMAS["dynamic_fp8_linear"])
def dynamic_fp8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                       out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """W8A8 fp8 with dynamic per-token activations: ``torch.ops.qpasses.quantize_fp8_per_token``
    (the codes and scales the ``w8a8_fp8`` fake quantizer uses), then :func:`fp8_linear`."""
    from ..numerics import fp8 as _fp8  # noqa: F401  registers quantize_fp8_per_token
    N, od = _dynamic_fp8_common(x, w_q, out_dtype)
    x_q, xs = torch.ops.qpasses.quantize_fp8_per_token(x)
    return fp8_linear(x_q, xs, w_q, w_scale, bias, od)


@dynamic_fp8_linear.register_fake
def _(x, w_q, w_scale, bias, out_dtype=None):
    N, od = _dynamic_fp8_common(x, w_q, out_dtype)
    return x.new_empty((*x.shape[:-1], N), dtype=od)
