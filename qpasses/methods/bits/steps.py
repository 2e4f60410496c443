"""The ``search_bits`` data step: per-layer bit-widths by HAQ (DDPG) or a HAWQ-style greedy baseline.

The step annotates the weighted ops of the graph with ``qpasses.bits`` (as ``assign_bits``
does), so the ``observe`` / ``convert`` families that follow in the recipe quantize each layer
at its chosen width; it can also save the map to a file that ``assign_bits`` loads
(``bit_map_file``). Per-layer results go to ``pm.report.layers`` and a summary to the step's
``info`` (``pm.report.steps``).

Data: the batches given to ``run`` are split into calibration (first part) and held-out
validation (last ``val_fraction`` of the batches). Without labels the reward is the agreement
of the quantized model with the float model's top-1 predictions (and the cross-entropy against
them); ``val_data=[(x, y), ...]`` gives labelled held-out data instead.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch

from ...errors import OptionError, StepError
from ...frontend import as_inputs, input_arity
from ...lang.registry import data_step
from ..ptq.calibrate import iterate_batches

__all__ = ["search_bits"]


def _split(batches: List[Tuple], frac: float) -> Tuple[List[Tuple], List[Tuple]]:
    if len(batches) >= 2:
        n_val = min(len(batches) - 1, max(1, int(round(len(batches) * frac))))
        return batches[:-n_val], batches[-n_val:]
    (only,) = batches
    x = only[0]
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] < 2 or len(only) != 1:
        raise StepError("search_bits needs at least two batches (calibration + validation), or val_data=")
    n_val = max(1, int(round(x.shape[0] * frac)))
    return [(x[:-n_val],)], [(x[-n_val:],)]


def _val_from_option(val_data: Any) -> Tuple[List[Tuple], List[torch.Tensor]]:
    if not isinstance(val_data, (list, tuple)) or not val_data:
        raise OptionError("val_data must be a non-empty list of (inputs, labels) batches")
    inputs, labels = [], []
    for i, item in enumerate(val_data):
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[1], torch.Tensor):
            raise OptionError(f"val_data[{i}] must be a pair (inputs, labels) with integer label tensor")
        inputs.append(as_inputs(item[0]))
        labels.append(item[1].long())
    return inputs, labels


@data_step("search_bits", args={
    "method": {"type": str, "choices": ("ddpg", "hessian", "perturbation"), "default": "ddpg"},
    "constraint": {"type": str, "choices": ("size", "bops", "latency"), "default": "size"},
    "budget": {"type": float, "min": 0.0, "max": 1.0, "default": 0.5},
    "budget_bits": {"type": list, "default": None},
    "min_bits": {"type": int, "min": 2, "max": 16, "default": 2},
    "max_bits": {"type": int, "min": 2, "max": 16, "default": 8},
    "a_bits": {"type": int, "min": 2, "max": 16, "default": 8},
    "search_activations": {"type": bool, "default": False},
    "episodes": {"type": int, "min": 1, "default": None},
    "warmup": {"type": int, "min": 0, "default": None},
    "seconds": {"type": float, "min": 0.0, "default": None},
    "reward": {"type": str, "choices": ("acc", "loss"), "default": "acc"},
    "device": {"type": str, "choices": ("h100", "h200"), "default": "h100"},
    "latency_table": {"type": str, "default": None},
    "latency_batch": {"type": int, "min": 1, "default": 1},
    "val_data": {"type": "any", "default": None},
    "val_fraction": {"type": float, "min": 0.05, "max": 0.95, "default": 0.5},
    "hutchinson_iters": {"type": int, "min": 1, "default": 8},
    "save_map": {"type": str, "default": None},
    "seed": {"type": int, "default": 0},
    "calib_batches": {"type": int, "min": 1, "default": None},
    "observer": {"type": str, "default": "minmax"},
    "symmetric": {"type": bool, "default": False},
})
def search_bits(ctx) -> None:
    """Search per-layer bit-widths under a resource budget and annotate the graph with them."""
    from .actions import save_bit_map
    from . import haq

    method = str(ctx.arg("method", "ddpg"))
    if method not in ("ddpg", "hessian", "perturbation"):
        raise OptionError(f"method must be 'ddpg', 'hessian' or 'perturbation', got {method!r}")
    min_bits, max_bits = int(ctx.arg("min_bits", 2)), int(ctx.arg("max_bits", 8))
    if min_bits > max_bits:
        raise OptionError(f"min_bits={min_bits} is larger than max_bits={max_bits}")
    a_bits = int(ctx.arg("a_bits", 8))
    search_a = bool(ctx.arg("search_activations", False))
    if search_a and method != "ddpg":
        raise OptionError(f"method={method!r} allocates weight bits only; use method='ddpg' with search_activations")
    constraint = str(ctx.arg("constraint", "size"))
    cost = haq.make_cost_model(constraint, str(ctx.arg("device", "h100")), ctx.arg("latency_table") or None,
                               int(ctx.arg("latency_batch", 1) or 1))

    batches = list(iterate_batches(ctx.data, ctx.arg("calib_batches"), "search_bits", ctx.progress,
                                   input_arity(ctx.gm)))
    if not batches:
        raise StepError("search_bits got an empty data iterable")
    val_data = ctx.arg("val_data")
    if val_data:
        val, labels = _val_from_option(val_data)
        calib = batches
    else:
        calib, val = _split(batches, float(ctx.arg("val_fraction", 0.5)))
        labels = None

    layers, nodes = haq.extract_layers(ctx.gm)
    n = len(layers)
    # budget
    budget_bits = ctx.arg("budget_bits")
    if budget_bits:
        if not isinstance(budget_bits, (list, tuple)) or len(budget_bits) != 2:
            raise OptionError(f"budget_bits must be [w_bits, a_bits], got {budget_bits!r}")
        bw, ba = int(budget_bits[0]), int(budget_bits[1])
        budget = cost.total(layers, [bw] * n, [ba] * n)
        budget_desc = f"cost of uniform W{bw}A{ba}"
    else:
        frac = float(ctx.arg("budget", 0.5))
        if not 0 < frac <= 1:
            raise OptionError(f"budget must be a fraction in (0, 1], got {frac}")
        budget = frac * cost.total(layers, [max_bits] * n, [a_bits] * n)
        budget_desc = f"{frac:g} x cost of uniform W{max_bits}A{a_bits}"
    floor = cost.total(layers, [min_bits] * n, [min_bits if search_a else a_bits] * n)
    if floor > budget * (1 + 1e-9):
        raise StepError(f"budget {budget:.6g} {cost.unit} ({budget_desc}) is below the cost of every layer at "
                        f"min_bits={min_bits}: {floor:.6g} {cost.unit}")

    # phases (the DDPG search draws its own bar of episodes); rank 0 draws, time left shown
    from ..ptq.calibrate import progress_bar
    phases = progress_bar(ctx.progress, total=4, desc="search_bits", unit="phase")
    phases.set_postfix_str("quantization simulator", refresh=True)
    a_range = list(range(min_bits, max_bits + 1)) if search_a else [a_bits]
    sim = haq.QuantSim(ctx.gm, layers, list(range(min_bits, max_bits + 1)), a_range, calib,
                       observer=str(ctx.arg("observer", "minmax")), symmetric=bool(ctx.arg("symmetric", False)))
    sim.set_bits(None, None)
    with torch.no_grad():
        float_logits = [sim.gm(*inp) for inp in val]
    if labels is None:
        labels = [o.argmax(-1) for o in float_logits]           # label-free: agree with the float model
        reward_target = "float top-1 (no labels given)"
    else:
        reward_target = "labels (val_data)"
    targets = torch.cat(labels)
    base_acc, base_loss = sim.evaluate(val, targets)

    phases.update(1)
    phases.set_postfix_str("Hessian traces", refresh=True)
    traces = haq.hutchinson_traces(ctx.gm, layers, val, labels, iters=int(ctx.arg("hutchinson_iters", 8)),
                                   seed=int(ctx.arg("seed", 0)))
    seed = int(ctx.arg("seed", 0))
    phases.update(1)
    phases.set_postfix_str(f"{method} search", refresh=True)
    if method == "ddpg":
        episodes = int(ctx.arg("episodes") or 60)
        warmup = ctx.arg("warmup")
        warmup = max(1, episodes // 5) if warmup is None else int(warmup)
        res = haq.ddpg_search(layers, sim, val, targets, cost, budget, min_bits, max_bits, a_bits, search_a,
                              episodes=episodes, warmup=warmup,
                              seconds=ctx.arg("seconds"), reward=str(ctx.arg("reward", "acc")), seed=seed,
                              progress=ctx.progress, base_acc=base_acc, base_loss=base_loss)
        ws, as_ = res.w_bits, res.a_bits
        extra = {"episodes": res.episodes, "search_seconds": round(res.seconds, 3)}
    else:
        measured = None
        if method == "perturbation":
            measured = haq.loss_perturbation(sim, val, targets, range(min_bits, max_bits + 1), a_bits)
        ws, _ = haq.greedy_allocation(layers, traces, sim, cost, budget, min_bits, max_bits, a_bits, measured)
        as_ = [a_bits] * n
        extra = {}
    phases.update(1)
    phases.set_postfix_str("evaluation", refresh=True)
    sim.set_bits(ws, as_)
    acc, loss = sim.evaluate(val, targets)
    phases.update(1)
    phases.close()
    total = cost.total(layers, ws, as_)
    if total > budget * (1 + 1e-9):
        raise StepError(f"internal error: the chosen configuration costs {total} > budget {budget}")

    rows, bit_map = [], {}
    for i, (layer, node) in enumerate(zip(layers, nodes)):
        node.meta["qpasses.bits"] = {"w_bits": int(ws[i]), "a_bits": int(as_[i])}
        omega = max(traces[i], 0.0) / max(layer.params, 1) * haq.weight_perturbation(sim, i, ws[i])
        rows.append({"layer": layer.name, "op": layer.op, "w_bits": int(ws[i]), "a_bits": int(as_[i]),
                     "cost": cost.layer_cost(layer, ws[i], as_[i]), "sensitivity": omega,
                     "hessian_trace": traces[i], "params": layer.params, "macs": layer.macs})
        bit_map[layer.name] = {"w_bits": int(ws[i]), "a_bits": int(as_[i])}
    ctx.report.layers.extend(rows)
    info = {"method": method, "constraint": constraint, "cost_unit": cost.unit, "budget": budget,
            "budget_desc": budget_desc, "cost": total, "avg_w_bits": sum(l.params * w for l, w in zip(layers, ws))
            / max(1, sum(l.params for l in layers)), "val_acc": acc, "val_loss": loss, "float_val_acc": base_acc,
            "reward_target": reward_target, "calib_batches": len(calib), "val_batches": len(val), **extra}
    if budget_bits:
        sim.set_bits([int(budget_bits[0])] * n, [int(budget_bits[1])] * n)
        info["uniform_val_acc"] = sim.evaluate(val, targets)[0]
    path = ctx.arg("save_map")
    if path:
        info["map_file"] = save_bit_map(str(path), bit_map, {k: v for k, v in info.items()
                                                             if isinstance(v, (int, float, str))})
    ctx.info.update(info)
    ctx.info["table"] = format_table(rows, cost.unit)
    return None


def format_table(rows: Sequence[dict], unit: str = "") -> str:
    """The per-layer table as aligned text: layer, op, w_bits, a_bits, cost, sensitivity."""
    head = ("layer", "op", "w_bits", "a_bits", f"cost ({unit})" if unit else "cost", "sensitivity")
    body = [(r["layer"], r["op"], str(r["w_bits"]), str(r["a_bits"]), f"{r['cost']:.4g}", f"{r['sensitivity']:.3g}")
            for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
