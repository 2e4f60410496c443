"""The ``observe`` and ``convert`` rule families and the ``ptq_int8`` recipe.

Every family gets: a match, a refused match with its reason, a numerics check against the
original graph, and idempotence; on both graph levels (symbolic trace and torch.export).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qpasses
from qpasses import zoo
from qpasses.errors import OptionError, QPassesError, StepError
from qpasses.numerics import FakeQuantize, Observer, sqnr
from qpasses.opclasses import classify

from conftest import randomize_bn
from qpasses.qnodes import quantizer_module

MODELS = ["resnet", "mobilenetv2", "mlp", "digits_cnn"]


def _model(name):
    torch.manual_seed(0)
    return randomize_bn(zoo.MODELS[name]()).eval()


def _trace(model, x, level):
    return qpasses.trace(model, (x,), mode=level)


def _quant_modules(gm, kind):
    return [n for n in gm.graph.nodes if isinstance(quantizer_module(gm, n, None), kind)]


def _snapshot(gm):
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}


def _same(gm, snap):
    code, sd = snap
    now = gm.state_dict()
    return gm.code == code and sd.keys() == now.keys() and all(torch.equal(sd[k], now[k]) for k in sd)


# --------------------------------------------------------------------------- observe
def test_observe_inserts_shared_observers(level):
    m = _model("resnet")
    x = zoo.example_input("resnet", batch=4)
    gm = _trace(m, x, level)
    pm = qpasses.PassManager(["canonicalize", "observe"])
    out = pm.run(gm)
    obs = _quant_modules(out, Observer)
    weighted = pm.report["observe_weighted_inputs"]
    assert weighted.rewrites == weighted.matches > 0
    # one observer per observed value: the residual input feeding conv and shortcut is shared
    assert 0 < len(obs) <= weighted.rewrites
    assert len({n.args[0] for n in obs}) == len(obs)
    # observers are identity: numerics unchanged
    torch.testing.assert_close(out(x), m(x), rtol=1e-4, atol=1e-4)


def test_observe_refuses_skipped_and_is_idempotent(level):
    m = _model("mlp")
    x = zoo.example_input("mlp", batch=4)
    gm = _trace(m, x, level)
    mods = dict(gm.named_modules())
    linears = [n.name for n in gm.graph.nodes if classify(n, mods) == "linear"]
    first = linears[0]
    pm = qpasses.PassManager("observe", skip=[first])
    out = pm.run(gm)
    st = pm.report["observe_weighted_inputs"]
    assert st.rewrites == st.matches - 1
    reasons = " ".join(str(r) for r in st.refused + st.failures)
    assert first in reasons or "skip" in reasons
    # second run: every weighted input is observed already -> nothing new
    pm2 = qpasses.PassManager("observe", skip=[first])
    out2 = pm2.run(out)
    assert pm2.report["observe_weighted_inputs"].rewrites == 0
    assert len(_quant_modules(out2, Observer)) == len(_quant_modules(out, Observer))


@pytest.mark.parametrize("kind", ["minmax", "moving_average", "percentile", "mse", "entropy", "aciq"])
def test_every_observer_kind_runs_end_to_end(kind):
    m = _model("digits_cnn")
    x = zoo.example_input("digits_cnn", batch=32)
    gm = _trace(m, x, "fx")
    q = qpasses.PassManager("ptq_int8", observer=kind).run(gm, data=[x[:16], x[16:]])
    d = q  # weight quantizers as nodes
    fqs = [quantizer_module(d, n, None) for n in _quant_modules(d, FakeQuantize)]
    assert fqs and all(torch.isfinite(f.scale).all() and (f.scale > 0).all() for f in fqs)
    assert sqnr(m(x), q(x)) > 20.0  # dB; 8-bit on random inputs


# --------------------------------------------------------------------------- convert
def test_convert_needs_calibration_and_leaves_input_untouched(level):
    m = _model("digits_cnn")
    x = zoo.example_input("digits_cnn", batch=4)
    observed = qpasses.PassManager(["canonicalize", "observe"]).run(_trace(m, x, level))
    snap = _snapshot(observed)
    with pytest.raises(StepError, match="seen no data"):
        qpasses.PassManager("convert").run(observed)
    assert _same(observed, snap)


def test_convert_fake_quantizes_weights_per_channel(level):
    m = _model("mobilenetv2")
    x = zoo.example_input("mobilenetv2", batch=8)
    gm = _trace(m, x, level)
    pm = qpasses.PassManager("ptq_int8")
    q = pm.run(gm, data=[x])
    d = q
    wq = [quantizer_module(d, n, None) for n in _quant_modules(d, FakeQuantize) if n.args[0].op == "get_attr"]
    n_weighted = pm.report["weight_fake_quant"].rewrites
    assert len(wq) == n_weighted > 0
    for fq in wq:  # symmetric, narrow range, one scale per output channel
        assert fq.axis == 0 and fq.scale.numel() > 1
        assert (fq.qmin, fq.qmax) == (-127, 127) and int(fq.zero_point.abs().max()) == 0
    # graph outputs stay float: the output is not read through a quantizer
    out_node = next(n for n in q.graph.nodes if n.op == "output")
    for a in out_node.all_input_nodes:
        assert not (isinstance(quantizer_module(q, a, None), (FakeQuantize, Observer)))
    assert q(x).dtype == torch.float32
    assert sqnr(m(x), q(x)) > 25.0
    # idempotent: converting again finds nothing to do
    pm2 = qpasses.PassManager("convert")
    pm2.run(q)
    assert pm2.report["weight_fake_quant"].rewrites == 0
    assert pm2.report["activation_fake_quant"].rewrites == 0


def test_convert_refuses_non_constant_weight():
    class DynW(nn.Module):
        def forward(self, x, w):
            return F.linear(x, w)

    x, w = torch.randn(4, 8), torch.randn(3, 8)
    gm = qpasses.trace(DynW(), (x, w))
    pm = qpasses.PassManager("convert")
    out = pm.run(gm)
    st = pm.report["weight_fake_quant"]
    assert st.matches == 1 and st.rewrites == 0
    assert any("not a constant" in str(r) for r in st.refused + st.failures)
    torch.testing.assert_close(out(x, w), F.linear(x, w))


# --------------------------------------------------------------------------- ptq_int8
@pytest.mark.parametrize("name", MODELS)
def test_ptq_int8_on_zoo_models(name, level):
    m = _model(name)
    x = zoo.example_input(name, batch=16)
    gm = _trace(m, x, level)
    snap = _snapshot(gm)
    pm = qpasses.PassManager("ptq_int8")
    q = pm.run(gm, data=[x[:8], x[8:]])
    assert _same(gm, snap), "run() must leave its input untouched"
    assert pm.report["weight_fake_quant"].rewrites > 0
    assert sqnr(m(x), q(x)) > 25.0
    # second application of the whole recipe rewrites nothing new
    pm2 = qpasses.PassManager("ptq_int8")
    pm2.run(q, data=[x])
    assert sum(s.rewrites for s in pm2.report.rules.values()) == 0


def test_ptq_int8_transformer_block_via_export():
    m = zoo.TransformerEncoderBlock().eval()
    x = zoo.example_input("transformer", batch=4)
    gm = qpasses.trace(m, (x,))  # symbolic tracing fails on this model; export takes over
    assert gm.meta["qpasses.level"] == "aten"
    q = qpasses.PassManager("ptq_int8").run(gm, data=[x])
    assert len(_quant_modules(q, FakeQuantize)) >= 6
    assert sqnr(m(x), q(x)) > 25.0


def test_skip_leaves_nodes_float(level):
    m = _model("digits_cnn")
    x = zoo.example_input("digits_cnn", batch=8)
    gm = _trace(m, x, level)
    full = qpasses.PassManager("ptq_int8").run(gm, data=[x])
    pm = qpasses.PassManager("ptq_int8", skip=["*fc*", "*linear*"])
    part = pm.run(gm, data=[x])
    assert pm.report["weight_fake_quant"].rewrites == pm.report["weight_fake_quant"].matches - 1
    assert len(_quant_modules(part, FakeQuantize)) == len(_quant_modules(full, FakeQuantize)) - 2


@pytest.mark.parametrize("opts, match", [
    ({"w_bitz": 4}, "w_bits"),
    ({"w_bits": 0}, "w_bits"),
    ({"a_bits": 17}, "a_bits"),
    ({"observer": "minmaxx"}, "minmax"),
    ({"per_channel": "maybe"}, "per_channel"),
])
def test_option_errors_before_any_rewrite(opts, match):
    with pytest.raises(OptionError) as e:
        qpasses.PassManager("ptq_int8", **opts)
    assert match in str(e.value)


def test_bits_option_changes_the_grid():
    m = _model("mlp")
    x = zoo.example_input("mlp", batch=32)
    gm = _trace(m, x, "fx")
    errs = {}
    for bits in (8, 4):
        q = qpasses.PassManager("ptq_int8", w_bits=bits, a_bits=bits).run(gm, data=[x])
        d = q  # weight quantizers as nodes
        fq = [quantizer_module(d, n, None) for n in _quant_modules(d, FakeQuantize)]
        assert all(f.qmax - f.qmin + 1 <= 2 ** bits for f in fq)
        errs[bits] = sqnr(m(x), q(x))
    assert errs[8] > errs[4] + 10  # ~6 dB per bit


def test_errors_are_qpasses_errors():
    with pytest.raises(QPassesError):
        qpasses.PassManager("ptq_int8").run(qpasses.trace(_model("mlp"), (zoo.example_input("mlp"),)), data=None)


# --------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def digits():
    from qpasses import datasets
    torch.manual_seed(0)
    model = datasets.train_digits_cnn().eval()
    xtest, ytest = datasets.load_digits_tensors("test")
    calib = datasets.calib_batches()
    return model, xtest, ytest, calib


def _fold(model: nn.Module) -> nn.Module:
    """Fold BN into the preceding conv with torch's own utility (independent of qpasses)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    m = copy.deepcopy(model)
    feats = list(m.features)
    out = []
    i = 0
    while i < len(feats):
        if isinstance(feats[i], nn.Conv2d) and i + 1 < len(feats) and isinstance(feats[i + 1], nn.BatchNorm2d):
            out.append(fuse_conv_bn_eval(feats[i], feats[i + 1]))
            i += 2
        else:
            out.append(feats[i])
            i += 1
    m.features = nn.Sequential(*out)
    return m


def _simulate_int8(model: nn.Module, calib, x: torch.Tensor) -> torch.Tensor:
    """An independent int8 simulation: BN folded; weights int8 symmetric per output channel,
    scale = max|w| / 127, codes in [-127, 127]; activations at the input of every conv / linear
    uint8 affine from the calibration min / max (range widened to contain 0)."""
    m = _fold(model).eval()
    layers = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    lo = {id(l): float("inf") for l in layers}
    hi = {id(l): float("-inf") for l in layers}

    def record(mod, args):
        lo[id(mod)] = min(lo[id(mod)], float(args[0].min()))
        hi[id(mod)] = max(hi[id(mod)], float(args[0].max()))

    hooks = [l.register_forward_pre_hook(record) for l in layers]
    with torch.no_grad():
        for b in calib:
            m(b)
    for h in hooks:
        h.remove()

    def quant_input(mod, args):
        a, b = min(lo[id(mod)], 0.0), max(hi[id(mod)], 0.0)
        s = (b - a) / 255.0
        zp = min(max(round(-a / s), 0), 255)
        q = torch.clamp(torch.round(args[0] / s) + zp, 0, 255)
        return ((q - zp) * s,)

    with torch.no_grad():
        for l in layers:
            w = l.weight
            s = w.abs().flatten(1).amax(1) / 127.0
            s = s.view(-1, *([1] * (w.dim() - 1)))
            l.weight.copy_(torch.clamp(torch.round(w / s), -127, 127) * s)
            l.register_forward_pre_hook(quant_input)
        return m(x)


def test_ptq_int8_on_real_data_matches_independent_simulation(digits):
    from qpasses import datasets
    model, xtest, ytest, calib = digits
    gm = qpasses.trace(model, (xtest[:2],))
    pm = qpasses.PassManager("ptq_int8")
    q = pm.run(gm, data=calib)
    acc_fp32 = datasets.accuracy(model, xtest, ytest)
    acc_int8 = datasets.accuracy(q, xtest, ytest)
    assert acc_fp32 > 95.0
    assert acc_int8 >= acc_fp32 - 1.0, (acc_fp32, acc_int8)
    with torch.no_grad():
        ours = q(xtest)
    sim = _simulate_int8(model, calib, xtest)
    # same int8 grid: outputs agree to float rounding; predictions agree
    diff = (ours - sim).abs()
    assert diff.max() < 1e-3 * ours.abs().max(), float(diff.max())
    assert (ours.argmax(1) == sim.argmax(1)).float().mean() == 1.0


def test_torch_nn_attention_modules_are_quantized_inside():
    """nn.TransformerEncoder / nn.MultiheadAttention: fx would keep them opaque (nothing inside
    quantized); trace(mode="auto") goes to torch.export, whose graph shows their projections."""
    from qpasses.frontend import graph_level

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.t, self.l = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.l(self.t(x).mean(1))

    torch.manual_seed(0)
    m = Enc().eval()
    x = torch.randn(4, 5, 16)
    gm = qpasses.trace(m, (x,))
    assert graph_level(gm) == "aten"
    pm = qpasses.PassManager("ptq_int8")
    q = pm.run(gm, data=[x, torch.randn(8, 5, 16)])
    # per layer: in-projection, out-projection, two feed-forward linears; plus the head
    assert pm.report["weight_fake_quant"].rewrites == 2 * 4 + 1
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()) > 30
    opaque = qpasses.trace(m, (x,), mode="fx")            # asked for: fx, the modules left as calls
    assert graph_level(opaque) == "fx"
    assert any(isinstance(quantizer_module(opaque, n, None), torch.nn.TransformerEncoder)
               for n in opaque.graph.nodes)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_skip_pattern_that_names_nothing_is_reported(mode):
    torch.manual_seed(0)
    m = zoo.ResNetLike().eval()
    x = zoo.example_input("resnet", 4)
    gm = qpasses.trace(m, (x,), mode=mode)
    pm = qpasses.PassManager("ptq_int8", skip=["fc", "stages.0.*", "stgaes.1.*"])
    pm.run(gm, data=[x])
    assert pm.report.warnings == ["skip pattern 'stgaes.1.*' matches no node name or module path of the graph "
                                  "(nothing is skipped by it)"]
    assert "warning: skip pattern 'stgaes.1.*'" in str(pm.report)
    assert pm.report["weight_fake_quant"].n_refused == 5            # fc + the four convs of stage 0
