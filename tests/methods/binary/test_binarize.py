"""The ``binarize`` rule family, the ``bnn`` recipe and 1-bit packing."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qpasses
from qpasses import datasets, zoo
from qpasses.methods.binary.lib import (BinaryActivation, BinaryWeight, PackedBinaryConv2d, PackedBinaryLinear,
                                    clip_latent_weights, make_optimizer, pack_binary, sign_pm1)
from qpasses.numerics import FakeQuantize, Observer

from conftest import randomize_bn
from qpasses.qnodes import quantizer_module


_OPS = {BinaryWeight: torch.ops.qpasses.binary_weight.default, BinaryActivation: torch.ops.qpasses.binary_sign.default}


def _mods(gm, kind):
    """Quantizer nodes of ``kind``: the module behind them, or, for the binary quantizers (plain op
    calls, no module), the op they call."""
    op = _OPS.get(kind)
    return [n for n in gm.graph.nodes if isinstance(quantizer_module(gm, n, None), kind)
            or (op is not None and n.op == "call_function" and n.target is op)]


def _digits_bnn(level="fx", width=8, **opts):
    torch.manual_seed(0)
    m = randomize_bn(zoo.DigitsCNN(width)).eval()
    x, _ = datasets.load_digits_tensors("calib")
    gm = qpasses.trace(m, (x[:8],), mode=level)
    pm = qpasses.PassManager("bnn", **opts)
    return m, gm, pm.run(gm, data=list(x[:128].split(32))), pm, x


class Renamed(nn.Module):
    """Module names in reverse alphabetical order of use: edges must come from graph order."""

    def __init__(self):
        super().__init__()
        self.zz_first = nn.Linear(12, 16)
        self.mm = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)
        self.aa_last = nn.Linear(16, 4)

    def forward(self, x):
        return self.aa_last(F.relu(self.bn(self.mm(F.relu(self.zz_first(x))))))


# --------------------------------------------------------------------------- STE modules
def test_binary_activation_sign_and_hardtanh_ste():
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.4, 1.0, 3.0], requires_grad=True)
    y = BinaryActivation()(x)
    assert torch.equal(y.detach(), torch.tensor([-1.0, -1, -1, 1, 1, 1, 1]))  # zero counts as +1
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 1, 0]))        # 1 inside [-1, 1] only


def test_binary_weight_xnor_scale_and_gradient():
    torch.manual_seed(0)
    w = (torch.randn(5, 3, 3, 3) * 0.7).requires_grad_()
    bw = BinaryWeight(scale=True, axis=0)
    y = bw(w)
    alpha = w.detach().abs().mean(dim=(1, 2, 3))
    assert torch.allclose(y.detach(), sign_pm1(w.detach()) * alpha[:, None, None, None])
    assert torch.allclose(bw.alpha(w.detach()), alpha)
    y.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    w2 = w.detach().clone().requires_grad_()
    plain = BinaryWeight(scale=False)(w2)
    assert set(plain.detach().unique().tolist()) <= {-1.0, 1.0}
    plain.sum().backward()
    assert torch.equal(w2.grad, (w2.detach().abs() <= 1).float())


# --------------------------------------------------------------------------- rewrite
def test_bnn_structure_on_digits_cnn():
    m, gm, q, pm, x = _digits_bnn()
    code_before = gm.code
    assert gm.code == code_before and not _mods(gm, BinaryWeight)        # input graph untouched
    assert len(_mods(q, BinaryWeight)) == 2 and len(_mods(q, BinaryActivation)) == 2
    # each binary quantizer is one op call, no module behind it
    assert not [n for n in q.graph.nodes if n.op == "call_module"
                and isinstance(q.get_submodule(n.target), (BinaryWeight, BinaryActivation))]
    assert pm.report["keep_edge_layers"].rewrites == 2                    # first conv and fc
    assert pm.report["binarize_weight"].rewrites == 2
    assert pm.report["drop_relu_before_sign"].rewrites == 2
    bn = [n for n in q.graph.nodes if isinstance(quantizer_module(q, n, None), nn.BatchNorm2d)]
    assert len(bn) == 3                                                   # BatchNorm kept
    weighted = [n for n in q.graph.nodes if n.target in (torch.conv2d, F.conv2d, torch._C._nn.linear, F.linear)]
    bits = [n.meta["qpasses.bits"] for n in weighted]
    assert bits == [{"w_bits": 8, "a_bits": 8}, {"w_bits": 1, "a_bits": 1}, {"w_bits": 1, "a_bits": 1},
                    {"w_bits": 8, "a_bits": 8}]
    fq = _mods(q, FakeQuantize)
    assert len(fq) == 4 and all(quantizer_module(q, n, None).bits == 8 for n in fq)
    assert not _mods(q, Observer)
    assert q(x[:4]).shape == (4, 10)


def test_binarized_layer_matches_hand_written_reference():
    m, gm, q, pm, x = _digits_bnn()
    q.eval()
    conv = [n for n in q.graph.nodes if n.op == "call_function" and len(n.args) > 1
            and isinstance(n.args[1], torch.fx.Node) and n.args[1] in _mods(q, BinaryWeight)][0]
    got = {}
    from torch.fx.interpreter import Interpreter

    class Rec(Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            got[n] = r
            return r

    with torch.no_grad():
        Rec(q).run(x[:6])
    inp = got[conv.args[0]]
    w = q.get_submodule("features.3").weight.detach()
    assert set(inp.unique().tolist()) <= {-1.0, 1.0}
    ref = F.conv2d(inp, sign_pm1(w) * w.abs().mean(dim=(1, 2, 3), keepdim=True), None, 1, 1)
    assert torch.allclose(got[conv], ref, atol=1e-5)


def test_edges_by_graph_order_not_names(level):
    torch.manual_seed(0)
    m = randomize_bn(Renamed()).eval()
    x = torch.randn(16, 12)
    gm = qpasses.trace(m, (x,), mode=level)
    pm = qpasses.PassManager("bnn")
    q = pm.run(gm, data=[x])
    kept = pm.report["keep_edge_layers"].rewritten
    binar = pm.report["binarize_weight"].rewritten
    assert len(kept) == 2 and len(binar) == 1
    assert "mm" in binar[0] or "linear_1" in binar[0] or binar[0].startswith("linear")
    # the middle layer is the binary one: its weight node reads the module's latent weight
    bw = _mods(q, BinaryWeight)
    assert len(bw) == 1 and "mm" in str(bw[0].args[0].target)
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


def test_keep_first_last_off_and_no_scale():
    torch.manual_seed(0)
    m = Renamed().eval()
    x = torch.randn(8, 12)
    gm = qpasses.trace(m, (x,))
    pm = qpasses.PassManager("bnn", keep_first_last=False, bin_scale=False)
    q = pm.run(gm)                           # no kept layers: no calibration, no data needed
    assert len(_mods(q, BinaryWeight)) == 3 and not _mods(q, FakeQuantize)
    assert all(n.args[2] is False for n in _mods(q, BinaryWeight))        # binary_weight(w, axis, scale)


def test_bnn_kept_layers_without_data_wait_for_their_first_batch():
    from qpasses.methods.qat.lib import FirstBatchFakeQuantize
    m = Renamed().eval()
    gm = qpasses.trace(m, (torch.randn(4, 12),))
    q = qpasses.PassManager("bnn").run(gm)   # no data: the kept layers' scales come from the first batch
    lazy = [mod for mod in q.modules() if isinstance(mod, FirstBatchFakeQuantize)]
    assert lazy and all(mod.pending for mod in lazy)
    q(torch.randn(4, 12))
    assert not any(mod.pending for mod in lazy)


def test_export_level_matches_fx_level():
    _, _, qf, _, x = _digits_bnn("fx")
    _, _, qe, pme, _ = _digits_bnn("export")
    assert pme.report["binarize_weight"].rewrites == 2
    with torch.no_grad():
        assert torch.allclose(qf.eval()(x[:16]), qe(x[:16]), atol=1e-4)


# --------------------------------------------------------------------------- training
def test_graph_trains_with_plain_loop():
    m, gm, q, pm, x = _digits_bnn(width=8)
    xtr, ytr = datasets.load_digits_tensors("train")
    xtr, ytr = xtr[:256], ytr[:256]
    opt = make_optimizer(q, 0.01)
    assert len(opt.param_groups) == 2                     # LSQ scales get their own learning rate
    q.train()
    losses = []
    torch.manual_seed(0)
    for step in range(30):
        idx = torch.randint(0, 256, (64,))
        loss = F.cross_entropy(q(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            lat = q.get_submodule("features.3").weight
            assert lat.grad is not None and lat.grad.abs().sum() > 0   # STE reaches latent weights
        opt.step()
        clip_latent_weights(q, step)
        losses.append(loss.item())
    assert q.get_submodule("features.3").weight.abs().max() <= 1.0
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


# --------------------------------------------------------------------------- packing
def test_packed_conv_accumulator_is_exact():
    torch.manual_seed(0)
    x = sign_pm1(torch.randn(3, 7, 6, 5))
    w = torch.randn(9, 7, 3, 3)
    mod = PackedBinaryConv2d(w, None, None, stride=(2, 1), padding=(1, 1), dilation=(1, 1))
    assert mod.w_packed.dtype == torch.int32 and mod.w_packed.shape == (9, (7 * 9 + 31) // 32)
    ref = F.conv2d(x, sign_pm1(w), None, (2, 1), 1)
    got = mod(x)
    assert torch.equal(got, ref)          # integer sums of ±1 products: exact


def test_packed_linear_exact_with_alpha_and_bias():
    torch.manual_seed(0)
    x = sign_pm1(torch.randn(5, 70))
    w = torch.randn(6, 70)
    alpha, b = w.abs().mean(1), torch.randn(6)
    mod = PackedBinaryLinear(w, alpha, b)
    acc = x @ sign_pm1(w).t()
    assert torch.allclose(mod(x), acc * alpha + b, atol=1e-5)


@pytest.mark.parametrize("level", ["fx", "export"])
def test_pack_binary_graph_matches_float_binarized(level):
    _, _, q, _, x = _digits_bnn(level)
    if level == "fx":
        q.eval()
    packed = pack_binary(q)
    assert packed.meta["qpasses.pack_report"]["pack_binary_layer"].rewrites == 2
    assert len(_mods(packed, PackedBinaryConv2d)) == 2 and not _mods(packed, BinaryWeight)
    assert len(_mods(q, BinaryWeight)) == 2                            # input graph untouched
    with torch.no_grad():
        a, b = q(x[:32]), packed(x[:32])
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_pack_option_in_recipe_on_linear_model():
    torch.manual_seed(0)
    m = Renamed().eval()
    x = torch.randn(16, 12)
    gm = qpasses.trace(m, (x,))
    pm = qpasses.PassManager("bnn", pack=True)
    q = pm.run(gm, data=[x])
    assert len(_mods(q, PackedBinaryLinear)) == 1
    ref = qpasses.PassManager("bnn").run(gm, data=[x])
    with torch.no_grad():
        assert torch.allclose(q(x), ref(x), atol=1e-4)


@pytest.mark.slow
def test_bnn_digits_accuracy():
    torch.manual_seed(0)
    xtr, ytr = datasets.load_digits_tensors("train")
    xte, yte = datasets.load_digits_tensors("test")
    m = zoo.DigitsCNN(16).eval()
    gm = qpasses.trace(m, (xtr[:8],))
    q = qpasses.PassManager("bnn").run(gm, data=list(xtr[:256].split(64)))
    datasets.fit(q, xtr, ytr, epochs=20, lr=0.01, step_hook=clip_latent_weights, optimizer=make_optimizer(q, 0.01))
    acc = datasets.accuracy(q, xte, yte)
    assert acc > 85.0
    packed = pack_binary(q)
    assert abs(datasets.accuracy(packed, xte, yte) - acc) <= 0.4
