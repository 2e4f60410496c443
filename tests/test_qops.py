"""The quantizer custom ops (``torch.ops.qpasses.fake_quant_*``, ``quantize_per_token``) and FakeQuantize on them."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

import qpasses  # noqa: F401  registers the ops
from qpasses.numerics import FakeQuantize, dynamic_qparams, qops

torch.set_num_threads(1)
Q = torch.ops.qpasses
EPS = torch.finfo(torch.float32).eps


def _x(*shape, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * spread


def _grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    gy = torch.linspace(-1.0, 2.0, y.numel()).reshape(y.shape).to(y.dtype)
    y.backward(gy)
    return y.detach(), x.grad


# ------------------------------------------------------------------------ per tensor / per channel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qmin,qmax,zp", [(0, 255, 3), (-128, 127, 0), (-127, 127, 0), (-8, 7, -2), (0, 15, 8)])
def test_per_tensor_matches_torch_bit_exactly(dtype, qmin, qmax, zp):
    x = _x(6, 7, 5).to(dtype)
    s, z = torch.tensor(0.0173), torch.tensor(zp, dtype=torch.int32)
    y, gx = _grad(lambda t: Q.fake_quant_per_tensor(t, s, z, qmin, qmax), x)
    y0, gx0 = _grad(lambda t: torch.fake_quantize_per_tensor_affine(t, s, z, qmin, qmax), x)
    assert y.dtype == dtype and torch.equal(y, y0)
    assert torch.equal(gx, gx0)
    assert 0 < int((gx0 == 0).sum()) < gx0.numel()      # some elements were clipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_matches_torch_bit_exactly(dtype, axis):
    x = _x(4, 6, 5).to(dtype)
    c = x.shape[axis]
    s = torch.rand(c, generator=torch.Generator().manual_seed(1)) * 0.05 + 0.002
    z = torch.arange(c, dtype=torch.int32) - 2
    y, gx = _grad(lambda t: Q.fake_quant_per_channel(t, s, z, axis, -8, 7), x)
    ax = axis % x.dim()
    y0, gx0 = _grad(lambda t: torch.fake_quantize_per_channel_affine(t, s, z, ax, -8, 7), x)
    assert torch.equal(y, y0) and torch.equal(gx, gx0)


def test_per_tensor_accepts_one_element_parameters_of_any_shape_and_integer_zero_points():
    x = _x(3, 4)
    y = Q.fake_quant_per_tensor(x, torch.tensor([0.05]), torch.tensor([1], dtype=torch.int64), 0, 255)
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, 0.05, 1, 0, 255))
    with pytest.raises(Exception, match="integer"):
        Q.fake_quant_per_tensor(x, torch.tensor(0.05), torch.tensor(1.0), 0, 255)


# --------------------------------------------------------------------------------------- per group
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_group_is_per_channel_over_groups(dtype):
    n, k, gs = 5, 64, 16
    w = _x(n, k, spread=1.0).to(dtype)
    gen = torch.Generator().manual_seed(2)
    s = torch.rand(n, k // gs, generator=gen) * 0.2 + 0.01
    z = torch.randint(0, 16, (n, k // gs), generator=gen, dtype=torch.int32)
    y, gw = _grad(lambda t: Q.fake_quant_per_group(t, s, z, gs, 0, 15), w)
    # the same numbers as torch's per-channel op on [n * groups, gs] rows
    y0, gw0 = _grad(lambda t: torch.fake_quantize_per_channel_affine(
        t.reshape(-1, gs), s.reshape(-1), z.reshape(-1), 0, 0, 15).reshape(n, k), w)
    assert torch.equal(y, y0) and torch.equal(gw, gw0)
    assert 0 < int((gw0 == 0).sum()) < gw0.numel()


def test_per_group_with_a_partial_last_group():
    w = _x(3, 40, spread=1.0)
    s = torch.full((3, 3), 0.1)
    s[:, 2] = 0.3                                  # last group: columns 32..39
    z = torch.zeros(3, 3, dtype=torch.int32)
    y = Q.fake_quant_per_group(w, s, z, 16, -8, 7)
    assert torch.equal(y[:, :32], torch.fake_quantize_per_tensor_affine(w[:, :32], 0.1, 0, -8, 7))
    assert torch.equal(y[:, 32:], torch.fake_quantize_per_tensor_affine(w[:, 32:], 0.3, 0, -8, 7))
    with pytest.raises(ValueError, match="shape"):
        Q.fake_quant_per_group(w, s[:, :2], z[:, :2], 16, -8, 7)


# -------------------------------------------------------------------------------------------- LSQ
def _old_lsq(x, scale, zero_point, qmin, qmax, axis, trick=True):
    """FakeQuantize._lsq before the custom ops: elementwise autograd arithmetic (the reference).

    ``trick=False`` leaves out the gradient-scaling detour ``(s - s*g).detach() + s*g`` (same
    value up to an ulp of ``s``, same gradients up to rounding)."""
    qpos = max(qmax, 1)
    if axis is None:
        xm, n = x, x.numel()
    else:
        xm, n = x.movedim(axis, -1), x.numel() // x.shape[axis]
    g = (n * qpos) ** -0.5
    s = (scale - scale * g).detach() + scale * g if trick else scale
    s = torch.clamp(s.abs(), min=EPS)
    z = zero_point.to(s.dtype)
    v = torch.clamp(xm / s + z, qmin, qmax)
    v = v + (torch.round(v) - v).detach()
    y = (v - z) * s
    if axis is not None:
        y = y.movedim(-1, axis)
    return y.to(x.dtype)


def _lsq_case(axis, seed=0):
    x = _x(8, 6, 5, seed=seed)
    c = 1 if axis is None else x.shape[axis]
    gen = torch.Generator().manual_seed(seed + 10)
    scale = (torch.rand(c, generator=gen) * 0.3 + 0.05).reshape(() if axis is None else (c,))
    if axis is not None:
        scale[0] = -scale[0]                        # a scale pushed below zero keeps training (|s|)
    zp = torch.zeros(scale.shape, dtype=torch.int32)
    if axis is not None:
        zp[1] = 2
    return x, scale, zp


def _run(fn, x, scale, zp):
    x = x.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    y = fn(x, s, zp)
    gy = torch.linspace(-1.0, 2.0, y.numel()).reshape(y.shape)
    y.backward(gy)
    return y.detach(), x.grad, s.grad


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("qmin,qmax", [(-8, 7), (0, 255), (-127, 127)])
def test_lsq_matches_the_old_arithmetic(axis, qmin, qmax):
    x, scale, zp = _lsq_case(axis)
    if axis is None:
        new = lambda t, s, z: Q.fake_quant_lsq_per_tensor(t, s, z, qmin, qmax)   # noqa: E731
    else:
        new = lambda t, s, z: Q.fake_quant_lsq_per_channel(t, s, z, axis, qmin, qmax)   # noqa: E731
    y, gx, gs = _run(new, x, scale, zp)
    y0, gx0, gs0 = _run(lambda t, s, z: _old_lsq(t, s, z, qmin, qmax, axis), x, scale, zp)
    # forward: exact where the old (s - s*g) + s*g gradient trick left s's value unchanged (it
    # can move it by an ulp); the op uses s itself
    n = x.numel() // (1 if axis is None else x.shape[axis])
    g = (n * max(qmax, 1)) ** -0.5
    same_s = ((scale - scale * g) + scale * g) == scale
    y1 = _old_lsq(x, scale, zp, qmin, qmax, axis, trick=False)
    assert torch.equal(y, y1)
    if axis is None:
        keep = torch.ones_like(y, dtype=torch.bool) if bool(same_s) else torch.zeros_like(y, dtype=torch.bool)
    else:
        shape = [1] * x.dim()
        shape[axis] = -1
        keep = same_s.reshape(shape).expand_as(y)
    assert torch.equal(y[keep], y0[keep])
    torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gs, gs0, rtol=1e-5, atol=1e-6)


def test_lsq_scale_gradient_closed_form_per_channel():
    """Esser et al. 2020, eq. 3 with g = 1/sqrt(N Qp): per channel, N = elements per channel."""
    qmin, qmax = -4, 3
    x = _x(10, 3, seed=4, spread=0.5)
    s = torch.tensor([0.1, 0.05, 0.2])
    zp = torch.tensor([0, 1, -1], dtype=torch.int32)
    _, gx, gs = _run(lambda t, sc, z: Q.fake_quant_lsq_per_channel(t, sc, z, 1, qmin, qmax), x, s, zp)
    gy = torch.linspace(-1.0, 2.0, x.numel()).reshape(x.shape)
    v = x / s + zp
    d = torch.where(v < qmin, qmin - zp.float(), torch.where(v > qmax, qmax - zp.float(), torch.round(v) - v))
    g = 1.0 / (x.shape[0] * qmax) ** 0.5
    torch.testing.assert_close(gs, (gy * d).sum(0) * g, rtol=1e-5, atol=1e-7)
    inside = (v >= qmin) & (v <= qmax)
    assert torch.equal(gx, gy * inside)
    assert 0 < int(inside.sum()) < inside.numel()


def test_lsq_grad_scale_follows_the_batch_size():
    assert qops.lsq_grad_scale(100, 7) == pytest.approx(1 / (700 ** 0.5))
    assert qops.lsq_grad_scale(100, 0) == pytest.approx(0.1)     # Qp = max(qmax, 1)


# -------------------------------------------------------------------------------------- per token
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_matches_dynamic_qparams(symmetric, bits):
    x = _x(2, 5, 16, seed=3)
    x[0, 1] = 0.0                                   # an all-zero token
    x[1, 2] += 5.0                                  # an all-positive one
    scale, zp, qmin, qmax = dynamic_qparams(x, bits, symmetric, -1)
    codes, s, z = Q.quantize_per_token(x, qmin, qmax, symmetric)
    want = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
    assert codes.dtype == torch.int32 and torch.equal(codes.float(), want)
    assert s.shape == (2, 5, 1) and torch.equal(s, scale) and torch.equal(z.float(), zp)
    y, gx = _grad(lambda t: Q.fake_quant_per_token(t, qmin, qmax, symmetric), x)
    assert torch.equal(y, (want - zp) * scale)
    assert torch.equal(gx != 0, torch.linspace(-1.0, 2.0, x.numel()).reshape(x.shape) != 0)  # STE, all inside


def test_per_token_rejects_a_symmetric_unsigned_range():
    with pytest.raises(ValueError, match="signed"):
        Q.fake_quant_per_token(_x(2, 4), 0, 255, True)


# ------------------------------------------------------------------------------------------ opcheck
def _opcheck_cases():
    x = _x(4, 6, 8, seed=5)
    s1, z1 = torch.tensor(0.05), torch.tensor(3, dtype=torch.int32)
    sc = torch.rand(6, generator=torch.Generator().manual_seed(6)) * 0.1 + 0.01
    zc = torch.zeros(6, dtype=torch.int32)
    sg = torch.rand(4, 6, 2, generator=torch.Generator().manual_seed(7)) * 0.2 + 0.05
    zg = torch.full((4, 6, 2), 8, dtype=torch.int32)
    xr = x.clone().requires_grad_(True)
    return [
        (Q.fake_quant_per_tensor.default, (xr, s1, z1, 0, 255)),
        (Q.fake_quant_per_channel.default, (xr, sc, zc, 1, -128, 127)),
        (Q.fake_quant_per_group.default, (xr, sg, zg, 4, 0, 15)),
        (Q.fake_quant_lsq_per_tensor.default, (xr, s1.clone().requires_grad_(True), z1, 0, 255)),
        (Q.fake_quant_lsq_per_channel.default, (xr, sc.clone().requires_grad_(True), zc, 1, -8, 7)),
        (Q.fake_quant_per_token.default, (xr, 0, 255, False)),
        (Q.fake_quant_per_token.default, (xr, -127, 127, True)),
        (Q.quantize_per_token.default, (x, 0, 255, False)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- FakeQuantize on the ops
class _Net(nn.Module):
    def __init__(self, learnable: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.act_fq = FakeQuantize(0.03, 128, 0, 255)
        self.w_fq = FakeQuantize(torch.rand(4) * 0.01 + 0.002, 0, -127, 127, axis=0, symmetric=True)
        self.lsq_fq = FakeQuantize(0.05, 0, -8, 7, learnable=learnable)

    def forward(self, x):
        x = self.act_fq(x)
        w = self.w_fq(self.conv.weight)
        y = nn.functional.conv2d(x, w, self.conv.bias)
        return self.lsq_fq(y)


def _qnodes(ep):
    return [n for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("qpasses.")]


@pytest.mark.parametrize("learnable", [True, False])
def test_export_keeps_each_quantizer_one_node_and_round_trips(learnable):
    m = _Net(learnable).eval()
    x = torch.rand(2, 3, 8, 8) * 4 - 1
    ep = torch.export.export(m, (x,))
    names = sorted(str(n.target) for n in _qnodes(ep))
    lsq = "qpasses.fake_quant_lsq_per_tensor.default" if learnable else "qpasses.fake_quant_per_tensor.default"
    assert names == sorted(["qpasses.fake_quant_per_tensor.default", "qpasses.fake_quant_per_channel.default", lsq])
    others = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"} - set(names)
    assert others == {"aten.conv2d.default"}, others          # nothing inlined
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    ep2 = torch.export.load(buf)
    assert len(_qnodes(ep2)) == 3
    assert torch.equal(ep2.module()(x), m(x))


def test_export_for_training_keeps_lsq_one_node():
    m = _Net(True).train()
    ep = torch.export.export(m, (torch.rand(2, 3, 8, 8),))
    targets = [str(n.target) for n in _qnodes(ep)]
    assert "qpasses.fake_quant_lsq_per_tensor.default" in targets and len(targets) == 3


def test_fake_quantize_module_gradients_match_the_old_implementation():
    x = _x(4, 3, 5, 5, seed=8)
    for axis in (None, 1):
        s0 = torch.tensor(0.2) if axis is None else torch.tensor([0.2, 0.1, 0.3])
        fq = FakeQuantize(s0, 0, -8, 7, axis=axis, learnable=True)
        xr = x.clone().requires_grad_(True)
        fq(xr).backward(torch.linspace(-1.0, 2.0, x.numel()).reshape(x.shape))
        _, gx0, gs0 = _run(lambda t, s, z: _old_lsq(t, s, z, -8, 7, axis), x, s0, fq.zero_point)
        torch.testing.assert_close(xr.grad, gx0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fq.scale.grad, gs0, rtol=1e-5, atol=1e-6)
    # fixed quantizers: torch's STE
    fq = FakeQuantize(torch.tensor([0.2, 0.1, 0.3]), torch.tensor([0, 1, 2]), 0, 15, axis=1)
    _, gx = _grad(fq, x)
    _, gx0 = _grad(lambda t: torch.fake_quantize_per_channel_affine(
        t, fq.scale, fq.zero_point, 1, 0, 15), x)
    assert torch.equal(gx, gx0)


def test_disabled_fake_quantize_is_the_identity():
    fq = FakeQuantize(0.1, 0, -8, 7)
    fq.enabled = False
    x = _x(3, 3)
    assert fq(x) is x


# ------------------------------------------------------------------------- dynamic quantization
def _old_dynamic_fq(x, bits, symmetric, reduce_dim):
    scale, zp, qmin, qmax = dynamic_qparams(x, bits, symmetric, reduce_dim)
    q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).to(x.dtype)


@pytest.mark.parametrize("reduce_dim", [None, -1, -2, 2, 0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dynamic_fake_quant_ops_equal_the_closed_form(reduce_dim, symmetric):
    """Each granularity is one op call (per tensor, per token, per slice), bit-exact with the
    closed form of ``dynamic_qparams``."""
    from qpasses.methods.dynamic.lib import dynamic_fake_quant
    x = _x(2, 7, 9, seed=9)
    x[1, :, 3] += 4.0
    assert torch.equal(dynamic_fake_quant(x, 8, symmetric, reduce_dim), _old_dynamic_fq(x, 8, symmetric, reduce_dim))


@pytest.mark.filterwarnings("ignore:The tensor attributes")   # the module's weight cache, refilled during export
@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dynamic_quant_linear_quantizes_its_input_with_the_per_token_op(granularity, symmetric, monkeypatch):
    from qpasses.methods.dynamic import lib as dyn
    g = torch.Generator().manual_seed(11)
    w, b = torch.randn(12, 32, generator=g), torch.randn(12, generator=g)
    x = torch.randn(3, 4, 32, generator=g) * 2 + 0.5
    mod = dyn.DynamicQuantLinear(w, b, granularity=granularity, symmetric=symmetric)
    reduce_dim = -1 if granularity == "per_token" else None
    scale, zp, qmin, qmax = dynamic_qparams(x, 8, symmetric, reduce_dim)
    xq, s, z = mod.quantize_input(x)
    assert torch.equal(xq, torch.clamp(torch.round(x / scale) + zp, qmin, qmax))
    assert torch.equal(s, scale) and torch.equal(z, zp)
    # the float route against the arithmetic it had before the op
    monkeypatch.setattr(dyn.DynamicQuantLinear, "_use_int_mm", lambda self, rows: False)
    centred = torch.clamp(torch.round(x / scale), qmin - zp, qmax - zp)
    want = torch.matmul(centred, mod.weight_q.t().float()) * (scale * mod.weight_scale) + b
    assert torch.equal(mod(x), want)
    # and it is one op node in an exported graph
    ep = torch.export.export(mod, (x,))
    assert [str(n.target) for n in _qnodes(ep)] == ["qpasses.quantize_per_token.default"]


# ----------------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("learnable", [False, True])
def test_onnx_export_of_a_graph_traced_through_fake_quantize(learnable):
    """qpasses.trace traces through FakeQuantize: its op call becomes a QuantizeLinear/DequantizeLinear pair."""
    pytest.importorskip("onnxruntime")
    from qpasses.onnx import export_onnx, run_onnx

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(6, 4)
            self.a = FakeQuantize(0.02, 128, 0, 255, learnable=learnable)
            self.w = FakeQuantize(self.fc.weight.detach().abs().amax(1) / 127, 0, -127, 127, axis=0,
                                  learnable=learnable)

        def forward(self, x):
            return nn.functional.linear(self.a(x), self.w(self.fc.weight), self.fc.bias)

    m = M().eval()
    x = torch.rand(3, 6) * 4 - 2
    gm = qpasses.trace(m, (x,))
    assert sum(str(n.target).startswith("qpasses.") for n in gm.graph.nodes) == 2
    model = export_onnx(gm, x)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    torch.testing.assert_close(torch.from_numpy(run_onnx(model, x)[0]), m(x).detach(), rtol=1e-5, atol=1e-5)


def test_torch_compile_sees_each_quantizer_as_one_op():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = _Net(True).eval()
    x = torch.rand(2, 3, 8, 8)
    torch._dynamo.reset()
    try:
        y = torch.compile(m, backend=backend, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(y, m(x))
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sorted(t for t in targets if t.startswith("qpasses.")) == sorted([
        "qpasses.fake_quant_per_tensor.default", "qpasses.fake_quant_per_channel.default",
        "qpasses.fake_quant_lsq_per_tensor.default"])
