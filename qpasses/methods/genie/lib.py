"""GENIE: zero-shot quantization (Jeon et al., "GENIE: Show Me the Data for Quantization", CVPR 2023).

Library code behind the ``swing_conv`` rules, the ``distill`` data step (GENIE-D) and the
``reconstruct`` data step (GENIE-M quantizers):

* :class:`SwingConv2d` / :class:`SwingConv1d` -- a strided convolution that, while swinging,
  reflection-pads its input by ``jitter`` and crops a random window of the original size before
  convolving, so the stride grid shifts from step to step and distilled images lose the
  checkerboard artefacts of strided convolutions.  Not swinging (the default in eval mode) it is
  exactly the wrapped convolution.
* :class:`Generator` -- latent vector -> tensor of any input shape ``[C]``, ``[C, L]``,
  ``[C, H, W]`` or ``[C, D, H, W]``.
* :func:`distill_batch` / :func:`synthesize` -- GENIE-D: a generator and per-sample latent
  vectors optimised jointly (each with its own optimizer) so that the batch statistics at the
  input of every BatchNorm match its running statistics, plus an input-statistics term.
* :class:`GenieWeightQuantizer` / :class:`GenieActQuantizer` -- GENIE-M: soft-bit weight rounding
  (:class:`qpasses.numerics.AdaRoundQuantizer` with the step size learned and ``floor(w/s0)``
  fixed), learned activation step sizes (LSQ) with QDrop.

Data parallelism: when ``torch.distributed`` is initialised every rank synthesises its own
shard of samples; parameters shared by the ranks (the generator, the quantizers) start from rank
0's values and their gradients are averaged with ``all_reduce``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...distributed import average_grads, broadcast_module, seeded_global_rng, world
from ...numerics.rounding import AdaRoundQuantizer

__all__ = ["SwingConv1d", "SwingConv2d", "to_swing", "from_swing", "Generator", "bn_capture_module",
           "distill_batch", "synthesize", "GenieWeightQuantizer", "GenieActQuantizer", "set_swing"]


# ----------------------------------------------------------------------------- swing convolution
class _Swing:
    """Mixin: random reflection-padded crop of the input before the convolution."""

    jitter: int = 1
    swing: Optional[bool] = None  # None: swing in training mode only; True/False force it

    def _swinging(self) -> bool:
        return self.training if self.swing is None else bool(self.swing)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        j = int(self.jitter)
        nd = self._spatial
        if j <= 0 or not self._swinging() or any(s <= j for s in x.shape[-nd:]):
            return x
        xp = F.pad(x, [j] * (2 * nd), mode="reflect")
        offs = torch.randint(0, 2 * j + 1, (nd,)).tolist()
        for d, (o, s) in enumerate(zip(offs, x.shape[-nd:])):
            xp = xp.narrow(x.dim() - nd + d, o, s)
        return xp

    @classmethod
    def from_conv(cls, conv: nn.Module, jitter: int = 1) -> nn.Module:
        """A swing convolution holding the very same weight and bias tensors as ``conv``.

        Built on the meta device, then given ``conv``'s tensors: no initialisation runs (nothing
        drawn from the global random generator, no time spent)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device="meta", dtype=conv.weight.dtype)
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        new.jitter = int(jitter)
        new.train(conv.training)
        return new

    def to_conv(self) -> nn.Module:
        """The plain convolution (same weight and bias tensors)."""
        base = self._base
        new = base(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                   self.dilation, self.groups, self.bias is not None, self.padding_mode,
                   device="meta", dtype=self.weight.dtype)
        new.weight = self.weight
        if self.bias is not None:
            new.bias = self.bias
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + f", jitter={self.jitter}"  # type: ignore[misc]


class SwingConv2d(_Swing, nn.Conv2d):
    """``nn.Conv2d`` whose input is randomly shifted (reflection pad + crop) while swinging."""
    _spatial = 2
    _base = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Conv2d.forward(self, self._crop(x))


class SwingConv1d(_Swing, nn.Conv1d):
    """``nn.Conv1d`` whose input is randomly shifted (reflection pad + crop) while swinging."""
    _spatial = 1
    _base = nn.Conv1d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Conv1d.forward(self, self._crop(x))


_SWING_OF = {nn.Conv2d: SwingConv2d, nn.Conv1d: SwingConv1d}


def to_swing(conv: nn.Module, jitter: int = 1) -> nn.Module:
    """Swing version of a plain ``nn.Conv1d`` / ``nn.Conv2d`` (same tensors); ValueError otherwise."""
    cls = _SWING_OF.get(type(conv))
    if cls is None:
        raise ValueError(f"no swing convolution for {type(conv).__name__}")
    return cls.from_conv(conv, jitter)


def from_swing(conv: nn.Module) -> nn.Module:
    return conv.to_conv()


def set_swing(root: nn.Module, value: Optional[bool]) -> List[nn.Module]:
    """Force every swing convolution under ``root`` to swing (True), not (False) or follow ``training`` (None)."""
    mods = [m for m in root.modules() if isinstance(m, _Swing)]
    for m in mods:
        m.swing = value
    return mods


# ----------------------------------------------------------------------------- generator
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Generator(nn.Module):
    """Latent vector ``[N, latent_dim]`` -> tensor ``[N, *shape]``.

    ``shape`` is one sample's shape: ``(C,)``, ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``.
    Spatial inputs: linear -> ``[hidden, ceil(s/2)...]`` -> BN -> LeakyReLU -> nearest upsampling
    to the full size -> conv3 -> BN -> LeakyReLU -> conv3 -> BN (output statistics start at
    ``mean``/``std`` per channel).  Vector inputs: linear -> BN -> LeakyReLU -> linear -> BN.
    """

    def __init__(self, shape: Sequence[int], latent_dim: int = 64, hidden: int = 64,
                 mean: float = 0.0, std: float = 1.0):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"bad sample shape {shape}")
        self.shape = shape
        self.latent_dim = int(latent_dim)
        c, spatial = shape[0], shape[1:]
        self.nd = len(spatial)
        if self.nd > 3:
            raise ValueError(f"inputs with {self.nd} spatial dims are not supported")
        if self.nd == 0:
            self.body = nn.Sequential(nn.Linear(latent_dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
                                      nn.Linear(hidden, c))
            self.out_bn = nn.BatchNorm1d(c)
        else:
            self.small = tuple(max(1, math.ceil(s / 2)) for s in spatial)
            self.fc = nn.Linear(latent_dim, hidden * math.prod(self.small))
            self.hidden = hidden
            conv, bn = _CONV[self.nd], _BN[self.nd]
            self.bn0 = bn(hidden)
            self.body = nn.Sequential(conv(hidden, hidden, 3, padding=1), bn(hidden), nn.LeakyReLU(0.2),
                                      conv(hidden, c, 3, padding=1))
            self.out_bn = bn(c)
        with torch.no_grad():
            self.out_bn.weight.fill_(float(std))
            self.out_bn.bias.fill_(float(mean))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.nd == 0:
            return self.out_bn(self.body(z))
        h = self.fc(z).reshape(z.shape[0], self.hidden, *self.small)
        h = F.leaky_relu(self.bn0(h), 0.2)
        h = F.interpolate(h, size=self.shape[1:], mode="nearest")
        return self.out_bn(self.body(h))


# ----------------------------------------------------------------------------- BN statistics
def bn_capture_module(gm: fx.GraphModule, bn_nodes: Sequence[fx.Node]) -> fx.GraphModule:
    """A copy of ``gm`` whose output is the tuple ``(input of bn_0, input of bn_1, ...)``.

    Works on the graph, so it serves fx and aten graphs alike; the copy's modules are the copies
    made by :func:`qpasses.context.copy_graph_module` (the caller's graph is not touched).
    """
    from ...context import copy_graph_module
    from ...matcher import Matcher
    cap = copy_graph_module(gm)
    by_name = {n.name: n for n in cap.graph.nodes}
    m = Matcher(cap)
    ins = []
    for bn in bn_nodes:
        node = by_name[bn.name]
        x = m.view(node).get("input")
        if not isinstance(x, fx.Node):
            raise ValueError(f"BatchNorm {bn.name} has no node input")
        ins.append(x)
    out = [n for n in cap.graph.nodes if n.op == "output"][0]
    out.args = (tuple(ins),)
    cap.graph._codegen = fx.graph.CodeGen()  # torch.export graphs carry a pytree output spec: drop it
    cap.graph.eliminate_dead_code()
    cap.recompile()
    return cap


def _stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False)
    return mean, torch.sqrt(var + 1e-8)


def bn_loss(feats: Sequence[torch.Tensor], targets: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum over BN layers of ``||mu - running_mean||_2 + ||sigma - sqrt(running_var + eps)||_2``."""
    loss = feats[0].new_zeros(())
    for x, (rm, rs) in zip(feats, targets):
        mu, sd = _stats(x)
        loss = loss + torch.norm(mu - rm, 2) + torch.norm(sd - rs, 2)
    return loss


def input_loss(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Input-statistics term: per-channel batch mean/std of the synthetic input against ``mean``/``std``."""
    mu, sd = _stats(x) if x.dim() > 1 else (x.mean().reshape(1), x.std().reshape(1))
    return torch.norm(mu - mean, 2) + torch.norm(sd - std, 2)


def distill_batch(capture: nn.Module, targets, shape: Sequence[int], n: int, *, iters: int = 200,
                  mode: str = "genie", latent_dim: int = 64, hidden: int = 64, lr_g: float = 0.01,
                  lr_z: float = 0.05, lr_x: float = 0.1, input_weight: float = 1.0, mean: float = 0.0,
                  std: float = 1.0, on_step: Optional[Callable[[float], None]] = None,
                  generator: Optional[torch.Generator] = None, state: Optional[dict] = None
                  ) -> Tuple[torch.Tensor, float]:
    """Synthesise ``n`` samples of one-sample ``shape`` (GENIE-D); returns ``(samples, final loss)``.

    ``mode``: ``"genie"`` (generator and latents both learned), ``"generator"`` (latents fixed),
    ``"latents"`` (no generator: the inputs themselves are the optimised variables).
    ``capture(x)`` returns the BN input tensors; ``targets`` their ``(running mean, running std)``.
    Under ``torch.distributed`` the generator is shared: same init, gradients averaged.
    ``state`` (a dict), when given, receives the trained ``generator``, the initial ``z0`` and the
    final ``z`` latents (or the inputs ``x``).
    """
    if mode not in ("genie", "generator", "latents"):
        raise ValueError(f"unknown distill mode {mode!r}")
    params_shared: List[torch.Tensor] = []
    if mode == "latents":
        x = torch.randn((n, *shape), generator=generator) * std + mean
        x = nn.Parameter(x)
        opts = [torch.optim.Adam([x], lr=lr_x)]
        make = lambda: x  # noqa: E731
        gen = None
    else:
        gen = Generator(shape, latent_dim, hidden, mean, std)
        broadcast_module(gen)
        gen.train()
        z = torch.randn((n, latent_dim), generator=generator)
        z = nn.Parameter(z, requires_grad=(mode == "genie"))
        params_shared = list(gen.parameters())
        opts = [torch.optim.Adam(params_shared, lr=lr_g, betas=(0.5, 0.999))]
        if mode == "genie":
            opts.append(torch.optim.Adam([z], lr=lr_z, betas=(0.5, 0.999)))
        make = lambda: gen(z)  # noqa: E731
        if state is not None:
            state["z0"] = z.detach().clone()
    scheds = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=max(10, iters // 10))
              for o in opts]
    last = float("nan")
    for _ in range(int(iters)):
        for o in opts:
            o.zero_grad(set_to_none=True)
        xs = make()
        feats = capture(xs)
        if isinstance(feats, torch.Tensor):
            feats = (feats,)
        loss = bn_loss(feats, targets) if len(feats) else xs.new_zeros(())
        if input_weight:
            loss = loss + float(input_weight) * input_loss(xs, mean, std)
        loss.backward()
        average_grads(params_shared)
        for o in opts:
            o.step()
        last = float(loss.detach())
        for s in scheds:
            s.step(last)
        if on_step is not None:
            on_step(last)
    with torch.no_grad():
        out = make().detach().clone()
    if state is not None:
        state["generator"] = gen
        if gen is not None:
            state["z"] = z.detach().clone()
        else:
            state["x"] = x.detach().clone()
    return out, last


def synthesize(gm: fx.GraphModule, shape: Sequence[int], samples: int, batch_size: int, iters: int,
               mode: str = "genie", swing: bool = True, progress: bool = False, seed: Optional[int] = 0,
               **kw) -> Tuple[torch.Tensor, Dict[str, float]]:
    """GENIE-D over a float GraphModule: ``samples`` inputs of one-sample ``shape`` (this rank's shard).

    BN layers are found with the matcher (op class ``batch_norm``).  Returns the samples and facts.
    """
    from tqdm.auto import tqdm
    from ...matcher import Matcher
    from ...frontend import set_training
    matcher = Matcher(gm)
    bns = matcher.index(["batch_norm"])
    targets = []
    for bn in bns:
        v = matcher.view(bn)
        rm, rv = v.tensor("running_mean"), v.tensor("running_var")
        if rm is None or rv is None:
            raise ValueError(f"BatchNorm {bn.name} has no running statistics")
        eps = float(v.get("eps", 1e-5) or 1e-5)
        targets.append((rm.detach().float(), torch.sqrt(rv.detach().float() + eps)))
    cap = bn_capture_module(gm, bns)
    set_training(cap, False)
    for p in cap.parameters():
        p.requires_grad_(False)
    set_swing(cap, bool(swing))
    rank, size = world()
    local = int(math.ceil(samples / size))
    g = torch.Generator().manual_seed(int(seed) * 1000 + rank) if seed is not None else None
    nb = int(math.ceil(local / batch_size))
    out, losses = [], []
    # one bar over every optimisation step of every batch: tqdm shows the time left; rank 0 draws
    bar = tqdm(total=nb * int(iters), desc="distill", unit="it", disable=(not progress) or rank != 0, leave=False,
               dynamic_ncols=True)
    # the generator's initialisation and the swing crops draw from the global generator
    try:
        with seeded_global_rng(None if seed is None else int(seed) * 1000 + rank):
            done = 0
            for b in range(nb):
                n = min(batch_size, local - done)
                bar.set_postfix_str(f"batch {b + 1}/{nb}", refresh=False)
                x, loss = distill_batch(cap, targets, shape, n, iters=iters, mode=mode, generator=g,
                                        on_step=lambda _l: bar.update(1), **kw)
                out.append(x)
                losses.append(loss)
                done += n
    finally:
        bar.close()
    data = torch.cat(out, 0)
    return data, {"bn_layers": len(bns), "final_loss": float(sum(losses) / max(1, len(losses))),
                  "batches": nb, "rank": rank, "world_size": size}


# ----------------------------------------------------------------------------- GENIE-M quantizers
class GenieWeightQuantizer(nn.Module):
    """Stands in for a weight ``FakeQuantize`` during reconstruction: soft bits + learned step size.

    ``forward(w)`` ignores ``w`` (the float weight the graph feeds in) and returns the
    :class:`AdaRoundQuantizer`'s fake-quantized weight; with ``enabled=False`` it returns ``w``.
    :meth:`to_fake_quant` bakes the hard-rounded result into a plain ``FakeQuantize`` (with the
    learned scale) and gives the weight tensor to write back.
    """

    def __init__(self, fq, weight: torch.Tensor, learn_scale: bool = True):
        super().__init__()
        self.q = AdaRoundQuantizer(weight, fq.scale.detach(), fq.zero_point, fq.qmin, fq.qmax,
                                   axis=fq.axis if fq.axis is not None else 0, learn_scale=learn_scale)
        self.template = fq
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return self.q().to(w.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        return self.q.regularizer(beta)

    def bake(self):
        """``(FakeQuantize with the learned scale, hard-rounded weight)``."""
        from ...numerics import FakeQuantize
        fq = self.template
        s = self.q.scale.detach().clone().abs().clamp_min(1e-12)
        new = FakeQuantize(s.reshape(-1) if fq.axis is not None else s.reshape(()), fq.zero_point.clone(),
                           fq.qmin, fq.qmax, axis=fq.axis, bits=fq.bits, symmetric=fq.symmetric)
        for k, v in fq.__dict__.items():
            if k.startswith("qpasses_"):
                new.__dict__[k] = v
        w = self.q.hard_weight()
        return new, w


class GenieActQuantizer(nn.Module):
    """Learned-step-size activation quantizer with QDrop, standing in for an activation ``FakeQuantize``.

    While ``drop_prob > 0`` and in training mode, each element keeps its float value with
    probability ``drop_prob`` (QDrop, Wei et al. ICLR 2022); otherwise it is fake-quantized with
    the LSQ-learned scale (zero point fixed).
    """

    def __init__(self, fq):
        super().__init__()
        from ...numerics import FakeQuantize
        self.fq = FakeQuantize(fq.scale.detach().clone(), fq.zero_point.clone(), fq.qmin, fq.qmax, axis=fq.axis,
                               learnable=True, bits=fq.bits, symmetric=fq.symmetric)
        self.template = fq
        self.drop_prob = 0.0
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        y = self.fq(x)
        if self.training and self.drop_prob > 0:
            keep = torch.rand_like(x) < self.drop_prob
            y = torch.where(keep, x, y)
        return y

    def bake(self):
        from ...numerics import FakeQuantize
        fq = self.template
        s = self.fq.scale.detach().clone().abs().clamp_min(1e-12)
        new = FakeQuantize(s, fq.zero_point.clone(), fq.qmin, fq.qmax, axis=fq.axis, learnable=fq.learnable,
                           bits=fq.bits, symmetric=fq.symmetric)
        for k, v in fq.__dict__.items():
            if k.startswith("qpasses_"):
                new.__dict__[k] = v
        return new
