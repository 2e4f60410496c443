"""GPTQ on every convolution kind: im2col of conv1d/2d/3d and conv_transpose1d/2d/3d against
torch's own convolutions (closed form, bit-exact on integer-valued data), and the ``gptq`` recipe on
conv3d and transposed-convolution models (both graph levels): every one is GPTQ-quantized (none
kept at round-to-nearest), the reported proxy error is the layer's true output error, the output
error is below round-to-nearest's, and the graph computes what torch computes with the written
weights.  Also the custom-op quantizer form (``qpasses.qnodes``)."""
from __future__ import annotations

import copy
import itertools
import os
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qpasses  # noqa: E402
from qpasses.kernels.lowering import Int4GroupFakeQuantize  # noqa: E402
from qpasses.numerics import FakeQuantize  # noqa: E402
from qpasses.numerics.gptq import (ConvGeometry, conv_rows, conv_weight_from_matrix,  # noqa: E402
                                   conv_weight_matrix)
from qpasses.opclasses import OpView  # noqa: E402
from qpasses.qnodes import quantizer_module  # noqa: E402
from qpasses.methods.gptq.steps import _geometry, _get_attr  # noqa: E402

torch.set_num_threads(1)

_DIRECT = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _geometry_of(fn, kw, w):
    """The step's geometry of ``fn(x, w, None, **kw)``, read from a traced graph (so the
    argument normalisation is part of what is checked)."""
    class M(nn.Module):
        def forward(self, x, w):
            return fn(x, w, None, **kw)

    gm = fx.symbolic_trace(M())
    op = [n for n in gm.graph.nodes if n.op == "call_function"][0]
    return _geometry(OpView(op, gm), w)


def _grid(transposed: bool):
    """(stride, padding, dilation, groups, output_padding) combinations."""
    for s, p, d, g in itertools.product((1, 2, 3), (0, 1, 2), (1, 2), (1, 2)):
        for op in (range(max(s, d)) if transposed else (0,)):
            yield s, p, d, g, op


def _im2col_output(x, w, geom):
    """``rows @ W_flat^T`` per group, as [rows, C_out]."""
    wm = conv_weight_matrix(w, geom)
    chunks = list(conv_rows(x, geom, max_elements=200))
    rows = torch.cat(chunks, 0)
    # memory-bounded: a chunk holds at most 200 entries, or one slice of the first output dimension
    b = x.shape[0] if x.dim() == geom.nd + 2 else 1
    positions = rows.shape[0] // b
    slice_rows = min(c.shape[0] for c in chunks)
    assert all(c.numel() <= 200 or c.shape[0] == slice_rows for c in chunks)
    assert slice_rows <= positions
    gsz = geom.groups
    per_out = wm.shape[0] // gsz
    parts = [rows.reshape(rows.shape[0], gsz, -1)[:, gi] @ wm[gi * per_out:(gi + 1) * per_out].T
             for gi in range(gsz)]
    return torch.cat(parts, 1), len(chunks)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True], ids=["direct", "transposed"])
def test_im2col_reproduces_every_convolution(nd, transposed):
    """x_cols @ W_flat == conv(x, W), bit for bit, over a grid of stride / padding / dilation /
    groups (/ output_padding): integer-valued float64 data make every sum exact, so equality is
    the closed-form check.  The weight map of a transposed convolution round-trips exactly."""
    gen = torch.Generator().manual_seed(nd)
    kernel = (3, 2, 2)[:nd]
    spatial = (7, 6, 5)[:nd]
    checked = multi_chunk = 0
    for s, p, d, g, op in _grid(transposed):
        x = torch.randint(-3, 4, (2, 4, *spatial), generator=gen).double()
        if transposed:
            w = torch.randint(-3, 4, (4, 6 // g, *kernel), generator=gen).double()
            kw = dict(stride=s, padding=p, output_padding=op, groups=g, dilation=d)
            fn = _TRANSPOSED[nd]
        else:
            w = torch.randint(-3, 4, (6, 4 // g, *kernel), generator=gen).double()
            kw = dict(stride=s, padding=p, dilation=d, groups=g)
            fn = _DIRECT[nd]
        try:
            want = fn(x, w, None, **kw)
        except RuntimeError:      # torch rejects the combination (e.g. output_padding >= stride and dilation)
            continue
        geom = _geometry_of(fn, kw, w)
        assert geom.transposed == transposed and geom.groups == g
        got, n_chunks = _im2col_output(x, w, geom)
        assert torch.equal(got, want.flatten(2).transpose(1, 2).reshape(-1, 6)), (s, p, d, g, op)
        assert torch.equal(conv_weight_from_matrix(conv_weight_matrix(w, geom), w.shape, geom), w)
        checked += 1
        multi_chunk += n_chunks > 1
    assert checked >= 30 and multi_chunk == checked      # every case really ran, in several chunks


@pytest.mark.parametrize("spec", [
    (F.conv3d, dict(stride=1, padding="same", dilation=(2, 1, 3)), (1, 2, 5, 6, 7), (3, 2, 3, 2, 2)),
    (F.conv3d, dict(stride=(1, 2, 3), padding=(1, 0, 2), dilation=(2, 1, 1)), (1, 2, 5, 6, 8), (3, 2, 3, 2, 2)),
    (F.conv3d, dict(stride=1, padding="valid", dilation=1, groups=2), (2, 4, 4, 4, 4), (4, 2, 2, 2, 2)),
    (F.conv_transpose3d, dict(stride=(2, 1, 3), padding=(1, 0, 2), output_padding=(1, 0, 1), dilation=(1, 2, 1)),
     (1, 3, 3, 4, 3), (3, 2, 3, 2, 3)),
    (F.conv_transpose2d, dict(stride=(1, 2), padding=(3, 0)), (2, 2, 8, 4), (2, 3, 2, 2)),     # padding > kernel - 1: crops
])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_im2col_anisotropic_and_cropping_geometries(spec):
    """Per-dimension stride / padding / dilation, string padding, and a transposed convolution whose
    padding exceeds ``dilation * (kernel - 1)`` (the equivalent direct convolution crops)."""
    fn, kw, xs, ws = spec
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, xs, generator=gen).double()
    w = torch.randint(-3, 4, ws, generator=gen).double()
    want = fn(x, w, None, **kw)
    got, _ = _im2col_output(x, w, _geometry_of(fn, kw, w))
    assert torch.equal(got, want.flatten(2).transpose(1, 2).reshape(got.shape[0], -1))


def test_unbatched_input_and_bad_shapes():
    geom = ConvGeometry.direct((3,), (1,), (1,), [(0, 0)])
    x = torch.randn(2, 9)
    w = torch.randn(4, 2, 3)
    rows = torch.cat(list(conv_rows(x, geom)))
    torch.testing.assert_close(rows @ conv_weight_matrix(w, geom).T, F.conv1d(x, w).T)
    with pytest.raises(ValueError, match="1-d convolution reads"):
        list(conv_rows(torch.randn(1, 2, 3, 4, 5), geom))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        list(conv_rows(torch.randn(1, 2, 2), geom))


# ----------------------------------------------------------------------------- the recipe
class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(3, 8, 3, padding=1)
        self.c2 = nn.Conv3d(8, 8, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), groups=2)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


class TransposedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.t1 = nn.ConvTranspose2d(4, 8, 3, stride=2, padding=1, output_padding=1)
        self.t2 = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, groups=2)     # per-tensor weight scale

    def forward(self, x):
        return self.t2(F.relu(self.t1(x)))


class MixedNet(nn.Module):
    """conv_transpose1d -> conv1d and conv_transpose3d: the other transposed kinds."""

    def __init__(self):
        super().__init__()
        self.t1 = nn.ConvTranspose1d(4, 6, 3, stride=3, padding=1, dilation=2)
        self.c1 = nn.Conv1d(6, 4, 3, padding=1)
        self.t3 = nn.ConvTranspose3d(2, 4, (2, 3, 2), stride=(2, 1, 2), padding=(0, 1, 1))

    def forward(self, x, v):
        return self.c1(F.relu(self.t1(x))).mean(), self.t3(v)


def _smooth(gen, shape, factor=2):
    """Spatially smooth data (upsampled noise plus a little noise): neighbouring im2col columns
    are correlated, as in images, which is where GPTQ's second-order updates pay."""
    small = torch.randn(shape[0], shape[1], *[max(1, s // factor) for s in shape[2:]], generator=gen)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape) - 2]
    up = F.interpolate(small, size=tuple(shape[2:]), mode=mode, align_corners=False)
    return up + 0.05 * torch.randn(shape, generator=gen)


def _data(kind, n=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if kind == "conv3d":
        return [_smooth(gen, (4, 3, 6, 8, 8)) for _ in range(n)]
    if kind == "transposed":
        return [_smooth(gen, (6, 4, 6, 6)) for _ in range(n)]
    return [(_smooth(gen, (6, 4, 10)), _smooth(gen, (3, 2, 4, 6, 4))) for _ in range(n)]


def _model(kind):
    torch.manual_seed(0)
    return {"conv3d": Conv3dNet, "transposed": TransposedNet, "mixed": MixedNet}[kind]().eval()


def _call(m, batch):
    return m(*batch) if isinstance(batch, tuple) else m(batch)


def _out_err(model, q, data):
    err = 0.0
    with torch.no_grad():
        for b in data:
            a, c = _call(model, b), _call(q, b)
            a, c = (a, c) if isinstance(a, tuple) else ((a,), (c,))
            err += sum(float((u - v).pow(2).sum()) for u, v in zip(a, c))
    return err


def _weighted_modules(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                                       nn.ConvTranspose2d, nn.ConvTranspose3d))]


def _weight_quantizers(gm):
    """{weight get_attr target: quantizer module} of a quantized graph (either quantizer form)."""
    out = {}
    for n in gm.graph.nodes:
        m = quantizer_module(gm, n, kinds=(FakeQuantize, Int4GroupFakeQuantize))
        if m is not None and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
            out[str(n.args[0].target)] = m
    return out


def _layer_error(mod, x, dw):
    """``||conv(x, dW)||^2``: a convolution layer's output error for weight error ``dW``."""
    if isinstance(mod, nn.ConvTranspose2d):
        fn = F.conv_transpose2d
    elif isinstance(mod, nn.ConvTranspose1d):
        fn = F.conv_transpose1d
    elif isinstance(mod, nn.ConvTranspose3d):
        fn = F.conv_transpose3d
    else:
        fn = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(mod)]
        return float(fn(x.double(), dw.double(), None, mod.stride, mod.padding, mod.dilation,
                        mod.groups).pow(2).sum())
    return float(fn(x.double(), dw.double(), None, mod.stride, mod.padding, mod.output_padding, mod.groups,
                    mod.dilation).pow(2).sum())


@pytest.mark.parametrize("kind,level", [("conv3d", "fx"), ("conv3d", "export"), ("transposed", "fx"),
                                        ("transposed", "export"), ("mixed", "fx"), ("mixed", "export")])
def test_recipe_on_conv3d_and_transposed_convolutions(kind, level):
    model = _model(kind)
    data = _data(kind)
    example = tuple(t[:2] for t in data[0]) if isinstance(data[0], tuple) else (data[0][:2],)
    gm = qpasses.trace(model, example, mode=level)
    pm = qpasses.PassManager("gptq", group_size=0, w_bits=3, progress=False)
    calib, held_out = data[:4], data[4:]
    q = pm.run(gm, data=calib)
    info = pm.report.steps[-1].info
    mods = _weighted_modules(model)
    # every convolution is GPTQ-quantized: none is reported as kept at round-to-nearest
    assert info["kept_rtn"] == {} and info["layers"] == len(mods)
    assert not pm.report.coverage_of(q).missing
    kinds = sorted(layer["opclass"] for layer in info["per_layer"])
    want = sorted({nn.Conv1d: "conv1d", nn.Conv3d: "conv3d", nn.ConvTranspose1d: "conv_transpose1d",
                   nn.ConvTranspose2d: "conv_transpose2d", nn.ConvTranspose3d: "conv_transpose3d"}[type(m)]
                  for m in mods)
    assert kinds == want
    quants = _weight_quantizers(q)
    written = {}
    for layer in info["per_layer"]:
        w = _get_attr(q, layer["weight"])
        fq = quants[layer["weight"]]
        assert torch.equal(fq(w), w)                  # on its quantizer's grid: the graph keeps its form
        assert fq.bits == 3
        if layer["opclass"].startswith("conv_transpose"):
            groups = [m for m in mods if tuple(m.weight.shape) == tuple(w.shape)][0].groups
            assert fq.axis == (1 if groups == 1 else None)
        written[layer["op"]] = w
    assert info["error_ratio"] < 1.0
    # the graph computes what torch's convolutions compute with the written weights
    ref = copy.deepcopy(model)
    order = [layer["weight"] for layer in info["per_layer"]]
    assert len(order) == len(_weighted_modules(ref))
    by_shape = {}
    for target in order:
        by_shape.setdefault(tuple(_get_attr(q, target).shape), []).append(target)
    with torch.no_grad():
        for m in _weighted_modules(ref):
            m.weight.copy_(_get_attr(q, by_shape[tuple(m.weight.shape)].pop(0)))
    with torch.no_grad():
        for b in held_out:
            got, exp = _call(q, b), _call(ref, b)
            for u, v in zip(got if isinstance(got, tuple) else (got,), exp if isinstance(exp, tuple) else (exp,)):
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    # lower output error than round-to-nearest on data it did not see
    rtn = qpasses.PassManager(["canonicalize", "convert"], w_bits=3, progress=False).run(gm)
    assert _out_err(model, q, held_out) < 0.9 * _out_err(model, rtn, held_out)


@pytest.mark.parametrize("kind", ["transposed", "conv3d"])
def test_reported_error_is_the_first_layers_output_error(kind):
    """Closed form: the Hessian is over the right columns iff the reported proxy error times the rows
    seen equals ``sum ||conv(x, W - Q)||^2`` over the calibration data, computed by torch's own
    (transposed) convolution, for GPTQ's weights and for round-to-nearest's."""
    model = _model(kind)
    data = _data(kind)[:3]
    pm = qpasses.PassManager("gptq", group_size=0, w_bits=3, progress=False)
    q = pm.run(qpasses.trace(model, (data[0][:2],)), data=data)
    info = pm.report.steps[-1].info
    first = info["per_layer"][0]
    mod = _weighted_modules(model)[0]
    w0 = mod.weight.detach()
    wq = _get_attr(q, first["weight"])
    fq = _weight_quantizers(q)[first["weight"]]
    with torch.no_grad():
        exact = sum(_layer_error(mod, x, w0 - wq) for x in data)
        exact_rtn = sum(_layer_error(mod, x, w0 - fq(w0)) for x in data)
    assert first["error"] * first["rows"] == pytest.approx(exact, rel=1e-4)
    assert first["rtn_error"] * first["rows"] == pytest.approx(exact_rtn, rel=1e-4)
    assert exact < exact_rtn


def _to_module_form(gm: fx.GraphModule) -> int:
    """Rewrite every FakeQuantize op node into a ``call_module`` of its holder (the form data steps
    use for stateful stand-ins); returns how many."""
    from qpasses.context import RewriteContext
    from qpasses.qnodes import as_module_call, is_quantizer_call
    rc = RewriteContext(gm)
    nodes = [n for n in gm.graph.nodes if is_quantizer_call(n)]
    for n in nodes:
        as_module_call(rc, n)
    gm.recompile()
    return len(nodes)


@pytest.mark.parametrize("sequential", [True, False])
def test_custom_op_quantizer_form_gives_the_same_weights(sequential):
    """The step finds weight quantizers in their custom-op form and in the call_module form
    (``qpasses.qnodes``) and bypasses them while capturing: the written weights are the same bit
    for bit."""
    from qpasses.methods.gptq.steps import gptq
    model = _model("transposed")
    data = _data("transposed")[:3]
    base = qpasses.PassManager(["canonicalize", "convert"], w_bits=3, progress=False).run(
        qpasses.trace(model, (data[0][:2],)))
    results = []
    for custom in (False, True):
        gm = copy.deepcopy(base)
        if not custom:
            assert _to_module_form(gm) == 2
        args = dict(sequential=sequential)
        ctx = SimpleNamespace(gm=gm, data=data, info={}, progress=False,
                              arg=lambda name, default=None: args.get(name, default))
        gptq(ctx)
        assert ctx.info["layers"] == 2 and ctx.info["kept_rtn"] == {}
        results.append([(layer["weight"], _get_attr(gm, layer["weight"]).clone())
                        for layer in ctx.info["per_layer"]])
    for (ta, wa), (tb, wb) in zip(*results):
        assert ta == tb and torch.equal(wa, wb)


def test_export_graph_conv_transpose1d_is_classified():
    """aten spells conv_transpose1d with its default overload (2-d / 3-d with ``.input``): the export
    graph's op is a conv_transpose1d, so it is quantized rather than silently left in float."""
    from qpasses.opclasses import classify
    m = nn.Sequential(nn.ConvTranspose1d(2, 3, 3, stride=2)).eval()
    gm = qpasses.trace(m, (torch.randn(1, 2, 5),), mode="export")
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and "conv_transpose1d" in str(n.target)]
    assert len(ops) == 1 and classify(ops[0], dict(gm.named_modules())) == "conv_transpose1d"
