"""Op classes: one semantic name per operation, whatever its spelling.

``nn.Conv2d`` called as a module, ``F.conv2d``, ``torch.conv2d`` and
``aten.conv2d.default`` are all the op class ``conv2d``.  :func:`classify` names the
class of an fx node and :class:`OpView` gives uniform access to its normalised
arguments (``input``, ``weight``, ``bias``, ``stride``, ...), whether they live on a
module, in the node's args/kwargs, or behind ``get_attr`` nodes.

Modules are matched by type (``isinstance``), never by attribute name.
"""
from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten

__all__ = [
    "OpClass", "OP_CLASSES", "ALIASES", "classify", "OpView", "resolve_names",
    "all_class_names", "register_op_class", "is_inplace", "get_attr_value", "node_paths", "matches_any",
]


@dataclass
class OpClass:
    """One semantic operation.

    ``params`` is the canonical argument order used for functional spellings;
    ``inputs`` names the activation inputs (what pattern children match);
    ``spellings`` maps a concrete target (function / OpOverload) to its own positional
    argument names when they differ from ``params``; ``methods`` are Tensor method
    names; ``modules`` module types with a ``module_args`` getter.
    """

    name: str
    params: Tuple[str, ...]
    inputs: Tuple[str, ...] = ("input",)
    defaults: Dict[str, Any] = field(default_factory=dict)
    modules: Tuple[type, ...] = ()
    functions: Tuple[Any, ...] = ()
    methods: Tuple[str, ...] = ()
    spellings: Dict[Any, Tuple[str, ...]] = field(default_factory=dict)
    commutative: bool = False
    list_input: bool = False  # the single input is a list of tensors (cat, stack)
    weighted: bool = False


OP_CLASSES: Dict[str, OpClass] = {}
_BY_TARGET: Dict[Any, str] = {}
_BY_METHOD: Dict[str, str] = {}
_BY_MODULE: List[Tuple[type, str]] = []
_REFINE: Dict[str, Callable[[fx.Node, Optional[nn.Module]], Optional[str]]] = {}

#: op-class groups usable wherever an op class name is.
ALIASES: Dict[str, Tuple[str, ...]] = {}


def register_op_class(oc: OpClass) -> OpClass:
    """Register an op class (also the extension point for user ops)."""
    OP_CLASSES[oc.name] = oc
    for f in oc.functions:
        _BY_TARGET[f] = oc.name
    for f in oc.spellings:
        _BY_TARGET[f] = oc.name
    for m in oc.methods:
        _BY_METHOD[m] = oc.name
    for t in oc.modules:
        _BY_MODULE.append((t, oc.name))
    return oc


def _aten(name: str, overload: str = "default"):
    packet = getattr(aten, name, None)
    if packet is None:
        return None
    return getattr(packet, overload, None)


def _spell(*pairs):
    return {k: v for k, v in pairs if k is not None}


_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONV_DEF = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_CONVT_DEF = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}

for _d, _mod, _mt in ((1, nn.Conv1d, nn.ConvTranspose1d), (2, nn.Conv2d, nn.ConvTranspose2d),
                      (3, nn.Conv3d, nn.ConvTranspose3d)):
    register_op_class(OpClass(
        f"conv{_d}d", _CONV, defaults=dict(_CONV_DEF), modules=(_mod,), weighted=True,
        functions=(getattr(F, f"conv{_d}d"), getattr(torch, f"conv{_d}d")),
        spellings=_spell((_aten(f"conv{_d}d"), _CONV), (_aten(f"conv{_d}d", "padding"), _CONV)),
    ))
    register_op_class(OpClass(
        f"conv_transpose{_d}d", _CONVT, defaults=dict(_CONVT_DEF), modules=(_mt,), weighted=True,
        functions=(getattr(F, f"conv_transpose{_d}d"), getattr(torch, f"conv_transpose{_d}d")),
        # aten spells conv_transpose1d with the default overload, 2d / 3d with ``.input``
        spellings=_spell((_aten(f"conv_transpose{_d}d", "input"), _CONVT),
                         (_aten(f"conv_transpose{_d}d", "default"), _CONVT)),
    ))

register_op_class(OpClass(
    "linear", ("input", "weight", "bias"), defaults={"bias": None}, modules=(nn.Linear,), weighted=True,
    functions=(F.linear,), spellings=_spell((_aten("linear"), ("input", "weight", "bias"))),
))
register_op_class(OpClass(
    "matmul", ("input", "other"), inputs=("input", "other"),
    functions=(torch.matmul, operator.matmul, torch.mm),
    methods=("matmul", "mm"),
    spellings=_spell((_aten("matmul"), ("input", "other")), (_aten("mm"), ("input", "mat2"))),
))
register_op_class(OpClass(
    "bmm", ("input", "mat2"), inputs=("input", "mat2"), functions=(torch.bmm,), methods=("bmm",),
    spellings=_spell((_aten("bmm"), ("input", "mat2"))),
))
_BN = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_ATEN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
            "cudnn_enabled")
register_op_class(OpClass(
    "batch_norm", _BN,
    defaults={"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
    modules=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), functions=(F.batch_norm,),
    spellings=_spell(
        (_aten("batch_norm"), _BN_ATEN),
        (_aten("_native_batch_norm_legit_no_training"),
         ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")),
    ),
))
register_op_class(OpClass(
    "layer_norm", ("input", "normalized_shape", "weight", "bias", "eps"),
    defaults={"weight": None, "bias": None, "eps": 1e-5}, modules=(nn.LayerNorm,),
    functions=(F.layer_norm,), spellings=_spell((_aten("layer_norm"), ("input", "normalized_shape", "weight", "bias", "eps"))),
))
register_op_class(OpClass(
    "relu", ("input",), modules=(nn.ReLU,), functions=(F.relu, torch.relu, F.relu_, torch.relu_),
    methods=("relu", "relu_"), spellings=_spell((_aten("relu"), ("input",)), (_aten("relu_"), ("input",))),
))
register_op_class(OpClass(
    "relu6", ("input",), modules=(nn.ReLU6,), functions=(F.relu6,),
    spellings=_spell((_aten("relu6"), ("input",))),
))
register_op_class(OpClass(
    "hardtanh", ("input", "min_val", "max_val"), defaults={"min_val": -1.0, "max_val": 1.0},
    modules=(nn.Hardtanh,), functions=(F.hardtanh, F.hardtanh_),
    spellings=_spell((_aten("hardtanh"), ("input", "min_val", "max_val")),
                     (_aten("hardtanh_"), ("input", "min_val", "max_val"))),
))
register_op_class(OpClass(
    "gelu", ("input", "approximate"), defaults={"approximate": "none"}, modules=(nn.GELU,),
    functions=(F.gelu,), spellings=_spell((_aten("gelu"), ("input", "approximate"))),
))
register_op_class(OpClass(
    "silu", ("input",), modules=(nn.SiLU,), functions=(F.silu,),
    spellings=_spell((_aten("silu"), ("input",))),
))
register_op_class(OpClass(
    "add", ("input", "other", "alpha"), inputs=("input", "other"), defaults={"alpha": 1}, commutative=True,
    functions=(operator.add, torch.add, operator.iadd), methods=("add", "add_"),
    spellings=_spell((_aten("add", "Tensor"), ("input", "other", "alpha")),
                     (_aten("add_", "Tensor"), ("input", "other", "alpha"))),
))
register_op_class(OpClass(
    "mul", ("input", "other"), inputs=("input", "other"), commutative=True,
    functions=(operator.mul, torch.mul, operator.imul), methods=("mul", "mul_"),
    spellings=_spell((_aten("mul", "Tensor"), ("input", "other")), (_aten("mul_", "Tensor"), ("input", "other"))),
))
register_op_class(OpClass(
    "cat", ("tensors", "dim"), inputs=("tensors",), defaults={"dim": 0}, list_input=True,
    functions=(torch.cat, torch.concat), spellings=_spell((_aten("cat"), ("tensors", "dim"))),
))
register_op_class(OpClass(
    "max_pool", ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    modules=(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d),
    functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d),
    spellings=_spell((_aten("max_pool2d"), ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")),
                     (_aten("max_pool1d"), ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"))),
))
register_op_class(OpClass(
    "avg_pool", ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    modules=(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), functions=(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d),
    spellings=_spell((_aten("avg_pool2d"), ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"))),
))
register_op_class(OpClass(
    "adaptive_avg_pool", ("input", "output_size"),
    modules=(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    functions=(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d),
    spellings=_spell((_aten("adaptive_avg_pool2d"), ("input", "output_size")),
                     (_aten("adaptive_avg_pool1d"), ("input", "output_size")),
                     (_aten("_adaptive_avg_pool2d"), ("input", "output_size"))),
))
register_op_class(OpClass(
    "flatten", ("input", "start_dim", "end_dim"), defaults={"start_dim": 0, "end_dim": -1},
    modules=(nn.Flatten,), functions=(torch.flatten,), methods=("flatten",),
    spellings=_spell((_aten("flatten", "using_ints"), ("input", "start_dim", "end_dim"))),
))
register_op_class(OpClass(
    "reshape", ("input", "shape"), functions=(torch.reshape,), methods=("reshape", "view"),
    spellings=_spell((_aten("view"), ("input", "size")), (_aten("reshape"), ("input", "shape")),
                     (_aten("_unsafe_view"), ("input", "size"))),
))
register_op_class(OpClass(
    "permute", ("input", "dims"), functions=(torch.permute,), methods=("permute",),
    spellings=_spell((_aten("permute"), ("input", "dims"))),
))
register_op_class(OpClass(
    "transpose", ("input", "dim0", "dim1"), functions=(torch.transpose,), methods=("transpose", "t"),
    spellings=_spell((_aten("transpose", "int"), ("input", "dim0", "dim1")), (_aten("t"), ("input",))),
))
register_op_class(OpClass(
    "embedding", ("input", "weight"), modules=(nn.Embedding,), functions=(F.embedding,), weighted=False,
    spellings=_spell((_aten("embedding"), ("weight", "input"))),
))
register_op_class(OpClass(
    "softmax", ("input", "dim"), modules=(nn.Softmax,), functions=(F.softmax, torch.softmax),
    methods=("softmax",),
    spellings=_spell((_aten("softmax", "int"), ("input", "dim", "dtype")),
                     (_aten("_softmax"), ("input", "dim", "half_to_float"))),
))
register_op_class(OpClass(
    "dropout", ("input", "p", "training"), modules=(nn.Dropout,), functions=(F.dropout,),
    spellings=_spell((_aten("dropout"), ("input", "p", "train"))),
))
# GPT-2's Conv1D: ``addmm(bias, x, W)`` with ``W`` of shape ``[in, out]``; canonicalize rewrites
# it (and ``matmul(x, W)`` against a constant 2-D weight) into ``linear`` with the ``[out, in]``
# weight every weighted-op rule expects (qpasses/methods/canonicalize/canonicalize.yaml), so it is not itself "weighted"
register_op_class(OpClass(
    "addmm", ("bias", "input", "weight", "beta", "alpha"), inputs=("input",), defaults={"beta": 1, "alpha": 1},
    functions=(torch.addmm,), methods=("addmm",),
    spellings=_spell((_aten("addmm"), ("bias", "input", "weight", "beta", "alpha"))),
))
register_op_class(OpClass(
    "baddbmm", ("bias", "input", "mat2", "beta", "alpha"), inputs=("input", "mat2"), defaults={"beta": 1, "alpha": 1},
    functions=(torch.baddbmm,), methods=("baddbmm",),
    spellings=_spell((_aten("baddbmm"), ("bias", "input", "mat2", "beta", "alpha"))),
))
register_op_class(OpClass(
    "scaled_dot_product_attention", ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"),
    inputs=("query", "key", "value"), defaults={"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None},
    functions=(F.scaled_dot_product_attention,),
    spellings=_spell((_aten("scaled_dot_product_attention"),
                      ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"))),
))
register_op_class(OpClass(
    "rms_norm", ("input", "normalized_shape", "weight", "eps"), defaults={"weight": None, "eps": None},
    modules=tuple(m for m in (getattr(nn, "RMSNorm", None),) if m is not None),
    functions=tuple(f for f in (getattr(F, "rms_norm", None),) if f is not None),
    spellings=_spell((_aten("rms_norm"), ("input", "normalized_shape", "weight", "eps"))),
))
register_op_class(OpClass(
    "group_norm", ("input", "num_groups", "weight", "bias", "eps"), defaults={"weight": None, "bias": None, "eps": 1e-5},
    modules=(nn.GroupNorm,), functions=(F.group_norm,),
    spellings=_spell((_aten("group_norm"), ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"))),
))
register_op_class(OpClass(
    "pad", ("input", "pad", "mode", "value"), defaults={"mode": "constant", "value": None},
    modules=(nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad2d, nn.ReflectionPad1d,
             nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d),
    functions=(F.pad,),
    spellings=_spell((_aten("pad"), ("input", "pad", "mode", "value")),
                     (_aten("constant_pad_nd"), ("input", "pad", "value"))),
))
register_op_class(OpClass(
    "interpolate", ("input", "size", "scale_factor", "mode", "align_corners"),
    defaults={"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None},
    modules=(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d), functions=(F.interpolate,),
    spellings=_spell((_aten("upsample_nearest2d", "vec"), ("input", "size", "scale_factor")),
                     (_aten("upsample_nearest1d", "vec"), ("input", "size", "scale_factor")),
                     (_aten("upsample_bilinear2d", "vec"), ("input", "size", "align_corners", "scale_factor")),
                     (_aten("upsample_bicubic2d", "vec"), ("input", "size", "align_corners", "scale_factor"))),
))
register_op_class(OpClass("getitem", ("input", "index"), functions=(operator.getitem,)))
# graph-structural classes (not ops): placeholders, constants, outputs
register_op_class(OpClass("placeholder", (), inputs=()))
register_op_class(OpClass("get_attr", (), inputs=()))
register_op_class(OpClass("output", ("input",)))

ALIASES.update({
    "conv": ("conv1d", "conv2d", "conv3d"),
    "conv_transpose": ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
    "weighted": ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                 "conv_transpose3d", "linear"),
    "activation": ("relu", "relu6", "hardtanh", "gelu", "silu"),
    "pool": ("max_pool", "avg_pool", "adaptive_avg_pool"),
    "shape_op": ("flatten", "reshape", "permute", "transpose"),
    "norm": ("batch_norm", "layer_norm", "rms_norm", "group_norm"),
    "attention": ("scaled_dot_product_attention",),
})


def _refine_hardtanh(node: fx.Node, mod: Optional[nn.Module]) -> Optional[str]:
    """hardtanh(0, 6) means relu6 (F.relu6 exports as aten.hardtanh)."""
    if mod is not None:
        lo, hi = mod.min_val, mod.max_val
    else:
        view = OpView(node, None, "hardtanh")
        lo, hi = view.get("min_val"), view.get("max_val")
    return "relu6" if (lo == 0 and hi == 6) else None


_REFINE["hardtanh"] = _refine_hardtanh
# a hardtanh refined to relu6 keeps its spelling: let relu6 views read it (not added to the
# target index, so plain hardtanh nodes still classify as hardtanh first)
OP_CLASSES["relu6"].spellings.update(OP_CLASSES["hardtanh"].spellings)


def register_module_class(module_type: type, name: str) -> None:
    """Let a module type (e.g. qpasses' own Observer / FakeQuantize) be matched as op class ``name``."""
    if name not in OP_CLASSES:
        register_op_class(OpClass(name, ("input",)))
    _BY_MODULE.insert(0, (module_type, name))
    _BY_MODULE_TYPE.clear()


#: module type -> op class name (or None): the first ``isinstance`` match in ``_BY_MODULE``,
#: memoised per type (graphs call thousands of modules of a handful of types)
_BY_MODULE_TYPE: Dict[type, Optional[str]] = {}


def _module_class(mod: nn.Module) -> Optional[str]:
    t = type(mod)
    try:
        return _BY_MODULE_TYPE[t]
    except KeyError:
        pass
    name = None
    for mt, n in _BY_MODULE:
        if isinstance(mod, mt):
            name = n
            break
    if all(type(mt) is type for mt, _ in _BY_MODULE):  # no metaclass with its own isinstance rule
        _BY_MODULE_TYPE[t] = name
    return name


def all_class_names() -> List[str]:
    return sorted(set(OP_CLASSES) | set(ALIASES))


def resolve_names(name: str) -> Tuple[str, ...]:
    """Op class name or alias -> the tuple of concrete class names; KeyError if unknown."""
    if name in OP_CLASSES:
        return (name,)
    if name in ALIASES:
        return ALIASES[name]
    raise KeyError(name)


#: ``call_function`` targets whose node reads its tensors from a *holder* module (qpasses'
#: quantizer ops: ``op(x, get_attr holder.scale, get_attr holder.zero_point, ...)``) -> the
#: index of the ``get_attr`` argument that names the holder
_HOLDER_OPS: Dict[Any, int] = {}


def register_holder_op(op: Any, attr_index: int = 1) -> None:
    """Declare that a node calling ``op`` reads the tensors of one module through ``get_attr``
    argument ``attr_index`` (``holder.name``): the node is then classified, viewed and looked up
    as that module (:func:`holder_of`)."""
    _HOLDER_OPS[op] = int(attr_index)


def holder_of(node: fx.Node) -> Optional[str]:
    """The module path a node stands for: a ``call_module`` node's target, or the holder module
    of a :func:`register_holder_op` op call (the owner of the attribute its ``get_attr`` reads)."""
    op = node.op
    if op == "call_module":
        return node.target
    if op != "call_function":
        return None
    try:
        i = _HOLDER_OPS.get(node.target)
    except TypeError:  # unhashable target
        return None
    if i is None or len(node.args) <= i:
        return None
    a = node.args[i]
    if isinstance(a, fx.Node) and a.op == "get_attr" and isinstance(a.target, str) and "." in a.target:
        return a.target.rpartition(".")[0]
    return None


def _module_of(node: fx.Node, modules: Optional[Dict[str, nn.Module]]) -> Optional[nn.Module]:
    if modules is None:
        return None
    if node.op == "call_module":
        return modules.get(node.target)
    t = holder_of(node) if node.op == "call_function" else None
    return None if t is None else modules.get(t)


def classify(node: fx.Node, modules: Optional[Dict[str, nn.Module]] = None) -> Optional[str]:
    """The op class name of ``node`` or ``None`` when it is none of the known classes.

    ``modules`` is ``dict(gm.named_modules())``; needed to classify ``call_module`` nodes.
    """
    op = node.op
    name = None
    mod = None
    if op == "call_function":
        try:
            name = _BY_TARGET.get(node.target)
        except TypeError:  # unhashable target
            name = None
        if name is None and holder_of(node) is not None:
            mod = _module_of(node, modules)
            if mod is not None:
                name = _module_class(mod)
    elif op == "call_method":
        name = _BY_METHOD.get(node.target)
    elif op == "call_module":
        mod = _module_of(node, modules)
        if mod is not None:
            name = _module_class(mod)
    elif op in ("placeholder", "get_attr", "output"):
        return op
    if name is not None and name in _REFINE:
        name = _REFINE[name](node, mod) or name
    return name


def get_attr_value(gm: nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def module_attr(mod: Any, name: str, default: Any = None) -> Any:
    """``getattr(mod, name, default)``, cheaper for nn.Modules.

    Reads the instance dict and the parameter / buffer / submodule tables directly, where
    ``nn.Module.__getattr__`` would look, so a missing attribute (``inplace`` on a conv)
    does not cost an AttributeError; class attributes, properties and modules with their
    own ``__getattr__`` go through ``getattr``.
    """
    cls = type(mod)
    if not isinstance(mod, nn.Module) or cls.__getattr__ is not nn.Module.__getattr__ or hasattr(cls, name):
        return getattr(mod, name, default)
    d = mod.__dict__
    if name in d:
        return d[name]
    for table in ("_parameters", "_buffers", "_modules"):  # where nn.Module.__getattr__ looks
        t = d.get(table)
        if t is not None and name in t:
            return t[name]
    return default


def is_inplace(node: fx.Node, modules: Optional[Dict[str, nn.Module]] = None) -> bool:
    """True for ops that mutate their inputs (``relu_``, ``+=``, ``inplace=True`` modules, mutable aten ops)."""
    if node.op == "call_module":
        mod = _module_of(node, modules)
        return bool(module_attr(mod, "inplace", False))
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        t = node.target
        if t in (operator.iadd, operator.imul, operator.isub, operator.itruediv, operator.setitem):
            return True
        if isinstance(t, torch._ops.OpOverload):
            return bool(t._schema.is_mutable)
        if node.kwargs.get("inplace", False):
            return True
        name = getattr(t, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    return False


def mutated_inputs(node: fx.Node, modules: Optional[Dict[str, nn.Module]] = None) -> List[fx.Node]:
    """The input nodes an in-place op writes to (empty for other ops).

    An aten op's schema says which arguments it writes (``add_.Tensor(Tensor(a!) self, Tensor
    other)`` writes ``self`` only, so the residual it adds is not mutated); a ``*_`` method and
    ``x += y`` write their first operand; an ``inplace=True`` module or function its input;
    ``setitem`` its target.  Anything else that :func:`is_inplace` flags is taken to write every
    input (conservative)."""
    if not is_inplace(node, modules):
        return []
    t = node.target
    if node.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        out: List[fx.Node] = []
        for i, arg in enumerate(t._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            v = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, fx.Node):
                    out.append(x)
        return out
    first = node.args[0] if node.args else None
    if isinstance(first, fx.Node):
        return [first]
    return list(node.all_input_nodes)


class OpView:
    """Uniform view of one node's normalised arguments.

    ``view.get("weight")`` returns the module parameter for module calls and the
    argument (often a ``get_attr`` node) for functional / aten spellings;
    ``view.tensor("weight")`` resolves ``get_attr`` nodes to tensors.
    """

    def __init__(self, node: fx.Node, gm: Optional[fx.GraphModule], opclass: Optional[str] = None,
                 modules: Optional[Dict[str, nn.Module]] = None):
        self.node = node
        self.gm = gm
        if modules is None and gm is not None:
            t = holder_of(node)
            if t is not None:
                modules = {t: get_attr_value(gm, t)}
        self.module = _module_of(node, modules)
        self.opclass = opclass or classify(node, modules)
        self.oc = OP_CLASSES.get(self.opclass) if self.opclass else None

    # -- argument positions --------------------------------------------------
    def _names(self) -> Tuple[str, ...]:
        n = self.node
        if self.oc is None:
            return ()
        if n.op == "call_function":
            spelled = self.oc.spellings.get(n.target)
            if spelled is not None:
                return spelled
            if isinstance(n.target, torch._ops.OpOverload):
                return tuple(a.name for a in n.target._schema.arguments)
        return self.oc.params

    def get(self, name: str, default: Any = None) -> Any:
        """Normalised argument ``name`` (module attribute for module calls)."""
        n = self.node
        if self.module is not None:
            if name == "input":
                return n.args[0] if n.args else n.kwargs.get("input")
            if name == "training":
                return self.module.training
            return module_attr(self.module, name, default)
        names = self._names()
        if name in n.kwargs:
            return n.kwargs[name]
        args = n.args
        if n.op == "call_method":
            # self is args[0]; canonical params start with "input"
            pass
        if name in names:
            i = names.index(name)
            if i < len(args):
                return args[i]
        if self.oc is not None and name in self.oc.defaults:
            return self.oc.defaults[name]
        if isinstance(n.target, torch._ops.OpOverload):
            for a in n.target._schema.arguments:
                if a.name == name and a.has_default_value():
                    return a.default_value
        return default

    def arg_index(self, name: str) -> Optional[int]:
        """Positional index of argument ``name`` in ``node.args`` (None if keyword or module)."""
        if self.module is not None:
            return 0 if name == "input" else None
        names = self._names()
        if name in self.node.kwargs:
            return None
        if name in names:
            i = names.index(name)
            return i if i < len(self.node.args) else None
        return None

    def set(self, name: str, value: Any) -> None:
        """Replace argument ``name`` of a functional/aten node."""
        if self.module is not None and name != "input":
            raise ValueError("set() on a module call: change the module instead")
        n = self.node
        if name in n.kwargs:
            kw = dict(n.kwargs)
            kw[name] = value
            n.kwargs = kw
            return
        i = self.arg_index(name)
        if i is None:
            names = self._names()
            if name not in names:
                raise KeyError(name)
            i = names.index(name)
            if i > len(n.args):
                kw = dict(n.kwargs)
                kw[name] = value
                n.kwargs = kw
                return
        args = list(n.args)
        if i == len(args):
            args.append(value)
        else:
            args[i] = value
        n.args = tuple(args)

    def tensor(self, name: str) -> Optional[torch.Tensor]:
        """Argument ``name`` resolved to a tensor (through ``get_attr``), or None."""
        v = self.get(name)
        if isinstance(v, fx.Node):
            if v.op == "get_attr" and self.gm is not None:
                return get_attr_value(self.gm, v.target)
            return None
        return v if isinstance(v, torch.Tensor) else None

    # -- inputs --------------------------------------------------------------
    def inputs(self) -> List[Any]:
        """The activation inputs, in the op class's order (list elements for cat)."""
        if self.oc is None:
            return [a for a in self.node.all_input_nodes]
        vals = [self.get(nm) for nm in self.oc.inputs]
        if self.oc.list_input:
            v = vals[0]
            return list(v) if isinstance(v, (list, tuple)) else [v]
        return vals

    @property
    def input(self) -> Any:
        ins = self.inputs()
        return ins[0] if ins else None

    def replace_input(self, old: fx.Node, new: fx.Node) -> None:
        """Make this node read ``new`` instead of ``old`` (only this use)."""
        self.node.replace_input_with(old, new)

    def __repr__(self) -> str:
        return f"OpView({self.node.name}: {self.opclass})"


# ------------------------------------------------------------------ names a user gives a node
def node_paths(node: fx.Node) -> Iterable[str]:
    """Names a user may use for a node: fx name, module path (fx) or source module path (export)."""
    yield node.name
    if node.op in ("call_module", "get_attr"):
        yield str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        for path, _ in list(stack.values())[-1:]:
            if path:
                yield str(path)
                # export prefixes paths with "L['self']." sometimes; offer the plain dotted path too
                yield str(path).replace("L['self'].", "").replace("L__self___", "")


def matches_any(node: fx.Node, patterns: Optional[Iterable[str]]) -> Optional[str]:
    """The first of ``patterns`` (fnmatch globs) one of the node's names matches, or None."""
    if not patterns:
        return None
    for name in node_paths(node):
        for p in patterns:
            if fnmatch.fnmatchcase(name, str(p)):
                return str(p)
    return None
