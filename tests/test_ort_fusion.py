"""onnxruntime fuses every DQ -> Conv / Gemm / Add -> Q unit of ``quantize_for_onnx``'s exports.

The counts are read from onnxruntime's own optimised graph (``SessionOptions.optimized_model_filepath``):
each Conv must become a ``QLinearConv`` and each Gemm a ``QGemm``, with no float Conv / Gemm left.
onnxruntime's QDQ selectors need *every* input of the op dequantized, so a float bias kept the digits
CNN's convolutions (and every model's classifier Gemm) in float; the clean-up stores the bias of such
a unit as int32 codes on the ``s_x * s_w`` grid, and ``ptq_int8`` with ``ort_fusable`` puts the fake-quant
graph's bias on that grid first (the ``int_bias`` rules), so the export still computes what the
fake-quant graph computes."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qpasses
from qpasses import datasets
from qpasses.numerics import FakeQuantize
from qpasses.onnx import export_onnx, ort_session, quantize_for_onnx, run_onnx
from qpasses.onnx.cleanup import quantize_unit_biases

torch.set_num_threads(1)


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> list:
    """The op types of the graph onnxruntime runs (all optimisations on, Q/DQ fusion on)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def _int32_biases(model: onnx.ModelProto) -> dict:
    """{op name: dequantized int32 bias} for every Conv / Gemm whose bias is read through a DequantizeLinear."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] in dq:
            d = dq[n.input[2]]
            codes, scale, zp = (inits[i] for i in d.input[:3])
            assert codes.dtype == np.int32 and not zp.any()
            out[n.name] = codes.astype(np.float64) * scale.astype(np.float64)
    return out


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    model = datasets.train_digits_cnn()
    xt, yt = datasets.load_digits_tensors("test")
    return qpasses.trace(model, xt[:1]), xt


def test_digits_cnn_every_conv_and_gemm_fuses(digits, tmp_path):
    """The bundled digits CNN (Conv -> BN -> ReLU, folded: convs with a bias): 3 QLinearConv + 1 QGemm,
    and the export computes the fake-quant graph (Q/DQ not fused) to float rounding."""
    gm, xt = digits
    q = quantize_for_onnx(gm, datasets.calib_batches()[:2])
    m = export_onnx(q, xt[:1])
    raw = [n.op_type for n in m.graph.node]
    ops = _optimized_ops(m, tmp_path)
    assert ops.count("QLinearConv") == raw.count("Conv") == 3, ops
    assert ops.count("QGemm") == raw.count("Gemm") == 1, ops
    assert not {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul"} & set(ops), ops

    # the int32 biases are the fake-quant graph's biases (already on the s_x * s_w grid)
    biases = _int32_biases(m)
    assert len(biases) == 4
    fx_biases = [p.detach().double().numpy() for n, p in q.named_parameters() if n.startswith("int_grid_bias")]
    fx_biases += [b.detach().double().numpy() for n, b in q.named_buffers() if n.startswith("int_grid_bias")]
    assert len(fx_biases) == 4
    for got in biases.values():
        assert any(got.shape == b.shape and np.allclose(got, b, rtol=1e-6, atol=0) for b in fx_biases)

    ref = q(xt).detach().numpy()
    got = run_onnx(m, xt, session=ort_session(m))[0]         # validation session: Q/DQ kept
    step = float(q.get_submodule([n for n, mod in q.named_modules() if isinstance(mod, FakeQuantize)
                                  and mod.axis is None and n.startswith("out_q")][-1]).scale)
    diff = np.abs(got - ref)
    # float32 ties in the last quantizer can round one code the other way, never more
    assert diff.max() <= step * 1.001 and (diff > 1e-5).mean() < 1e-3, (diff.max(), step)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.998


@pytest.mark.slow
def test_seven_bit_weights_fused_kernels_match_the_fake_quant_graph(digits):
    """With ``w_bits=7`` (onnxruntime's ``reduce_range``) the fused u8 x s8 kernels cannot saturate their
    16-bit pair sums on AVX2 CPUs without VNNI (2 * 255 * 63 < 2^15), so the *fused* session matches the
    fake-quant graph on any x86 CPU: at most one output step on a few logits."""
    gm, xt = digits
    q = quantize_for_onnx(gm, datasets.calib_batches()[:2], w_bits=7)
    m = export_onnx(q, xt[:1])
    ref = q(xt).detach().numpy()
    fused = run_onnx(m, xt, session=ort_session(m, fuse_qdq=True))[0]
    step = float(q.get_submodule([n for n, mod in q.named_modules() if isinstance(mod, FakeQuantize)
                                  and mod.axis is None and n.startswith("out_q")][-1]).scale)
    diff = np.abs(fused - ref)
    assert diff.max() <= step * 1.001 and (diff > 1e-5).mean() < 1e-2, (diff.max(), step)
    assert (fused.argmax(1) == ref.argmax(1)).mean() >= 0.998


def test_plain_ptq_int8_keeps_float_biases(digits):
    """Without ort_fusable nothing changes: the conv outputs are not quantized (not a fusable unit), so
    the biases stay float and the fake-quant graph has no int_bias unit."""
    gm, xt = digits
    pm = qpasses.PassManager("ptq_int8")
    assert "int_bias" not in [u.family for u in pm.units]
    assert "int_bias" in [u.family for u in qpasses.PassManager("ptq_int8", ort_fusable=True).units]
    q = pm.run(gm, data=datasets.calib_batches()[:2])
    m = export_onnx(q, xt[:1])
    assert _int32_biases(m) == {}
    assert not [i.name for i in m.graph.initializer if i.data_type == TensorProto.INT32]


def _unit_model(bias: np.ndarray, out_quantized: bool, relu: bool) -> onnx.ModelProto:
    """input -> Q -> DQ -> Conv(DQ int8 weight, float bias) [-> Relu] [-> Q -> DQ] -> output."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr), name)  # noqa: E731
    inits = [c("sx", np.float32(0.02)), c("zx", np.uint8(128)), c("w", w),
             c("sw", np.array([0.01, 0.02, 0.005, 0.03], np.float32)), c("zw", np.zeros(4, np.int8)),
             c("b", bias), c("sy", np.float32(0.05)), c("zy", np.uint8(0))]
    nodes = [helper.make_node("QuantizeLinear", ["input", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    last = "y"
    if relu:
        nodes.append(helper.make_node("Relu", ["y"], ["r"]))
        last = "r"
    if out_quantized:
        nodes += [helper.make_node("QuantizeLinear", [last, "sy", "zy"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["output"])]
    else:
        nodes.append(helper.make_node("Identity", [last], ["output"]))
    g = helper.make_graph(nodes, "unit", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("out_quantized,relu,on_grid,changed", [
    (True, False, True, True), (True, True, True, True), (False, True, True, False), (True, True, False, False)])
def test_quantize_unit_biases(out_quantized, relu, on_grid, changed, tmp_path):
    """Only a unit whose output is quantized (directly or after one Relu) and whose bias lies on the
    s_x s_w grid gets an int32 bias (codes round(b / (s_x s_w)) per output channel, the same values);
    onnxruntime then fuses it into QLinearConv.  A bias off the grid stays float: the clean-up never
    changes what the model computes."""
    acc = 0.02 * np.array([0.01, 0.02, 0.005, 0.03], np.float64)
    bias = (np.array([617.0, -2500.0, 3.0, 3333.0]) * acc).astype(np.float32)
    if not on_grid:
        bias = bias + (0.3 * acc).astype(np.float32)
    model = _unit_model(bias, out_quantized, relu)
    g = gs.import_onnx(model)
    assert quantize_unit_biases(g) == int(changed)
    out = gs.export_onnx(g.cleanup().toposort())
    out.ir_version = 10
    onnx.checker.check_model(out, full_check=True)
    biases = _int32_biases(out)
    if not changed:
        assert biases == {}
        return
    np.testing.assert_allclose(biases["conv"], bias, rtol=1e-6)
    ops = _optimized_ops(out, tmp_path)
    assert ops.count("QLinearConv") == 1 and "Conv" not in ops, ops
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)
    a = run_onnx(model, x, session=ort_session(model))[0]
    b = run_onnx(out, x, session=ort_session(out))[0]
    np.testing.assert_array_equal(a, b)
