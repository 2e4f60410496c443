"""The ``qdq`` family: quantizers frozen into PT2E's folded Q/DQ convention.

The frozen graph must compute the fake-quant graph's numbers bit for bit (a Q/DQ pair with the
same scale, zero point and range is the fake quantization; the dequantized weight codes are the
fake-quantized weight, checked at rewrite time), at both graph levels, for CNNs, MLPs and a
transformers model; the input graph is never modified; what quantized_decomposed cannot express
stays a qpasses custom op and is listed in the report.
"""
import copy

import pytest
import torch
import torch.nn as nn

import qpasses
from qpasses.qnodes import quantizer_module
from qpasses import zoo
from qpasses.numerics import FakeQuantize

QD = torch.ops.quantized_decomposed
QP = torch.ops.qpasses


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, groups=2)
        self.c3 = nn.Conv1d(8, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        y = self.c2(y) + 1.0
        y = y.flatten(2)
        y = self.c3(y).mean(-1)
        return self.fc(y)


def _model():
    torch.manual_seed(0)
    m = SmallCNN().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


def _data(shape, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for o in out for t in _leaves(o)]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _quantizer_modules(gm):
    from qpasses.deploy import _quantizer_module_types
    types = _quantizer_module_types()
    return [n.name for n in gm.graph.nodes if isinstance(quantizer_module(gm, n, None), types)]


def _freeze(qgm):
    code, state = qgm.code, {k: v.clone() for k, v in qgm.state_dict().items()}
    pm = qpasses.PassManager("qdq")
    out = pm.run(qgm)
    # the input graph and its tensors are untouched
    assert qgm.code == code
    after = qgm.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert not _quantizer_modules(out), "every quantizer is a call_function node now"
    return out, pm


def _same(a, b, inputs):
    with torch.no_grad():
        for x in inputs:
            args = x if isinstance(x, tuple) else (x,)
            for u, v in zip(_leaves(a(*args)), _leaves(b(*args)), strict=True):
                assert torch.equal(u, v), f"max |diff| {(u - v).abs().max().item():.3g}"


@pytest.mark.parametrize("mode", ["fx", "export"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_ptq_int8_cnn_frozen_bit_exact(mode, symmetric):
    m = _model()
    x = torch.randn(2, 3, 10, 10)
    q = qpasses.PassManager("ptq_int8", symmetric=symmetric).run(qpasses.trace(m, (x,), mode=mode),
                                                                 data=_data((4, 3, 10, 10)))
    d, pm = _freeze(q)
    t = _targets(d)
    assert t.count(QD.dequantize_per_channel.default) == 4          # c1, c2, c3, fc
    assert t.count(QD.quantize_per_tensor.default) == 4
    assert pm.report["freeze_weight"].rewrites == 4 and pm.report["activation_qdq"].rewrites == 4
    for n in d.graph.nodes:
        if n.target is QD.dequantize_per_channel.default:
            codes = d.get_buffer(n.args[0].target)
            assert codes.dtype is torch.int8 and n.args[3] == 0
        if n.target is QD.quantize_per_tensor.default:
            assert n.args[-1] is torch.uint8 and (n.args[3], n.args[4]) == (0, 255)
            if symmetric:
                assert n.args[2] == 128                              # signed int8 shifted into uint8
    assert pm.report.coverage.complete
    # wide inputs: every clamp is exercised
    _same(q, d, [torch.randn(16, 3, 10, 10) * s for s in (0.5, 1.0, 4.0)])


def test_each_reader_gets_its_own_dequantize():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x) * self.b(x)

    torch.manual_seed(0)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(Two().eval(), (torch.randn(2, 8),)), data=_data((4, 8)))
    shared = [n for n in q.graph.nodes if n.name.startswith("act_q") and quantizer_module(q, n) is not None]
    d, _ = _freeze(q)
    quants = [n for n in d.graph.nodes if n.target is QD.quantize_per_tensor.default]
    deqs = [n for n in d.graph.nodes if n.target is QD.dequantize_per_tensor.default]
    assert len(quants) == len(shared) and len(deqs) == 2 and all(len(n.users) == 1 for n in deqs)
    _same(q, d, [torch.randn(8, 8) * 3])


def test_narrow_and_4bit_ranges_stay_custom_ops_listed_in_report():
    m = _model()
    x = torch.randn(2, 3, 10, 10)
    q = qpasses.PassManager("ptq_int8", a_bits=4, w_bits=4).run(qpasses.trace(m, (x,)), data=_data((4, 3, 10, 10)))
    d, pm = _freeze(q)
    refused = pm.report["activation_qdq"].refused
    assert len(refused) == 4 and all("narrower than uint8" in why and "4-bit" in why for _, why in refused)
    assert pm.report["keep_custom_quantizer"].rewrites == 4
    t = _targets(d)
    assert t.count(QP.fake_quant_per_tensor.default) == 4
    # the custom op is followed by the identity uint8 Q/DQ pair; 4-bit weights are int8 codes
    assert t.count(QD.quantize_per_tensor.default) == 4 and t.count(QD.dequantize_per_channel.default) == 4
    for n in d.graph.nodes:
        if n.target is QD.dequantize_per_channel.default:
            codes = d.get_buffer(n.args[0].target)
            assert int(codes.min()) >= -8 and int(codes.max()) <= 7
        if n.target is QP.fake_quant_per_tensor.default:
            assert "narrower" in n.meta["qpasses.qdq"]["reason"]
    _same(q, d, [torch.randn(16, 3, 10, 10) * 3])


def test_lsq_activation_and_weight():
    m = _model()
    x = torch.randn(2, 3, 10, 10)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(m, (x,)), data=_data((4, 3, 10, 10)))
    for name, mod in list(q.named_children()):
        if isinstance(mod, FakeQuantize):                # learnable (LSQ) copies of every quantizer
            scale = mod.scale * (1.0 + 0.01 * torch.rand_like(mod.scale))
            setattr(q, name, FakeQuantize(scale, mod.zero_point, mod.qmin, mod.qmax, axis=mod.axis,
                                          learnable=True))
    d, pm = _freeze(q)
    assert pm.report["freeze_weight"].rewrites == 4              # LSQ weights: int8 codes, checked exact
    assert [why for _, why in pm.report["activation_qdq"].refused][0].count("LSQ") == 1
    assert _targets(d).count(QP.fake_quant_lsq_per_tensor.default) == 4
    _same(q, d, [torch.randn(16, 3, 10, 10) * 3])


def test_int_only_fake_quant_graph():
    m = _model()
    x = torch.randn(2, 3, 10, 10)
    q = qpasses.PassManager("int_only", integerize=False).run(qpasses.trace(m, (x,)), data=_data((4, 3, 10, 10)))
    d, pm = _freeze(q)
    assert pm.report["activation_qdq"].rewrites >= 6             # inputs and outputs are observed
    _same(q, d, [torch.randn(16, 3, 10, 10) * 3])


def test_w4a16_group_weights_stay_fake_quant_per_group():
    torch.manual_seed(0)
    mlp = zoo.MLP().eval()
    x = zoo.example_input("mlp", batch=8)
    q = qpasses.PassManager("w4a16", group_size=32).run(qpasses.trace(mlp, (x,)))
    d, pm = _freeze(q)
    assert pm.report["freeze_group_weight"].rewrites == 3
    assert _targets(d).count(QP.fake_quant_per_group.default) == 3
    # the frozen op is the graph's own quantizer op on frozen int32 zero points: the same values
    for n in d.graph.nodes:
        if n.target is QP.fake_quant_per_group.default:
            assert n.meta["qpasses.qdq"]["form"] == "custom_op" and n.meta["qpasses.qdq"]["exact"]
    # the holders' own tensors (weight_fq4_N.scales / .zero_point) are no longer read
    assert not any(n.op == "get_attr" and str(n.target).startswith("weight_fq4_") and "." in str(n.target)
                   for n in d.graph.nodes)
    xs = zoo.example_input("mlp", batch=16, seed=3)
    with torch.no_grad():
        assert torch.equal(d(xs), q(xs))


def test_dynamic_int8_linear_frozen_exactly_and_within_gemm_rounding_of_the_integer_kernel():
    """dynamic_int8's linear is ``linear(dyn_q(x), fq_w(W), b)``: ``freeze_weight`` freezes its
    weight quantizer bit-exactly; the per-token input quantizer is a custom op node already and
    stays (``freeze_dynamic_fq`` refuses it with the reason).  The
    integer kernel (``dynamic_int8_linear``) sums the same integer products exactly and scales once;
    the float ``linear`` on the same dequantized operands differs only by fp32 GEMM rounding:
    |err| <= K * u * sum_k |x_k w_k| (u = 2^-24) plus a few ulps of the scaling."""
    from qpasses.kernels.packing import pack_int8_weight
    from qpasses.kernels.lowering import int8_weight_codes
    from qpasses.methods.dynamic.lib import dynamic_fake_quant, dynamic_linear_quantizers
    torch.manual_seed(0)
    mlp = zoo.MLP().eval()
    x = zoo.example_input("mlp", batch=8)
    q = qpasses.PassManager("dynamic_int8").run(qpasses.trace(mlp, (x,)))
    lin = [n for n in q.graph.nodes if dynamic_linear_quantizers(q, n) is not None]
    d, pm = _freeze(q)
    assert len(lin) == 3 and pm.report["freeze_weight"].rewrites == 3
    st = pm.report["freeze_dynamic_fq"]
    assert st.rewrites == 0 and st.n_refused == 3
    assert all("per_token activation qparams have no quantized_decomposed form" in why for _, why in st.refused)
    assert _targets(d).count(QP.fake_quant_per_token.default) == 3
    with torch.no_grad():
        xs = zoo.example_input("mlp", batch=16, seed=2)
        assert torch.equal(d(xs), q(xs))                  # freezing is exact
    # one layer: the fake-quant form against the exact integer kernel, within the bound
    dq, wfq, _, wnode = dynamic_linear_quantizers(q, lin[0])
    w = q.get_parameter(wnode.args[0].target).detach()
    b = q.get_parameter(lin[0].args[2].target).detach()
    codes, w_scale = int8_weight_codes(wfq, w)
    K = w.shape[1]
    xin = torch.randn(32, K) * 2
    with torch.no_grad():
        want = QP.dynamic_int8_linear.default(xin, pack_int8_weight(codes), w_scale, b, 8, False, True, None)
        xq = QP.fake_quant_per_token.default(xin, 0, 255, False)
        assert torch.equal(xq, dynamic_fake_quant(xin, dq.bits, dq.symmetric, dq.reduce_dim))
        got = torch.nn.functional.linear(xq, wfq(w), b)
        bound = xq.abs() @ wfq(w).abs().t()
    tol = (K + 4) * 2.0 ** -24 * bound + 4 * 2.0 ** -24 * want.abs()
    assert bool(((got - want).abs() <= tol).all())


@pytest.mark.slow
def test_transformers_bert_tiny_bit_exact():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 8), generator=g)
    gm = qpasses.trace(bert, (ids, torch.ones_like(ids)))
    data = [(torch.randint(0, 100, (2, 8), generator=g), torch.ones(2, 8, dtype=torch.long)) for _ in range(3)]
    q = qpasses.PassManager("ptq_int8").run(gm, data=data)
    d, pm = _freeze(q)
    assert pm.report["freeze_weight"].rewrites == 7               # q, k, v, o, ffn in / out, pooler
    assert pm.report.coverage.complete
    ids2 = torch.randint(0, 100, (3, 11), generator=g)
    mask = torch.ones_like(ids2)
    mask[0, 6:] = 0
    _same(q, d, [(ids2, mask)])


def test_observers_are_reported_not_frozen():
    m = _model()
    x = torch.randn(2, 3, 10, 10)
    obs = qpasses.PassManager(["canonicalize", "observe"]).run(qpasses.trace(m, (x,)))
    pm = qpasses.PassManager("qdq")
    out = pm.run(obs)
    st = pm.report["unfrozen_quantizer"]
    assert st.rewrites == 0 and st.n_refused == 4
    assert all("no frozen Q/DQ form for" in why for _, why in st.refused)
    with torch.no_grad():
        torch.testing.assert_close(out(x), obs(x), rtol=0, atol=0)


def test_running_twice_changes_nothing():
    m = _model()
    x = torch.randn(2, 3, 10, 10)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(m, (x,)), data=_data((4, 3, 10, 10)))
    d, _ = _freeze(q)
    pm = qpasses.PassManager("qdq")
    d2 = pm.run(d)
    assert pm.report.rewrites == 0 and d2.code == d.code


def test_quantize_dequantize_equals_fake_quantize_on_rounding_ties():
    """The identity the family relies on, on the values where rounding is decided: ties
    ``(k + 1/2) s``, their float neighbours, the range ends and beyond."""
    s = torch.tensor(0.0371, dtype=torch.float32)
    k = torch.arange(-300, 300, dtype=torch.float32)
    ties = (k + 0.5) * s
    x = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1), k * s,
                   torch.randn(10000) * 5])
    for zp, lo, hi in ((0, 0, 255), (128, 0, 255), (37, 0, 255)):
        fq = torch.fake_quantize_per_tensor_affine(x, float(s), zp, lo, hi)
        qd = QD.dequantize_per_tensor.default(QD.quantize_per_tensor.default(x, float(s), zp, lo, hi, torch.uint8),
                                              float(s), zp, lo, hi, torch.uint8)
        assert torch.equal(fq, qd)
    # signed int8 re-expressed as uint8 with zero point + 128
    fq = torch.fake_quantize_per_tensor_affine(x, float(s), 0, -128, 127)
    qd = QD.dequantize_per_tensor.default(QD.quantize_per_tensor.default(x, float(s), 128, 0, 255, torch.uint8),
                                          float(s), 128, 0, 255, torch.uint8)
    assert torch.equal(fq, qd)
