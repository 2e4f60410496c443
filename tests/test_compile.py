"""``qpasses.compile``: the ``qdq`` form through Inductor with freezing, int8 on x86 CPUs.

Inductor's x86 int8 passes must fire (its ``qconv_weight_prepack_matcher_count`` /
``qlinear_weight_prepack_matcher_count`` counters) and the compiled model must compute what the
frozen Q/DQ graph computes: the int8 accumulations are exact, so only the float epilogue's
rounding separates them (and, through it, a rare requantization tie one step apart).

On CPUs without VNNI oneDNN adds pairs of u8 x s8 products in saturating int16, so the tests
quantize weights to 7 bits there (|code| <= 63: 2 x 255 x 63 < 32767), which keeps int8 exact.
"""
import shutil

import pytest
import torch
import torch.nn as nn

import qpasses
from qpasses.deploy import CompileError, has_vnni

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="Inductor's C++ back-end needs a C++ compiler")

W_BITS = 8 if has_vnni() else 7


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 8, 3)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _quantized(model, shape, mode="auto", **opts):
    torch.manual_seed(0)
    model = model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    data = [torch.randn(shape, generator=g) for _ in range(4)]
    q = qpasses.PassManager("ptq_int8", w_bits=W_BITS, **opts).run(qpasses.trace(model, (x,), mode=mode), data=data)
    return q, x


def _check_close(fast, x):
    with torch.no_grad():
        ref = fast.qdq(x)
        got = fast(x)
    assert got.shape == ref.shape
    err = (got - ref).abs()
    # exact int32 sums, float epilogue: a few ulps, except where a requantization tie flips a code
    assert float(err.max()) <= 1e-2 * float(ref.abs().max())
    assert float((err <= 1e-5 * float(ref.abs().max()) + 1e-6).float().mean()) >= 0.99


@pytest.mark.slow
def test_conv_model_lowers_to_qconv():
    from torch._dynamo.utils import counters
    q, x = _quantized(ConvNet(), (2, 3, 16, 16))
    code = q.code
    before = counters["inductor"]["qconv_weight_prepack_matcher_count"]
    fast = qpasses.compile(q, (x,))
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] - before == 2
    assert fast.report.inductor["qconv_weight_prepack_matcher_count"] == 2
    assert [c for _, c in fast.report.lowered] == ["conv2d", "conv2d"] and not fast.report.refused
    assert fast.report.ran_qdq and not fast.report.warnings
    assert q.code == code, "the input graph is not modified"
    import torch._inductor.config as cfg
    assert cfg.freezing is False, "freezing is set for the compiled calls only"
    _check_close(fast, x)
    _check_close(fast, torch.randn(2, 3, 16, 16) * 2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fx", "export"])
def test_linear_model_lowers_to_qlinear(mode):
    from torch._dynamo.utils import counters
    q, x = _quantized(MLP(), (8, 64), mode=mode)
    before = counters["inductor"]["qlinear_weight_prepack_matcher_count"]
    fast = qpasses.compile(q, (x,))
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] - before == 2
    assert [c for _, c in fast.report.lowered] == ["linear", "linear"]
    _check_close(fast, x)


def test_refusals_have_reasons_and_strict_raises():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.ConvTranspose2d(3, 4, 2)
            self.c = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.c(self.t(x))

    q, x = _quantized(Mixed(), (2, 3, 6, 6), a_bits=4)
    from qpasses.deploy import int8_candidates
    d = qpasses.PassManager("qdq").run(q)
    rep = int8_candidates(d)
    reasons = dict(rep.refused)
    assert any("conv_transpose2d" in r and "conv1d / conv2d / linear only" in r for r in reasons.values())
    # 4-bit activations: the custom op, then a uint8 Q/DQ pair: the conv still gets an int8 input
    assert [c for _, c in rep.lowered] == ["conv2d"]
    with pytest.raises(CompileError, match="conv_transpose2d"):
        qpasses.compile(q, strict=True)


def test_saturation_warning_without_vnni(monkeypatch):
    import qpasses.deploy as dep
    monkeypatch.setattr(dep, "has_vnni", lambda: False)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8)).eval()
    x = torch.rand(4, 16)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(m, (x,)), data=[torch.rand(4, 16)])
    rep = dep.int8_candidates(qpasses.PassManager("qdq").run(q))
    assert rep.lowered and rep.warnings and "w_bits=7" in rep.warnings[0]
    q7 = qpasses.PassManager("ptq_int8", w_bits=7).run(qpasses.trace(m, (x,)), data=[torch.rand(4, 16)])
    assert not dep.int8_candidates(qpasses.PassManager("qdq").run(q7)).warnings


# ------------------------------------------------------------------------- dynamic_int8
def _dynamic(model, shape, granularity, **opts):
    torch.manual_seed(0)
    model = model.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    q = qpasses.PassManager("dynamic_int8", granularity=granularity, progress=False, **opts).run(
        qpasses.trace(model, (x,)))
    return model, q, x


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_dynamic_per_tensor_freezes_to_pt2e_dynamic_form():
    """``dynamic_int8`` per tensor: the ``qdq`` family writes what ``convert_pt2e`` writes for
    ``X86InductorQuantizer``'s dynamic config -- ``choose_qparams.tensor`` -> ``quantize_per_tensor.tensor``
    -> ``dequantize_per_tensor.tensor`` (uint8 [0, 255]) before each linear, weights int8 codes +
    ``dequantize_per_channel`` -- with the op's own qparams (float32 eps) and codes, so the frozen
    graph computes the fake-quant graph's numbers (up to a code on a rounding tie of x / s against
    x * (1 / s)); Inductor's candidates are both linears.  Per token is refused with the reason."""
    from qpasses.methods.qdq.pt2e import CHOOSE_QPARAMS, DQ_CHANNEL, DQ_TENSOR_T, Q_TENSOR_T
    from qpasses.deploy import int8_candidates
    from qpasses.qnodes import is_dynamic_quantizer
    model, q, x = _dynamic(MLP(), (8, 64), "per_tensor")
    pm = qpasses.PassManager("qdq", progress=False)
    d = pm.run(q)
    assert pm.report["freeze_dynamic_fq"].rewrites == 2 and not any(is_dynamic_quantizer(n) for n in d.graph.nodes)
    targets = [n.target for n in d.graph.nodes if n.op == "call_function"]
    assert targets.count(CHOOSE_QPARAMS) == targets.count(Q_TENSOR_T) == targets.count(DQ_TENSOR_T) == 2
    for n in d.graph.nodes:
        if n.target is CHOOSE_QPARAMS:
            assert n.args[1:] == (0, 255, torch.finfo(torch.float32).eps, torch.uint8)
        if n.target is torch.ops.aten.linear.default or n.target is torch.nn.functional.linear:
            assert n.args[0].target is DQ_TENSOR_T and n.args[1].target is DQ_CHANNEL
    rep = int8_candidates(d)
    assert [c for _, c in rep.lowered] == ["linear", "linear"] and not rep.refused
    with torch.no_grad():
        for xs in (x, 3 * torch.randn(5, 64) + 1):
            want, got = q(xs), d(xs)
            assert float((got == want).float().mean()) >= 0.99
            step = float(want.abs().max()) / 127            # generous: one input code flip, scaled by |w|
            assert float((got - want).abs().max()) <= step
            assert _cos(got, model(xs)) > 0.999
    # per token: no Inductor form; the refusal names the granularity and the way out
    _, qt, _ = _dynamic(MLP(), (8, 64), "per_token")
    pm = qpasses.PassManager("qdq", progress=False)
    rep = int8_candidates(pm.run(qt))
    assert pm.report["freeze_dynamic_fq"].rewrites == 0 and pm.report["freeze_dynamic_fq"].n_refused == 2
    assert not rep.lowered and all("per_token" in r and "granularity=per_tensor" in r for _, r in rep.refused)


def test_pt2e_dynamic_qparams_equal_the_ops():
    """``choose_qparams.tensor`` with float32 eps gives ``fake_quant_dynamic_per_tensor``'s scale
    and zero point bit for bit, including an all-positive, an all-negative and a constant tensor."""
    from qpasses.methods.qdq.pt2e import CHOOSE_QPARAMS
    from qpasses.numerics.qparams import dynamic_range_qparams
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(64, 33, generator=g) * 3 + 1, torch.rand(50, generator=g) + 2, -torch.rand(7, 9, generator=g),
              torch.full((4, 4), 0.25), torch.zeros(3)):
        s, z = CHOOSE_QPARAMS(x, 0, 255, torch.finfo(torch.float32).eps, torch.uint8)
        s2, z2 = dynamic_range_qparams(x, 0, 255, False, None)
        assert float(s) == float(s2) and int(z) == int(z2)


@pytest.mark.slow
def test_dynamic_per_tensor_compiles_to_qlinear_and_leaves_the_input_alone():
    """Inductor's x86 dynamic int8 linear pattern fires once per linear of a Transformer block
    (per tensor), the compiled block tracks the float one, and the caller's input is not
    overwritten (Inductor's qlinear + add fusion writes into its residual input in place)."""
    from torch._dynamo.utils import counters
    from qpasses import zoo
    model, q, x = _dynamic(zoo.TransformerEncoderBlock(), (4, 16, 64), "per_tensor", w_bits=W_BITS)
    before = counters["inductor"]["qlinear_weight_prepack_matcher_count"]
    fast = qpasses.compile(q, (x,))
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] - before == 6
    assert len(fast.report.lowered) == 6 and not fast.report.warnings
    x2 = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(7)) * 2
    keep = x2.clone()
    with torch.no_grad():
        got = fast(x2)
        assert torch.equal(x2, keep), "the compiled model overwrote its input"
        assert _cos(got, fast.qdq(x2)) > 0.9999
        assert _cos(got, model(x2)) > 0.999
