"""The rule language on ONNX graphs: same rule files (canonicalize, qdq_cleanup) on both IRs; ONNX quantization."""
from __future__ import annotations


import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

import qpasses
from qpasses import datasets, zoo
from qpasses.lang import find_named
from qpasses.onnx import export_onnx, quantize_onnx, run_onnx
from qpasses.onnx.rewrite import explain, onnx_opclass, run_rules
from qpasses.numerics import FakeQuantize
from conftest import duplicate_act_fake_quants, randomize_bn

torch.set_num_threads(1)


def _float_onnx(model, x):
    return export_onnx(qpasses.trace(model.eval(), x), x)


def _ops(m):
    return [n.op for n in m.nodes] if isinstance(m, gs.Graph) else [n.op_type for n in m.graph.node]


def test_opclasses_of_onnx_nodes():
    x = zoo.example_input("resnet", 2)
    g = gs.import_onnx(_float_onnx(randomize_bn(zoo.ResNetLike()), x))
    classes = {n.op: onnx_opclass(n) for n in g.nodes}
    assert classes["Conv"] == "conv2d" and classes["BatchNormalization"] == "batch_norm"
    assert classes["Relu"] == "relu" and classes["Add"] == "add" and classes["Gemm"] == "linear"


@pytest.mark.parametrize("name,cls", [("resnet", zoo.ResNetLike), ("mobilenetv2", zoo.MobileNetV2Like),
                                      ("digits_cnn", zoo.DigitsCNN)])
def test_fold_bn_same_rule_file_on_onnx(name, cls):
    torch.manual_seed(0)
    m = randomize_bn(cls()).eval()
    x = zoo.example_input(name, 4)
    model = _float_onnx(m, x)
    n_bn = _ops(model).count("BatchNormalization")
    assert n_bn > 0
    g = gs.import_onnx(model)
    rep = run_rules(g, "canonicalize")
    assert rep["fold_bn"].rewrites == n_bn
    folded = gs.export_onnx(g)
    onnx.checker.check_model(folded)
    assert "BatchNormalization" not in _ops(folded)
    np.testing.assert_allclose(run_onnx(folded, x)[0], run_onnx(model, x)[0], atol=1e-4, rtol=1e-4)
    # the fx side folds the same number with the same rule
    pm = qpasses.PassManager("canonicalize")
    pm.run(qpasses.trace(m, x))
    assert pm.report["fold_bn"].rewrites == n_bn
    # same parsed Rule objects drive both
    fam = find_named("canonicalize")
    assert {r.name for r in fam.rules} >= {"fold_bn", "drop_eval_dropout"}


def test_fold_bn_refuses_shared_conv_output():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(1, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.c(x)
            return self.bn(y) + y

    x = torch.randn(2, 1, 8, 8)
    g = gs.import_onnx(_float_onnx(randomize_bn(Two()), x))
    rep = run_rules(g, "canonicalize")
    assert rep["fold_bn"].rewrites == 0
    assert rep["fold_bn"].n_refused == 1
    assert "outside the match" in rep["fold_bn"].refused[0][1]
    assert "outside the match" in explain(g, "fold_bn", [n.name for n in g.nodes if n.op == "BatchNormalization"][0])


def test_qdq_cleanup_same_rule_file_on_fx_and_onnx():
    torch.manual_seed(0)
    x = zoo.example_input("mlp", 8)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(zoo.MLP().eval(), x), data=[x])
    n_act = duplicate_act_fake_quants(q)
    assert n_act == sum(1 for n in q.graph.nodes if n.name.endswith("_dup"))
    # fx
    pm = qpasses.PassManager("qdq_cleanup")
    q2 = pm.run(q)
    assert pm.report["merge_repeated_fake_quant"].rewrites == n_act
    assert torch.equal(q2(x), q(x))
    # onnx
    g = gs.import_onnx(export_onnx(q, x, cleanup=False))
    rep = run_rules(g, "qdq_cleanup")
    assert rep["merge_repeated_fake_quant"].rewrites == n_act
    assert _ops(g).count("QuantizeLinear") == n_act


def test_qdq_cleanup_keeps_different_params():
    from qpasses.numerics import FakeQuantize

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = FakeQuantize(0.1, 3, 0, 255), FakeQuantize(0.2, 3, 0, 255)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.b(self.a(x)))

    x = torch.randn(3, 4)
    g = gs.import_onnx(export_onnx(qpasses.trace(M(), x), x, cleanup=False))
    rep = run_rules(g, "qdq_cleanup")
    assert rep["merge_repeated_fake_quant"].rewrites == 0
    assert "quantize differently" in rep["merge_repeated_fake_quant"].refused[0][1]


def test_quantize_fp32_onnx_file(tmp_path):
    m = datasets.train_digits_cnn()
    xt, yt = datasets.load_digits_tensors("test")
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(qpasses.trace(m, xt[:2]), xt[:2], fp32)
    qm = quantize_onnx(fp32, datasets.calib_batches(), path=tmp_path / "int8.onnx")
    onnx.checker.check_model(qm, full_check=True)
    ops = _ops(qm)
    assert "BatchNormalization" not in ops and ops.count("QuantizeLinear") == 4
    acc = (run_onnx(qm, xt)[0].argmax(1) == yt.numpy()).mean()
    acc32 = (run_onnx(str(fp32), xt)[0].argmax(1) == yt.numpy()).mean()
    assert acc >= acc32 - 0.01
    # same numerics as qpasses ptq_int8 on the torch model (same observers, same weight quantizer)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(m, xt[:2]), data=datasets.calib_batches())
    a, b = run_onnx(qm, xt)[0], q(xt).detach().numpy()
    assert (np.abs(a - b) <= (b.max() - b.min()) / 255).mean() >= 0.99


@pytest.mark.parametrize("opt", [dict(w_bits=4, a_bits=4), dict(observer="percentile", per_channel=False)])
def test_quantize_onnx_runs_the_recipe_files(tmp_path, opt):
    from qpasses.report import Report
    m = datasets.train_digits_cnn()
    xt, _ = datasets.load_digits_tensors("test")
    gm = qpasses.trace(m, xt[:2])
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(gm, xt[:2], fp32)
    rep = Report()
    qm = quantize_onnx(fp32, datasets.calib_batches(), report=rep, **opt)
    assert rep["fold_bn"].rewrites == 3 and rep["observe_weighted_inputs"].rewrites == 4
    assert rep["weight_fake_quant"].rewrites == 4 and rep.steps[0].info["observers"] == 4
    q = qpasses.PassManager("ptq_int8", **opt).run(gm, data=datasets.calib_batches())
    a, b = run_onnx(qm, xt)[0], q(xt).detach().numpy()
    assert (np.abs(a - b) <= (b.max() - b.min()) / 255 + 1e-6).mean() >= 0.99
    if opt.get("a_bits") == 4:
        assert "Clip" in _ops(qm)
    rep = Report()
    quantize_onnx(fp32, datasets.calib_batches(), report=rep, skip=["*fc*"])
    assert rep["weight_fake_quant"].rewrites == 3 and "skip pattern" in rep["weight_fake_quant"].refused[0][1]


def test_quantize_onnx_rejects_other_recipes(tmp_path):
    x = torch.randn(2, 4)
    p = tmp_path / "l.onnx"
    export_onnx(qpasses.trace(torch.nn.Linear(4, 2), x), x, p)
    with pytest.raises(qpasses.QPassesError, match="cannot run on an ONNX model.*assign_bits"):
        quantize_onnx(p, [x], recipe="mixed_ptq")
    with pytest.raises(qpasses.OptionError, match="w_bitz"):
        quantize_onnx(p, [x], w_bitz=3)


def test_quantize_onnx_reads_constant_nodes_of_other_exporters():
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w)),
             helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(b)),
             helper.make_node("Gemm", ["x", "W", "B"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = torch.randn(16, 4)
    qm = quantize_onnx(m, [x])
    assert _ops(qm).count("QuantizeLinear") == 1 and _ops(qm).count("DequantizeLinear") == 2
    ref = run_onnx(m, x)[0]
    got = run_onnx(qm, x)[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


# ----------------------------------------------------------------------------- one matcher, one driver

_FOLD_WHEN = """version: 1
family: fold_when
params:
  fold: {default: "off", doc: fold BatchNorm (on / off)}
stages:
  - {name: s, mode: once}
rules:
  - name: fold_bn_when
    stage: s
    when: ${fold}
    match: (batch_norm $bn (weighted $conv ?x))
    where:
      - eval_mode($bn)
    rewrite: fold_bn($conv, $bn)
"""


def test_when_disables_a_rule_on_both_irs(tmp_path):
    """``when: ${param}`` means the same on fx and ONNX graphs (it once disabled the fx rule only)."""
    from qpasses.lang import load_file
    p = tmp_path / "fold_when.yaml"
    p.write_text(_FOLD_WHEN)
    fam = load_file(str(p))
    torch.manual_seed(0)
    m = randomize_bn(zoo.ResNetLike()).eval()
    x = zoo.example_input("resnet", 2)
    n_bn = _ops(_float_onnx(m, x)).count("BatchNormalization")
    # a boolean and a spelled-out "off" (which the ONNX driver once took for true) alike
    for fold, expect in ((False, 0), ("off", 0), ("on", n_bn), (True, n_bn)):
        g = gs.import_onnx(_float_onnx(m, x))
        rep = run_rules(g, fam, fold=fold)
        pm = qpasses.PassManager(fam, fold=fold, progress=False)
        pm.run(qpasses.trace(m, x))
        for r in (rep, pm.report):
            assert r["fold_bn_when"].rewrites == expect
            assert r["fold_bn_when"].disabled == (expect == 0)


def test_onnx_matching_is_the_fx_matcher_with_failure_objects():
    """The ONNX graph goes through qpasses.matcher.Matcher (an IR adapter), and a failed match is
    the same MatchFailure object as on fx graphs, naming the pattern step and the node."""
    from qpasses.matcher import MatchFailure, Matcher
    from qpasses.onnx.rewrite import OnnxIR
    from qpasses.lang.registry import ACTIONS, CONSTRAINTS
    g = gs.import_onnx(_float_onnx(randomize_bn(zoo.ResNetLike()).eval(), zoo.example_input("resnet", 2)))
    rule = next(r for r in find_named("canonicalize").rules if r.name == "fold_bn")
    mt = Matcher(OnnxIR(g))
    relu = next(n for n in g.nodes if n.op == "Relu")
    bn = next(n for n in g.nodes if n.op == "BatchNormalization")
    fail = mt.match(rule.match[0], relu)
    assert isinstance(fail, MatchFailure) and fail.node == relu.name and "is not batch_norm" in fail.reason
    ok = mt.match(rule.match[0], bn)
    assert not isinstance(ok, MatchFailure) and ok["bn"] is bn and ok["conv"].op == "Conv"
    # one registry: the ONNX implementation hangs off the action's own entry
    assert ACTIONS["fold_bn"].onnx is not None and CONSTRAINTS["eval_mode"].onnx is not None
    assert ACTIONS["fold_bn"].fn is not ACTIONS["fold_bn"].onnx


def test_onnx_action_must_name_a_registered_action():
    from qpasses.onnx.rewrite import onnx_action
    with pytest.raises(ValueError, match="unknown action 'no_such_action'"):
        onnx_action("no_such_action")(lambda ctx: None)
