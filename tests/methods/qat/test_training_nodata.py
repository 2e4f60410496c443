"""Training recipes without data: ``PassManager("qat" | "bnn").run(gm)`` and the first-batch scales."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qpasses
from qpasses.errors import StepError
from qpasses.methods.qat.lib import FirstBatchFakeQuantize, frozen_fake_quant
from qpasses.numerics import FakeQuantize
from qpasses.zoo import ResNetLike

from conftest import randomize_bn

torch.set_num_threads(1)


class TinyAttention(nn.Module):
    """A transformer-like block: Linear embedding, LayerNorm, single-head attention, MLP, head."""

    def __init__(self, d: int = 16, n_cls: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, n_cls)
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, x):                      # x: [N, T, 8]
        h = self.embed(x)
        a = self.ln1(h)
        att = torch.softmax(self.q(a) @ self.k(a).transpose(-2, -1) * self.scale, dim=-1)
        h = h + self.proj(att @ self.v(a))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


def _cnn():
    torch.manual_seed(0)
    m = randomize_bn(ResNetLike(num_classes=5, in_ch=3, width=8, blocks=(1, 1))).eval()
    x = torch.randn(2, 3, 12, 12)
    return qpasses.trace(m, (x,)), (lambda n: torch.randn(n, 3, 12, 12)), 5


def _attn():
    torch.manual_seed(0)
    m = TinyAttention().eval()
    x = torch.randn(2, 6, 8)
    return qpasses.trace(m, (x,)), (lambda n: torch.randn(n, 6, 8)), 4


def _one_step(q, make, n_cls):
    from qpasses.methods.binary.lib import make_optimizer
    q.train()
    opt = make_optimizer(q, 1e-3)
    pending = [m for m in q.modules() if isinstance(m, FirstBatchFakeQuantize)]
    assert pending and all(m.pending for m in pending)
    scales = {id(m): m.scale for m in pending}
    x, y = make(8), torch.randint(0, n_cls, (8,))
    loss = F.cross_entropy(q(x), y)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not any(m.pending for m in pending)
    for m in pending:
        assert m.scale is scales[id(m)]          # the optimizer's parameter, updated in place
        assert torch.isfinite(m.scale).all() and (m.scale.detach().abs() > 0).all()
    q.eval()
    with torch.no_grad():
        out = q(make(4))
    assert torch.isfinite(out).all()
    return pending


@pytest.mark.parametrize("build", [_cnn, _attn], ids=["cnn", "attention"])
def test_qat_runs_without_data_then_trains(build):
    gm, make, n_cls = build()
    pm = qpasses.PassManager("qat", progress=False)
    q = pm.run(gm)                                  # no data
    steps = {s.name: s.info for s in pm.report.steps}
    assert steps["calibrate"]["first_batch_init"] > 0
    assert steps["first_batch_init"]["first_batch_quantizers"] == steps["calibrate"]["first_batch_init"]
    pending = _one_step(q, make, n_cls)
    assert all(m.learnable for m in pending)


@pytest.mark.parametrize("build", [_cnn, _attn], ids=["cnn", "attention"])
def test_bnn_runs_without_data_then_trains(build):
    gm, make, n_cls = build()
    pm = qpasses.PassManager("bnn", progress=False)
    q = pm.run(gm)
    _one_step(q, make, n_cls)


def test_with_data_nothing_waits_for_a_batch():
    gm, make, _ = _cnn()
    q = qpasses.PassManager("qat", progress=False).run(gm, data=[make(4) for _ in range(2)])
    assert not any(isinstance(m, FirstBatchFakeQuantize) for m in q.modules())
    assert any(isinstance(m, FakeQuantize) and m.learnable for m in q.modules())


def test_lsq_initial_scale_is_two_mean_abs_over_sqrt_qp():
    fq = FakeQuantize(1.0, 0, 0, 255, learnable=True)          # unsigned 8 bit, zero point 0
    lazy = FirstBatchFakeQuantize.from_fake_quant(fq)
    x = torch.rand(64, 10) * 3                                   # non-negative: zero point stays qmin
    lazy(x)
    assert int(lazy.zero_point) == 0
    assert torch.allclose(lazy.scale.detach(), 2 * x.abs().mean() / math.sqrt(255))
    signed = FirstBatchFakeQuantize.from_fake_quant(FakeQuantize(1.0, 0, -127, 127, learnable=True, symmetric=True))
    x = torch.randn(100)
    signed(x)
    assert int(signed.zero_point) == 0
    assert torch.allclose(signed.scale.detach(), 2 * x.abs().mean() / math.sqrt(127))
    fixed = FirstBatchFakeQuantize.from_fake_quant(FakeQuantize(1.0, 0, 0, 255))     # not learnable: min-max
    x = torch.rand(50) * 2
    fixed(x)
    assert torch.allclose(fixed.scale, x.max() / 255)


def test_first_batch_quantizer_state_dict_and_freezing():
    fq = FirstBatchFakeQuantize.from_fake_quant(FakeQuantize(1.0, 0, 0, 255, learnable=True))
    with pytest.raises(StepError, match="first batch"):
        frozen_fake_quant(fq)                                    # a placeholder scale is no scale
    fq(torch.rand(8) + 1)
    other = FirstBatchFakeQuantize.from_fake_quant(FakeQuantize(1.0, 0, 0, 255, learnable=True))
    other.load_state_dict(fq.state_dict())
    assert not other.pending and torch.equal(other.scale, fq.scale)
    frozen = frozen_fake_quant(fq)
    assert type(frozen) is FakeQuantize and torch.equal(frozen.scale, fq.scale.detach())


def test_tracing_does_not_initialise():
    gm, make, _ = _cnn()
    q = qpasses.PassManager("qat", progress=False).run(gm)
    torch.fx.symbolic_trace(q)
    assert all(m.pending for m in q.modules() if isinstance(m, FirstBatchFakeQuantize))
