"""QDQ ONNX export: onnx.checker, onnxruntime CPU, agreement with the fake-quant graph."""
from __future__ import annotations


import numpy as np
import onnx
import pytest
import torch

import qpasses
from qpasses import datasets, zoo
from qpasses.onnx import ExportError, export_onnx, run_onnx

from conftest import duplicate_act_fake_quants
from qpasses.qnodes import quantizer_module

torch.set_num_threads(1)


def _agree(onnx_out: np.ndarray, ref: torch.Tensor, frac: float = 0.99):
    """At most one quantization step (of an 8-bit grid over the output range) apart on >= frac of values."""
    ref = ref.detach().numpy()
    step = (ref.max() - ref.min()) / 255
    within = (np.abs(onnx_out - ref) <= step + 1e-6).mean()
    assert within >= frac, f"only {within:.3%} of outputs within one step ({step:.3g})"


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _ptq(model, x, level="fx", **opt):
    gm = qpasses.trace(model.eval(), (x,), mode=level)
    return gm, qpasses.PassManager("ptq_int8", **opt).run(gm, data=[x, x * 0.5])


@pytest.mark.parametrize("name,cls", [("resnet", zoo.ResNetLike), ("mlp", zoo.MLP), ("mobilenetv2", zoo.MobileNetV2Like)])
def test_zoo_models_export_and_agree(tmp_path, level, name, cls):
    torch.manual_seed(0)
    x = zoo.example_input(name, batch=8)
    gm, q = _ptq(cls(), x, level)
    path = tmp_path / f"{name}.onnx"
    before_code, before_out = q.code, q(x).detach().clone()
    model = export_onnx(q, x, path)
    assert q.code == before_code and torch.equal(q(x), before_out)  # the exported graph is left untouched
    onnx.checker.check_model(onnx.load(path), full_check=True)
    ops = _ops(model)
    n_weighted = sum(1 for n in q.graph.nodes if "weight" in n.meta.get("qpasses.quant", {}))
    assert ops.count("QuantizeLinear") >= 1
    assert ops.count("DequantizeLinear") >= n_weighted + ops.count("QuantizeLinear")
    ints = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len([i for i in ints if len(i.dims) >= 2]) == n_weighted  # one int8 weight per weighted op
    _agree(run_onnx(str(path), x)[0], q(x))
    # other batch sizes work (dynamic batch) and the input graph is untouched
    x2 = zoo.example_input(name, batch=3, seed=1)
    _agree(run_onnx(model, x2)[0], q(x2))
    assert "weight_fq" not in str(gm.graph)


def test_digits_cnn_accuracy_matches_fake_quant(tmp_path):
    m = datasets.train_digits_cnn()
    xt, yt = datasets.load_digits_tensors("test")
    gm = qpasses.trace(m, xt[:4])
    q = qpasses.PassManager("ptq_int8").run(gm, data=datasets.calib_batches())
    model = export_onnx(q, xt[:4], tmp_path / "d.onnx")
    out = run_onnx(model, xt)[0]
    _agree(out, q(xt))
    acc_onnx = (out.argmax(1) == yt.numpy()).mean()
    acc_fq = (q(xt).argmax(1) == yt).float().mean().item()
    assert abs(acc_onnx - acc_fq) <= 0.004 and acc_onnx > 0.97
    assert "BatchNormalization" not in _ops(model)


def test_int4_weights_at_opset_21_and_int8_containers_before():
    torch.manual_seed(0)
    x = zoo.example_input("mlp", 8)
    _, q = _ptq(zoo.MLP(), x, w_bits=4)
    m21 = export_onnx(q, x, opset=21)
    m17 = export_onnx(q, x, opset=17)
    assert any(i.data_type == onnx.TensorProto.INT4 for i in m21.graph.initializer)
    assert not any(i.data_type == onnx.TensorProto.INT4 for i in m17.graph.initializer)
    assert m21.opset_import[0].version == 21 and m17.opset_import[0].version == 17
    for m in (m21, m17):
        _agree(run_onnx(m, x)[0], q(x))


def test_low_bit_activations_are_clipped():
    torch.manual_seed(0)
    x = zoo.example_input("mlp", 16)
    _, q = _ptq(zoo.MLP(), x, a_bits=4)
    for opset in (17, 21):  # 4-bit activation codes in uint8 containers + Clip to [qmin, qmax] by default
        m = export_onnx(q, x, opset=opset)
        assert "Clip" in _ops(m)
        _agree(run_onnx(m, x)[0], q(x))
    from qpasses.onnx import ort_session
    m4 = export_onnx(q, x, opset=21, int4_activations=True)  # UINT4 Q/DQ: valid ONNX, no Clip
    assert "Clip" not in _ops(m4)
    assert any(i.data_type == onnx.TensorProto.UINT4 for i in m4.graph.initializer)
    _agree(run_onnx(m4, x, session=ort_session(m4, optimize=False))[0], q(x))


def test_float_graph_exports_and_matches():
    torch.manual_seed(0)
    x = zoo.example_input("resnet", 4)
    m = zoo.ResNetLike().eval()
    model = export_onnx(qpasses.trace(m, x), x)
    assert "QuantizeLinear" not in _ops(model)
    np.testing.assert_allclose(run_onnx(model, x)[0], m(x).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_redundant_qdq_pairs_are_removed():
    torch.manual_seed(0)
    x = zoo.example_input("mlp", 8)
    _, q = _ptq(zoo.MLP(), x)
    duplicate_act_fake_quants(q)
    raw = export_onnx(q, x, cleanup=False)
    clean = export_onnx(q, x)
    consts = {i.name for i in raw.graph.initializer}       # weights' Q nodes are folded by the clean-up too
    act_q = [n for n in raw.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts]
    assert len(act_q) == 2 * _ops(clean).count("QuantizeLinear")
    np.testing.assert_allclose(run_onnx(clean, x)[0], run_onnx(raw, x)[0], atol=1e-6)


def test_errors_name_the_problem():
    x = torch.randn(2, 4)
    with pytest.raises(ExportError, match="GraphModule"):
        export_onnx("model.pt", x)
    lin = torch.nn.Linear(4, 2)  # a plain module is traced first
    np.testing.assert_allclose(run_onnx(export_onnx(lin, x), x)[0], lin(x).detach().numpy(), atol=1e-6)
    gm = qpasses.trace(torch.nn.Linear(4, 2), x)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(gm, x, opset=10)

    class Odd(torch.nn.Module):                  # ops torchlib has no translation for: every node is listed
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(4, 4)

        def forward(self, x):
            a = torch.cummax(self.l(x), 1)[0]
            return a + torch.kthvalue(x, 2, 1, keepdim=True)[0] + torch.cummax(x, 1)[0]
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(Odd().eval(), x), data=[x])
    with pytest.raises(ExportError, match=r"(?s)3 node\(s\).*cummax.*'cummax', 'cummax_1'.*kthvalue.*'kthvalue'"):
        export_onnx(q, x)
    assert issubclass(ExportError, qpasses.QPassesError)


def test_public_entry_point(tmp_path):
    x = torch.randn(2, 4)
    gm = qpasses.trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), x)
    q = qpasses.PassManager("ptq_int8").run(gm, data=[x])
    m = qpasses.export_onnx(q, x, tmp_path / "p.onnx")
    assert (tmp_path / "p.onnx").exists() and "QuantizeLinear" in _ops(m)


# ----------------------------------------------------------------------------- other recipes

def _recipe(name, model, x, **opt):
    return qpasses.PassManager(name, **opt).run(qpasses.trace(model.eval(), x), data=[x, x * 0.5])


def _out_step(q, ref):
    """One quantization step of the output: its fake quant's scale when it has one, else range / 255."""
    last = [n for n in q.graph.nodes if n.op == "output"][0].args[0]
    mod = quantizer_module(q, last, None) if True else None
    r = ref.detach()
    return max(float(getattr(mod, "scale", torch.tensor(0.0)).max()), float(r.max() - r.min()) / 255)


@pytest.mark.parametrize("recipe,opt", [("mixed_ptq", {}), ("bnn", {}), ("int_only", {"integerize": False}),
                                        ("dynamic_int8", {}), ("w4a16", {"group_size": 32}), ("aciq4", {})])
def test_recipes_with_fake_quant_graphs_export(recipe, opt):
    torch.manual_seed(0)
    x = zoo.example_input("mlp", 16)
    q = _recipe(recipe, zoo.MLP(), x, **opt)
    model = export_onnx(q, x)
    ref = q(x)
    from qpasses.onnx import ort_session
    # exact ONNX semantics (ORT's basic optimisations only) ...
    exact = run_onnx(model, x, session=ort_session(model, optimize=False))[0]
    step = _out_step(q, ref)
    assert (np.abs(exact - ref.detach().numpy()) <= step + 1e-6).mean() >= 0.99
    # ... and ORT's fused integer kernels: a rare code flip, at most a few steps
    full = run_onnx(model, x)[0]
    assert (np.abs(full - ref.detach().numpy()) <= step + 1e-6).mean() >= 0.95
    ops = _ops(model)
    assert "DequantizeLinear" in ops
    if recipe == "w4a16":
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert any(a.name == "block_size" and a.i == 32 for n in dq for a in n.attribute)
        assert any(i.data_type == onnx.TensorProto.UINT4 for i in model.graph.initializer)


def test_qat_exports_after_qat_convert():
    torch.manual_seed(0)
    m = zoo.DigitsCNN().eval()
    x = zoo.example_input("digits_cnn", 8)
    q = _recipe("qat", m, x)
    with pytest.raises(ExportError, match="qat_convert"):
        export_onnx(q, x)
    q.eval()
    q2 = qpasses.PassManager("qat_convert").run(q)
    _agree(run_onnx(export_onnx(q2, x), x)[0], q2(x))


def test_integer_kernel_graphs_are_refused_with_a_hint():
    torch.manual_seed(0)
    x = zoo.example_input("mlp", 8)
    q = _recipe("int_only", zoo.MLP(), x)
    with pytest.raises(ExportError, match="integerize=false"):
        export_onnx(q, x)


def test_transformer_block_exports_from_torch_export_graph():
    torch.manual_seed(0)
    x = zoo.example_input("transformer", 2)
    gm, q = _ptq(zoo.TransformerEncoderBlock(), x, "auto")  # fx fails on this block: aten-level graph
    assert q.meta.get("qpasses.level") == "aten"
    model = export_onnx(q, x)
    ops = _ops(model)
    assert {"LayerNormalization", "Softmax", "MatMul", "QuantizeLinear"} <= set(ops)
    _agree(run_onnx(model, x)[0], q(x))
    old = export_onnx(q, x, opset=17)  # torch.onnx exports at 18; onnx's version converter goes down to 17
    assert old.opset_import[0].version == 17
    _agree(run_onnx(old, x)[0], q(x))
    with pytest.raises(ExportError, match="LayerNormalization"):   # ... but not below the op's first opset
        export_onnx(q, x, opset=13)


def test_shape_queries_are_static_and_batch_stays_dynamic():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(1, 4, 3)
            self.fc = torch.nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            y = self.c(x)
            return self.fc(y.view(y.size(0), -1)).softmax(-1)

    torch.manual_seed(0)
    x = torch.randn(5, 1, 8, 8)
    _, q = _ptq(M(), x)
    model = export_onnx(q, x)
    x2 = torch.randn(3, 1, 8, 8)
    _agree(run_onnx(model, x2)[0], q(x2))


@pytest.mark.slow
@pytest.mark.parametrize("recipe,opt", [
    ("haq", {"episodes": 2}),
    ("adaround", {"recon_iters": 5}),
    ("genie", {"distill_iters": 3, "recon_iters": 3, "samples": 64}),
])
def test_data_hungry_recipes_export(recipe, opt):
    """Recipes with search / reconstruction / distillation steps end in plain fake-quant graphs."""
    m = datasets.train_digits_cnn()
    calib = datasets.calib_batches()
    x = calib[0]
    q = qpasses.PassManager(recipe, **opt).run(qpasses.trace(m, x), data=calib)
    q.eval()
    model = export_onnx(q, x)
    from qpasses.onnx import ort_session
    exact = run_onnx(model, x, session=ort_session(model, optimize=False))[0]
    _agree(exact, q(x))
    full = run_onnx(model, x)[0]
    _agree(full, q(x), frac=0.95)


def test_several_inputs_outputs_and_indexing():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)

        def forward(self, x, y):
            h = self.a(x) + self.b(y)
            return h, torch.cat([h, x[:, :3]], 1) * 2 - 1, x[..., 1], y[:, None, 1:4:2]

    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randn(6, 5)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(M().eval(), (x, y)), data=[(x, y)])
    model = export_onnx(q, (x, y), output_names=["h", "cat"])
    assert [i.name for i in model.graph.input] == ["x", "y"]
    assert [o.name for o in model.graph.output] == ["h", "cat", "output_2", "output_3"]
    x2, y2 = torch.randn(3, 4), torch.randn(3, 5)
    for got, ref in zip(run_onnx(model, x2, y2), q(x2, y2)):
        _agree(got, ref)


class _Activations(torch.nn.Module):
    """Every activation the exporter maps, as modules and as functionals (with non-default arguments)."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(4 if i else 3, 4, 3, padding=1) for i in range(7))
        self.acts = torch.nn.ModuleList([torch.nn.Hardswish(), torch.nn.Hardsigmoid(), torch.nn.LeakyReLU(0.2),
                                         torch.nn.ELU(0.7), torch.nn.Softplus(beta=2.0), torch.nn.Mish()])

    def forward(self, x):
        F = torch.nn.functional
        fns = [F.hardswish, F.hardsigmoid, lambda t: F.leaky_relu(t, 0.05), lambda t: F.elu(t, alpha=1.3),
               F.softplus, F.mish]
        for conv, act, fn in zip(self.convs, self.acts, fns):
            x = fn(act(conv(x)))
        return self.convs[6](x)


@pytest.mark.parametrize("opset", [18, 21])
def test_activations_export(level, opset):
    torch.manual_seed(0)
    m = _Activations().eval()
    x = torch.randn(4, 3, 8, 8)
    gm = qpasses.trace(m, (x,), mode=level)
    fl = export_onnx(gm, x, opset=opset)                         # float: the same function, to float rounding
    np.testing.assert_allclose(run_onnx(fl, x)[0], m(x).detach().numpy(), atol=1e-5, rtol=1e-4)
    ops = set(_ops(fl))
    assert {"HardSigmoid", "LeakyRelu", "Elu"} <= ops
    q = qpasses.PassManager("ptq_int8").run(gm, data=[x, x * 0.5])
    _agree(run_onnx(export_onnx(q, x, opset=opset), x)[0], q(x))


class _Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.n, self.l = torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)

    def forward(self, ids):
        return self.l(self.n(self.e(ids)).mean(1))


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.l = torch.nn.MultiheadAttention(16, 2, batch_first=True), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.l(self.a(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("cls,make", [(_Bag, lambda b: torch.randint(0, 50, (b, 7))),
                                      (_Attention, lambda b: torch.randn(b, 5, 16))])
def test_embedding_and_attention_export_with_a_dynamic_batch(level, cls, make):
    """Gather for embeddings; nn.MultiheadAttention (a leaf module of the fx graph, or the aten ops
    torch.export decomposes it into) with symbolic sizes that follow the batch."""
    torch.manual_seed(0)
    m = cls().eval()
    x = make(4)
    gm = qpasses.trace(m, (x,), mode=level)
    fl = export_onnx(gm, x)
    q = qpasses.PassManager("ptq_int8").run(gm, data=[x])
    qm = export_onnx(q, x)
    for b in (4, 3):                                      # the example's batch and another one
        xb = make(b)
        np.testing.assert_allclose(run_onnx(fl, xb)[0], m(xb).detach().numpy(), atol=1e-5, rtol=1e-4)
        _agree(run_onnx(qm, xb)[0], q(xb))
    assert "Gather" in _ops(fl)


def test_tensors_built_from_the_batch_size_keep_the_batch_dynamic():
    """torch.export keeps ``x.size(0)`` symbolic: a tensor made from it follows the batch in ONNX."""
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.l(x) * torch.ones(x.size(0), 1)      # a tensor made from the batch size

    x = torch.randn(4, 8)
    gm = qpasses.trace(Masked().eval(), (x,))
    model = export_onnx(gm, x)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for b in (4, 7):
        xb = torch.randn(b, 8)
        np.testing.assert_allclose(run_onnx(model, xb)[0], gm(xb).detach().numpy(), atol=1e-6)
    static = export_onnx(gm, x, dynamic_batch=False)
    assert static.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4


@pytest.mark.parametrize("kind", ["plain", "causal", "bool_mask", "float_mask"])
def test_scaled_dot_product_attention_exports(level, kind):
    F = torch.nn.functional

    class Sdpa(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k, self.v = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
            g = torch.Generator().manual_seed(0)
            self.register_buffer("bmask", torch.rand(6, 6, generator=g) > 0.3)
            self.bmask[:, 0] = True                       # no fully masked row
            self.register_buffer("fmask", torch.randn(6, 6, generator=g))

        def forward(self, x):
            k, v = self.k(x), self.v(x)
            if kind == "causal":
                return F.scaled_dot_product_attention(x, k, v, is_causal=True, scale=0.5)
            mask = {"bool_mask": self.bmask, "float_mask": self.fmask}.get(kind)
            return F.scaled_dot_product_attention(x, k, v, attn_mask=mask)

    torch.manual_seed(0)
    m = Sdpa().eval()
    x = torch.randn(2, 3, 6, 8)
    model = export_onnx(qpasses.trace(m, (x,), mode=level), x)
    for b in (2, 5):
        xb = torch.randn(b, 3, 6, 8)
        np.testing.assert_allclose(run_onnx(model, xb)[0], m(xb).detach().numpy(), atol=1e-5, rtol=1e-4)
