"""Actions, constraints and the data step of the fp8 rule families (``qpasses/methods/fp8/fp8_prepare.yaml``,
``qpasses/methods/fp8/fp8_convert.yaml``; recipe ``w8a8_fp8``).

Representation (both graph levels), with :mod:`qpasses.numerics.fp8`:

* every weighted op reads its weight through an :class:`~qpasses.numerics.fp8.Fp8FakeQuantize`
  (op class ``fp8_fake_quant``), one scale per output channel (axis 0; grouped transposed
  convolutions: one scale), ``amax / 448``: the node is ``qpasses.fp8_fake_quant_per_channel(w,
  get_attr weight_fp8_N.scale, axis)``, the module a holder the graph never calls
  (:mod:`qpasses.qnodes`);
* ``activations=static``: a min-max observer (config ``format: fp8``) on the activation input,
  replaced after calibration by a per-tensor ``Fp8FakeQuantize`` with ``scale = amax / 448``
  (the node ``qpasses.fp8_fake_quant_per_tensor(x, get_attr act_q_N.scale)``);
* ``activations=dynamic``: a plain call of ``qpasses.fp8_fake_quant_per_token(x)`` (linear ops)
  or ``qpasses.fp8_fake_quant_dynamic_tensor(x)`` (convolutions) on the input, op class
  ``fp8_dynamic``: no module, no state (an ``Fp8DynamicQuantize`` module call, which a user's
  graph may hold, is the same op class).

Quantizers are shared per value: two ops reading one activation read one quantizer.  The op's
meta ``qpasses.quant`` records ``{"weight": {"format": "fp8", "axis": ...}, "fp8": {...}}``.
"""
from __future__ import annotations

import torch.fx as fx

from ...numerics.fp8 import FP8_DYNAMIC_OPS, fp8_dynamic_op
from ...opclasses import OP_CLASSES, OpClass, register_op_class
from ...qnodes import as_quantizer_call, fp8_dynamic_granularity

from ...context import Refuse
from ...lang.registry import action, constraint, data_step
from ...matcher import MatchContext
from ...numerics import Observer
from ...numerics.fp8 import Fp8DynamicQuantize, Fp8FakeQuantize
from ...opclasses import register_module_class
from ..ptq.calibrate import CALIBRATE_ARGS
from ..ptq.actions import QUANT_KEY, attach_weight_quantizer, insert_input_quantizer, new_observer, weight_axis

register_module_class(Fp8FakeQuantize, "fp8_fake_quant")
if "fp8_dynamic" not in OP_CLASSES:   # the dynamic fp8 ops themselves, and the module form
    register_op_class(OpClass("fp8_dynamic", ("input",), spellings={op: ("input",) for op in FP8_DYNAMIC_OPS}))
register_module_class(Fp8DynamicQuantize, "fp8_dynamic")

FP8_OBSERVER = dict(kind="minmax", bits=8, symmetric=True, axis=None, narrow=False)
ACTIVATIONS = ("static", "dynamic")


def _module(ctx: MatchContext, node) -> object:
    """The module a node calls, or the holder of a quantizer op node (else None)."""
    return ctx.module(node) if isinstance(node, fx.Node) else None


def _dynamic_granularity(ctx: MatchContext, node) -> object:
    """``"per_token"`` / ``"per_tensor"`` for a dynamic fp8 quantizer node (op call or
    ``Fp8DynamicQuantize`` module call), else None."""
    g = fp8_dynamic_granularity(node)
    if g is None:
        mod = _module(ctx, node)
        if isinstance(mod, Fp8DynamicQuantize):
            g = "per_token" if mod.per_token else "per_tensor"
    return g


def _is_fp8_observer(mod) -> bool:
    return isinstance(mod, Observer) and (getattr(mod, "qpasses_config", None) or {}).get("format") == "fp8"


@constraint("fp8_input_quantized")
def fp8_input_quantized(ctx: MatchContext, node: fx.Node):
    """The op's activation input already passes through an fp8 observer / quantizer (or any
    other observer or fake quantizer: an input is quantized once)."""
    from ..ptq.actions import _is_quant_module
    ins = ctx.view(node).inputs()
    if not ins:
        return False
    mod = _module(ctx, ins[0])
    hit = isinstance(mod, (Fp8FakeQuantize, Fp8DynamicQuantize)) or _is_fp8_observer(mod) or \
        _dynamic_granularity(ctx, ins[0]) is not None or _is_quant_module(ctx, ins[0])
    return hit, f"the input of {node.name} is already quantized by {ins[0].name if hit else ''}"


@constraint("fp8_observer")
def fp8_observer(ctx: MatchContext, node: fx.Node):
    """The node calls an observer that an fp8 rule inserted."""
    ok = _is_fp8_observer(_module(ctx, node))
    return ok, ("" if ok else f"{node.name} is not an fp8 observer")


@action("fp8_input", args={"activations": {"choices": ACTIVATIONS}})
def fp8_input(ctx: MatchContext, op: fx.Node, activations: str = "static"):
    """Quantize the activation input of ``op``: a min-max observer to calibrate (static) or a
    dynamic fp8 quantizer (per token for linear ops, per tensor otherwise)."""
    ins = ctx.view(op).inputs()
    if not ins or not isinstance(ins[0], fx.Node):
        raise Refuse(f"{op.name} has no activation input")
    x = ins[0]
    opclass = ctx.view(op).opclass
    if activations == "static":
        want = lambda u: _is_fp8_observer(_module(ctx, u))  # noqa: E731
        info = {"activations": "static"}
    else:
        per_token = opclass == "linear"
        gran = "per_token" if per_token else "per_tensor"
        want = lambda u: _dynamic_granularity(ctx, u) == gran  # noqa: E731
        info = {"activations": "dynamic", "per_token": per_token}
    for u in list(x.users):  # one quantizer per (value, kind), shared by every op reading it
        if u is not op and want(u):
            ctx.replace_input(op, x, u)
            break
    else:
        if activations == "static":
            insert_input_quantizer(ctx, op, x, _fp8_observer())
        else:   # stateless: a plain op call, no module
            q = ctx.insert("call_function", fp8_dynamic_op(per_token), (x,), after=x, like=x,
                           name=f"fp8_dyn_{x.name}")
            ctx.replace_input(op, x, q)
    quant = dict(op.meta.get(QUANT_KEY) or {})
    quant["fp8"] = info
    op.meta[QUANT_KEY] = quant


def _fp8_observer() -> Observer:
    obs = new_observer(dict(FP8_OBSERVER))
    obs.qpasses_config = dict(FP8_OBSERVER, format="fp8")
    return obs


@action("fp8_from_observer")
def fp8_from_observer(ctx: MatchContext, obs: fx.Node):
    """Replace a calibrated fp8 observer by a per-tensor :class:`Fp8FakeQuantize` (``amax / 448``)."""
    from ...errors import StepError
    mod = _module(ctx, obs)
    if not _is_fp8_observer(mod):
        raise Refuse(f"{obs.name} is not an fp8 observer")
    if not getattr(mod, "has_data", True):
        raise StepError(f"observer {obs.target} ({obs.name}) has seen no data: the w8a8_fp8 recipe with "
                        f"activations=static needs calibration data (PassManager(...).run(gm, data=batches)), "
                        f"or use activations=dynamic")
    lo, hi = mod.calculate_range()
    try:
        fq = Fp8FakeQuantize.from_range(lo, hi)
    except ValueError as e:
        raise StepError(f"observer {obs.target} ({obs.name}): {e}: the float model overflows on the "
                        f"calibration data there") from None
    fq.qpasses_config = dict(mod.qpasses_config)
    # the observer's node becomes the quantizer's op call, reading its scale from the holder
    ctx.replace_module(obs.target, fq)
    as_quantizer_call(ctx, obs)


@action("fp8_weight")
def fp8_weight(ctx: MatchContext, op: fx.Node):
    """Make ``op`` read its weight through an fp8 quantizer, one scale per output channel."""
    view = ctx.view(op)
    w = view.tensor("weight")
    if w is None:
        raise Refuse(f"the weight of {op.name} is not a constant")
    if not w.is_floating_point():
        raise Refuse(f"the weight of {op.name} is {w.dtype}, not floating point")
    groups = int(view.get("groups", 1) or 1)
    axis = weight_axis(view.opclass, groups) if w.dim() > 1 else None
    fq = Fp8FakeQuantize.fit(w, axis)
    attach_weight_quantizer(ctx, op, fq, "weight_fp8", {"format": "fp8", "bits": 8, "axis": axis})


@data_step("calibrate_observers", args=CALIBRATE_ARGS)
def calibrate_observers(ctx) -> None:
    """``calibrate`` when the graph holds observers (static activations), nothing otherwise
    (dynamic activations need no data; data given anyway is not run)."""
    from ..ptq.calibrate import run_calibration
    if not any(isinstance(m, Observer) for m in ctx.gm.modules()):
        ctx.info.update(batches=0, observers=0, skipped="no observers in the graph (dynamic activations)")
        return
    run_calibration(ctx, ctx.data, "calibrate")
