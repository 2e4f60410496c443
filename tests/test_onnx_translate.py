"""The ONNX translations of the qpasses quantizer ops (qpasses/onnx/translate.py), checked in
onnxruntime against the ops themselves, the registry, weight folding and ORT-fusable placement."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import qpasses
from qpasses.onnx import ExportError, export_onnx, ort_session, quantize_for_onnx, run_onnx
from qpasses.onnx import translate
from qpasses.qnodes import quantizer_module

torch.set_num_threads(1)
Q = torch.ops.qpasses


class _Op(torch.nn.Module):
    """Calls one quantizer op on its input with buffers for the tensor parameters."""

    def __init__(self, fn, **buffers):
        super().__init__()
        self.fn = fn
        for k, v in buffers.items():
            self.register_buffer(k, v)

    def forward(self, x):
        return self.fn(self, x)


def _run(model, *xs, opset=21, **kw):
    """Export ``model`` (traced) and run it in onnxruntime without graph optimisations."""
    gm = qpasses.trace(model.eval(), xs if len(xs) > 1 else xs[0])
    m = export_onnx(gm, xs if len(xs) > 1 else xs[0], opset=opset, **kw)
    return m, run_onnx(m, *xs, session=ort_session(m, optimize=False))


def _ops(m):
    return [n.op_type for n in m.graph.node]


def _steps_apart(got, ref, scale):
    return np.abs(np.asarray(got) - ref.detach().numpy()) / scale


def test_registry_covers_every_quantizer_op_and_accepts_new_ones():
    table = translate.translation_table()
    for name in ("fake_quant_per_tensor", "fake_quant_per_channel", "fake_quant_per_group",
                 "fake_quant_lsq_per_tensor", "fake_quant_lsq_per_channel", "fake_quant_per_token",
                 "quantize_per_token"):
        assert getattr(Q, name).default in table, name
    with pytest.raises(TypeError, match="OpOverload"):
        translate.register_translation("qpasses::fake_quant_per_tensor", lambda x: x)
    table[Q.fake_quant_per_tensor.default] = None        # a copy: the registry is unchanged
    assert translate.translation_table()[Q.fake_quant_per_tensor.default] is not None


def test_narrow_range_in_uint8_is_clipped_exactly():
    """[0, 15] in a uint8 container: QuantizeLinear alone would saturate at 255 (torchlib's
    quantize_per_tensor drops quant_min / quant_max); the translation clips to the range."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g) * 3
    s, z = torch.tensor(0.1), torch.tensor(3, dtype=torch.int32)
    mod = _Op(lambda m, t: Q.fake_quant_per_tensor(t, m.s, m.z, 0, 15), s=s, z=z)
    m, (got,) = _run(mod, x)
    assert "Clip" in _ops(m)
    ref = mod(x)
    assert float(ref.max()) == pytest.approx((15 - 3) * 0.1) and float(ref.min()) == pytest.approx(-0.3)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-6)
    m4, (got4,) = _run(mod, x, int4_activations=True)       # UINT4 Q/DQ at opset 21: no Clip
    assert "Clip" not in _ops(m4)
    np.testing.assert_allclose(got4, ref.numpy(), atol=1e-6)


def test_per_channel_signed_narrow_range_on_an_activation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 5, generator=g) * 4
    s = torch.rand(6, generator=g) * 0.05 + 0.01
    mod = _Op(lambda m, t: Q.fake_quant_per_channel(t, m.s, m.z, -2, -127, 127), s=s,
              z=torch.zeros(6, dtype=torch.int32))
    m, (got,) = _run(mod, x)
    ref = mod(x)
    assert float(_steps_apart(got, ref, s.reshape(1, 6, 1).numpy()).max()) <= 1.0 + 1e-4   # ties only
    assert (np.abs(np.asarray(got) - ref.numpy()) < 1e-6).mean() > 0.99
    assert ref.abs().max() <= 127 * s.max() + 1e-6


def test_group_wise_activation_is_a_blocked_qdq():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, generator=g)
    s = torch.rand(4, 2, generator=g) * 0.2 + 0.05
    z = torch.randint(0, 16, (4, 2), generator=g, dtype=torch.int32)
    mod = _Op(lambda m, t: Q.fake_quant_per_group(t, m.s, m.z, 32, 0, 15), s=s, z=z)
    gm = qpasses.trace(mod.eval(), x)
    m = export_onnx(gm, x, dynamic_batch=False)        # blocked parameters have the batch's shape
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert any(a.name == "block_size" and a.i == 32 for n in dq for a in n.attribute)
    got = run_onnx(m, x, session=ort_session(m, optimize=False))[0]
    np.testing.assert_allclose(got, mod(x).numpy(), atol=1e-6)
    with pytest.raises(ExportError, match="opset 21"):
        export_onnx(gm, x, opset=18, dynamic_batch=False)


def test_lsq_ops_export_at_their_current_scale():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, generator=g)
    s = torch.tensor(-0.05)                         # LSQ uses max(|scale|, eps): a negative scale works
    mod = _Op(lambda m, t: Q.fake_quant_lsq_per_tensor(t, m.s, m.z, -8, 7), s=s, z=torch.tensor(0))
    _, (got,) = _run(mod, x)
    np.testing.assert_allclose(got, mod(x).numpy(), atol=1e-6)
    sc = torch.rand(4, generator=g) * 0.1 + 0.02
    modc = _Op(lambda m, t: Q.fake_quant_lsq_per_channel(t, m.s, m.z, 1, 0, 255), s=sc,
               z=torch.full((4,), 128, dtype=torch.int32))
    _, (gotc,) = _run(modc, x)
    np.testing.assert_allclose(gotc, modc(x).numpy(), atol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_dynamic_per_token_ops(symmetric):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 16, generator=g) * torch.linspace(0.1, 3, 5).reshape(1, 5, 1)
    lo, hi = (-127, 127) if symmetric else (0, 255)
    mod = _Op(lambda m, t: Q.fake_quant_per_token(t, lo, hi, symmetric))
    m, (got,) = _run(mod, x)
    ref = mod(x)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-6)
    assert "QuantizeLinear" in _ops(m)                           # one block per row at opset 21
    m18, (got18,) = _run(mod, x, opset=18)                       # the same arithmetic as float ops
    assert "QuantizeLinear" not in _ops(m18)
    np.testing.assert_allclose(got18, ref.numpy(), atol=1e-6)
    x2 = torch.randn(3, 5, 16, generator=g)                      # the batch stays dynamic
    np.testing.assert_allclose(run_onnx(m, x2, session=ort_session(m, optimize=False))[0], mod(x2).numpy(),
                               atol=1e-6)
    codes = _Op(lambda m, t: Q.quantize_per_token(t, lo, hi, symmetric))
    _, outs = _run(codes, x)
    for o, r in zip(outs, codes(x)):
        np.testing.assert_array_equal(np.asarray(o), r.numpy())


def test_weight_quantizers_fold_into_integer_initializers_with_the_modules_codes():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(6, 16)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(lin, x), data=[x])
    m = export_onnx(q, x)
    assert "QuantizeLinear" in _ops(m)
    consts = {i.name: i for i in m.graph.initializer}
    q_inputs = [n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert not any(i in consts for i in q_inputs)               # no Q left on a constant
    ints = sorted((i for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2),
                  key=lambda i: -i.dims[0])
    from qpasses.numerics import FakeQuantize
    wfq = [mod for name, mod in q.named_modules() if isinstance(mod, FakeQuantize) and mod.axis is not None]
    weights = [lin[0].weight, lin[2].weight]
    assert len(ints) == 2
    for init, fq, w in zip(ints, sorted(wfq, key=lambda f: -f.scale.numel()), weights):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(init), fq.int_repr(w).numpy())


def test_integer_kernel_graphs_are_refused_naming_every_op():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    q = qpasses.PassManager("int_only").run(qpasses.trace(m, x), data=[x])
    with pytest.raises(ExportError, match=r"(?s)integer kernel op.*integerize=false"):
        export_onnx(q, x)


def test_ort_fusable_placement_fuses_every_conv():
    """quantize_for_onnx (ptq_int8 with ort_fusable): each Conv / Add / Gemm is DQ -> op -> Q, which
    onnxruntime turns into QLinearConv / QLinearAdd / QGemm; plain ptq_int8's placement leaves float convs."""
    import os
    import tempfile

    import onnxruntime as ort
    from qpasses import zoo
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    gm = qpasses.trace(zoo.ResNetLike(in_ch=3).eval(), x)
    n_conv = sum(1 for n in gm.graph.nodes if isinstance(quantizer_module(gm, n, None),
                                                                                     torch.nn.Conv2d))

    def fused(qgm, path):
        model = export_onnx(qgm, x)
        so = ort.SessionOptions()
        so.optimized_model_filepath = path
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return model, [n.op_type for n in onnx.load(path).graph.node]

    with tempfile.TemporaryDirectory() as d:
        q = quantize_for_onnx(gm, [x, x * 0.5])
        model, ops = fused(q, os.path.join(d, "a.onnx"))
        assert ops.count("QLinearConv") == n_conv == 10 and ops.count("QLinearAdd") == 4, ops
        # the classifier too: its bias is on the int32 grid (int_bias), stored as int32, so Gemm -> QGemm
        assert ops.count("QGemm") == 1 and not {"Conv", "FusedConv", "Gemm", "FusedGemm"} & set(ops), ops
        got = run_onnx(model, x, session=ort_session(model))[0]      # validation: Q/DQ not fused
        np.testing.assert_allclose(got, q(x).detach().numpy(), atol=1e-5)
        _, plain = fused(qpasses.PassManager("ptq_int8").run(gm, data=[x, x * 0.5]), os.path.join(d, "b.onnx"))
        assert plain.count("QLinearConv") < n_conv and "QLinearAdd" not in plain
