"""fx GraphModule -> standard QDQ ONNX, through ``torch.onnx.export(..., dynamo=True)``.

1. **Prepare** (on a copy; the caller's graph is never touched): quantizer modules that are not
   one custom-op call become one; ACIQ's ``qpasses::fake_quant_channel_bits`` becomes a
   per-channel quantizer (a range per channel has no ONNX form); the group-wise int4 quantizer (``qpasses::fake_quant_per_group`` on an ``Int4GroupFakeQuantize``
   holder's ``get_attr`` qparams) gets integer zero points; a weight quantizer reading a constant
   reads that constant already fake-quantized by the module itself, so the integer codes folded
   later are exactly the module's; observers are dropped; disabled quantizers are the identity.
   Anything that cannot export (a QAT training pattern's ``QATBatchNorm2d``, an integer kernel op) is
   collected.
2. **torch.export** with the batch / sequence dimensions dynamic where the fx graph is
   (``gm.meta["qpasses.dynamic_dims"]`` from :func:`qpasses.trace`; dimension 0 of every input of
   an fx-level graph).
3. **torch.onnx** translates the aten ops with torchlib and each ``torch.ops.qpasses`` quantizer
   with :mod:`qpasses.onnx.translate` (its ``custom_translation_table``).  When ops have no
   translation, every one of them is listed in the :class:`ExportError` (op, node, reason).
4. **Clean-up** (:mod:`qpasses.onnx.cleanup`, onnx-graphsurgeon): the ``QuantizeLinear`` of a
   constant weight folded into an INT8 / INT4 initializer read by ``DequantizeLinear``, a weight
   transpose folded into it, identity casts dropped, the ``qdq_cleanup`` rules, dead nodes.
5. ``onnx.checker`` (full check).
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from ..errors import QPassesError
from ..frontend import as_inputs
from ..numerics import FakeQuantize
from ..qnodes import is_quantizer_call, quantizer_module
from . import translate as _tr

__all__ = ["export_onnx", "ExportError", "build_model", "DEFAULT_OPSET", "MIN_OPSET", "quant_type", "int_tensor",
           "quantize_for_onnx"]

DEFAULT_OPSET = 21
MIN_OPSET = 13


class ExportError(QPassesError):
    """The graph holds something the ONNX exporter cannot express (the message names every such node)."""


_QOPS = torch.ops.qpasses


# helpers shared with the ONNX quantizer (qpasses.onnx.quantize)
def quant_type(qmin: int, qmax: int, opset: int, allow_4bit: bool = True) -> Tuple[int, int, int]:
    """(ONNX ``TensorProto`` element type, type min, type max) of the narrowest type holding ``[qmin, qmax]``."""
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


# ----------------------------------------------------------------------------- prepare (fx copy)
def _const_value(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    """The tensor of a ``get_attr`` node (a weight), else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            v = gm.get_submodule(node.target.rsplit(".", 1)[0]) if "." in node.target else gm
            v = getattr(v, node.target.rsplit(".", 1)[-1])
        except AttributeError:
            return None
        return v if isinstance(v, torch.Tensor) else None
    return None


class _Prep:
    def __init__(self, gm: fx.GraphModule, opts: _tr.ExportOptions):
        self.gm = gm
        self.opts = opts
        self.g = gm.graph
        self.modules = dict(gm.named_modules())
        self.problems: List[Tuple[str, str, str]] = []      # (node, op, reason)
        self._n = 0

    def attr(self, value: torch.Tensor, before: fx.Node, base: str = "_onnx_const") -> fx.Node:
        self._n += 1
        name = f"{base}_{self._n}"
        self.gm.register_buffer(name, value.detach().clone(), persistent=False)
        with self.g.inserting_before(before):
            return self.g.get_attr(name)

    def call(self, fn, args, before: fx.Node) -> fx.Node:
        with self.g.inserting_before(before):
            return self.g.call_function(fn, tuple(args))

    def run(self) -> None:
        from ..kernels.lowering import Int4GroupFakeQuantize
        from ..methods.aciq.lib import ChannelBitsFakeQuant
        from ..methods.qat.lib import QATBatchNorm2d
        from ..numerics.observers import Observer
        for node in list(self.g.nodes):
            if node.op == "call_module":
                m = self.modules.get(node.target)
                if isinstance(m, FakeQuantize):
                    self.fake_quant(node, m)
                elif isinstance(m, Int4GroupFakeQuantize):
                    self.group_int4(node, m)
                elif isinstance(m, ChannelBitsFakeQuant):
                    self.channel_bits(node, m)
                elif isinstance(m, Observer):
                    node.replace_all_uses_with(node.args[0])
                    self.g.erase_node(node)
                elif isinstance(m, QATBatchNorm2d):
                    self.problems.append((node.name, "QATBatchNorm2d", "the BatchNorm of a QAT conv + BatchNorm "
                                          "training pattern: run PassManager('qat_convert') on the trained graph "
                                          "first (qat_convert)"))
                elif type(m).__name__ == "GenieWeightQuantizer" or type(m).__name__ == "GenieActQuantizer":
                    self.problems.append((node.name, type(m).__name__, "a reconstruction-time quantizer: "
                                          "export the graph the genie recipe returns"))
            elif is_quantizer_call(node) and isinstance(quantizer_module(self.modules, node), FakeQuantize):
                self.fake_quant_call(node)
            elif is_quantizer_call(node) and isinstance(quantizer_module(self.modules, node, None),
                                                        Int4GroupFakeQuantize):
                self.group_int4(node, quantizer_module(self.modules, node, None))
            elif is_quantizer_call(node) and isinstance(quantizer_module(self.modules, node, None),
                                                        ChannelBitsFakeQuant):
                self.channel_bits(node, quantizer_module(self.modules, node, None))
            elif node.op == "call_function" and node.target is _QOPS.binary_weight.default:
                self.constant_weight(node)
            elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                    and node.target.namespace == "qpasses" and node.target not in _tr.translation_table():
                self.problems.append((node.name, str(node.target),
                                      "an integer kernel op: ONNX export takes fake-quant graphs; export before "
                                      "the 'lower' recipe, or run int_only with integerize=false"))
        self.g.eliminate_dead_code()
        self.g.lint()
        self.gm.recompile()

    # -- quantizers
    def fake_quant(self, node: fx.Node, m: FakeQuantize) -> None:
        x = node.args[0]
        if not m.enabled:
            node.replace_all_uses_with(x)
            self.g.erase_node(node)
            return
        w = _const_value(self.gm, x)
        if w is not None:   # a weight: fake-quantized by the module itself, so the folded codes are its own
            with torch.no_grad():
                node.args = (self.attr(m(w.detach()), node),) + tuple(node.args[1:])

    def fake_quant_call(self, node: fx.Node) -> None:
        """A quantizer op node reading a constant weight reads it already fake-quantized by the
        same op (so the integer codes folded later are exactly the graph's)."""
        w = _const_value(self.gm, node.args[0])
        if w is None:
            return
        rest = [_const_value(self.gm, a) if isinstance(a, fx.Node) else a for a in node.args[1:]]
        with torch.no_grad():
            node.args = (self.attr(node.target(w.detach(), *rest), node),) + tuple(node.args[1:])

    def group_int4(self, node: fx.Node, m) -> None:
        w = _const_value(self.gm, node.args[0])
        if w is None:
            self.problems.append((node.name, "Int4GroupFakeQuantize", "its input is not a constant weight"))
            return
        with torch.no_grad():
            wq = m(w.detach())
        if self.opts.opset < 21:        # no blocked DequantizeLinear before opset 21: the float weight
            node.replace_all_uses_with(self.attr(wq, node))
            self.g.erase_node(node)
            return
        zeros = m.zeros if m.zeros is not None else torch.full_like(m.scales, 8.0)
        s = self.attr(m.scales.float(), node, "_onnx_scale")
        z = self.attr(torch.round(zeros).to(torch.int32), node, "_onnx_zp")
        new = self.call(_QOPS.fake_quant_per_group.default, (self.attr(wq, node), s, z, m.group_size, 0, 15), node)
        node.replace_all_uses_with(new)
        self.g.erase_node(node)

    def constant_weight(self, node: fx.Node) -> None:
        """A stateless weight quantizer op (``binary_weight``) on a constant: its value, folded."""
        w = _const_value(self.gm, node.args[0])
        if w is None:
            return                      # a non-constant input: the op's own translation
        with torch.no_grad():
            node.replace_all_uses_with(self.attr(node.target(w.detach(), *node.args[1:]), node))
        self.g.erase_node(node)

    def channel_bits(self, node: fx.Node, m) -> None:
        w = _const_value(self.gm, node.args[0])
        if w is None:
            self.problems.append((node.name, "ChannelBitsFakeQuant", "its input is not a constant weight"))
            return
        with torch.no_grad():
            wq = m(w.detach())
            ax = m.axis % w.dim()
            scale = (m.scale * m.gain).float()
            if torch.any(scale <= 0):      # a channel scaled by 0 (or flipped): the float weight
                node.replace_all_uses_with(self.attr(wq, node))
                self.g.erase_node(node)
                return
            shape = [1] * w.dim()
            shape[ax] = -1
            offset = m.offset.reshape(shape)
            codes_in = wq - offset            # q * s * gain: the per-channel codes times their scale
        qmax = int(m.qmax.max().item())
        new = self.call(_QOPS.fake_quant_per_channel.default,
                        (self.attr(codes_in, node), self.attr(scale, node, "_onnx_scale"),
                         self.attr(torch.zeros_like(scale, dtype=torch.int32), node, "_onnx_zp"), ax, -qmax, qmax),
                        node)
        if torch.any(offset != 0):
            new = self.call(torch.ops.aten.add.Tensor, (new, self.attr(offset, node, "_onnx_offset")), node)
        node.replace_all_uses_with(new)
        self.g.erase_node(node)


# ----------------------------------------------------------------------------- export
def _dynamic_shapes(gm: fx.GraphModule, inputs: Tuple[Any, ...], dynamic_batch: bool, dim):
    """``dynamic_shapes`` for torch.export: the dims ``qpasses.trace`` found dynamic (aten graphs),
    else dimension 0 of every tensor input (fx graphs); ``None`` when nothing is dynamic."""
    if not dynamic_batch:
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dd = gm.meta.get("qpasses.dynamic_dims") if isinstance(getattr(gm, "meta", None), dict) else None
    specs = []
    for i, (p, x) in enumerate(zip(placeholders, inputs)):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            specs.append(None)
            continue
        dims = dd.get(p.name, dd.get(str(p.target))) if isinstance(dd, dict) else None
        if dims is None:
            dims = [0]
        specs.append({int(d): dim for d in dims} or None)
    if not any(specs):
        return None
    return tuple(specs)


def _default_names(gm: fx.GraphModule, inputs, outputs_n: int, input_names, output_names):
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = [p for p, x in zip(placeholders, inputs) if isinstance(x, torch.Tensor)]
    names = list(input_names or [])
    ins = [names[i] if i < len(names) else ("input" if len(tensors) == 1 else p.name) for i, p in enumerate(tensors)]
    onames = list(output_names or [])
    outs = [onames[i] if i < len(onames) else ("output" if outputs_n == 1 else f"output_{i}") for i in range(outputs_n)]
    return ins, outs


def _unsupported(ep, table) -> List[Tuple[str, str, str]]:
    """Every call of the exported program that torch.onnx cannot dispatch: (node, op, reason)."""
    import logging
    lg = logging.getLogger("torch.onnx")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        from torch.onnx._internal.exporter import _core, _dispatching, _registration
        registry = _registration.ONNXRegistry.from_torchlib()
        for k, v in table.items():
            registry.register_op(k, v, is_complex=False)
        prog = _core._prepare_exported_program_for_export(ep, registry=registry)
    except Exception:  # noqa: BLE001  private API moved: no list, the caller reports the first error
        return []
    finally:
        lg.setLevel(level)
    out = []
    for n in prog.graph.nodes:
        if n.op != "call_function":
            continue
        try:
            fn, msg = _dispatching.dispatch(n, registry)
        except Exception as e:  # noqa: BLE001
            fn, msg = None, f"{type(e).__name__}: {e}"
        if fn is None:
            out.append((n.name, str(n.target), (msg or "no ONNX translation").splitlines()[0][:300]))
    return out


def _format(problems: List[Tuple[str, str, str]]) -> str:
    by_op: Dict[str, List[Tuple[str, str]]] = {}
    for node, op, why in problems:
        by_op.setdefault(op, []).append((node, why))
    lines = [f"{len(problems)} node(s) cannot be exported to ONNX:"]
    for op, items in by_op.items():
        nodes = ", ".join(repr(n) for n, _ in items[:12]) + (f" (+{len(items) - 12} more)" if len(items) > 12 else "")
        lines.append(f"  {op}: {items[0][1]} -- node(s) {nodes}")
    return "\n".join(lines)


def build_model(gm: fx.GraphModule, example_inputs: Any, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None, int4_activations: bool = False,
                optimize: bool = True) -> onnx.ModelProto:
    """The ONNX model torch.onnx makes of ``gm`` (before the clean-up); see :func:`export_onnx`."""
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
    opts = _tr.ExportOptions(opset=max(opset, 18), int4_activations=int4_activations)
    try:
        work = copy.deepcopy(gm)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"cannot copy the graph for export: {type(e).__name__}: {e}") from e
    work.eval()
    prep = _Prep(work, opts)
    prep.run()
    if prep.problems:
        raise ExportError(_format(prep.problems))
    args = tuple(inputs)
    ds = _dynamic_shapes(work, args, dynamic_batch, torch.export.Dim.DYNAMIC)
    ep = None
    err: Optional[BaseException] = None
    attempts: List[Tuple[Tuple[Any, ...], Any]] = []
    if ds is not None:
        # torch.export specialises a dimension of size 1: trace with 2 there (the example repeated)
        grown = tuple(x.repeat(*[2 if (s is not None and d in s and x.shape[d] == 1) else 1 for d in range(x.dim())])
                      if isinstance(x, torch.Tensor) and s is not None else x for x, s in zip(args, ds))
        if any(g is not x for g, x in zip(grown, args)):
            attempts.append((grown, ds))
        attempts.append((args, ds))
        attempts.append((args, tuple(None if s is None else {d: torch.export.Dim.AUTO for d in s} for s in ds)))
    else:
        attempts.append((args, None))
    for ex_args, shapes in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(work, ex_args, dynamic_shapes=shapes, strict=False)
            break
        except Exception as e:  # noqa: BLE001
            err = e if err is None else err
    if ep is None:
        raise ExportError(f"torch.export failed on the graph: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    n_out = len([s for s in ep.graph_signature.output_specs if s.kind.name == "USER_OUTPUT"])
    ins, outs = _default_names(work, args, n_out, input_names, output_names)
    table = _tr.translation_table()
    try:
        with _tr.using(opts), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import logging
            lg = logging.getLogger("torch.onnx")
            level = lg.level
            lg.setLevel(logging.ERROR)
            try:
                prog = torch.onnx.export(ep, (), dynamo=True, opset_version=opts.opset,
                                         custom_translation_table=table, optimize=False, verbose=False)
                if optimize:
                    _optimize(prog)
            finally:
                lg.setLevel(level)
    except Exception as e:  # noqa: BLE001
        problems = _unsupported(ep, table)
        if problems:
            raise ExportError(_format(problems)) from e
        chain, c = [], e
        while c is not None and len(chain) < 16:
            chain.append(c)
            c = c.__cause__ or c.__context__
        root = next((c for c in chain if isinstance(c, _tr.TranslationError)), chain[-1])
        where = next((str(c).strip().splitlines()[0] for c in chain if "Error when translating node" in str(c)), "")
        raise ExportError(f"torch.onnx could not translate the graph: {type(root).__name__}: "
                          f"{str(root).strip()[:1500]}" + (f" ({where[:300]})" if where else "")) from e
    model = prog.model_proto
    _rename_io(model, ins, outs)
    _rename_dims(model)
    _name_nodes(model)
    if opset < opts.opset:
        try:
            from onnx import version_converter
            model = version_converter.convert_version(model, opset)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"the model exports at opset {opts.opset} (torch.onnx's lowest) but onnx's version "
                              f"converter cannot bring it down to opset {opset}: {type(e).__name__}: {e}") from e
    return model


def _keep_qdq(node) -> Optional[bool]:
    """Never constant-fold a Q/DQ node: a weight's Q is folded by qpasses' clean-up into an integer
    initializer, its DQ stays (integer weights must stay integer)."""
    return False if node.op_type in ("QuantizeLinear", "DequantizeLinear") else None


def _optimize(prog) -> None:
    """onnxscript's optimizer (constant folding, its rewrite rules, CSE) as torch.onnx runs it,
    except the rule that fuses BatchNormalization into Conv: the ONNX graph keeps the fx graph's
    ops (the ONNX rule adapter folds BatchNorm itself; quantized graphs have none left)."""
    try:
        from onnxscript import ir as oir
        from onnxscript import rewriter
        import onnx_ir.passes.common as common_passes
        from onnxscript.optimizer import _constant_folding
        from onnxscript.rewriter import _fuse_batchnorm
        skip = set(map(id, getattr(_fuse_batchnorm.rules, "rules", _fuse_batchnorm.rules)))
        rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if id(r) not in skip]
        passes = oir.passes.Sequential(
            common_passes.InlinePass(),
            oir.passes.PassManager([_constant_folding.FoldConstantsPass(shape_inference=True,
                                                                          input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                                                          output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                                                          should_fold=_keep_qdq),
                                    rewriter.RewritePass(rules), common_passes.RemoveUnusedNodesPass(),
                                    common_passes.RemoveUnusedFunctionsPass(), common_passes.RemoveUnusedOpsetsPass()],
                                   steps=2, early_stop=True),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common_passes.LiftSubgraphInitializersToMainGraphPass(),
            common_passes.DeduplicateInitializersPass(),
            common_passes.CommonSubexpressionEliminationPass(),
            common_passes.OutputFixPass(),
            common_passes.NameFixPass())
        passes(prog.model)
    except (ImportError, AttributeError, TypeError):   # onnxscript moved its internals: its full optimizer
        prog.optimize()


def _rename_io(model: onnx.ModelProto, ins: Sequence[str], outs: Sequence[str]) -> None:
    """Name the graph inputs / outputs ``ins`` / ``outs``; a value already holding a wanted name is
    renamed out of the way first (torch.onnx's own renaming can leave two values named alike)."""
    g = model.graph
    used = {i.name for i in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output} | \
        {v.name for v in g.value_info} | {x for n in g.node for x in list(n.input) + list(n.output)}

    def rename(old: str, new: str) -> None:
        for n in g.node:
            for lst in (n.input, n.output):
                for i, x in enumerate(lst):
                    if x == old:
                        lst[i] = new
        for coll in (g.initializer, g.input, g.output, g.value_info):
            for v in coll:
                if v.name == old:
                    v.name = new
        used.discard(old)
        used.add(new)

    pairs = list(zip([v.name for v in g.input], ins)) + list(zip([v.name for v in g.output], outs))
    for old, new in pairs:
        if old == new:
            continue
        if new in used:
            k = 1
            while f"{new}_{k}" in used:
                k += 1
            rename(new, f"{new}_{k}")
        rename(old, new)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Node names from the module path torch.onnx records (``fc/linear``, ``features.0/conv2d``),
    so globs over ONNX node names (``skip=["*fc*"]``) find the layers by their PyTorch names."""
    import ast
    used = set()
    for n in model.graph.node:
        scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if not scopes:
            used.add(n.name)
            continue
        try:
            parts = [str(x) for x in ast.literal_eval(scopes)]
        except (ValueError, SyntaxError):
            used.add(n.name)
            continue
        base = "/".join(parts) or n.name
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        n.name = name
        used.add(name)
    used = set()
    for n in model.graph.node:
        used.add(n.name)
    if len(used) != len(model.graph.node):      # a clash with a node left unnamed by the scopes: suffix
        seen: set = set()
        for i, n in enumerate(model.graph.node):
            if n.name in seen:
                n.name = f"{n.name}__{i}"
            seen.add(n.name)


def _rename_dims(model: onnx.ModelProto) -> None:
    """Symbolic dims get readable names: the first dim of the inputs ``N``, then ``L``, ``D2``, ..."""
    names: Dict[str, str] = {}
    for vi in model.graph.input:
        for d, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.dim_param and dim.dim_param not in names:
                want = "N" if d == 0 else ("L" if d == 1 else f"D{d}")
                if want in names.values():
                    want = f"{want}_{len(names)}"
                names[dim.dim_param] = want
    if not names:
        return
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def export_onnx(gm: fx.GraphModule, example_inputs: Any, path: Optional[str] = None, opset: int = DEFAULT_OPSET,
                *, int4: bool = True, int4_activations: bool = False, cleanup: bool = True, check: bool = True,
                dynamic_batch: bool = True, input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None) -> onnx.ModelProto:
    """Export a (fake-)quantized GraphModule as a standard QDQ ONNX model, through
    ``torch.onnx.export(..., dynamo=True)`` with qpasses' quantizer translations.

    Args:
        gm: a GraphModule from :func:`qpasses.trace` or ``PassManager.run`` (fx or aten level).
            Float graphs export too (no Q/DQ); a plain ``nn.Module`` is traced first.  ``gm`` is
            not modified (the export works on a copy).
        example_inputs: a tensor or tuple of positional inputs (for torch.export).
        path: where to write the ``.onnx`` file (``None``: only return the model).
        opset: ONNX opset (13..).  torch.onnx translates at opset >= 18; a lower opset is reached
            with onnx's version converter.  At opset 21 weights whose codes fit 4 bits are stored
            as ``INT4``/``UINT4`` initializers, 16-bit ranges are allowed and group-wise weights
            use blocked ``DequantizeLinear``.
        int4: allow 4-bit weight initializers (at opset 21).
        int4_activations: use 4-bit Q/DQ types for activations with a 4-bit range too (opset 21).
            Off by default: onnxruntime's CPU integer kernels (QLinearConv, ...) reject 4-bit
            activations, so 4-bit activation codes go in uint8/int8 containers with a ``Clip``.
        cleanup: run the onnx-graphsurgeon clean-up (:mod:`qpasses.onnx.cleanup`: ``qdq_cleanup``
            rules, constant folding); weight quantizers are folded into integer initializers either way.
        check: run ``onnx.checker.check_model(full_check=True)``.
        dynamic_batch: keep the batch (and, for torch.export graphs, sequence) dimensions dynamic.

    Returns:
        The ``onnx.ModelProto`` (also written to ``path``).

    Raises:
        ExportError: ops or parameters ONNX cannot express -- every such node, with its op and why.
    """
    model = build_model(gm, example_inputs, opset, dynamic_batch, input_names, output_names, int4_activations)
    from .cleanup import cleanup_model
    # weights are always folded into integer initializers; cleanup=False skips the rules and folding
    model = cleanup_model(model, rules=cleanup, fold=cleanup, int4=int4, int4_activations=int4_activations)
    if check:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"the exported model fails onnx.checker: {e}") from e
    if path is not None:
        d = os.path.dirname(os.fspath(path))
        if d:
            os.makedirs(d, exist_ok=True)
        onnx.save(model, os.fspath(path))
    return model


def quantize_for_onnx(gm: fx.GraphModule, data: Any, recipe: str = "ptq_int8", **options: Any) -> fx.GraphModule:
    """Quantize ``gm`` for an ONNX / onnxruntime deployment: ``PassManager(recipe, ort_fusable=True,
    **options).run(gm, data=data)``.

    ORT-fusable placement (the ``ort_placement`` rule family, on by default here) also observes the
    outputs of weighted ops, adds, concatenations and ReLU-like ops (after a ReLU that is an op's
    only user), so that the exported model has a ``DequantizeLinear -> op -> QuantizeLinear`` unit
    around each Conv / Gemm / MatMul / Add, which onnxruntime fuses into QLinearConv /
    QLinearMatMul / QLinearAdd.  Pass ``ort_fusable=False`` for ``ptq_int8``'s PyTorch placement
    (inputs of weighted ops only)."""
    from ..manager import PassManager
    options.setdefault("ort_fusable", True)
    return PassManager(recipe, **options).run(gm, data=data)
