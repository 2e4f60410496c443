"""The ``lower`` family: fake-quantized graphs -> integer kernel ops (torch.ops.qpasses.*).

A lowered graph must call the kernel ops, agree with the fake-quant graph it came from
(integer accumulations are exact, so only fp32 rounding separates them), run with the CPU
reference and with the Triton kernels (interpreter), and list in ``pm.report`` what stayed float.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import qpasses  # noqa: E402
from qpasses import datasets, zoo  # noqa: E402
from qpasses.errors import QPassesError  # noqa: E402
from qpasses.kernels import library as kops  # noqa: E402
from qpasses.kernels.lowering import Int4GroupFakeQuantize  # noqa: E402
from qpasses.numerics import FakeQuantize  # noqa: E402
from qpasses.qnodes import QUANTIZER_OPS, quantizer_module

torch.set_num_threads(1)

Q = torch.ops.qpasses
INT8_TARGETS = {Q.int8_linear.default, Q.int8_conv2d.default}


def kernel_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("qpasses.")
            and n.target not in QUANTIZER_OPS]


def fake_quant_modules(gm):
    return [n for n in gm.graph.nodes if
            isinstance(quantizer_module(gm, n, None), (FakeQuantize, Int4GroupFakeQuantize))]


def rule_row(pm, name):
    rows = pm.report.to_dict()["rules"]
    rows = rows.values() if isinstance(rows, dict) else rows
    for r in rows:
        if str(r.get("rule", r.get("name", ""))).endswith(name):
            return r
    raise KeyError(name)


def digits(n=64):
    x, _ = datasets.load_digits_tensors("test")
    return x[:n]


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return datasets.train_digits_cnn().eval()


def quantize_and_lower(model, example, level, **opts):
    gm = qpasses.trace(model, (example,), mode=level)
    fq = qpasses.PassManager("ptq_int8").run(gm, data=datasets.calib_batches(n=64))
    pm = qpasses.PassManager("lower", device="cpu", **opts)
    return gm, fq, pm.run(fq), pm


@pytest.mark.parametrize("level", ["fx", "export"])
def test_mlp_lowered_to_int8_linear_agrees_with_fake_quant(level):
    torch.manual_seed(1)
    model = zoo.MLP().eval()
    x = digits()
    gm, fq, low, pm = quantize_and_lower(model, x[:2], level)
    assert low.meta.get("qpasses.level") == ("aten" if level == "export" else "fx")
    targets = kernel_targets(low)
    assert targets.count(Q.int8_linear.default) == 3
    assert targets.count(Q.quantize_int8.default) == 3
    assert not fake_quant_modules(low), "every quantized layer has a kernel here"
    row = rule_row(pm, "lower_quantized_weighted")
    assert row["rewrites"] == 3 and row["refused"] == 0
    with torch.no_grad():
        want, got = fq(x), low(x)
    # same int32 accumulators; only the fp32 epilogue order differs from the fake-quant matmul
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6
    assert not kernel_targets(fq), "the fake-quant input graph was modified"


@pytest.mark.parametrize("level", ["fx", "export"])
def test_cnn_lowered_to_int8_conv2d_keeps_accuracy(cnn, level):
    x = digits(200)
    gm, fq, low, pm = quantize_and_lower(cnn, x[:2], level)
    targets = kernel_targets(low)
    assert targets.count(Q.int8_conv2d.default) == 3 and targets.count(Q.int8_linear.default) == 1
    with torch.no_grad():
        want, got = fq(x), low(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_lowered_graph_runs_the_triton_kernels_under_the_interpreter(cnn, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = digits(3)                                                  # M = 3 rows for the linear
    _, fq, low, _ = quantize_and_lower(cnn, x[:2], "fx")
    used = []
    real = kops._kmod
    monkeypatch.setattr(kops, "_kmod", lambda name: used.append(name) or real(name))
    with torch.no_grad():
        ref = low(x)
        with kops.triton_policy("always"):
            tri = low(x)
    assert used.count("triton_int8") == 4                          # 3 convs + 1 linear
    assert (tri - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (tri - fq(x)).abs().max() <= 1e-4 * ref.abs().max()


def test_layers_without_a_kernel_stay_fake_quant_and_are_reported():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5)).eval()
    x = torch.randn(8, 4, 8)
    gm = qpasses.trace(model, (x[:2],))
    fq = qpasses.PassManager("ptq_int8").run(gm, data=[x])
    pm = qpasses.PassManager("lower", device="cpu")
    low = pm.run(fq)
    assert kernel_targets(low).count(Q.int8_linear.default) == 1
    assert len(fake_quant_modules(low)) == 2                       # conv1d's activation + weight quantizers
    row = rule_row(pm, "lower_quantized_weighted")
    assert row["rewrites"] == 1 and row["refused"] == 1
    assert "no kernel for conv1d" in pm.report.table()
    with torch.no_grad():
        assert (low(x) - fq(x)).abs().max() <= 1e-5 * fq(x).abs().max()


def test_skip_leaves_a_layer_in_fake_quant_form():
    torch.manual_seed(3)
    model = zoo.MLP().eval()
    x = digits(16)
    _, fq, low, pm = quantize_and_lower(model, x[:2], "fx", skip=["linear_2", "net.5"])
    assert kernel_targets(low).count(Q.int8_linear.default) == 2
    assert rule_row(pm, "lower_quantized_weighted")["refused"] == 1
    with torch.no_grad():
        assert (low(x) - fq(x)).abs().max() <= 1e-5 * fq(x).abs().max()


def test_float_graph_has_nothing_to_lower_and_bad_option_is_clear():
    model = zoo.MLP().eval()
    gm = qpasses.trace(model, (digits(2),))
    low = qpasses.PassManager("lower", device="cpu").run(gm)
    assert not kernel_targets(low)
    fq = qpasses.PassManager("ptq_int8").run(gm, data=datasets.calib_batches(n=32))
    with pytest.raises(QPassesError, match="out_dtype"):
        qpasses.PassManager("lower", device="cpu", out_dtype="int3").run(fq)


@pytest.mark.parametrize("group_size,symmetric", [(32, True), (64, False), (128, True)])
def test_w4a16_lowered_to_int4_kernel(group_size, symmetric):
    torch.manual_seed(4)
    model = zoo.MLP().eval()
    x = digits(32)
    gm = qpasses.trace(model, (x[:2],))
    fq = qpasses.PassManager("w4a16", group_size=group_size, symmetric=symmetric).run(gm)
    mods = [quantizer_module(fq, n, None) for n in fake_quant_modules(fq)]
    assert len(mods) == 3 and all(isinstance(m, Int4GroupFakeQuantize) and m.group_size == group_size for m in mods)
    low = qpasses.PassManager("lower", device="cpu").run(fq)
    assert kernel_targets(low).count(Q.int4_weight_only_linear.default) == 3
    with torch.no_grad():
        want, got, dense = fq(x), low(x), model(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6
    assert (got - dense).abs().max() < 0.2 * dense.abs().max()     # int4 is close to the float model
    with torch.no_grad(), kops.triton_policy("always"):
        tri = low(x[:3])
    assert (tri - want[:3]).abs().max() <= 1e-5 * want.abs().max() + 1e-6


def test_w4a16_cnn_lowers_the_linear_and_keeps_convs_float(cnn):
    x = digits(100)
    gm = qpasses.trace(cnn, (x[:2],))
    pm = qpasses.PassManager(["w4a16", "lower"], group_size=32, device="cpu")
    low = pm.run(gm)
    t = kernel_targets(low)
    assert t == [Q.int4_weight_only_linear.default]
    with torch.no_grad():
        assert (low(x).argmax(1) == cnn(x).argmax(1)).float().mean() > 0.95


def test_bnn_binary_layers_are_packed_and_edges_lowered():
    torch.manual_seed(5)
    model = zoo.MLP().eval()
    x = digits(32)
    gm = qpasses.trace(model, (x[:2],))
    data = datasets.calib_batches(n=64)
    fq = qpasses.PassManager("bnn", learnable=False).run(gm, data=data)
    pm = qpasses.PassManager("lower", device="cpu")
    low = pm.run(fq)
    assert kernel_targets(low).count(Q.int8_linear.default) == 2      # first and last layers (8 bit)
    assert rule_row(pm, "lower_binary_layer")["rewrites"] == 1
    with torch.no_grad():
        assert (low(x) - fq(x)).abs().max() <= 1e-4 * fq(x).abs().max()


def test_quantize_int8_codes_equal_fake_quant_codes():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1000, generator=g) * 3
    x[:5] = torch.tensor([0.5, 1.5, -2.5, 1e9, -1e9]) * 0.1       # ties and saturation
    for (s, zp, qmin, qmax, off) in [(0.1, 3, 0, 255, 128), (0.02, 0, -128, 127, 0), (0.05, -7, -127, 127, 0)]:
        q = Q.quantize_int8(x, s, zp, qmin, qmax, off)
        assert q.dtype == torch.int8
        fqv = torch.fake_quantize_per_tensor_affine(x, s, zp, qmin, qmax)
        assert torch.equal((q.float() + off - zp) * s, fqv)
    with pytest.raises(ValueError, match="int8"):
        Q.quantize_int8(x, 0.1, 0, 0, 255, 0)


def test_custom_ops_opcheck_and_lowered_graph_exports():
    x = torch.randn(3, 5)
    torch.library.opcheck(Q.quantize_int8.default, (x, 0.05, 4, 0, 255, 128))
    model = zoo.MLP().eval()
    xd = digits(4)
    _, _, low, _ = quantize_and_lower(model, xd[:2], "fx")
    ep = torch.export.export(low, (xd,))
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "qpasses.int8_linear.default" in names and "qpasses.quantize_int8.default" in names
    with torch.no_grad():
        assert torch.allclose(ep.module()(xd), low(xd))


def test_int_only_graph_runs_bit_exact_on_the_triton_kernels(cnn, monkeypatch):
    """int_only lowers straight to the requantizing kernel ops; `lower` after it has nothing left
    to do, and the Triton kernels reproduce the integer reference bit for bit."""
    from qpasses.lang.rules import available_names
    if "int_only" not in available_names():
        pytest.skip("the int_only recipe is not in this checkout")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = digits(3)
    gm = qpasses.trace(cnn, (x[:2],))
    pm = qpasses.PassManager(["int_only", "lower"], device="cpu")
    low = pm.run(gm, data=datasets.calib_batches(n=64))
    t = kernel_targets(low)
    assert t.count(Q.int8_conv2d_requant.default) == 3 and t.count(Q.int8_linear_requant.default) == 1
    assert rule_row(pm, "lower_quantized_weighted")["rewrites"] == 0
    with torch.no_grad():
        ref = low(x)
        with kops.triton_policy("always"):
            tri = low(x)
    assert torch.equal(tri, ref)


@pytest.mark.parametrize("name,cls", [("transformer", zoo.TransformerEncoderBlock),
                                      ("mobilenetv2", zoo.MobileNetV2Like)])
def test_zoo_models_lower_every_quantized_layer(name, cls):
    """aten-level transformer (3-d linear inputs) and MobileNetV2 (depthwise convs, residual adds)."""
    torch.manual_seed(7)
    model = cls().eval()
    x = zoo.example_input(name)
    gm = qpasses.trace(model, (x,))
    fq = qpasses.PassManager("ptq_int8").run(gm, data=[x + 0.1 * torch.randn_like(x) for _ in range(2)])
    pm = qpasses.PassManager("lower", device="cpu")
    low = pm.run(fq)
    row = rule_row(pm, "lower_quantized_weighted")
    assert row["rewrites"] == row["candidates"] and row["refused"] == 0 and row["rewrites"] >= 6
    assert not fake_quant_modules(low)
    with torch.no_grad():
        a, b = fq(x), low(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_four_bit_weights_from_ptq_int8_run_on_the_int8_kernel():
    torch.manual_seed(8)
    model = zoo.MLP().eval()
    x = digits(32)
    gm = qpasses.trace(model, (x[:2],))
    fq = qpasses.PassManager("ptq_int8", w_bits=4).run(gm, data=datasets.calib_batches(n=64))
    low = qpasses.PassManager("lower", device="cpu").run(fq)
    codes = [getattr(low, n.target) for n in low.graph.nodes
             if n.op == "get_attr" and n.target.startswith("lowered_w_")]
    assert len(codes) == 3 and all(int(c.abs().max()) <= 7 for c in codes)
    with torch.no_grad():
        assert (low(x) - fq(x)).abs().max() <= 1e-5 * fq(x).abs().max()


def test_one_quantize_node_per_shared_activation_and_lowering_twice_is_a_no_op():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x) + self.b(x)

    torch.manual_seed(9)
    x = torch.randn(16, 8)
    gm = qpasses.trace(TwoHeads().eval(), (x,))
    fq = qpasses.PassManager("ptq_int8").run(gm, data=[x])
    low = qpasses.PassManager("lower", device="cpu").run(fq)
    t = kernel_targets(low)
    assert t.count(Q.quantize_int8.default) == 1 and t.count(Q.int8_linear.default) == 2
    with torch.no_grad():
        assert (low(x) - fq(x)).abs().max() <= 1e-5 * fq(x).abs().max()
    again = qpasses.PassManager("lower", device="cpu").run(low)
    assert kernel_targets(again) == t


def test_lower_names_the_weight_quantizer_it_has_no_kernel_for():
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    gm = qpasses.trace(zoo.MLP().eval(), (x,))
    pm = qpasses.PassManager(["canonicalize", "observe", "aciq", "lower_triton"], device="cpu")
    out = pm.run(gm, data=[x])
    st = pm.report["lower_quantized_weighted"]
    assert st.rewrites == 0 and st.n_refused == st.matches > 0
    assert all("read through ChannelBitsFakeQuant, which has no kernel" in why for _, why in st.refused)
    torch.testing.assert_close(out(x), qpasses.PassManager(["canonicalize", "observe", "aciq"]).run(gm, data=[x])(x))


@pytest.mark.parametrize("name,level", [("mlp", "fx"), ("transformer", "export")])
def test_dynamic_int8_linears_lowered_to_the_dynamic_kernel(name, level):
    from qpasses.methods.dynamic.lib import dynamic_linear_quantizers
    torch.manual_seed(0)
    model = zoo.MODELS[name]().eval()
    x = zoo.example_input(name, 4)
    gm = qpasses.trace(model, (x,), mode=level)
    dyn = qpasses.PassManager("dynamic_int8").run(gm)
    n_dyn = sum(dynamic_linear_quantizers(dyn, n) is not None for n in dyn.graph.nodes)
    pm = qpasses.PassManager("lower", device="cpu")
    low = pm.run(dyn)
    assert n_dyn > 0 and kernel_targets(low).count(Q.dynamic_int8_linear.default) == n_dyn
    assert not any(dynamic_linear_quantizers(low, n) is not None for n in low.graph.nodes)
    assert rule_row(pm, "lower_dynamic_linear")["rewrites"] == n_dyn
    xs = zoo.example_input(name, 3, seed=1)                     # another batch size: qparams come from the batch
    with torch.no_grad():
        want = dyn(xs)
        with kops.triton_policy("never"):
            got = low(xs)
        with kops.triton_policy("always"):
            tri = low(xs)
    # same integer codes; the fake-quant graph sums them with the float GEMM, the kernel exactly
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(tri, got)                                 # Triton (interpreted) == reference, bit for bit
    # composed in one PassManager, and a second lowering finds nothing left
    low2 = qpasses.PassManager(["dynamic_int8", "lower"], device="cpu").run(gm)
    with torch.no_grad():
        assert torch.equal(low2(xs), got)
    pm3 = qpasses.PassManager("lower", device="cpu")
    pm3.run(low)
    assert rule_row(pm3, "lower_dynamic_linear")["candidates"] == 0


def test_dynamic_lowering_skip_out_dtype_and_export():
    from qpasses.methods.dynamic.lib import dynamic_linear_quantizers
    model = zoo.MLP().eval()
    x = digits(4)
    dyn = qpasses.PassManager("dynamic_int8", granularity="per_tensor", symmetric=True).run(
        qpasses.trace(model, (x,)))
    first = next(n for n in dyn.graph.nodes if dynamic_linear_quantizers(dyn, n) is not None)
    pm = qpasses.PassManager("lower", device="cpu", skip=[first.name])
    low = pm.run(dyn)
    assert sum(dynamic_linear_quantizers(low, n) is not None for n in low.graph.nodes) == 1
    assert kernel_targets(low).count(Q.dynamic_int8_linear.default) == 2
    assert "in skip" in str(pm.report.to_dict())
    bf = qpasses.PassManager("lower", device="cpu", out_dtype="bfloat16").run(dyn)
    with torch.no_grad():
        assert bf(x).dtype == torch.bfloat16
        torch.testing.assert_close(bf(x).float(), dyn(x), rtol=2e-2, atol=2e-2)
    full = qpasses.PassManager("lower", device="cpu").run(dyn)
    ep = torch.export.export(full, (x,))
    assert Q.dynamic_int8_linear.default in {n.target for n in ep.graph.nodes if n.op == "call_function"}
    with torch.no_grad():
        assert torch.equal(ep.module()(x), full(x))


def test_cpu_graph_refused_by_default_with_pointer_to_compile():
    """``lower`` targets CUDA: on a CPU graph the reference kernels are slower than float, so each
    layer is refused, the reason points to qpasses.compile, and the graph stays fake-quant."""
    torch.manual_seed(1)
    model = zoo.MLP().eval()
    x = digits()
    gm = qpasses.trace(model, (x[:2],))
    fq = qpasses.PassManager("ptq_int8").run(gm, data=datasets.calib_batches(n=64))
    pm = qpasses.PassManager("lower")
    low = pm.run(fq)
    assert not kernel_targets(low) and len(fake_quant_modules(low)) == len(fake_quant_modules(fq))
    row = pm.report["lower_quantized_weighted"]
    assert row.rewrites == 0 and row.n_refused == 3
    assert all("qpasses.compile" in why and "device='cpu'" in why for _, why in row.refused)
    dyn = qpasses.PassManager("dynamic_int8").run(gm)
    pm = qpasses.PassManager("lower")
    pm.run(dyn)
    assert pm.report["lower_dynamic_linear"].rewrites == 0
    assert all("qpasses.compile" in why for _, why in pm.report["lower_dynamic_linear"].refused)
    with torch.no_grad():
        assert torch.equal(low(x), fq(x))


def test_cuda_graph_lowered_by_default(monkeypatch):
    """The default (``device='cuda'``) lowers a layer whose weight is on a CUDA device: the
    device lookup is faked here (no GPU on CI); the kernels then run their CPU references."""
    import qpasses.methods.lower.actions as lower_actions
    monkeypatch.setattr(lower_actions, "_weight_device", lambda ctx, op: torch.device("cuda", 0))
    torch.manual_seed(1)
    x = digits()
    gm = qpasses.trace(zoo.MLP().eval(), (x[:2],))
    fq = qpasses.PassManager("ptq_int8").run(gm, data=datasets.calib_batches(n=64))
    pm = qpasses.PassManager("lower")
    low = pm.run(fq)
    assert kernel_targets(low).count(Q.int8_linear.default) == 3
    assert pm.report["lower_quantized_weighted"].n_refused == 0
