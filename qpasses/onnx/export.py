"""fx GraphModule -> standard QDQ ONNX, built node by node from op classes.

The exporter runs the graph once on the example inputs (an fx ``Interpreter``) to learn
every value's shape and which values are constants (no path from a graph input), then
emits one small group of ONNX nodes per fx node, chosen by its op class
(:func:`qpasses.ops.classify`), so module calls, functional calls and aten ops export
alike:

* activation :class:`~qpasses.numerics.FakeQuantize` -> ``QuantizeLinear`` ->
  ``DequantizeLinear`` (uint8 / int8 / int16 / 4-bit zero-point type chosen from the
  integer range; a ``Clip`` follows when ``[qmin, qmax]`` is narrower than that type);
* weight ``FakeQuantize`` on a constant -> an integer initializer (int8, or int4 when
  ``opset >= 21`` and the range fits) read by a per-axis ``DequantizeLinear``;
* any other constant sub-graph -> a float initializer (constant folding at export).

onnx-graphsurgeon passes then clean the model (:mod:`qpasses.onnx.cleanup`): the
``qdq_cleanup`` rule family (the same rule file that runs on fx graphs), dead nodes and
topological order.  The result is checked with ``onnx.checker`` (and shape inference).
"""
from __future__ import annotations

import math
import operator
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from ..errors import QPassesError
from ..frontend import as_inputs
from ..numerics import FakeQuantize
from ..ops import OpView, classify

__all__ = ["export_onnx", "ExportError", "build_model", "DEFAULT_OPSET"]

DEFAULT_OPSET = 21
MIN_OPSET = 13


class ExportError(QPassesError):
    """The graph holds something the ONNX exporter cannot express (the message names the node)."""


_DTYPES = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.float64: TensorProto.DOUBLE,
    torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
    torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8, torch.bool: TensorProto.BOOL,
    torch.int16: TensorProto.INT16,
}


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def quant_type(qmin: int, qmax: int, opset: int, allow_4bit: bool = True) -> Tuple[int, int, int]:
    """(ONNX element type, type min, type max) of the narrowest type holding ``[qmin, qmax]``."""
    cands = []
    if opset >= 21 and allow_4bit:
        cands += [(TensorProto.UINT4, 0, 15), (TensorProto.INT4, -8, 7)]
    cands += [(TensorProto.UINT8, 0, 255), (TensorProto.INT8, -128, 127)]
    if opset >= 21:
        cands += [(TensorProto.UINT16, 0, 65535), (TensorProto.INT16, -32768, 32767)]
    for t, lo, hi in cands:
        if lo <= qmin and qmax <= hi:
            return t, lo, hi
    raise ExportError(f"integer range [{qmin}, {qmax}] has no ONNX QuantizeLinear type at opset {opset}"
                      + ("" if opset >= 21 else " (opset 21 adds 16-bit and 4-bit types)"))


_NP_OF = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8, TensorProto.UINT16: np.uint16,
          TensorProto.INT16: np.int16, TensorProto.INT4: np.int8, TensorProto.UINT4: np.uint8}


def int_tensor(name: str, values: np.ndarray, elem_type: int) -> onnx.TensorProto:
    """An integer initializer of ``elem_type`` (4-bit types are packed by onnx.helper)."""
    values = np.asarray(values)
    if elem_type in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, elem_type, list(values.shape), values.astype(np.int64).reshape(-1).tolist())
    return numpy_helper.from_array(values.astype(_NP_OF[elem_type]), name)


class _Const:
    """A value known at export time (tensor or Python value)."""

    def __init__(self, value: Any):
        self.value = value


class _Builder:
    def __init__(self, gm: fx.GraphModule, opset: int, int4: bool, int4_activations: bool = False):
        self.gm = gm
        self.opset = opset
        self.int4 = int4
        self.int4_activations = int4_activations
        self.modules = dict(gm.named_modules())
        self.nodes: List[onnx.NodeProto] = []
        self.inits: Dict[str, onnx.TensorProto] = {}
        self.names: Dict[fx.Node, Any] = {}   # fx node -> onnx tensor name | _Const | tuple of those
        self.vals: Dict[fx.Node, Any] = {}     # fx node -> value seen on the example inputs
        self.dynamic: Dict[fx.Node, bool] = {}  # depends on a graph input
        self._n = 0
        self._fq_cache: Dict[fx.Node, Optional[FakeQuantize]] = {}
        self._const_names: Dict[Tuple[fx.Node, torch.dtype], str] = {}

    # ---------------------------------------------------------------- helpers
    def uid(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, value: Any, name: str = "c", dtype: Optional[torch.dtype] = None) -> str:
        if isinstance(value, torch.Tensor):
            t = value.detach()
        else:
            t = torch.tensor(value, dtype=dtype)
        if dtype is not None:
            t = t.to(dtype)
        arr = _np(t)
        nm = self.uid(name.replace(".", "_"))
        self.inits[nm] = numpy_helper.from_array(arr, nm)
        return nm

    def ints(self, values: Sequence[int], name: str = "shape") -> str:
        return self.const(torch.tensor(list(values), dtype=torch.int64), name)

    def add(self, op: str, inputs: Sequence[str], name: str, n_out: int = 1, **attrs) -> Union[str, List[str]]:
        outs = [self.uid(name) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.uid(f"{name}_{op}"), **attrs))
        return outs[0] if n_out == 1 else outs

    def tensor_in(self, arg: Any, like: Optional[torch.Tensor] = None) -> str:
        """An ONNX tensor name for ``arg`` (an fx node or a constant), materialising constants."""
        if isinstance(arg, fx.Node):
            v = self.names[arg]
            if isinstance(v, _Const):
                val = v.value
                if not isinstance(val, torch.Tensor):
                    val = torch.tensor(val, dtype=like.dtype if like is not None else None)
                key = (arg, val.dtype)
                if key not in self._const_names:  # one initializer per constant value, however often used
                    self._const_names[key] = self.const(val, arg.name)
                return self._const_names[key]
            if isinstance(v, str):
                return v
            raise ExportError(f"{arg.name} is a tuple/list value; index it before use")
        dt = like.dtype if isinstance(like, torch.Tensor) else None
        return self.const(arg, "k", dtype=dt)

    def is_const(self, arg: Any) -> bool:
        return not isinstance(arg, fx.Node) or not self.dynamic.get(arg, True)

    def shape(self, node: Any) -> Optional[Tuple[int, ...]]:
        v = self.vals.get(node) if isinstance(node, fx.Node) else node
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    # ---------------------------------------------------------------- quantization
    def fq_module(self, node: fx.Node) -> Optional[FakeQuantize]:
        """The FakeQuantize of a module call, or one rebuilt from a ``fake_quantize_per_*_affine`` call
        or a ``torch.ops.qpasses.fake_quant_*`` quantizer op (same arguments)."""
        if node.op == "call_module":
            m = self.modules.get(node.target)
            if isinstance(m, FakeQuantize):
                return m
            return None
        if node.op != "call_function":
            return None
        if node in self._fq_cache:
            return self._fq_cache[node]
        tn = _target_name(node)
        fq = None
        if tn.startswith(("fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine")) or tn in _QOPS_FQ:
            per_channel = "channel" in tn
            names = (("input", "scale", "zero_point", "axis", "quant_min", "quant_max") if per_channel
                     else ("input", "scale", "zero_point", "quant_min", "quant_max"))
            vals = dict(zip(names, node.args))
            vals.update(node.kwargs)
            res = {}
            for k in names[1:]:
                v = vals.get(k)
                if isinstance(v, fx.Node):
                    if self.dynamic.get(v, True):
                        raise ExportError(f"{node.name}: quantization parameter {k} is computed at run time")
                    v = self.vals[v]
                res[k] = v
            if "lsq" in tn:  # the value LSQ quantizes with: max(|scale|, eps)
                res["scale"] = torch.clamp(torch.as_tensor(res["scale"]).detach().abs(),
                                           min=torch.finfo(torch.float32).eps)
            fq = FakeQuantize(res["scale"], res["zero_point"], int(res["quant_min"]), int(res["quant_max"]),
                              axis=int(res["axis"]) if per_channel else None)
        self._fq_cache[node] = fq
        return fq

    def qparams(self, fq: FakeQuantize, base: str, elem: int):
        s = fq.scale.detach().float()
        z = fq.zero_point.detach().to(torch.int64)
        sn = self.const(s, base + "_scale")
        zn = self.uid(base + "_zp")
        self.inits[zn] = int_tensor(zn, _np(z), elem)
        return sn, zn

    def weight_dq(self, fq: FakeQuantize, w: torch.Tensor, base: str, transpose: bool = False) -> str:
        """Integer initializer + per-axis DequantizeLinear for a constant weight."""
        q = fq.quantize(w.detach().float()).to(torch.int64)
        axis = fq.axis
        if transpose:  # linear weight [out, in] stored as [in, out] for MatMul
            q = q.t().contiguous()
            if axis is not None:
                axis = 1 - (axis % 2)
        qmin, qmax = int(q.min().item()) if q.numel() else 0, int(q.max().item()) if q.numel() else 0
        lo, hi = min(fq.qmin, qmin), max(fq.qmax, qmax)
        opset = self.opset if self.int4 else min(self.opset, 20)
        elem, _, _ = quant_type(lo, hi, opset)
        qn = self.uid(base + "_q")
        self.inits[qn] = int_tensor(qn, _np(q), elem)
        sn, zn = self.qparams(fq, base, elem)
        kw = {}
        if axis is not None:
            kw["axis"] = int(axis)
        return self.add("DequantizeLinear", [qn, sn, zn], base + "_dq", **kw)

    def act_qdq(self, fq: FakeQuantize, x: str, base: str, rank: int = 4) -> str:
        elem, lo, hi = quant_type(fq.qmin, fq.qmax, self.opset, allow_4bit=self.int4_activations)
        sn, zn = self.qparams(fq, base, elem)
        kw = {} if fq.axis is None else {"axis": int(fq.axis)}
        q = self.add("QuantizeLinear", [x, sn, zn], base + "_q", **kw)
        y = self.add("DequantizeLinear", [q, sn, zn], base + "_dq", **kw)
        if fq.qmin > lo or fq.qmax < hi:  # narrower range than the type: clamp in the real domain
            s = fq.scale.detach().float()
            z = fq.zero_point.detach().float()
            lo_r, hi_r = (fq.qmin - z) * s, (fq.qmax - z) * s
            if fq.axis is None:
                y = self.add("Clip", [y, self.const(lo_r.reshape(()), base + "_lo"),
                                      self.const(hi_r.reshape(()), base + "_hi")], base + "_clip")
            else:
                shp = [1] * rank
                shp[fq.axis] = -1
                y = self.add("Max", [y, self.const(lo_r.reshape(shp), base + "_lo")], base + "_max")
                y = self.add("Min", [y, self.const(hi_r.reshape(shp), base + "_hi")], base + "_min")
        return y


# ----------------------------------------------------------------------------- converters

def _tup(v: Any, n: int) -> List[int]:
    if isinstance(v, (list, tuple)):
        v = list(v)
        if len(v) == 1 and n > 1:
            v = v * n
        return [int(x) for x in v]
    return [int(v)] * n


def _pads(padding: Any, n: int) -> List[int]:
    p = _tup(padding, n)
    return p + p


def _weight(b: _Builder, node: fx.Node, arg: Any, transpose: bool = False) -> str:
    """ONNX name of a weight argument: integer + DQ for a fake-quantized constant, else as is."""
    if isinstance(arg, fx.Node):
        fq = b.fq_module(arg)
        if fq is not None and fq.enabled and b.is_const(arg.args[0]):
            w = b.vals[arg.args[0]]
            return b.weight_dq(fq, w, arg.name, transpose=transpose)
        mod = b.modules.get(arg.target) if arg.op == "call_module" else None
        if mod is not None and arg.args and isinstance(arg.args[0], fx.Node) and b.is_const(arg.args[0]):
            w = b.vals[arg.args[0]]
            out = _other_weight_quantizer(b, mod, w, arg.name, transpose)
            if out is not None:
                return out
        if transpose:
            if b.is_const(arg):
                return b.const(b.vals[arg].detach().t().contiguous(), arg.name + "_t")
            return b.add("Transpose", [b.tensor_in(arg)], node.name + "_wt", perm=[1, 0])
        return b.tensor_in(arg)
    if isinstance(arg, torch.Tensor):
        return b.const(arg.t().contiguous() if transpose else arg, node.name + "_w")
    raise ExportError(f"{node.name}: weight is {arg!r}")


def _other_weight_quantizer(b: _Builder, mod: nn.Module, w: torch.Tensor, base: str, transpose: bool) -> Optional[str]:
    """Integer initializers + DequantizeLinear for the non-FakeQuantize weight quantizers of other recipes.

    * ``Int4GroupFakeQuantize`` (w4a16): UINT4 codes with a *blocked* DequantizeLinear
      (``block_size`` = group size, opset >= 21); older opsets fold the weight to float.
    * per-channel quantizers with ``int_repr`` / ``scale`` / ``axis`` (e.g. ACIQ's
      ``ChannelBitsFakeQuant``): int8 codes and a per-axis DequantizeLinear.
    """
    name = type(mod).__name__
    if name == "Int4GroupFakeQuantize":
        if b.opset < 21 or not b.int4 or transpose:
            return None
        codes = mod.codes(w).to(torch.int64)
        k = codes.shape[1]
        if k % mod.group_size:
            return None
        z = mod.zeros if mod.zeros is not None else torch.full_like(mod.scales, 8.0)
        if not torch.equal(z, torch.round(z)) or bool((z < 0).any()) or bool((z > 15).any()):
            return None
        qn, zn = b.uid(base + "_q"), b.uid(base + "_zp")
        b.inits[qn] = int_tensor(qn, _np(codes), TensorProto.UINT4)
        b.inits[zn] = int_tensor(zn, _np(z.to(torch.int64)), TensorProto.UINT4)
        sn = b.const(mod.scales.float(), base + "_scale")
        return b.add("DequantizeLinear", [qn, sn, zn], base + "_dq", axis=1, block_size=int(mod.group_size))
    if hasattr(mod, "int_repr") and hasattr(mod, "scale") and getattr(mod, "axis", None) is not None \
            and getattr(mod, "zero_point", None) is None:
        q = mod.int_repr(w).to(torch.int64)
        s = mod.scale.detach().float().reshape(-1)
        axis = int(mod.axis)
        if not torch.allclose(q.float() * s.reshape([-1 if i == axis else 1 for i in range(w.dim())]),
                              mod(w).float(), rtol=1e-5, atol=1e-7):
            return None  # not a plain scaled integer grid: fold to float instead
        if transpose:
            q = q.t().contiguous()
            axis = 1 - axis
        elem, _, _ = quant_type(int(q.min()), int(q.max()), min(b.opset, 20))
        qn, zn = b.uid(base + "_q"), b.uid(base + "_zp")
        b.inits[qn] = int_tensor(qn, _np(q), elem)
        b.inits[zn] = int_tensor(zn, np.zeros(s.numel(), dtype=np.int64), elem)
        return b.add("DequantizeLinear", [qn, b.const(s, base + "_scale"), zn], base + "_dq", axis=axis)
    return None


def _dynamic_fq(b: _Builder, x: str, bits: int, symmetric: bool, reduce_dim: Optional[int], rank: int, base: str):
    """Float ONNX ops for qpasses' dynamic (per-batch) quantization: returns (centred codes, scale) names.

    ``centred = clamp(round(x / s), qmin - z, qmax - z)``, the value is ``centred * s``.
    """
    f32 = torch.float32
    eps = torch.finfo(torch.float32).eps
    kw = {}
    if reduce_dim is None:
        kw = dict(keepdims=0)
        red_in = []
    else:
        axes = [_dim(int(reduce_dim), rank)]
        kw = dict(keepdims=1)
        red_in = [b.ints(axes, "axes")] if b.opset >= 18 else []
        if b.opset < 18:
            kw["axes"] = axes
    lo = b.add("ReduceMin", [x] + red_in, base + "_min", **kw)
    hi = b.add("ReduceMax", [x] + red_in, base + "_max", **kw)
    zero = b.const(0.0, "zero", f32)
    lo = b.add("Min", [lo, zero], base + "_lo")
    hi = b.add("Max", [hi, zero], base + "_hi")
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax
        mag = b.add("Max", [b.add("Neg", [lo], base + "_nlo"), hi], base + "_mag")
        s = b.add("Max", [b.add("Div", [mag, b.const(float(qmax), "qmax", f32)], base + "_s0"),
                          b.const(eps, "eps", f32)], base + "_scale")
        c = b.add("Round", [b.add("Div", [x, s], base + "_xs")], base + "_r")
        c = b.add("Clip", [c, b.const(float(qmin), "qmin", f32), b.const(float(qmax), "qmax", f32)], base + "_c")
        return c, s
    qmin, qmax = 0, 2 ** bits - 1
    s = b.add("Max", [b.add("Div", [b.add("Sub", [hi, lo], base + "_rng"), b.const(float(qmax - qmin), "n", f32)],
                            base + "_s0"), b.const(eps, "eps", f32)], base + "_scale")
    z = b.add("Round", [b.add("Sub", [b.const(float(qmin), "qmin", f32), b.add("Div", [lo, s], base + "_los")],
                              base + "_z0")], base + "_zr")
    z = b.add("Clip", [z, b.const(float(qmin), "qmin", f32), b.const(float(qmax), "qmax", f32)], base + "_z")
    c = b.add("Round", [b.add("Div", [x, s], base + "_xs")], base + "_r")
    c = b.add("Max", [c, b.add("Sub", [b.const(float(qmin), "qmin", f32), z], base + "_cl")], base + "_c0")
    c = b.add("Min", [c, b.add("Sub", [b.const(float(qmax), "qmax", f32), z], base + "_ch")], base + "_c")
    return c, s


def _conv(b: _Builder, node: fx.Node, view: OpView, cls: str) -> str:
    x = view.get("input")
    xs = b.shape(x)
    nsp = (len(xs) - 2) if xs else int(cls[-2])
    mod = view.module
    if mod is not None:
        if getattr(mod, "padding_mode", "zeros") != "zeros":
            raise ExportError(f"{node.name}: padding_mode={mod.padding_mode!r} is not exported")
        w_name = b.const(mod.weight, node.name + "_w")
        b_name = b.const(mod.bias, node.name + "_b") if mod.bias is not None else None
    else:
        w_name = _weight(b, node, view.get("weight"))
        bias = view.get("bias")
        b_name = b.tensor_in(bias) if bias is not None else None
    ins = [b.tensor_in(x), w_name] + ([b_name] if b_name else [])
    attrs: Dict[str, Any] = dict(strides=_tup(view.get("stride", 1), nsp), dilations=_tup(view.get("dilation", 1), nsp),
                                 group=int(view.get("groups", 1) or 1))
    pad = view.get("padding", 0)
    if cls.startswith("conv_transpose"):
        attrs["pads"] = _pads(pad, nsp)
        op = view.get("output_padding", 0)
        if any(_tup(op, nsp)):
            attrs["output_padding"] = _tup(op, nsp)
        return b.add("ConvTranspose", ins, node.name, **attrs)
    if isinstance(pad, str):
        if pad == "valid":
            attrs["pads"] = [0] * (2 * nsp)
        else:
            attrs["auto_pad"] = "SAME_UPPER"
    else:
        attrs["pads"] = _pads(pad, nsp)
    return b.add("Conv", ins, node.name, **attrs)


def _linear(b: _Builder, node: fx.Node, view: OpView) -> str:
    x = view.get("input")
    xs = b.shape(x)
    mod = view.module
    if mod is not None:
        w_arg, bias_t = mod.weight, mod.bias
    else:
        w_arg, bias_arg = view.get("weight"), view.get("bias")
        bias_t = bias_arg
    if xs is not None and len(xs) == 2:
        w = _weight(b, node, w_arg)
        ins = [b.tensor_in(x), w]
        if bias_t is not None:
            ins.append(b.tensor_in(bias_t) if not isinstance(bias_t, torch.Tensor) else b.const(bias_t, node.name + "_b"))
        return b.add("Gemm", ins, node.name, transB=1)
    w = _weight(b, node, w_arg, transpose=True)
    y = b.add("MatMul", [b.tensor_in(x), w], node.name + "_mm")
    if bias_t is not None:
        bn = b.tensor_in(bias_t) if not isinstance(bias_t, torch.Tensor) else b.const(bias_t, node.name + "_b")
        y = b.add("Add", [y, bn], node.name)
    return y


def _batch_norm(b: _Builder, node: fx.Node, view: OpView) -> str:
    if view.get("training", False):
        raise ExportError(f"{node.name}: BatchNorm in training mode; call model.eval() before tracing")
    x = view.get("input")
    mean, var = view.tensor("running_mean"), view.tensor("running_var")
    if mean is None:
        mean, var = b.vals.get(view.get("running_mean")), b.vals.get(view.get("running_var"))
    if mean is None or var is None:
        raise ExportError(f"{node.name}: BatchNorm without running statistics")
    g = view.tensor("weight")
    beta = view.tensor("bias")
    if g is None and isinstance(view.get("weight"), fx.Node):
        g = b.vals.get(view.get("weight"))
    if beta is None and isinstance(view.get("bias"), fx.Node):
        beta = b.vals.get(view.get("bias"))
    g = g if g is not None else torch.ones_like(mean)
    beta = beta if beta is not None else torch.zeros_like(mean)
    eps = float(view.get("eps", 1e-5))
    return b.add("BatchNormalization", [b.tensor_in(x), b.const(g, "bn_g"), b.const(beta, "bn_b"),
                                        b.const(mean, "bn_m"), b.const(var, "bn_v")], node.name, epsilon=eps)


def _pool(b: _Builder, node: fx.Node, view: OpView, cls: str) -> str:
    x = view.get("input")
    xs = b.shape(x)
    nsp = len(xs) - 2
    xin = b.tensor_in(x)
    if cls == "adaptive_avg_pool":
        out = view.get("output_size")
        out = _tup(out if out is not None else 1, nsp)
        out = [xs[2 + i] if o is None else o for i, o in enumerate(out)]
        if all(o == 1 for o in out):
            return b.add("GlobalAveragePool", [xin], node.name)
        if any(xs[2 + i] % o for i, o in enumerate(out)):
            raise ExportError(f"{node.name}: adaptive_avg_pool from {xs[2:]} to {out} is not a fixed pooling window")
        k = [xs[2 + i] // o for i, o in enumerate(out)]
        return b.add("AveragePool", [xin], node.name, kernel_shape=k, strides=k)
    k = _tup(view.get("kernel_size"), nsp)
    st = view.get("stride")
    st = k if st is None or (isinstance(st, (list, tuple)) and len(st) == 0) else _tup(st, nsp)
    attrs = dict(kernel_shape=k, strides=st, pads=_pads(view.get("padding", 0) or 0, nsp),
                 ceil_mode=int(bool(view.get("ceil_mode", False))))
    if cls == "max_pool":
        dil = _tup(view.get("dilation", 1) or 1, nsp)
        if any(d != 1 for d in dil):
            attrs["dilations"] = dil
        return b.add("MaxPool", [xin], node.name, **attrs)
    cip = view.get("count_include_pad", True)
    attrs["count_include_pad"] = int(True if cip is None else bool(cip))
    if view.module is not None and getattr(view.module, "divisor_override", None):
        raise ExportError(f"{node.name}: avg_pool divisor_override is not exported")
    return b.add("AveragePool", [xin], node.name, **attrs)


def _reshape_to(b: _Builder, node: fx.Node, x: Any) -> str:
    """``Reshape`` to the node's recorded shape.  A ``torch.export`` graph records symbolic sizes
    (``node.meta["val"]``): a target with one symbolic dimension (``s0``, ``5*s0``, ...) gets
    ``-1`` there, so the reshape follows the batch wherever it sits; otherwise a target whose
    first dimension equals the input's keeps it (``0``)."""
    out = b.shape(node)
    xs = b.shape(x)
    shp = list(out)
    dims = getattr(node.meta.get("val"), "shape", None)
    if dims is not None and len(dims) == len(shp):
        sym = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        if len(sym) <= 1:
            for i in sym:
                shp[i] = -1
            return b.add("Reshape", [b.tensor_in(x), b.ints(shp)], node.name)
    if xs and shp and len(xs) >= 1 and shp[0] == xs[0]:
        shp[0] = 0  # keep the (possibly dynamic) batch dimension
    return b.add("Reshape", [b.tensor_in(x), b.ints(shp)], node.name)


def _tensor_getitem(b: _Builder, node: fx.Node) -> str:
    """Basic indexing (ints, slices, None, ...) as ONNX Slice + Reshape to the recorded shape."""
    x, idx = node.args
    xs = b.shape(x)
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in idx):
        raise ExportError(f"cannot export node {node.name!r}: advanced (tensor / list) indexing")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(xs) - n_real) + idx[k + 1:]
    starts, ends, axes, steps = [], [], [], []
    d = 0
    for i in idx:
        if i is None:
            continue
        if isinstance(i, int):
            i = i % xs[d]
            starts.append(i); ends.append(i + 1); axes.append(d); steps.append(1)
        elif isinstance(i, slice):
            if i != slice(None):
                st = 1 if i.step is None else int(i.step)
                starts.append(0 if i.start is None else int(i.start))
                ends.append(2 ** 62 if i.stop is None else int(i.stop))
                axes.append(d); steps.append(st)
        else:
            raise ExportError(f"cannot export node {node.name!r}: index {i!r}")
        d += 1
    y = b.tensor_in(x)
    if axes:
        y = b.add("Slice", [y, b.ints(starts, "starts"), b.ints(ends, "ends"), b.ints(axes, "axes"),
                            b.ints(steps, "steps")], node.name + "_slice")
    out = list(b.shape(node))
    if 0 not in axes and out and xs and out[0] == xs[0] and (idx[0] is not None if idx else True):
        out[0] = 0  # batch dimension kept
    return b.add("Reshape", [y, b.ints(out)], node.name)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


_UNARY = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "neg": "Neg", "exp": "Exp", "sqrt": "Sqrt",
          "abs": "Abs", "erf": "Erf"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "truediv": "Div", "pow": "Pow"}
# activation modules without an op class, by the name their functional / aten spelling has
_ACT_MODULES = {nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.LeakyReLU: "leaky_relu",
                nn.ELU: "elu", nn.Softplus: "softplus", nn.Mish: "mish"}
_IDENTITY = {"contiguous", "clone", "detach", "dropout", "alias", "identity"}


# the quantizer custom ops (qpasses.numerics.qops) with torch's fake_quantize_per_*_affine arguments
_QOPS_FQ = ("fake_quant_per_tensor", "fake_quant_per_channel",
            "fake_quant_lsq_per_tensor", "fake_quant_lsq_per_channel")


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__.lower()
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1].rstrip("_")
    return getattr(t, "__name__", str(t)).rstrip("_")


class _View(OpView):
    """OpView whose ``input`` falls back to the first argument (aten spellings named ``self``)."""

    def get(self, name: str, default: Any = None) -> Any:
        v = super().get(name, default)
        if name == "input" and v is None and self.node.args:
            return self.node.args[0]
        return v


def _convert(b: _Builder, node: fx.Node) -> Any:
    cls = classify(node, b.modules)
    view = _View(node, b.gm, cls, b.modules)
    nm = node.name
    fq = b.fq_module(node)
    if cls == "fake_quant" or fq is not None:
        x = node.args[0]
        if not fq.enabled:
            return b.names[x]
        return b.act_qdq(fq, b.tensor_in(x), nm, len(b.shape(x) or (0,) * 4))
    if cls == "observer":
        return b.names[node.args[0]]
    if cls in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        return _conv(b, node, view, cls)
    if cls == "linear":
        return _linear(b, node, view)
    if cls in ("matmul", "bmm"):
        a, c = view.inputs()
        return b.add("MatMul", [b.tensor_in(a), b.tensor_in(c)], nm)
    if cls == "batch_norm":
        return _batch_norm(b, node, view)
    if cls == "layer_norm":
        x = view.get("input")
        ns = view.get("normalized_shape")
        ns = _tup(ns, 1) if not isinstance(ns, (list, tuple)) else list(ns)
        w = view.tensor("weight")
        bb = view.tensor("bias")
        w = w if w is not None else torch.ones(ns)
        bb = bb if bb is not None else torch.zeros(ns)
        eps = float(view.get("eps", 1e-5))
        if b.opset >= 17:
            return b.add("LayerNormalization", [b.tensor_in(x), b.const(w, nm + "_g"), b.const(bb, nm + "_b")], nm,
                         axis=-len(ns), epsilon=eps)
        # opset < 17: (x - mean) / sqrt(var + eps) * g + b over the last len(ns) dimensions
        rank = len(b.shape(x))
        axes = list(range(rank - len(ns), rank))
        xin = b.tensor_in(x)

        def mean(t, tag):
            if b.opset >= 18:
                return b.add("ReduceMean", [t, b.ints(axes, "axes")], nm + tag, keepdims=1)
            return b.add("ReduceMean", [t], nm + tag, axes=axes, keepdims=1)
        d = b.add("Sub", [xin, mean(xin, "_mu")], nm + "_d")
        var = mean(b.add("Mul", [d, d], nm + "_d2"), "_var")
        std = b.add("Sqrt", [b.add("Add", [var, b.const(eps, "eps", torch.float32)], nm + "_ve")], nm + "_std")
        y = b.add("Div", [d, std], nm + "_n")
        return b.add("Add", [b.add("Mul", [y, b.const(w, nm + "_g")], nm + "_gy"), b.const(bb, nm + "_b")], nm)
    if cls == "relu":
        return b.add("Relu", [b.tensor_in(view.get("input"))], nm)
    if cls in ("relu6", "hardtanh"):
        lo, hi = (0.0, 6.0) if cls == "relu6" else (float(view.get("min_val", -1.0)), float(view.get("max_val", 1.0)))
        x = view.get("input")
        return b.add("Clip", [b.tensor_in(x), b.const(lo, nm + "_lo", torch.float32),
                              b.const(hi, nm + "_hi", torch.float32)], nm)
    if cls == "gelu":
        x = b.tensor_in(view.get("input"))
        approx = str(view.get("approximate", "none"))
        if b.opset >= 20:
            return b.add("Gelu", [x], nm, approximate=approx)
        if approx == "tanh":
            x3 = b.add("Mul", [x, b.add("Mul", [x, x], nm + "_x2")], nm + "_x3")
            inner = b.add("Add", [x, b.add("Mul", [x3, b.const(0.044715, "c", torch.float32)], nm + "_a")], nm + "_b")
            t = b.add("Tanh", [b.add("Mul", [inner, b.const(math.sqrt(2 / math.pi), "c", torch.float32)], nm + "_c")], nm + "_t")
        else:
            t = b.add("Erf", [b.add("Mul", [x, b.const(1 / math.sqrt(2), "c", torch.float32)], nm + "_s")], nm + "_erf")
        one = b.add("Add", [t, b.const(1.0, "c", torch.float32)], nm + "_p1")
        return b.add("Mul", [b.add("Mul", [x, one], nm + "_xm"), b.const(0.5, "c", torch.float32)], nm)
    if cls == "silu":
        x = b.tensor_in(view.get("input"))
        return b.add("Mul", [x, b.add("Sigmoid", [x], nm + "_sig")], nm)
    if cls in ("add", "mul"):
        a, c = view.get("input"), view.get("other")
        like = b.vals.get(a) if isinstance(a, fx.Node) else b.vals.get(c)
        like = like if isinstance(like, torch.Tensor) else None
        an, cn = b.tensor_in(a, like), b.tensor_in(c, like)
        alpha = view.get("alpha", 1) if cls == "add" else 1
        if alpha not in (1, None):
            cn = b.add("Mul", [cn, b.const(alpha, "alpha", like.dtype if like is not None else torch.float32)], nm + "_al")
        return b.add("Add" if cls == "add" else "Mul", [an, cn], nm)
    if cls == "cat":
        ts = view.get("tensors")
        rank = len(b.shape(node))
        return b.add("Concat", [b.tensor_in(t) for t in ts], nm, axis=_dim(int(view.get("dim", 0) or 0), rank))
    if cls in ("max_pool", "avg_pool", "adaptive_avg_pool"):
        return _pool(b, node, view, cls)
    if cls == "flatten":
        x = view.get("input")
        xs = b.shape(x)
        sd = _dim(int(view.get("start_dim", 0 if view.module is None else view.module.start_dim)), len(xs))
        ed = _dim(int(view.get("end_dim", -1)), len(xs))
        if view.module is not None:
            sd, ed = _dim(view.module.start_dim, len(xs)), _dim(view.module.end_dim, len(xs))
        if sd == 1 and ed == len(xs) - 1:
            return b.add("Flatten", [b.tensor_in(x)], nm, axis=1)
        return _reshape_to(b, node, x)
    if cls == "reshape":
        return _reshape_to(b, node, view.get("input"))
    if cls in ("permute", "transpose"):
        x = view.get("input")
        rank = len(b.shape(x))
        if cls == "permute":
            dims = view.get("dims")
            if node.op == "call_method" and not isinstance(dims, (list, tuple)):
                dims = node.args[1:]
            perm = [_dim(int(d), rank) for d in dims]
        else:
            perm = list(range(rank))
            if node.op == "call_method" and node.target == "t" or (rank == 2 and view.get("dim0") is None):
                perm = [1, 0][:rank]
            else:
                d0, d1 = _dim(int(view.get("dim0")), rank), _dim(int(view.get("dim1")), rank)
                perm[d0], perm[d1] = perm[d1], perm[d0]
        return b.add("Transpose", [b.tensor_in(x)], nm, perm=perm)
    if cls == "softmax":
        x = view.get("input")
        rank = len(b.shape(x))
        d = view.get("dim")
        if view.module is not None:
            d = view.module.dim
        return b.add("Softmax", [b.tensor_in(x)], nm, axis=_dim(int(d if d is not None else -1), rank))
    if cls == "dropout":
        return b.names[view.get("input")]
    if cls == "embedding":
        if view.module is not None and view.module.max_norm is not None:
            raise ExportError(f"cannot export node {node.name!r}: embedding with max_norm renormalises its "
                              "weight in place at every call")
        if node.op == "call_function" and view.get("max_norm") is not None:
            raise ExportError(f"cannot export node {node.name!r}: embedding with max_norm")
        return b.add("Gather", [_weight(b, node, view.get("weight")), b.tensor_in(view.get("input"))], nm, axis=0)
    if cls == "getitem" and isinstance(b.vals.get(node.args[0]), torch.Tensor):
        return _tensor_getitem(b, node)
    mod = b.modules.get(node.target) if node.op == "call_module" else None
    mname = type(mod).__name__ if mod is not None else ""
    if mname == "BinaryActivation":  # sign with sign(0) = +1
        x = b.tensor_in(node.args[0])
        ge = b.add("GreaterOrEqual", [x, b.const(0.0, "zero", torch.float32)], nm + "_ge")
        return b.add("Where", [ge, b.const(1.0, "one", torch.float32), b.const(-1.0, "mone", torch.float32)], nm)
    if mname == "DynamicFakeQuant":
        x = node.args[0]
        c, s = _dynamic_fq(b, b.tensor_in(x), mod.bits, mod.symmetric, mod.reduce_dim, len(b.shape(x)), nm)
        return b.add("Mul", [c, s], nm)
    if mname == "DynamicQuantLinear":
        x = node.args[0]
        reduce_dim = -1 if mod.granularity == "per_token" else None
        c, s = _dynamic_fq(b, b.tensor_in(x), mod.a_bits, mod.symmetric, reduce_dim, len(b.shape(x)), nm)
        q = mod.weight_q.detach().to(torch.int64).t().contiguous()  # [K, N] for MatMul, per-column scales
        qn, zn = b.uid(nm + "_wq"), b.uid(nm + "_wzp")
        b.inits[qn] = int_tensor(qn, _np(q), TensorProto.INT8)
        b.inits[zn] = int_tensor(zn, np.zeros(q.shape[1], dtype=np.int64), TensorProto.INT8)
        # integer-valued weights (scale 1) so the float GEMM sums exact integers, then s_x * s_w as in torch
        ones = b.const(torch.ones(q.shape[1]), nm + "_one")
        w = b.add("DequantizeLinear", [qn, ones, zn], nm + "_wdq", axis=1)
        sw = b.add("Mul", [s, b.const(mod.weight_scale.float(), nm + "_wscale")], nm + "_sxw")
        y = b.add("Mul", [b.add("MatMul", [c, w], nm + "_mm"), sw], nm + "_y")
        if mod.bias is not None:
            y = b.add("Add", [y, b.const(mod.bias.float(), nm + "_b")], nm)
        return y
    if mname == "QATConvBn2d":
        raise ExportError(f"cannot export node {node.name!r}: QATConvBn2d is a training-time module; after training "
                          "apply the qat_convert rules (qpasses.PassManager('qat_convert').run(gm)) and export that")
    # plain ops without an op class
    tn = _target_name(node)
    if node.op == "call_module":
        mod = b.modules.get(node.target)
        if isinstance(mod, (nn.Identity, nn.Dropout)):
            return b.names[node.args[0]]
        if isinstance(mod, nn.Sigmoid):
            tn = "sigmoid"
        elif isinstance(mod, nn.Tanh):
            tn = "tanh"
    if tn in _IDENTITY:
        return b.names[node.args[0]]
    act = _activation(b, node, tn, nm)
    if act is not None:
        return act
    if tn in _UNARY and len(node.args) >= 1:
        return b.add(_UNARY[tn], [b.tensor_in(node.args[0])], nm)
    if tn in _BINARY and len(node.args) == 2:
        a, c = node.args
        like = b.vals.get(a) if isinstance(a, fx.Node) else b.vals.get(c)
        like = like if isinstance(like, torch.Tensor) else None
        return b.add(_BINARY[tn], [b.tensor_in(a, like), b.tensor_in(c, like)], nm)
    if tn == "scaled_dot_product_attention" and node.op == "call_function":
        return _sdpa(b, node, nm)
    if tn in ("unflatten", "squeeze", "unsqueeze") and node.op in ("call_method", "call_function"):
        return _reshape_to(b, node, node.args[0])       # pure reshapes: to the recorded shape
    if tn == "select" and node.op in ("call_method", "call_function") and len(node.args) == 3:
        x, dim, index = node.args
        rank = len(b.shape(x))
        d = _dim(int(dim), rank)
        i = int(index) + (b.shape(x)[d] if int(index) < 0 else 0)
        return b.add("Gather", [b.tensor_in(x), b.const(torch.tensor(i, dtype=torch.int64), nm + "_i")], nm, axis=d)
    if tn == "mean" and node.op in ("call_method", "call_function"):
        x = node.args[0]
        rank = len(b.shape(x))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        dims = list(range(rank)) if dims is None else _tup(dims, 1) if not isinstance(dims, (list, tuple)) else list(dims)
        axes = [_dim(int(d), rank) for d in dims]
        if b.opset >= 18:
            return b.add("ReduceMean", [b.tensor_in(x), b.ints(axes, "axes")], nm, keepdims=int(keep))
        return b.add("ReduceMean", [b.tensor_in(x)], nm, axes=axes, keepdims=int(keep))
    target = node.target if node.op != "call_module" else type(b.modules.get(node.target)).__name__
    hint = ""
    if node.op == "call_module":
        hint = (" (a module whose inside the fx graph does not show: trace with qpasses.trace(model, inputs, "
                "mode='export') to export its aten ops)")
    if "qpasses" in str(target):
        hint = (" (an integer kernel op: ONNX export takes fake-quant graphs; export before the 'lower' recipe, "
                "or run int_only with integerize=false)")
    raise ExportError(f"cannot export node {node.name!r} ({node.op} {target}, op class {cls}) to ONNX{hint}")


def _sdpa(b: _Builder, node: fx.Node, nm: str) -> str:
    """``scaled_dot_product_attention`` spelled out: ``Softmax(Q K^T * scale [+ mask]) V``."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    if a.get("enable_gqa"):
        raise ExportError(f"cannot export node {node.name!r}: scaled_dot_product_attention with enable_gqa")
    if float(a.get("dropout_p") or 0.0) != 0.0:
        raise ExportError(f"cannot export node {node.name!r}: attention dropout (export an eval-mode model)")
    q, k, v = a["query"], a["key"], a["value"]
    qs, ks = b.shape(q), b.shape(k)
    rank = len(ks)
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(qs[-1]) if scale is None else float(scale)
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = b.add("Transpose", [b.tensor_in(k)], nm + "_kt", perm=perm)
    scores = b.add("Mul", [b.add("MatMul", [b.tensor_in(q), kt], nm + "_qk"), b.const(scale, nm + "_sc", torch.float32)],
                   nm + "_s")
    mask = a.get("attn_mask")
    if a.get("is_causal"):
        L, S = qs[-2], ks[-2]
        mask = torch.ones(L, S, dtype=torch.bool).tril()
        scores = b.add("Where", [b.const(mask, nm + "_causal"), scores,
                                 b.const(float("-inf"), nm + "_ninf", torch.float32)], nm + "_m")
    elif mask is not None:
        mv = b.vals.get(mask) if isinstance(mask, fx.Node) else mask
        if isinstance(mv, torch.Tensor) and mv.dtype == torch.bool:
            scores = b.add("Where", [b.tensor_in(mask), scores, b.const(float("-inf"), nm + "_ninf", torch.float32)],
                           nm + "_m")
        else:
            scores = b.add("Add", [scores, b.tensor_in(mask)], nm + "_m")
    p = b.add("Softmax", [scores], nm + "_p", axis=-1)
    return b.add("MatMul", [p, b.tensor_in(v)], nm)


def _activation(b: _Builder, node: fx.Node, tn: str, nm: str) -> Optional[str]:
    """Hardswish / hardsigmoid / leaky_relu / elu / softplus / mish (module, functional or aten), else None."""
    mod = b.modules.get(node.target) if node.op == "call_module" else None
    if mod is not None:
        tn = _ACT_MODULES.get(type(mod), "")
    if tn not in ("hardswish", "hardsigmoid", "leaky_relu", "elu", "softplus", "mish") or not node.args:
        return None

    def arg(i: int, key: str, attr: str, default: float) -> float:
        if mod is not None:
            return float(getattr(mod, attr, default))
        if len(node.args) > i:
            return float(node.args[i])
        return float(node.kwargs.get(key, default))

    x = b.tensor_in(node.args[0])
    if tn == "hardsigmoid":
        return b.add("HardSigmoid", [x], nm, alpha=1.0 / 6, beta=0.5)
    if tn == "hardswish":
        if b.opset >= 14:
            return b.add("HardSwish", [x], nm)
        return b.add("Mul", [x, b.add("HardSigmoid", [x], nm + "_hs", alpha=1.0 / 6, beta=0.5)], nm)
    if tn == "leaky_relu":
        return b.add("LeakyRelu", [x], nm, alpha=arg(1, "negative_slope", "negative_slope", 0.01))
    if tn == "elu":
        if mod is None and (arg(2, "scale", "", 1.0) != 1.0 or arg(3, "input_scale", "", 1.0) != 1.0):
            raise ExportError(f"cannot export node {node.name!r}: elu with scale / input_scale other than 1")
        return b.add("Elu", [x], nm, alpha=arg(1, "alpha", "alpha", 1.0))
    if tn == "softplus":
        beta = arg(1, "beta", "beta", 1.0)          # torch's threshold (linear above it) is a float no-op
        if beta == 1.0:
            return b.add("Softplus", [x], nm)
        bx = b.add("Mul", [x, b.const(beta, nm + "_beta", torch.float32)], nm + "_bx")
        return b.add("Div", [b.add("Softplus", [bx], nm + "_sp"), b.const(beta, nm + "_beta", torch.float32)], nm)
    # mish: x * tanh(softplus(x))
    if b.opset >= 18:
        return b.add("Mish", [x], nm)
    return b.add("Mul", [x, b.add("Tanh", [b.add("Softplus", [x], nm + "_sp")], nm + "_t")], nm)


# ----------------------------------------------------------------------------- driver

class _Recorder(fx.Interpreter):
    """Runs the graph once: every node's value, whether it depends on a graph input (``dynamic``:
    else it is folded to a constant) and whether it was computed from an input's size
    (``sized``: a folded tensor of that kind holds the example's batch size)."""

    def __init__(self, gm, vals, dynamic, sized=None):
        super().__init__(gm)
        self.vals_out = vals
        self.dynamic = dynamic
        self.sized = {} if sized is None else sized

    def run_node(self, n):
        out = super().run_node(n)
        self.vals_out[n] = out
        if n.op == "placeholder":
            self.dynamic[n] = True
            self.sized[n] = False
        elif _is_shape_query(n):
            self.dynamic[n] = False  # static shapes: x.size(1), x.shape, x.dim() are constants
            self.sized[n] = any(self.dynamic.get(a, False) for a in n.all_input_nodes)
        else:
            self.dynamic[n] = any(self.dynamic.get(a, False) for a in n.all_input_nodes)
            self.sized[n] = any(self.sized.get(a, False) for a in n.all_input_nodes)
        return out


def _batch_baked(gm: fx.GraphModule, vals, dynamic, sized) -> Optional[fx.Node]:
    """A tensor folded to a constant although computed from an input's size, and read at run
    time (e.g. ``torch.ones(x.size(0), n)``): the exported graph would hold the example's batch."""
    def const_tensor(n):
        return sized.get(n) and not dynamic.get(n, True) and isinstance(vals.get(n), torch.Tensor)
    if any(const_tensor(n) and any(dynamic.get(u, False) for u in n.users) for n in gm.graph.nodes):
        return next(n for n in gm.graph.nodes if const_tensor(n))    # where it starts, e.g. the ones(...)
    return None


def _is_shape_query(n: fx.Node) -> bool:
    if n.op == "call_method" and n.target in ("size", "dim"):
        return True
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in ("shape", "ndim"):
        return True
    return n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and \
        n.target._schema.name in ("aten::sym_size", "aten::size")


def build_model(gm: fx.GraphModule, example_inputs: Any, opset: int = DEFAULT_OPSET, int4: bool = True,
                dynamic_batch: bool = True, input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None, int4_activations: bool = False) -> onnx.ModelProto:
    """Translate ``gm`` to an (uncleaned) ONNX model; see :func:`export_onnx`."""
    if isinstance(gm, nn.Module) and not isinstance(gm, fx.GraphModule):
        from ..frontend import trace
        gm = trace(gm.eval(), example_inputs)  # a plain (float) model: trace it first
    if not isinstance(gm, fx.GraphModule):
        raise ExportError(f"export_onnx expects a torch.fx.GraphModule (qpasses.trace / PassManager.run) "
                          f"or an nn.Module, got {type(gm).__name__}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: per-axis QDQ needs opset >= {MIN_OPSET}")
    if opset > onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {opset} is newer than this onnx package supports ({onnx.defs.onnx_opset_version()})")
    inputs = as_inputs(example_inputs)
    b = _Builder(gm, opset, int4, int4_activations)
    sized: Dict[fx.Node, bool] = {}
    try:
        with torch.no_grad():
            _Recorder(gm, b.vals, b.dynamic, sized).run(*inputs)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the graph does not run on the example inputs: {type(e).__name__}: {e}") from e
    baked = _batch_baked(gm, b.vals, b.dynamic, sized) if dynamic_batch else None
    if baked is not None:
        batch = next((v.shape[0] for v in inputs if isinstance(v, torch.Tensor) and v.dim()), None)
        warnings.warn(f"export_onnx: node {baked.name!r} computes a tensor from an input's size, which the ONNX "
                      f"graph holds as a constant; the model is exported for the example's batch size ({batch}) "
                      f"only (dynamic_batch=False). Export once per batch size you need.", stacklevel=3)
        dynamic_batch = False
    g_inputs, g_outputs = [], []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = list(input_names or [])
    for i, n in enumerate(placeholders):
        v = b.vals[n]
        if not isinstance(v, torch.Tensor):
            b.names[n] = _Const(v)
            b.dynamic[n] = False
            continue
        nm = names[i] if i < len(names) else ("input" if len(placeholders) == 1 else n.name)
        shp: List[Any] = list(v.shape)
        if dynamic_batch and shp:
            shp[0] = "N"
        g_inputs.append(helper.make_tensor_value_info(nm, _DTYPES[v.dtype], shp))
        b.names[n] = nm
    out_node = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            out_node = n
            continue
        v = b.vals[n]
        if not n.users and not isinstance(v, torch.Tensor):
            continue  # side-effect-only calls (torch.export's _guards_fn, asserts): nothing to export
        # constants: any value that does not depend on a graph input, except weight fake-quant
        # (kept so the consumer exports int8 + DequantizeLinear) and its constant input
        is_wfq = b.fq_module(n) is not None
        if not b.dynamic.get(n, True) and not is_wfq:
            b.names[n] = _Const(v)
            continue
        if n.op == "call_function" and n.target is operator.getitem:
            src = b.names.get(n.args[0])
            if isinstance(src, (list, tuple)):
                b.names[n] = src[n.args[1]]
                continue
        if is_wfq and not b.dynamic.get(n, True):
            b.names[n] = _Const(v)  # used directly only by non-weighted consumers
            continue
        b.names[n] = _convert(b, n)
    flat, _ = torch.utils._pytree.tree_flatten(out_node.args[0])
    onames = list(output_names or [])
    used = set()
    for i, a in enumerate(flat):
        nm = b.tensor_in(a) if isinstance(a, fx.Node) else b.const(a, "out")
        want = onames[i] if i < len(onames) else ("output" if len(flat) == 1 else f"output_{i}")
        v = b.vals[a] if isinstance(a, fx.Node) else torch.as_tensor(a)
        src = nm
        if nm in used or nm in [vi.name for vi in g_inputs] or nm in b.inits:
            nm = b.add("Identity", [src], want)
        b.nodes.append(helper.make_node("Identity", [nm], [want], name=f"{want}_out"))
        used.add(nm)
        shp = list(v.shape)
        if dynamic_batch and shp:
            shp[0] = "N"
        g_outputs.append(helper.make_tensor_value_info(want, _DTYPES[v.dtype], shp))
    graph = helper.make_graph(b.nodes, "qpasses", g_inputs, g_outputs, list(b.inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="qpasses", producer_version="0.1.0")
    model.ir_version = min(model.ir_version, 10)
    return model


def export_onnx(gm: fx.GraphModule, example_inputs: Any, path: Optional[str] = None, opset: int = DEFAULT_OPSET,
                *, int4: bool = True, int4_activations: bool = False, cleanup: bool = True, check: bool = True,
                dynamic_batch: bool = True, input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None) -> onnx.ModelProto:
    """Export a (fake-)quantized GraphModule as a standard QDQ ONNX model.

    Args:
        gm: a GraphModule from :func:`qpasses.trace` or ``PassManager.run`` (fx or aten level).
            Float graphs export too (no Q/DQ); a plain ``nn.Module`` is traced first.
        example_inputs: a tensor or tuple of positional inputs; the graph runs on them once
            to learn shapes and constants.
        path: where to write the ``.onnx`` file (``None``: only return the model).
        opset: ONNX opset (13..).  At ``opset >= 21`` weights whose integer range fits 4 bits
            are stored as ``INT4``/``UINT4`` initializers and 16-bit ranges are allowed.
        int4: allow 4-bit weight initializers (when the opset has them).
        int4_activations: use 4-bit Q/DQ types for activations with a 4-bit range too (opset >= 21).
            Off by default: onnxruntime's CPU integer kernels (QLinearConv, ...) reject 4-bit
            activations, so 4-bit activation codes go in uint8/int8 containers with a ``Clip``.
        cleanup: run the onnx-graphsurgeon clean-up (redundant Q/DQ pairs, dead nodes, topological order).
        check: run ``onnx.checker.check_model(full_check=True)``.
        dynamic_batch: make dimension 0 of inputs and outputs symbolic (``N``).

    Returns:
        The ``onnx.ModelProto`` (also written to ``path``).

    Raises:
        ExportError: an op or parameter that ONNX cannot express (names the node).
    """
    model = build_model(gm, example_inputs, opset, int4, dynamic_batch, input_names, output_names, int4_activations)
    if cleanup:
        from .cleanup import cleanup_model
        model = cleanup_model(model)
    if check:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"the exported model fails onnx.checker: {e}") from e
    if path is not None:
        import os
        d = os.path.dirname(os.fspath(path))
        if d:
            os.makedirs(d, exist_ok=True)
        onnx.save(model, os.fspath(path))
    return model
