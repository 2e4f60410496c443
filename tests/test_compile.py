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
