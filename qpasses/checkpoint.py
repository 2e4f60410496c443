"""LLM checkpoints for serving engines: a quantized graph written as a compressed-tensors checkpoint.

vLLM and SGLang load quantized Hugging Face checkpoints in the compressed-tensors format:
safetensors files holding the compressed weights and their qparams, plus a
``quantization_config`` (``quant_method: compressed-tensors``) in ``config.json``.
:func:`save_compressed` writes one from a qpasses result, with the ``compressed-tensors``
package's own machinery (``apply_quantization_config`` attaches the scheme to each layer,
``ModelCompressor`` compresses and writes the config), so the files are what its loaders and the
engines read:

=============================  ===================================  =====================================
qpasses result                 weights                              activations (engine-side)
=============================  ===================================  =====================================
``w4a16``                      int4, group (32/64/128), symmetric   float
                               or with zero points (pack-quantized)
``dynamic_int8`` (per token)   int8, per output channel, symmetric  int8 per token, dynamic
                               (int-quantized)
``w8a8_fp8``                   float8 e4m3, per output channel      fp8 per tensor (static, with
                               (float-quantized)                    ``input_scale``) or per token (dynamic)
=============================  ===================================  =====================================

Graph weights are mapped back to the HF module names: the quantizer of a weight reads a
``get_attr`` of ``<module path>.weight`` (or the node records the module it replaced), and that
path -- with any wrapper prefix the traced model added -- is matched to the ``nn.Linear``
modules of ``hf_model``.  The weight written is exactly the fake-quantized weight of the graph
(its codes and scales).  Linear layers the graph left in float are listed in ``ignore``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import QPassesError
from .opclasses import get_attr_value
from .qnodes import fp8_dynamic_granularity, quantizer_module

__all__ = ["save_compressed", "compressed_entries", "CheckpointError", "LayerQuant"]


class CheckpointError(QPassesError, ValueError):
    """The quantized graph cannot be written as a compressed-tensors checkpoint (the message says why)."""


@dataclass
class LayerQuant:
    """How one HF linear layer is quantized in the graph."""
    name: str                          # module path in the HF model
    kind: str                          # "int4_group" | "int8_dynamic" | "fp8"
    weight: torch.Tensor               # the fake-quantized weight (float), what the graph computes
    scale: torch.Tensor                # [N, 1] per channel, [N, G] per group
    zero_point: Optional[torch.Tensor] = None
    group_size: Optional[int] = None
    act: Dict[str, Any] = field(default_factory=dict)   # activation scheme (dynamic, strategy, symmetric, scale)

    def signature(self) -> Tuple:
        return (self.kind, self.group_size, self.zero_point is None,
                tuple(sorted((k, v) for k, v in self.act.items() if k != "scale")))


# ------------------------------------------------------------------------ reading the graph
def _module_path_of(node: fx.Node) -> Optional[str]:
    """The module path an op node stands for (qpasses meta, or torch.export's module stack)."""
    p = node.meta.get("qpasses.module")
    if p:
        return str(p)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path)
    return None


def _weight_path(node: fx.Node) -> Optional[str]:
    """``<module path>`` of a ``get_attr`` of ``<module path>.weight``."""
    if isinstance(node, fx.Node) and node.op == "get_attr" and str(node.target).endswith("weight"):
        t = str(node.target)
        return t[: -len(".weight")] if t.endswith(".weight") else None
    return None


def _resolve(path: str, linears: Dict[str, nn.Linear], shape) -> str:
    """The HF module name ``path`` refers to: equal, or ``path`` ends with ``.<name>`` (a wrapper
    prefix), or export's ``_``-joined spelling; the weight shape must agree."""
    cands = [n for n in linears if path == n or path.endswith("." + n) or path.replace(".", "_") == n.replace(".", "_")]
    if not cands:
        raise CheckpointError(f"graph weight {path!r} matches no nn.Linear of the Hugging Face model")
    best = max(cands, key=len)
    if tuple(linears[best].weight.shape) != tuple(shape):
        raise CheckpointError(f"graph weight {path!r} has shape {tuple(shape)}, but {best} of the Hugging Face "
                              f"model has {tuple(linears[best].weight.shape)}")
    return best


def _input_quantizer(gm: fx.GraphModule, op: fx.Node, mods) -> Any:
    x = op.args[0] if op.args else None
    return quantizer_module(mods, x, None)


def compressed_entries(qgm: fx.GraphModule, hf_model: nn.Module) -> Tuple[List[LayerQuant], List[str]]:
    """``(quantized layers, linear layers left in float)`` of ``qgm`` in terms of ``hf_model``'s
    module names.  Raises :class:`CheckpointError` for quantizers the format cannot hold."""
    from .kernels.lowering import Int4GroupFakeQuantize
    from .methods.dynamic.lib import dynamic_linear_quantizers
    from .numerics import FakeQuantize
    from .numerics.fp8 import Fp8DynamicQuantize, Fp8FakeQuantize

    linears = {n: m for n, m in hf_model.named_modules() if isinstance(m, nn.Linear)}
    mods = dict(qgm.named_modules())
    out: Dict[str, LayerQuant] = {}
    for n in qgm.graph.nodes:
        mod = quantizer_module(mods, n, None)
        if mod is None:
            continue
        if not isinstance(mod, (Int4GroupFakeQuantize, Fp8FakeQuantize, FakeQuantize)):
            continue
        path = _weight_path(n.args[0]) if n.args else None
        if path is None:
            continue                                    # an activation quantizer
        w_float = get_attr_value(qgm, n.args[0].target)      # tied parameters have several names
        if w_float.dim() != 2:
            continue                                    # conv weights: not an LLM linear layer
        name = _resolve(path, linears, w_float.shape)
        ops_reading = [u for u in n.users]
        with torch.no_grad():
            wq = mod(w_float.detach()).detach().float()
        if isinstance(mod, Int4GroupFakeQuantize):
            k = w_float.shape[1]
            if k % mod.group_size:
                raise CheckpointError(f"{name}: in_features {k} is not a multiple of group_size {mod.group_size}")
            zp = None if mod.zeros is None else (mod.zeros.detach() - 8).to(torch.int8)
            out[name] = LayerQuant(name, "int4_group", wq, mod.scales.detach().float(), zp, mod.group_size)
        elif isinstance(mod, Fp8FakeQuantize):
            if mod.axis not in (0, None):
                raise CheckpointError(f"{name}: fp8 weight scales along axis {mod.axis} (want per output channel)")
            s = mod.scale.detach().float().reshape(-1, 1)
            if s.numel() == 1:
                s = s.expand(w_float.shape[0], 1).clone()
            aq = _input_quantizer(qgm, ops_reading[0], mods) if ops_reading else None
            dyn = fp8_dynamic_granularity(ops_reading[0].args[0] if ops_reading and ops_reading[0].args else None)
            if dyn is not None:                         # the plain dynamic fp8 op call
                act = {"dynamic": True, "strategy": "token" if dyn == "per_token" else "tensor", "type": "float"}
            elif isinstance(aq, Fp8DynamicQuantize):
                act = {"dynamic": True, "strategy": "token" if aq.per_token else "tensor", "type": "float"}
            elif isinstance(aq, Fp8FakeQuantize) and aq.axis is None:
                act = {"dynamic": False, "strategy": "tensor", "type": "float", "scale": aq.scale.detach().float()}
            else:
                act = {}
            out[name] = LayerQuant(name, "fp8", wq, s, act=act)
        elif ops_reading and all(dynamic_linear_quantizers(mods, u) is not None for u in ops_reading):
            # dynamic_int8's linear(dyn_q(x), fq_w(W), b): W8A8 int8, dynamic per-token input
            dq = dynamic_linear_quantizers(mods, ops_reading[0])[0]
            per_token = dq.reduce_dim == -1
            if mod.bits != 8 or dq.bits != 8 or not per_token:
                raise CheckpointError(f"{name}: compressed-tensors W8A8 int8 is 8-bit weights with 8-bit per-token "
                                      f"activations; this layer has w_bits={mod.bits}, a_bits={dq.bits}, "
                                      f"{'per_token' if per_token else 'per_tensor'}")
            if mod.axis != 0 or bool((mod.zero_point != 0).any()):
                raise CheckpointError(f"{name}: W8A8 int8 weights are symmetric per output channel; this "
                                      f"quantizer has axis {mod.axis} and a non-zero zero point")
            s = mod.scale.detach().float().reshape(-1, 1)
            out[name] = LayerQuant(name, "int8_dynamic", wq, s,
                                   act={"dynamic": True, "strategy": "token", "symmetric": bool(dq.symmetric),
                                        "type": "int"})
        else:
            raise CheckpointError(f"{name}: integer FakeQuantize weights ({mod.bits} bits, axis {mod.axis}) are "
                                  f"not written here: use w4a16, dynamic_int8 (per_token) or w8a8_fp8")
    floats = [n for n in linears if n not in out]
    return list(out.values()), floats


def _tied_output_name(hf_model: nn.Module) -> Optional[str]:
    """Module name of the output embeddings when they share their weight with the input embeddings."""
    try:
        out, inp = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    return next((n for n, m in hf_model.named_modules() if m is out), None)


# ------------------------------------------------------------------------ the scheme
def _scheme_args(e: LayerQuant):
    from compressed_tensors.quantization import QuantizationArgs
    if e.kind == "int4_group":
        w = QuantizationArgs(num_bits=4, type="int", symmetric=e.zero_point is None, strategy="group",
                             group_size=e.group_size)
        return w, None
    if e.kind == "int8_dynamic":
        w = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        a = QuantizationArgs(num_bits=8, type="int", symmetric=e.act["symmetric"], strategy="token", dynamic=True)
        return w, a
    w = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    if not e.act:
        return w, None
    a = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=e.act["strategy"],
                         dynamic=e.act["dynamic"])
    return w, a


def save_compressed(qgm: fx.GraphModule, hf_model: nn.Module, directory: str, *,
                    safe_serialization: bool = True) -> Dict[str, Any]:
    """Write ``hf_model`` with the quantized weights of ``qgm`` as a compressed-tensors checkpoint.

    Args:
        qgm: the quantized graph (``PassManager("w4a16" | "dynamic_int8" | "w8a8_fp8").run(...)``)
            of ``hf_model`` (or of a wrapper around it).
        hf_model: the Hugging Face model the graph was traced from (left unchanged: a copy is
            compressed); its ``config`` and ``save_pretrained`` are used.
        directory: output folder (``config.json`` with ``quantization_config``, safetensors).

    Returns the ``quantization_config`` written.  Every quantized layer must share one scheme.
    """
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                     apply_quantization_config)
    except ImportError as e:  # pragma: no cover - an optional dependency
        raise ImportError("save_compressed needs the 'compressed-tensors' package (pip install compressed-tensors)") \
            from e
    entries, floats = compressed_entries(qgm, hf_model)
    if not entries:
        raise CheckpointError("the graph has no quantized linear weight to write")
    tied = _tied_output_name(hf_model)
    if tied is not None and any(e.name == tied for e in entries):
        raise CheckpointError(f"{tied} shares its weight with the input embeddings (tie_word_embeddings): a "
                              f"quantized {tied} cannot be stored without changing the embeddings; quantize with "
                              f"skip=['*{tied}*'] to keep it in float")
    sigs = {e.signature() for e in entries}
    if len(sigs) > 1:
        kinds = sorted({e.kind for e in entries})
        raise CheckpointError(f"the quantized layers use {len(sigs)} different schemes ({', '.join(kinds)}); a "
                              f"checkpoint written here has one scheme for every quantized layer")
    first = entries[0]
    w_args, a_args = _scheme_args(first)
    scheme = QuantizationScheme(targets=["Linear"], weights=w_args, input_activations=a_args)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=sorted(floats),
                                 quantization_status=QuantizationStatus.INITIALIZED)
    model = copy.deepcopy(hf_model)
    apply_quantization_config(model, qconfig, show_progress=False)
    named = dict(model.named_modules())
    with torch.no_grad():
        for e in entries:
            m = named[e.name]
            dt = m.weight.dtype
            m.weight.data = e.weight.to(dt).clone()
            m.weight_scale.data = e.scale.to(m.weight_scale.dtype).reshape(m.weight_scale.shape).clone()
            if e.zero_point is not None:
                m.weight_zero_point.data = e.zero_point.to(m.weight_zero_point.dtype).reshape(
                    m.weight_zero_point.shape).clone()
            if "scale" in e.act:
                m.input_scale.data = e.act["scale"].to(m.input_scale.dtype).reshape(m.input_scale.shape).clone()
            m.quantization_status = QuantizationStatus.FROZEN
    qconfig.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    compressor.remove_decompression_hook(model)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=safe_serialization)
    compressor.update_config(directory)
    import json
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)["quantization_config"]
