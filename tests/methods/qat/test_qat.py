"""qat recipe: LSQ fake quantization, BatchNorm folded during training, conversion afterwards."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qpasses
from qpasses.errors import OptionError
from qpasses.methods.qat.lib import QATBatchNorm2d, freeze_bn
from qpasses.numerics import FakeQuantize
from qpasses.qnodes import QUANTIZER_OPS, bypassed, quantizer_module

torch.set_num_threads(1)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    return m


def _prepared(**opts):
    m = _model()
    data = [torch.randn(8, 1, 6, 6) for _ in range(3)]
    gm = qpasses.trace(m, (data[0],))
    pm = qpasses.PassManager("qat", **opts)
    return m, gm, pm.run(gm, data=data), pm, data


def test_lsq_gradient_matches_formula():
    s0, qmin, qmax = 0.1, -8, 7
    fq = FakeQuantize(s0, 0, qmin, qmax, learnable=True)
    x = torch.tensor([-2.0, -0.34, 0.0, 0.26, 0.449, 1.5])
    fq(x).sum().backward()
    v = x / s0
    per = torch.where(v <= qmin, torch.tensor(float(qmin)),
                      torch.where(v >= qmax, torch.tensor(float(qmax)), torch.round(v) - v))
    g = 1.0 / (x.numel() * qmax) ** 0.5
    assert torch.allclose(fq.scale.grad, per.sum() * g, atol=1e-5)


def _pattern_conv(q):
    """The conv2d node of the QAT conv + BatchNorm pattern and its weight quantizer module."""
    conv = next(n for n in q.graph.nodes if n.meta.get("qpasses.qat_interior") and "conv2d" in str(n.target))
    return conv, quantizer_module(q, conv.args[1])


def test_prepare_builds_trainable_graph_and_gradients_reach_scales():
    m, gm, q, pm, data = _prepared(w_bits=4, a_bits=4)
    bns = [mm for mm in q.modules() if isinstance(mm, QATBatchNorm2d)]
    conv, wfq = _pattern_conv(q)
    assert len(bns) == 1 and wfq.learnable and wfq.bits == 4
    # no module hides a quantizer: the conv + BatchNorm pattern is graph nodes, the weight
    # quantizer one custom-op call reading the conv's own weight (scaled by the BN factor)
    assert conv.args[1].op == "call_function" and conv.args[1].target in QUANTIZER_OPS
    assert {"0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"} <= set(q.state_dict())
    fqs = [mm for mm in q.modules() if isinstance(mm, FakeQuantize)]
    assert all(f.learnable for f in fqs) and len(fqs) >= 3
    q.train()
    q(data[0]).pow(2).mean().backward()
    assert all(f.scale.grad is not None and float(f.scale.grad.abs().sum()) > 0 for f in fqs)
    assert q.get_submodule("0").weight.grad is not None and bns[0].weight.grad is not None
    assert str(gm.graph) != str(q.graph)
    assert not any(isinstance(mm, QATBatchNorm2d) for mm in gm.modules())   # input untouched


@pytest.mark.parametrize("bias", [True, False])
def test_pattern_is_conv_bn_in_training_and_the_folded_conv_in_eval(bias):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(2, 3, 3, bias=bias), nn.BatchNorm2d(3)).eval()
    with torch.no_grad():
        ref[1].running_mean.uniform_(-1, 1), ref[1].running_var.uniform_(0.5, 2), ref[1].weight.uniform_(0.5, 2)
    x = torch.randn(4, 2, 5, 5)
    q = qpasses.PassManager("qat_prepare").run(qpasses.trace(ref, (x,)))
    wq = [n for n in q.graph.nodes if n.op == "call_function" and n.target in QUANTIZER_OPS]
    assert len(wq) == 1
    with bypassed(q, wq):       # weight quantizer off: the pattern is exactly conv -> BatchNorm
        q.train(), ref.train()
        torch.testing.assert_close(q(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(q.get_submodule("1").running_mean, ref[1].running_mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(q.get_submodule("1").running_var, ref[1].running_var, atol=1e-5, rtol=0)
        q.eval(), ref.eval()
        torch.testing.assert_close(q(x), ref(x), atol=1e-5, rtol=1e-5)
    # in eval mode the pattern (quantizer on) equals its folded conv, which qat_convert builds
    c = qpasses.PassManager("qat_convert").run(q)
    assert not any(isinstance(quantizer_module(c, n, None), QATBatchNorm2d) for n in c.graph.nodes)
    assert sum(1 for n in c.graph.nodes if "conv2d" in str(n.target)) == 1
    torch.testing.assert_close(c(x), q(x), atol=1e-5, rtol=1e-5)


def test_bn_freezes_after_configured_steps():
    m, gm, q, pm, data = _prepared(freeze_bn_after=2)
    mod = [mm for mm in q.modules() if isinstance(mm, QATBatchNorm2d)][0]
    q.train()
    stats = []
    for i in range(4):
        q(data[i % 3] * (i + 1))
        stats.append(mod.running_mean.clone())
    assert not torch.equal(stats[0], stats[1])      # steps 1-2 update the running statistics
    assert mod.bn_frozen and torch.equal(stats[2], stats[3]) and torch.equal(stats[1], stats[2])
    assert freeze_bn(q, False) == 1 and not mod.bn_frozen


def test_convert_gives_ptq_form_and_integerizes():
    m, gm, q, pm, data = _prepared(observe_outputs=True)
    opt = torch.optim.SGD(q.parameters(), lr=1e-3)
    q.train()
    for x in data:
        opt.zero_grad()
        q(x).pow(2).mean().backward()
        opt.step()
    q.eval()
    c = qpasses.PassManager("qat_convert").run(q)
    used = [m for m in (quantizer_module(c, n, None) for n in c.graph.nodes) if m is not None]
    assert not any(isinstance(mm, QATBatchNorm2d) for mm in used)
    assert not any(isinstance(mm, FakeQuantize) and mm.learnable for mm in used)
    assert any(isinstance(mm, FakeQuantize) for mm in used)
    assert torch.allclose(c(data[0]), q(data[0]), atol=1e-5)
    pm2 = qpasses.PassManager(["qat_convert", "integerize"])
    iq = pm2.run(q)
    out = [n for n in iq.graph.nodes if n.op == "output"][0].args[0]
    step = float(out.args[1])
    assert float(((iq(data[0]) - c(data[0])).abs() <= step * 1.0001).float().mean()) >= 0.99
    # idempotent: a second qat_convert finds nothing
    pm3 = qpasses.PassManager("qat_convert")
    pm3.run(c)
    assert sum(r["rewrites"] for r in pm3.report.to_dict()["rules"]) == 0


def test_refusal_reason_and_plain_ste():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(2),
                      nn.Flatten(), nn.Linear(2 * 5 * 5, 2)).eval()
    data = [torch.randn(4, 1, 5, 5) for _ in range(2)]
    gm = qpasses.trace(m, (data[0],))
    pm = qpasses.PassManager("qat", learnable=False)
    q = pm.run(gm, data=data)
    rules = {r["rule"]: r for r in pm.report.to_dict()["rules"]}
    assert rules["qat_conv_bn"]["refused"] == 1
    assert "padding_mode" in rules["qat_conv_bn"]["refused_reasons"][0][1]
    fqs = [mm for mm in q.modules() if isinstance(mm, FakeQuantize)]
    assert fqs and not any(f.learnable for f in fqs)
    x = data[0].clone().requires_grad_(True)
    q.train()
    q(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0      # straight-through gradient


def test_qat_recipe_is_idempotent():
    m, gm, q, pm, data = _prepared(w_bits=4, a_bits=4)
    pm2 = qpasses.PassManager("qat", w_bits=4, a_bits=4)
    q2 = pm2.run(q, data=data)
    assert sum(r["rewrites"] for r in pm2.report.to_dict()["rules"]) == 0
    assert torch.equal(q(data[0]), q2(data[0]))


@pytest.mark.parametrize("opts", [{"w_bits": 1}, {"a_bits": 9}, {"freeze_bn_after": -1}, {"bogus": 3}])
def test_option_validation(opts):
    with pytest.raises(OptionError):
        qpasses.PassManager("qat", **opts)


@pytest.mark.slow
def test_qat_recovers_w4a4_accuracy_on_digits():
    from qpasses.datasets import accuracy, calib_batches, fit, load_digits_tensors, train_digits_cnn
    m = train_digits_cnn()
    xtr, ytr = load_digits_tensors("train")
    xte, yte = load_digits_tensors("test")
    cb = calib_batches()
    gm = qpasses.trace(m, (cb[0],))
    res = {}
    for w, a in ((4, 4), (3, 3)):
        ptq = accuracy(qpasses.PassManager("ptq_int8", w_bits=w, a_bits=a).run(gm, data=cb), xte, yte)
        q = qpasses.PassManager("qat", w_bits=w, a_bits=a, freeze_bn_after=40).run(gm, data=cb)
        fit(q, xtr, ytr, epochs=3, lr=1e-3)
        res[(w, a)] = (ptq, accuracy(qpasses.PassManager("qat_convert").run(q), xte, yte))
    fp32 = accuracy(m, xte, yte)
    ptq, qat = res[(4, 4)]          # measured: 98.4 -> 99.2 (FP32 99.4)
    assert qat >= fp32 - 1.0        # QAT brings W4A4 within a point of FP32
    if fp32 - ptq > 0.5:            # and where PTQ loses (here; not on every CPU's trained CNN),
        assert qat >= ptq + 0.4     # it recovers
    ptq, qat = res[(3, 3)]          # measured: 87.8 -> 97.8 (without AVX-512 VNNI: 95.0 -> 97.4)
    assert qat >= ptq + 1.0 and qat - ptq >= 0.5 * (fp32 - ptq)   # at least half of the loss back


def test_qat_prepare_modules_stay_in_eval_mode_like_the_batchnorm_they_replace():
    # (a training-mode BatchNorm is refused by the soundness guards: it is stateful)
    torch.manual_seed(0)
    gm = qpasses.trace(_model(), (torch.randn(2, 1, 6, 6),))
    out = qpasses.PassManager("qat_prepare").run(gm)
    mods = [mod for mod in out.modules() if isinstance(mod, QATBatchNorm2d)]
    assert mods and not any(mod.training for mod in mods)
    before = [mod.running_mean.clone() for mod in mods]
    with torch.no_grad():  # an eval forward leaves the running statistics alone
        out(torch.randn(4, 1, 6, 6))
    assert all(torch.equal(b, mod.running_mean) for b, mod in zip(before, mods))


def test_qat_on_an_exported_graph_trains():
    """ExportedProgram.module() refuses train()/eval(); the graph qpasses returns switches its
    modules' flags (the aten ops keep their exported form, and a warning says so when that matters)."""
    import warnings
    import torch.nn.functional as F
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self, bn_after_relu=False):
            super().__init__()
            self.c, self.b, self.l = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)
            self.bn_after_relu = bn_after_relu

        def forward(self, x):
            y = self.b(torch.relu(self.c(x))) if self.bn_after_relu else torch.relu(self.b(self.c(x)))
            return self.l(y.flatten(1))

    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    gm = qpasses.trace(Net().eval(), (x[:4],), mode="export")
    q = qpasses.PassManager("qat").run(gm, data=[x])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # BN folded: nothing baked to warn about
        assert q.train() is q
    assert all(m.training for m in q.modules())
    scales = {n: p.detach().clone() for n, p in q.named_parameters() if n.endswith("scale")}
    assert scales
    opt = torch.optim.SGD(q.parameters(), lr=1e-2)
    for _ in range(3):
        loss = F.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(scales[n], p) for n, p in q.named_parameters() if n in scales)
    q.eval()
    assert not any(m.training for m in q.modules())
    with pytest.raises(NotImplementedError):
        gm.train()                                          # the input graph is untouched
    unfolded = qpasses.PassManager("qat").run(qpasses.trace(Net(True).eval(), (x[:4],), mode="export"), data=[x])
    with pytest.warns(UserWarning, match="batch_norm.*keep their exported"):
        unfolded.train()
