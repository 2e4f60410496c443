"""Hardware-aware mixed-precision search (HAQ, Wang et al., CVPR 2019) and a HAWQ-style baseline.

Pieces (all plain PyTorch, CPU friendly):

* :func:`extract_layers` -- the weighted ops of a float graph in graph order with the features
  HAQ's agent observes (index, cin, cout, kernel, stride, #params, depthwise flag, ...), MACs
  and activation sizes from the shapes recorded by ``qpasses.trace``.
* cost models -- :class:`SizeCost` (weight bits), :class:`BOPsCost` (MACs x w_bits x a_bits),
  :class:`RooflineLatency` (per layer ``max(compute, memory)`` time on an H100 / H200) and
  :class:`TableLatency` (a measured per-layer latency table, JSON).
* :class:`QuantSim` -- a copy of the float graph whose layers switch bit-widths instantly:
  weights fake-quantized exactly as the ``convert`` family does (per-channel symmetric,
  narrow range, min-max), activation inputs through the recipe's observer kind calibrated once
  for every candidate bit-width. Evaluates accuracy / loss of a bit configuration.
* :class:`DDPGAgent` -- actor/critic, target networks with soft updates, replay buffer,
  truncated-normal exploration noise with decay (HAQ section 3).
* :func:`ddpg_search` -- HAQ's episode loop: the agent walks the layers, continuous actions
  become bits in ``[min_bits, max_bits]``, the budget is enforced by lowering bits, and the
  quantized model's accuracy (or -loss) on held-out data is the reward.
* :func:`hutchinson_traces` + :func:`greedy_allocation` -- the fast baseline: per-layer
  Hessian trace (Hutchinson's estimator, HAWQ-v2) times the weight quantization perturbation
  ``||Q_b(W) - W||^2``, then greedy bit lowering by least sensitivity per unit of cost saved;
  :func:`loss_perturbation` measures the sensitivity instead (held-out loss increase with one
  layer quantized).

Deviations from the paper (stated in ``docs/recipes/haq.md``): smaller networks (64 hidden
units instead of 300), the episode reward minus a moving-average baseline is given to every
step with discount 0 (HAQ bootstraps with discount 1), and far fewer episodes (tens to hundreds
instead of 600).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...errors import StepError

__all__ = ["Layer", "extract_layers", "SizeCost", "BOPsCost", "RooflineLatency", "TableLatency", "make_cost_model",
           "DEVICES", "QuantSim", "DDPGAgent", "ddpg_search", "hutchinson_traces", "greedy_allocation",
           "weight_perturbation", "loss_perturbation", "enforce_budget", "SearchResult"]

_WEIGHTED = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear")


# ============================================================================== layers
def classification(out: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits [M, C], targets [M])`` for a model output whose last dimension holds the classes.

    A classifier's ``[N, C]`` output is used as it is; a per-position output such as a
    transformer's ``[N, S, C]`` (targets ``[N, S]``) is scored position by position, the
    same convention as the label-free targets (``float_output.argmax(-1)``).
    """
    if out.dim() < 1 or tuple(targets.shape) != tuple(out.shape[:-1]):
        raise StepError(f"labels of shape {tuple(targets.shape)} do not fit a model output of shape "
                        f"{tuple(out.shape)}: the search scores classes on the output's last dimension, so the "
                        f"labels must have shape {tuple(out.shape[:-1])}")
    return out.reshape(-1, out.shape[-1]), targets.reshape(-1)


@dataclass
class Layer:
    """One weighted op and the features HAQ's agent sees."""
    index: int
    name: str            # module path (see qpasses.methods.bits.actions.layer_name)
    node: str            # fx node name
    op: str              # op class
    cin: int
    cout: int
    kernel: int          # product of kernel dims (1 for linear)
    stride: int
    groups: int
    params: int          # weight elements
    macs: int            # multiply-accumulates per sample
    in_numel: int        # activation input elements per sample
    out_numel: int       # output elements per sample
    is_depthwise: bool

    def features(self) -> List[float]:
        """Raw state features (normalised by the search): index, cin, cout, kernel, stride, log params,
        depthwise flag, log MACs."""
        return [float(self.index), float(self.cin), float(self.cout), float(self.kernel), float(self.stride),
                math.log(max(self.params, 1)), float(self.is_depthwise), math.log(max(self.macs, 1))]


def _prod(xs) -> int:
    p = 1
    for v in xs:
        p *= int(v)
    return p


def extract_layers(gm: fx.GraphModule) -> Tuple[List[Layer], List[fx.Node]]:
    """The weighted ops of ``gm`` in graph order (needs the shapes ``qpasses.trace`` records)."""
    from .actions import layer_name
    from ...frontend import node_shape
    from ...opclasses import OpView, classify
    mods = dict(gm.named_modules())
    layers, nodes = [], []
    for n in gm.graph.nodes:
        cls = classify(n, mods)
        if cls not in _WEIGHTED:
            continue
        v = OpView(n, gm, cls, mods)
        w = v.tensor("weight")
        if w is None:
            continue
        out_shape = node_shape(n)
        ins = v.inputs()
        in_shape = node_shape(ins[0]) if ins and isinstance(ins[0], fx.Node) else None
        if out_shape is None or in_shape is None:
            raise StepError(f"no recorded shapes on {n.name}: trace the model with qpasses.trace(model, inputs)")
        groups = int(v.get("groups", 1) or 1)
        if cls == "linear":
            cout, cin, kernel, stride = int(w.shape[0]), int(w.shape[1]), 1, 1
        elif cls.startswith("conv_transpose"):
            cin, cout = int(w.shape[0]), int(w.shape[1]) * groups
            kernel = _prod(w.shape[2:])
            s = v.get("stride", 1)
            stride = int(s[0] if isinstance(s, (list, tuple)) else s)
        else:
            cout, cin = int(w.shape[0]), int(w.shape[1]) * groups
            kernel = _prod(w.shape[2:])
            s = v.get("stride", 1)
            stride = int(s[0] if isinstance(s, (list, tuple)) else s)
        out_numel = _prod(out_shape[1:]) if len(out_shape) > 1 else _prod(out_shape)
        in_numel = _prod(in_shape[1:]) if len(in_shape) > 1 else _prod(in_shape)
        if cls == "linear":
            macs = out_numel * cin
        elif cls.startswith("conv_transpose"):
            macs = in_numel * (cout // groups) * kernel
        else:
            macs = out_numel * (cin // groups) * kernel
        layers.append(Layer(len(layers), layer_name(n), n.name, cls, cin, cout, kernel, stride, groups,
                            int(w.numel()), int(macs), int(in_numel), int(out_numel),
                            groups > 1 and groups == cin))
        nodes.append(n)
    if not layers:
        raise StepError("the graph has no weighted ops (conv / linear with constant weights) to assign bits to")
    return layers, nodes


# ============================================================================== cost models
class CostModel:
    """``layer_cost(layer, w_bits, a_bits)``; ``total`` sums over layers."""
    name = "cost"
    unit = ""

    def layer_cost(self, layer: Layer, w: int, a: int) -> float:
        raise NotImplementedError

    def total(self, layers: Sequence[Layer], ws: Sequence[int], as_: Sequence[int]) -> float:
        return float(sum(self.layer_cost(l, w, a) for l, w, a in zip(layers, ws, as_)))


class SizeCost(CostModel):
    """Model size: weight bytes ``params * w_bits / 8`` (activations do not count)."""
    name, unit = "size", "bytes"

    def layer_cost(self, layer, w, a):
        return layer.params * w / 8.0


class BOPsCost(CostModel):
    """Bit operations per sample: ``MACs * w_bits * a_bits`` (Baskin et al.; used by HAWQ-v3)."""
    name, unit = "bops", "bit-ops"

    def layer_cost(self, layer, w, a):
        return float(layer.macs) * w * a


#: Peak dense throughput and memory bandwidth of the default roofline devices.
#: Sources: NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5: FP16/BF16 tensor 989 TFLOPS dense
#: -- 1,979 with 2:4 sparsity --, INT8 tensor 1,979 TOPS dense, HBM3 3.35 TB/s) and NVIDIA H200
#: Tensor Core GPU datasheet (H200 SXM: same tensor throughput, HBM3e 4.8 TB/s). Hopper has no
#: INT4 tensor-core path, so sub-8-bit weights/activations run at the INT8 rate and only save
#: memory traffic (packed sub-byte storage is assumed).
DEVICES: Dict[str, Dict[str, float]] = {
    "h100": {"int8_ops": 1978.9e12, "fp16_ops": 989.4e12, "hbm_bytes_s": 3.35e12},
    "h200": {"int8_ops": 1978.9e12, "fp16_ops": 989.4e12, "hbm_bytes_s": 4.8e12},
}


class RooflineLatency(CostModel):
    """Per-layer time ``max(2 * MACs * batch / peak_ops(bits), bytes / HBM bandwidth)`` in seconds.

    ``peak_ops`` is the INT8 tensor rate when both bit-widths are <= 8, else the FP16 rate.
    Bytes: weights ``params * w / 8`` + input ``batch * in_numel * a / 8`` + output
    ``batch * out_numel * out_bits / 8`` (fp16 output by default). Launch overheads are ignored
    (``overhead_s`` adds a constant per layer).
    """
    name, unit = "latency", "s"

    def __init__(self, device: str = "h100", batch: int = 1, out_bits: int = 16, overhead_s: float = 0.0):
        if device not in DEVICES:
            raise StepError(f"unknown roofline device {device!r}; choose one of {sorted(DEVICES)}")
        self.device, self.batch, self.out_bits, self.overhead_s = device, int(batch), int(out_bits), float(overhead_s)
        self.spec = DEVICES[device]

    def layer_cost(self, layer, w, a):
        peak = self.spec["int8_ops"] if max(w, a) <= 8 else self.spec["fp16_ops"]
        compute = 2.0 * layer.macs * self.batch / peak
        nbytes = (layer.params * w + self.batch * layer.in_numel * a + self.batch * layer.out_numel * self.out_bits) / 8
        return max(compute, nbytes / self.spec["hbm_bytes_s"]) + self.overhead_s


class TableLatency(CostModel):
    """Measured latency per layer and bit-width from a JSON file::

        {"unit": "s", "layers": {"features.0": {"w8a8": 1.2e-6, "w4a8": 9e-7, ...}, ...}}

    (keys ``"w{w}a{a}"`` or ``"{w},{a}"``; layer keys are layer names or fx node names).
    """
    name = "latency_table"

    def __init__(self, path: str):
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except OSError as e:
            raise StepError(f"cannot read latency table {path!r}: {e.strerror}") from None
        except ValueError as e:
            raise StepError(f"latency table {path!r} is not valid JSON: {e}") from None
        self.path = path
        self.unit = str(doc.get("unit", "s")) if isinstance(doc, dict) else "s"
        table = doc.get("layers", doc) if isinstance(doc, dict) else None
        if not isinstance(table, dict):
            raise StepError(f"latency table {path!r} must map layer -> {{'w8a8': seconds, ...}}")
        self.table = table

    def layer_cost(self, layer, w, a):
        row = self.table.get(layer.name, self.table.get(layer.node))
        if row is None:
            raise StepError(f"latency table {self.path!r} has no row for layer {layer.name!r}")
        for key in (f"w{w}a{a}", f"{w},{a}"):
            if key in row:
                return float(row[key])
        raise StepError(f"latency table {self.path!r} has no entry w{w}a{a} for layer {layer.name!r}")


def make_cost_model(constraint: str, device: str = "h100", latency_table: Optional[str] = None,
                    batch: int = 1) -> CostModel:
    """``size`` | ``bops`` | ``latency`` (roofline on ``device``, or ``latency_table`` when given)."""
    if constraint == "size":
        return SizeCost()
    if constraint == "bops":
        return BOPsCost()
    if constraint == "latency":
        return TableLatency(latency_table) if latency_table else RooflineLatency(device, batch)
    raise StepError(f"unknown constraint {constraint!r}; choose size, bops or latency")


# ============================================================================== simulation
class _SimAct(nn.Module):
    """Switchable activation fake quantizer: calibrates one observer per candidate bit-width."""

    def __init__(self, observers: Dict[int, nn.Module]):
        super().__init__()
        self.obs = nn.ModuleDict({str(b): o for b, o in observers.items()})
        self.fq: Dict[int, nn.Module] = {}
        self.bits: Optional[int] = None
        self.calibrating = True

    def finish(self) -> None:
        from ...numerics import FakeQuantize
        for b, o in self.obs.items():
            if not getattr(o, "has_data", True):
                raise StepError("search_bits: an activation observer saw no calibration data")
            self.fq[int(b)] = FakeQuantize.from_observer(o)
        self.calibrating = False

    def forward(self, x):
        if self.calibrating:
            for o in self.obs.values():
                o(x)
            return x
        if self.bits is None:
            return x
        return self.fq[self.bits](x)


class QuantSim:
    """A copy of a float graph whose weighted layers switch bit-widths without re-tracing.

    Weights: per-channel symmetric narrow-range min-max fake quantization (what ``convert`` does),
    precomputed for every bit-width in ``w_range``. Activation inputs: ``observer`` observers (one
    per candidate bit-width in ``a_range``), calibrated on ``calib`` -- the numerics of
    ``observe`` + ``calibrate`` + ``convert``.
    """

    def __init__(self, gm: fx.GraphModule, layers: Sequence[Layer], w_range: Sequence[int], a_range: Sequence[int],
                 calib: Sequence[Tuple], observer: str = "minmax", symmetric: bool = False,
                 per_channel: bool = True):
        from ..ptq.actions import _observer_config, new_observer, weight_fake_quant
        from ...frontend import set_training
        from ...context import copy_graph_module
        from ...opclasses import OpView, classify
        self.gm = copy_graph_module(gm)
        set_training(self.gm, False)
        self.layers = list(layers)
        mods = dict(self.gm.named_modules())
        by_name = {n.name: n for n in self.gm.graph.nodes}
        self.weights: List[torch.Tensor] = []
        self.float_w: List[torch.Tensor] = []
        self.qw: List[Dict[int, torch.Tensor]] = []
        self.acts: List[_SimAct] = []
        for i, layer in enumerate(self.layers):
            n = by_name[layer.node]
            v = OpView(n, self.gm, classify(n, mods), mods)
            w = v.tensor("weight")
            self.weights.append(w)
            wf = w.detach().clone()
            self.float_w.append(wf)
            qd = {}
            for b in w_range:
                fq = weight_fake_quant(wf, layer.op, layer.groups, int(b), per_channel)
                with torch.no_grad():
                    qd[int(b)] = fq(wf).detach()
            self.qw.append(qd)
            obs = {int(b): new_observer(_observer_config(observer, int(b), symmetric)) for b in a_range}
            act = _SimAct(obs)
            name = f"haq_sim_act_{i}"
            self.gm.add_module(name, act)
            x = v.inputs()[0]
            with self.gm.graph.inserting_before(n):
                q = self.gm.graph.call_module(name, (x,))
            n.replace_input_with(x, q)
            self.acts.append(act)
        self.gm.recompile()
        from ...frontend import as_inputs
        with torch.no_grad():
            seen = 0
            for inputs in calib:
                self.gm(*as_inputs(inputs))
                seen += 1
        if not seen:
            raise StepError("search_bits needs calibration batches")
        for a in self.acts:
            a.finish()

    @torch.no_grad()
    def set_bits(self, ws: Optional[Sequence[Optional[int]]], as_: Optional[Sequence[Optional[int]]]) -> None:
        """Use weight bits ``ws[i]`` / activation bits ``as_[i]`` (None: float) for layer ``i``."""
        for i in range(len(self.layers)):
            wb = ws[i] if ws is not None else None
            self.weights[i].copy_(self.float_w[i] if wb is None else self.qw[i][int(wb)])
            self.acts[i].bits = None if as_ is None or as_[i] is None else int(as_[i])

    @torch.no_grad()
    def logits(self, batches: Sequence[Tuple]) -> torch.Tensor:
        """Concatenated outputs of the current configuration on ``batches``."""
        from ...frontend import as_inputs
        return torch.cat([self.gm(*as_inputs(inp)) for inp in batches])

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Tuple], targets: torch.Tensor) -> Tuple[float, float]:
        """(top-1 accuracy in %, mean cross-entropy) of the current configuration."""
        out, targets = classification(self.logits(batches), targets)
        acc = 100.0 * float((out.argmax(-1) == targets).float().mean())
        return acc, float(F.cross_entropy(out, targets))


# ============================================================================== DDPG
def _mlp(i: int, h: int, o: int, out_act: Optional[nn.Module] = None) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o)]
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


class DDPGAgent:
    """Deep deterministic policy gradient (Lillicrap et al. 2016) as used by HAQ.

    Actor ``mu(s) in [0, 1]`` (sigmoid), critic ``Q(s, a)``, target copies with soft updates
    (``tau``), a replay buffer, and truncated-normal exploration around ``mu(s)`` whose width
    ``sigma`` decays by ``sigma_decay`` per episode after the warm-up.
    """

    def __init__(self, state_dim: int, hidden: int = 64, lr_actor: float = 1e-4, lr_critic: float = 1e-3,
                 tau: float = 0.01, buffer_size: int = 2000, batch_size: int = 64, sigma: float = 0.5,
                 sigma_decay: float = 0.99, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = _mlp(state_dim, hidden, 1, nn.Sigmoid())
            self.critic = _mlp(state_dim + 1, hidden, 1)
        import copy
        self.actor_t, self.critic_t = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.opt_a = torch.optim.Adam(self.actor.parameters(), lr=lr_actor)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=lr_critic)
        self.tau, self.batch_size, self.buffer_size = tau, batch_size, buffer_size
        self.sigma, self.sigma_decay = sigma, sigma_decay
        self.buffer: List[Tuple[torch.Tensor, float, float]] = []
        self.rng = random.Random(seed)
        self.gen = g

    def act(self, state: torch.Tensor, explore: bool = True) -> float:
        with torch.no_grad():
            mu = float(self.actor(state[None])[0, 0])
        if not explore:
            return mu
        for _ in range(100):  # truncated normal on [0, 1]
            a = mu + self.sigma * float(torch.randn((), generator=self.gen))
            if 0.0 <= a <= 1.0:
                return a
        return min(max(mu, 0.0), 1.0)

    def random_action(self) -> float:
        return self.rng.random()

    def remember(self, state: torch.Tensor, action: float, reward: float) -> None:
        self.buffer.append((state, action, reward))
        if len(self.buffer) > self.buffer_size:
            self.buffer.pop(0)

    def decay(self) -> None:
        self.sigma *= self.sigma_decay

    def update(self) -> Optional[Tuple[float, float]]:
        """One critic + actor step on a replay batch; returns (critic loss, -Q) or None."""
        if len(self.buffer) < min(self.batch_size, 8):
            return None
        batch = self.rng.sample(self.buffer, min(self.batch_size, len(self.buffer)))
        s = torch.stack([b[0] for b in batch])
        a = torch.tensor([[b[1]] for b in batch])
        r = torch.tensor([[b[2]] for b in batch])
        q = self.critic(torch.cat([s, a], 1))
        loss_c = F.mse_loss(q, r)          # target = episode reward (discount 0, see module doc)
        self.opt_c.zero_grad()
        loss_c.backward()
        self.opt_c.step()
        loss_a = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
        self.opt_a.zero_grad()
        loss_a.backward()
        self.opt_a.step()
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_t), (self.critic, self.critic_t)):
                for p, pt in zip(net.parameters(), tgt.parameters()):
                    pt.mul_(1 - self.tau).add_(p, alpha=self.tau)
        return loss_c.item(), loss_a.item()


# ============================================================================== budget
def enforce_budget(layers: Sequence[Layer], ws: List[int], as_: List[int], cost: CostModel, budget: float,
                   min_bits: int, search_a: bool) -> Tuple[List[int], List[int]]:
    """HAQ's rule: lower bit-widths one step at a time (layers by decreasing cost, weights before
    activations) until the configuration fits ``budget``."""
    ws, as_ = list(ws), list(as_)
    total = cost.total(layers, ws, as_)
    guard = 0
    while total > budget * (1 + 1e-9):
        order = sorted(range(len(layers)), key=lambda i: -cost.layer_cost(layers[i], ws[i], as_[i]))
        changed = False
        for i in order:
            for kind in (("w", "a") if search_a else ("w",)):
                arr = ws if kind == "w" else as_
                if arr[i] > min_bits:
                    arr[i] -= 1
                    changed = True
                    total = cost.total(layers, ws, as_)
                    if total <= budget * (1 + 1e-9):
                        return ws, as_
        guard += 1
        if not changed or guard > 64:
            raise StepError(f"budget {budget:.6g} cannot be met even at {min_bits} bits "
                            f"(cost {total:.6g} {cost.unit})")
    return ws, as_


# ============================================================================== search
@dataclass
class SearchResult:
    """Outcome of a search: chosen bits, its cost / reward / metrics, and a history."""
    w_bits: List[int]
    a_bits: List[int]
    cost: float
    reward: float
    accuracy: float
    loss: float
    episodes: int = 0
    seconds: float = 0.0
    history: List[Dict[str, Any]] = field(default_factory=list)


def _normalised_states(layers: Sequence[Layer]) -> torch.Tensor:
    raw = torch.tensor([l.features() for l in layers], dtype=torch.float32)
    lo, hi = raw.min(0).values, raw.max(0).values
    return torch.where(hi > lo, (raw - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(raw))


def _to_bits(a: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(lo - 0.5 + a * (hi - lo + 1)))))


def ddpg_search(layers: Sequence[Layer], sim: QuantSim, val: Sequence[Tuple], targets: torch.Tensor,
                cost: CostModel, budget: float, min_bits: int = 2, max_bits: int = 8, a_bits: int = 8,
                search_activations: bool = False, episodes: int = 60, warmup: int = 10,
                seconds: Optional[float] = None, reward: str = "acc", seed: int = 0, progress: bool = False,
                base_acc: float = 0.0, base_loss: float = 0.0) -> SearchResult:
    """HAQ's search loop (see the module doc). Returns the best configuration seen."""
    from tqdm.auto import tqdm
    feats = _normalised_states(layers)
    kinds = ["w", "a"] if search_activations else ["w"]
    steps = [(i, k) for i in range(len(layers)) for k in kinds]
    state_dim = feats.shape[1] + 2   # + is_weight flag + previous action
    agent = DDPGAgent(state_dim, seed=seed)
    best: Optional[SearchResult] = None
    history: List[Dict[str, Any]] = []
    baseline: Optional[float] = None
    t0 = time.perf_counter()
    bar = tqdm(range(episodes), desc="haq search", disable=not progress, leave=False)
    ep = 0
    for ep in bar:
        if seconds is not None and time.perf_counter() - t0 > seconds and ep > 0:
            break
        ws, as_ = [max_bits] * len(layers), [a_bits] * len(layers)
        states, actions = [], []
        prev = 1.0
        for i, k in steps:
            s = torch.cat([feats[i], torch.tensor([1.0 if k == "w" else 0.0, prev])])
            a = agent.random_action() if ep < warmup else agent.act(s)
            b = _to_bits(a, min_bits, max_bits)
            (ws if k == "w" else as_)[i] = b
            states.append(s)
            actions.append(a)
            prev = a
        ws, as_ = enforce_budget(layers, ws, as_, cost, budget, min_bits, search_activations)
        sim.set_bits(ws, as_)
        acc, loss = sim.evaluate(val, targets)
        r = 0.1 * (acc - base_acc) if reward == "acc" else -(loss - base_loss)
        baseline = r if baseline is None else 0.5 * baseline + 0.5 * r   # moving-average baseline (HAQ)
        for s, a in zip(states, actions):
            agent.remember(s, a, r - baseline)
        if ep >= warmup:
            for _ in range(len(steps)):
                agent.update()
            agent.decay()
        c = cost.total(layers, ws, as_)
        history.append({"episode": ep, "w_bits": list(ws), "a_bits": list(as_), "acc": acc, "loss": loss,
                        "reward": r, "cost": c})
        better = best is None or (r > best.reward) or (r == best.reward and loss < best.loss)
        if better:
            best = SearchResult(list(ws), list(as_), c, r, acc, loss)
        bar.set_postfix(best=f"{best.accuracy:.1f}%", acc=f"{acc:.1f}%")
    assert best is not None
    best.episodes = len(history)
    best.seconds = time.perf_counter() - t0
    best.history = history
    return best


# ============================================================================== HAWQ baseline
def hutchinson_traces(gm: fx.GraphModule, layers: Sequence[Layer], batches: Sequence[Tuple],
                      targets: Sequence[torch.Tensor], iters: int = 16, seed: int = 0) -> List[float]:
    """Per-layer Hessian trace of the cross-entropy w.r.t. each layer's weight (Hutchinson:
    ``E_v[v^T H v]`` with Rademacher ``v``; Avron & Toledo 2011, HAWQ-v2)."""
    from ...frontend import set_training
    from ...context import copy_graph_module
    from ...opclasses import OpView, classify
    g = copy_graph_module(gm)
    set_training(g, False)
    mods = dict(g.named_modules())
    by_name = {n.name: n for n in g.graph.nodes}
    params = []
    for l in layers:
        n = by_name[l.node]
        w = OpView(n, g, classify(n, mods), mods).tensor("weight")
        if not isinstance(w, nn.Parameter):
            raise StepError(f"the weight of {l.name} is not a parameter; cannot differentiate")
        w.requires_grad_(True)
        params.append(w)
    gen = torch.Generator().manual_seed(seed)
    traces = [0.0] * len(params)
    total = 0
    for inputs, y in zip(batches, targets):
        loss = F.cross_entropy(*classification(g(*inputs), y))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(iters):
            vs = [torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            for j, (h, v) in enumerate(zip(hv, vs)):
                traces[j] += float((h * v).sum())
        total += iters
    return [t / max(total, 1) for t in traces]


@torch.no_grad()
def loss_perturbation(sim: QuantSim, val: Sequence[Tuple], targets: torch.Tensor, bits: Sequence[int],
                      a_bits: int) -> List[Dict[int, float]]:
    """Measured sensitivity: increase of the held-out loss when only layer ``i`` is quantized to
    ``b`` bits (the others stay float), for every layer and every ``b`` in ``bits``."""
    n = len(sim.layers)
    sim.set_bits(None, None)
    base = sim.evaluate(val, targets)[1]
    out: List[Dict[int, float]] = []
    for i in range(n):
        row = {}
        for b in bits:
            ws: List[Optional[int]] = [None] * n
            as_: List[Optional[int]] = [None] * n
            ws[i], as_[i] = int(b), int(a_bits)
            sim.set_bits(ws, as_)
            row[int(b)] = sim.evaluate(val, targets)[1] - base
        out.append(row)
    sim.set_bits(None, None)
    return out


def weight_perturbation(sim: QuantSim, i: int, bits: int) -> float:
    """``||Q_bits(W_i) - W_i||^2`` with the simulator's weight quantizer."""
    return float((sim.qw[i][int(bits)] - sim.float_w[i]).pow(2).sum())


def greedy_allocation(layers: Sequence[Layer], traces: Sequence[float], sim: QuantSim, cost: CostModel,
                      budget: float, min_bits: int, max_bits: int, a_bits: int,
                      measured: Optional[Sequence[Dict[int, float]]] = None) -> Tuple[List[int], List[float]]:
    """HAWQ-style allocation: start at ``max_bits``; repeatedly lower the layer whose next step adds
    the least sensitivity per unit of cost saved, until the budget holds. Sensitivity: HAWQ-v2's
    ``trace(H)/n * ||Q_b(W) - W||^2``, or the ``measured`` loss increase per layer and bit-width
    (:func:`loss_perturbation`) when given. Returns weight bits and the per-layer sensitivity at
    the chosen bits."""
    n = len(layers)
    ws, as_ = [max_bits] * n, [a_bits] * n

    def omega(i, b):
        if measured is not None:
            return max(measured[i][b], 0.0)
        return max(traces[i], 0.0) / max(layers[i].params, 1) * weight_perturbation(sim, i, b)

    total = cost.total(layers, ws, as_)
    while total > budget * (1 + 1e-9):
        best_i, best_score = None, None
        for i in range(n):
            if ws[i] <= min_bits:
                continue
            saved = cost.layer_cost(layers[i], ws[i], as_[i]) - cost.layer_cost(layers[i], ws[i] - 1, as_[i])
            if saved <= 0:
                continue
            score = (omega(i, ws[i] - 1) - omega(i, ws[i])) / saved
            if best_score is None or score < best_score:
                best_i, best_score = i, score
        if best_i is None:
            raise StepError(f"budget {budget:.6g} cannot be met even at {min_bits} bits (cost {total:.6g} "
                            f"{cost.unit})")
        ws[best_i] -= 1
        total = cost.total(layers, ws, as_)
    return ws, [omega(i, ws[i]) for i in range(n)]
