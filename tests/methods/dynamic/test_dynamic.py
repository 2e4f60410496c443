"""The ``dynamic`` rule family and the ``dynamic_int8`` recipe."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qpasses
from qpasses import zoo
from qpasses.errors import OptionError
from qpasses.methods.dynamic.lib import DynamicQuantLinear, dynamic_fake_quant, dynamic_linear_quantizers, dynamic_qparams
from qpasses.numerics import FakeQuantize
from qpasses.opclasses import OpView
from qpasses.qnodes import is_dynamic_quantizer, quantizer_module


def _mods(gm, kind):
    return [n for n in gm.graph.nodes if isinstance(quantizer_module(gm, n, None), kind)]


def _dyn_nodes(gm):
    """The dynamic quantizer op nodes of ``gm``."""
    return [n for n in gm.graph.nodes if is_dynamic_quantizer(n) is not None]


def _dyn_linears(gm):
    """dynamic_int8's linears: ``linear(dyn_q(x), fq_w(W), b)`` nodes."""
    return [n for n in gm.graph.nodes if dynamic_linear_quantizers(gm, n) is not None]


def _cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


class MLPAttn(nn.Module):
    """Linear layers, an activation x activation matmul and a parameter matmul."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16, bias=False)
        self.p = nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))          # [N, T, 16]
        s = torch.matmul(h, h.transpose(-1, -2) * 0.5)  # activation x activation
        return torch.matmul(s, h) @ self.p        # last matmul has a constant operand


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    m = zoo.TransformerEncoderBlock().eval()
    x = zoo.example_input("transformer", batch=4)
    return m, x, qpasses.trace(m, (x,))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_encoder_export_level_cosine(encoder, granularity):
    m, x, gm = encoder
    assert gm.meta["qpasses.level"] == "aten"  # fx cannot trace it
    before = copy.deepcopy(gm.code)
    pm = qpasses.PassManager("dynamic_int8", granularity=granularity)
    q = pm.run(gm)
    assert gm.code == before  # input graph untouched
    assert pm.report["dynamic.dynamic_linear"].rewrites == 6
    assert pm.report["dynamic.dynamic_matmul"].rewrites == 2
    assert len(_dyn_linears(q)) == 6
    assert not any(isinstance(m, DynamicQuantLinear) for m in q.modules())   # no module hides a quantizer
    lin = [n for n in q.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert lin and set(lin) == set(_dyn_linears(q))   # every linear reads both quantizers
    with torch.no_grad():
        ref, y = m(x), q(x)
    assert _cos(ref, y) >= 0.995
    assert not torch.equal(ref, y)  # really quantized
    # a fresh batch with a different range: qparams follow the data (no calibration)
    x2 = 5 * torch.randn_like(x)
    with torch.no_grad():
        assert _cos(m(x2), q(x2)) >= 0.995


def test_fx_level_and_refusals(level):
    torch.manual_seed(0)
    m = MLPAttn().eval()
    x = torch.randn(2, 6, 16)
    gm = qpasses.trace(m, (x,), mode=level)
    pm = qpasses.PassManager("dynamic_int8")
    q = pm.run(gm)
    # the matmul with a parameter operand is a linear (canonicalize's matmul_weight_as_linear)
    assert pm.report["canonicalize.matmul_weight_as_linear"].rewrites == 1
    assert pm.report["dynamic.dynamic_linear"].rewrites == 3
    mm = pm.report["dynamic.dynamic_matmul"]
    assert mm.rewrites == 2 and mm.n_refused == 0
    reason = pm.explain("dynamic_matmul", [n for n in gm.graph.nodes if "matmul" in n.name][-1].name, gm)
    assert not reason and "constant" in str(reason)
    with torch.no_grad():
        assert _cos(m(x), q(x)) > 0.999


def test_linear_numerics_match_integer_kernel():
    torch.manual_seed(0)
    w, b = torch.randn(24, 40), torch.randn(24)
    x = torch.randn(3, 5, 40) * 3 + 1
    mod = DynamicQuantLinear(w, b, granularity="per_tensor", symmetric=True)
    # the repo's int8 x int8 -> int32 kernel on the same integers gives the same result
    scale, _, lo, hi = dynamic_qparams(x, 8, True, None)
    xq = torch.clamp(torch.round(x / scale), lo, hi).to(torch.int8)
    from qpasses.kernels.packing import pack_int8_weight
    ref = torch.ops.qpasses.int8_linear(xq, scale.reshape(1), pack_int8_weight(mod.weight_q), mod.weight_scale, b)
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)
    # per-token affine: each row's error bounded by half its own step times sum|w|
    mod = DynamicQuantLinear(w, b, granularity="per_token")
    x[0, 0] *= 100  # one outlier token must not hurt the others
    err = (mod(x) - F.linear(x, mod.dequantized_weight(), b)).abs()
    step = (x.amax(-1) - x.amin(-1).clamp(max=0)) / 255
    assert torch.all(err.amax(-1) <= 0.5 * step * w.abs().sum(1).max() + 1e-4)


def test_large_k_uses_exact_integer_accumulation():
    torch.manual_seed(0)
    w = torch.randn(4, 1024)
    mod = DynamicQuantLinear(w, None, granularity="per_tensor")
    x = torch.randn(2, 1024)
    scale, zp, lo, hi = dynamic_qparams(x, 8, False, None)
    xq = torch.clamp(torch.round(x / scale) + zp, lo, hi) - zp
    exact = (xq.double() @ mod.weight_q.double().t()) * scale.double() * mod.weight_scale.double()
    torch.testing.assert_close(mod(x).double(), exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("a_bits,w_bits,K", [(8, 8, 40), (8, 8, 1030), (4, 6, 33), (8, 4, 7)])
def test_int_mm_route_equals_float_route(granularity, symmetric, a_bits, w_bits, K, monkeypatch):
    """The int8 GEMM route (torch._int_mm, unsigned codes shifted by 128) and the exact-float
    route compute the same integer sums and the same epilogue: bit-identical outputs."""
    from qpasses.methods.dynamic.lib import int_mm_is_exact
    if not int_mm_is_exact("cpu"):
        pytest.skip("torch._int_mm is not exact on this CPU (no AVX-512 VNNI): qpasses does not use it here")
    g = torch.Generator().manual_seed(K + a_bits)
    w, b = torch.randn(19, K, generator=g), torch.randn(19, generator=g)
    x = torch.randn(2, 6, K, generator=g) * 2 + 0.7
    x[1, 2] *= 30                                                    # an outlier token
    mod = DynamicQuantLinear(w, b, w_bits=w_bits, a_bits=a_bits, granularity=granularity, symmetric=symmetric)
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a: calls.append(1) or real(*a))
    y_int = mod(x)
    assert calls, "the int8 GEMM route was not taken"
    monkeypatch.setattr(DynamicQuantLinear, "_use_int_mm", lambda self, rows: False)
    y_float = mod(x)
    assert torch.equal(y_int, y_float)


def test_dynamic_fake_quant_granularity():
    x = torch.tensor([[0.0, 1.0, 2.0], [0.0, 100.0, 50.0]])
    row = dynamic_fake_quant(x, 8, reduce_dim=-1)
    assert torch.allclose(row[0], x[0], atol=2 / 255)  # row 0 keeps its own fine step
    tensor = dynamic_fake_quant(x, 8, reduce_dim=None)
    assert (tensor[0] - x[0]).abs().max() > 2 / 255


def test_idempotent(encoder):
    _, x, gm = encoder
    q = qpasses.PassManager("dynamic_int8").run(gm)
    pm2 = qpasses.PassManager("dynamic_int8")
    q2 = pm2.run(q)
    assert pm2.report["dynamic.dynamic_linear"].rewrites == 0
    assert pm2.report["dynamic.dynamic_matmul"].rewrites == 0
    with torch.no_grad():
        torch.testing.assert_close(q(x), q2(x))


def test_skip_and_linear_only(encoder):
    _, _, gm = encoder
    pm = qpasses.PassManager("dynamic_int8", skip=["fc*"], quantize_matmul=False)
    q = pm.run(gm)
    assert len(_dyn_linears(q)) == 4
    # the only dynamic quantizers are the linears' inputs (one per distinct input value)
    fqs = _dyn_nodes(q)
    assert fqs and all(u in _dyn_linears(q) for f in fqs for u in f.users)
    assert len(fqs) == len({dynamic_linear_quantizers(q, n)[2] for n in _dyn_linears(q)})


@pytest.mark.parametrize("bad", [dict(w_bits=0), dict(a_bits=0), dict(a_bits=17), dict(w_bits=9),
                                 dict(granularity="per_row"), dict(bogus=1), dict(symmetric="yes")])
def test_options_validated_before_rewrite(bad):
    with pytest.raises(OptionError):
        qpasses.PassManager("dynamic_int8", **bad)


def test_weight_quantized_once():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    mod = DynamicQuantLinear(lin.weight, lin.bias)
    assert mod.weight_q.dtype == torch.int8 and mod.weight_q.abs().max() <= 127
    assert not any(p.is_floating_point() and p.shape == lin.weight.shape for p in mod.buffers())


def test_conv_optional(level):
    torch.manual_seed(0)
    m = zoo.DigitsCNN().eval()
    x = torch.randn(4, 1, 8, 8)
    gm = qpasses.trace(m, (x,), mode=level)
    pm = qpasses.PassManager("dynamic_int8")
    q = pm.run(gm)
    n_lin = len(_dyn_linears(q))                  # the classifier's linear(s): dynamic_linear
    assert n_lin == pm.report["dynamic.dynamic_linear"].rewrites > 0
    # off by default: the only weight quantizers are the linears'
    assert pm.report["dynamic.dynamic_conv"].disabled and len(_mods(q, FakeQuantize)) == n_lin
    pm = qpasses.PassManager("dynamic_int8", quantize_conv=True)
    q = pm.run(gm)
    assert pm.report["dynamic.dynamic_conv"].rewrites == 3
    assert len(_dyn_nodes(q)) == 3 + n_lin and len(_mods(q, FakeQuantize)) == 3 + n_lin
    with torch.no_grad():
        assert _cos(m(x), q(x)) > 0.999
        x2 = 10 * torch.randn(4, 1, 8, 8)  # other range, no calibration
        assert _cos(m(x2), q(x2)) > 0.999
    pm2 = qpasses.PassManager("dynamic_int8", quantize_conv=True)
    pm2.run(q)
    assert pm2.report["dynamic.dynamic_conv"].rewrites == 0


def test_per_token_protects_tokens_from_an_outlier_token():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    x = torch.randn(4, 16, 64)
    x[:, 0] *= 100
    with torch.no_grad():
        ref = lin(x)[:, 1:]
        gm = qpasses.trace(nn.Sequential(lin).eval(), (x,))
        cos = {g: _cos(qpasses.PassManager("dynamic_int8", granularity=g).run(gm)(x)[:, 1:], ref)
               for g in ("per_tensor", "per_token")}
    assert cos["per_token"] > 0.9999 and cos["per_tensor"] < 0.99


def _saturating_int_mm(a, b):
    """An int8 GEMM that sums pairs of u8 x s8 products in saturating int16, as some CPU kernels do."""
    u = (a.to(torch.int32) + 128)                                   # u8 codes
    prod = u.unsqueeze(2) * b.to(torch.int32).unsqueeze(0)          # [M, K, N]
    k = prod.shape[1] - prod.shape[1] % 2
    pairs = (prod[:, 0:k:2] + prod[:, 1:k:2]).clamp(-32768, 32767)
    acc = pairs.sum(1) + (prod[:, k:].sum(1) if k < prod.shape[1] else 0)
    return (acc - 128 * b.to(torch.int32).sum(0)).to(torch.int32)


def test_inexact_int_mm_is_detected_and_not_used(monkeypatch):
    from qpasses.methods.dynamic import lib as dyn
    monkeypatch.setattr(dyn, "_INT_MM_EXACT", {})
    monkeypatch.setattr(torch, "_int_mm", _saturating_int_mm)
    assert dyn.int_mm_is_exact("cpu") is False
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(19, 40, generator=g), torch.randn(19, generator=g)
    x = torch.randn(2, 6, 40, generator=g) * 2 + 0.7
    mod = DynamicQuantLinear(w, b, granularity="per_token")
    y = mod(x)
    monkeypatch.setattr(DynamicQuantLinear, "_use_int_mm", lambda self, rows: False)
    assert torch.equal(y, mod(x))  # the exact float route


def test_int_mm_probe_agrees_with_an_exact_reference():
    from qpasses.methods.dynamic.lib import int_mm_is_exact
    g = torch.Generator().manual_seed(1)
    cases = [(torch.full((3, 64), 127, dtype=torch.int8), torch.full((64, 8), 127, dtype=torch.int8)),
             (torch.randint(-128, 128, (17, 64), generator=g, dtype=torch.int8),
              torch.randint(-128, 128, (64, 32), generator=g, dtype=torch.int8))]
    exact = all(torch.equal(torch._int_mm(a, b).to(torch.int64), a.to(torch.int64) @ b.to(torch.int64))
                for a, b in cases)
    assert int_mm_is_exact("cpu") is exact


def _closed_form_fq(x, bits, symmetric, reduce_dim):
    """Dynamic fake quantization written out from ``dynamic_qparams`` (the reference of the ops)."""
    s, z, qmin, qmax = dynamic_qparams(x.float(), bits, symmetric, reduce_dim)
    return ((torch.clamp(torch.round(x.float() / s) + z, qmin, qmax) - z) * s).to(x.dtype)


class _ScoresWithBias(nn.Module):
    """Attention scores as ``baddbmm(bias, q, k^T, beta, alpha)`` (as BLOOM and older GPT-2 ports write them)."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, bias):
        return torch.baddbmm(bias, self.q(x), self.k(x).transpose(1, 2), beta=0.5, alpha=0.25)


@pytest.mark.parametrize("level", ["fx", "export"])
def test_baddbmm_operands_quantized_bias_kept(level):
    torch.manual_seed(0)
    m = _ScoresWithBias().eval()
    x, bias = torch.randn(3, 8, 16), torch.randn(3, 8, 8)
    gm = qpasses.trace(m, (x, bias), mode=level)
    pm = qpasses.PassManager("dynamic_int8", skip=["q", "k"], progress=False)  # projections float: exact reference
    q = pm.run(gm)
    assert pm.report["dynamic_matmul"].rewrites == 1 and pm.report["dynamic_linear"].rewrites == 0
    from qpasses.matcher import Matcher
    mt = Matcher(q)
    op = next(n for n in q.graph.nodes if mt.classify(n) == "baddbmm")
    v = mt.view(op)
    assert v.get("bias").op == "placeholder"                                  # the bias stays float
    assert mt.classify(v.get("input")) == "dynamic_fq" and mt.classify(v.get("mat2")) == "dynamic_fq"
    # numerics: the float op on per-token (rows of q) / per-column (of k^T) quantized operands
    with torch.no_grad():
        a, b = m.q(x), m.k(x).transpose(1, 2)
        ref = torch.baddbmm(bias, _closed_form_fq(a, 8, False, -1), _closed_form_fq(b, 8, False, -2),
                            beta=0.5, alpha=0.25)
        torch.testing.assert_close(q(x, bias), ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(q(x, bias), m(x, bias), atol=1e-6)           # it did quantize


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_linear_graph_form(level, granularity):
    """PT2E's dynamic form: ``linear(dyn_q(x), fake_quant_per_channel(get_attr W), b)``, ``dyn_q`` one
    custom op node (per token ``fake_quant_per_token``, per tensor ``fake_quant_dynamic_per_tensor``).
    The module's parameters stay where they were (state_dict keys and tensors unchanged), the
    weight quantizer has exactly the per-channel scales of ``quantize_weight_per_channel``, one
    activation quantizer is shared by the linears reading the same value, and the graph equals the
    exact integer computation (``DynamicQuantLinear``) up to fp32 GEMM rounding."""
    from qpasses.methods.dynamic.lib import quantize_weight_per_channel

    class Fan(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(40, 24), nn.Linear(40, 24, bias=False)

        def forward(self, x):
            return self.q(x) + self.k(x)

    torch.manual_seed(0)
    m = Fan().eval()
    x = torch.randn(3, 5, 40) * 3 + 1
    gm = qpasses.trace(m, (x,), mode=level)
    keys = {k: v.clone() for k, v in gm.state_dict().items()}
    pm = qpasses.PassManager("dynamic_int8", granularity=granularity)
    q = pm.run(gm)
    assert pm.report["dynamic.dynamic_linear"].rewrites == 2
    lins = _dyn_linears(q)
    assert len(lins) == 2
    qk = {k: v for k, v in q.state_dict().items() if not k.startswith("weight_fq")}
    assert qk.keys() == keys.keys() and all(torch.equal(qk[k], keys[k]) for k in keys)
    dqs = {dynamic_linear_quantizers(q, n)[2] for n in lins}
    assert len(dqs) == 1                                    # shared per (value, configuration)
    for n in lins:
        dq, wq, _, wnode = dynamic_linear_quantizers(q, n)
        assert wnode.op == "call_function" and wnode.args[0].op == "get_attr"   # a holder-backed op node
        assert dq.reduce_dim == (-1 if granularity == "per_token" else None) and dq.bits == 8
        assert n.meta["qpasses.quant"]["dynamic"]["granularity"] == granularity
        assert n.meta["qpasses.quant"]["weight"] == {"bits": 8, "axis": 0}
        w = q.get_parameter(wnode.args[0].target)
        _, scale = quantize_weight_per_channel(w, 8)
        assert isinstance(wq, FakeQuantize) and wq.axis == 0 and torch.equal(wq.scale, scale)
        assert (wq.qmin, wq.qmax) == (-127, 127) and not bool(wq.zero_point.any())
    with torch.no_grad():
        ref = sum(DynamicQuantLinear(lin.weight, lin.bias, granularity=granularity)(x) for lin in (m.q, m.k))
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
        x2 = 5 * torch.randn_like(x)                        # qparams follow the data
        ref2 = sum(DynamicQuantLinear(lin.weight, lin.bias, granularity=granularity)(x2) for lin in (m.q, m.k))
        torch.testing.assert_close(q(x2), ref2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_export_keeps_one_node_per_dynamic_quantizer(granularity):
    """Each dynamic quantizer is one custom op node (no module, no reshape around it), and
    torch.export keeps it one node: the exported graph calls the same op as often, with the same
    constants, and computes the same numbers."""
    from qpasses.qnodes import DYNAMIC_QUANTIZER_OPS
    torch.manual_seed(0)
    m = MLPAttn().eval()
    x = torch.randn(2, 6, 16)
    q = qpasses.PassManager("dynamic_int8", granularity=granularity, progress=False).run(qpasses.trace(m, (x,)))
    dyn = _dyn_nodes(q)
    # inputs of a, b and the parameter matmul (a linear): 3; matmul(h, h^T * 0.5): 2; matmul(s, h): s,
    # and h again -- shared per tensor, a column quantizer (not the row one) per token
    assert len(dyn) == {"per_tensor": 6, "per_token": 7}[granularity]
    assert not any(n.op == "call_module" for n in q.graph.nodes)        # no module hides a quantizer
    want = sorted((str(n.target), tuple(n.args[1:])) for n in dyn)
    if granularity == "per_tensor":
        assert {str(n.target) for n in dyn} == {"qpasses.fake_quant_dynamic_per_tensor.default"}
    else:
        assert {str(n.target) for n in dyn} == {"qpasses.fake_quant_per_token.default",
                                                "qpasses.fake_quant_dynamic_per_slice.default"}
    ep = torch.export.export(q, (x,), strict=False)
    got = sorted((str(n.target), tuple(n.args[1:])) for n in ep.graph.nodes
                 if n.op == "call_function" and n.target in DYNAMIC_QUANTIZER_OPS)
    assert got == want
    # nothing of the quantizers' arithmetic leaked into the exported graph
    assert not any(n.op == "call_function" and n.target in (torch.ops.aten.amin.default, torch.ops.aten.round.default)
                   for n in ep.graph.nodes)
    with torch.no_grad():
        assert torch.equal(ep.module()(x), q(x))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduce_dim", [None, -1, -2, 0])
def test_dynamic_ops_equal_closed_form_and_ste(symmetric, reduce_dim):
    """The dynamic ops are bit-exact with the closed form of ``dynamic_qparams`` (per tensor, per
    token, per slice); their gradient is straight-through, zero where the code was clamped
    (nowhere here: the range is the tensor's own) and is computed for bfloat16 inputs too."""
    torch.manual_seed(1)
    x = (torch.randn(3, 7, 9) * 4 + 1).requires_grad_()
    y = dynamic_fake_quant(x, 8, symmetric, reduce_dim)
    assert torch.equal(y, _closed_form_fq(x.detach(), 8, symmetric, reduce_dim))
    assert not torch.equal(y, x)
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, g)
    xb = x.detach().bfloat16()
    assert torch.equal(dynamic_fake_quant(xb, 4, symmetric, reduce_dim), _closed_form_fq(xb, 4, symmetric, reduce_dim))


def test_is_dynamic_quantizer_reads_the_configuration():
    from qpasses.qnodes import dynamic_quantizer_call
    g = torch.fx.Graph()
    x = g.placeholder("x")
    for bits, sym, rd, gran in ((8, False, -1, "per_token"), (8, True, None, "per_tensor"),
                                (4, False, -2, "per_slice"), (6, True, -1, "per_token")):
        op, consts = dynamic_quantizer_call(bits, sym, rd)
        info = is_dynamic_quantizer(g.call_function(op, (x, *consts)))
        assert (info.bits, info.symmetric, info.reduce_dim, info.granularity) == (bits, sym, rd, gran)
    assert is_dynamic_quantizer(x) is None and is_dynamic_quantizer(g.call_function(torch.relu, (x,))) is None


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_onnx_export_of_every_dynamic_op(granularity):
    """The per-tensor, per-token and per-column (matmul operand) ops export through their ONNX
    translations and onnxruntime reproduces the graph within one quantization step of the output."""
    from qpasses.onnx import export_onnx, ort_session, run_onnx
    torch.manual_seed(0)
    m = MLPAttn().eval()
    x = torch.randn(2, 6, 16)
    q = qpasses.PassManager("dynamic_int8", granularity=granularity, progress=False).run(qpasses.trace(m, (x,)))
    ops = {str(n.target) for n in _dyn_nodes(q)}
    model = export_onnx(q, (x,))
    x2 = torch.randn(3, 6, 16)                                       # another batch: qparams from the batch
    with torch.no_grad():
        ref = q(x2).numpy()
    got = run_onnx(model, x2, session=ort_session(model, optimize=False))[0]
    step = (ref.max() - ref.min()) / 255
    assert abs(got - ref).max() <= step, (ops, abs(got - ref).max(), step)
    assert _cos(torch.from_numpy(got), torch.from_numpy(ref)) > 0.9999


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
@pytest.mark.parametrize("mode", ["fx", "export"])
def test_dynamic_quantizer_nodes_are_dynamic_fq_and_read_their_input_by_name(granularity, mode):
    """The op class reads a dynamic quantizer node's tensor as ``input`` (the ops' schemas call it
    ``x``): a rule's ``(dynamic_fq $q ?x)`` and ``OpView.get("input")`` see the quantized value."""
    from qpasses.opclasses import classify
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(2, 8)
    q = qpasses.PassManager("dynamic_int8", granularity=granularity).run(qpasses.trace(m, (x,), mode=mode))
    mods = dict(q.named_modules())
    dyn = [n for n in q.graph.nodes if classify(n, mods) == "dynamic_fq"]
    assert len(dyn) == 2
    for n in dyn:
        view = OpView(n, q, "dynamic_fq", mods)
        assert view.get("input") is n.args[0] and isinstance(view.get("input"), torch.fx.Node)
        assert view.get("quant_min") == 0 and view.get("quant_max") == 255 and view.get("symmetric") is False
