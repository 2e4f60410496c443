"""The qpasses command line (click's CliRunner): commands, --help, exit codes."""
from __future__ import annotations

import subprocess
import sys

import onnx
import pytest
import torch
from click.testing import CliRunner

import qpasses
from qpasses import zoo
from qpasses.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main

torch.set_num_threads(1)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("cmd", [[], ["quantize"], ["rules"], ["rules", "list"], ["rules", "show"], ["rules", "check"],
                                 ["explain"], ["report"], ["draw"], ["demo"]])
def test_help_everywhere(cmd):
    r = _run(*cmd, "--help")
    assert r.exit_code == EXIT_OK and "Usage:" in r.output


def test_quantize_pt_to_onnx_and_pt(tmp_path):
    torch.manual_seed(0)
    m = zoo.MLP().eval()
    torch.save(m, tmp_path / "m.pt")
    torch.save(torch.randn(64, 1, 8, 8), tmp_path / "calib.pt")
    r = _run("quantize", tmp_path / "m.pt", "--data", tmp_path / "calib.pt", "-o", "w_bits=4", "--no-progress",
             "--out", tmp_path / "q.onnx")
    assert r.exit_code == EXIT_OK, r.output
    assert "weight_fake_quant" in r.output and "wrote" in r.output
    model = onnx.load(tmp_path / "q.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert any(i.data_type == onnx.TensorProto.INT4 for i in model.graph.initializer)
    r = _run("quantize", tmp_path / "m.pt", "--data", tmp_path / "calib.pt", "--no-progress", "--no-report",
             "--out", tmp_path / "q.pt")
    assert r.exit_code == EXIT_OK, r.output
    qgm = torch.load(tmp_path / "q.pt", weights_only=False)
    assert "act_q" in str(qgm.graph)  # activation fake quants
    r = _run("report", tmp_path / "q.pt", "--as-is", "--data", tmp_path / "calib.pt")
    assert r.exit_code == EXIT_OK, r.output
    assert r.output.count(" linear ") == 3 and "total" in r.output


def test_quantize_digits_factory_prints_accuracy(tmp_path):
    r = _run("quantize", "qpasses.zoo:DigitsCNN", "--data", "digits", "--no-progress", "--out", tmp_path / "d.onnx")
    assert r.exit_code == EXIT_OK, r.output
    assert "accuracy: fp32 0.9" in r.output and "accuracy (onnxruntime" in r.output


def test_quantize_onnx_file(tmp_path):
    from qpasses.onnx import export_onnx
    import qpasses
    x = torch.randn(4, 1, 8, 8)
    export_onnx(qpasses.trace(zoo.MLP().eval(), x), x, tmp_path / "f.onnx")
    torch.save(torch.randn(32, 1, 8, 8), tmp_path / "c.pt")
    r = _run("quantize", tmp_path / "f.onnx", "--data", tmp_path / "c.pt", "--out", tmp_path / "i.onnx", "--no-progress")
    assert r.exit_code == EXIT_OK, r.output
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(tmp_path / "i.onnx").graph.node) == 3


def test_exit_codes_and_messages(tmp_path):
    r = _run("quantize", "qpasses.zoo:NoSuchModel", "--data", "digits")
    assert r.exit_code == EXIT_ERROR and "no attribute 'NoSuchModel'" in r.output
    r = _run("quantize", "qpasses.zoo:MLP", "--data", "digits", "-o", "w_bitz=4")
    assert r.exit_code == EXIT_ERROR and "did you mean 'w_bits'" in r.output
    r = _run("quantize", "qpasses.zoo:MLP", "--recipe", "no_such_recipe", "--data", "digits")
    assert r.exit_code == EXIT_ERROR and "no_such_recipe" in r.output
    assert _run("quantize", "--bogus").exit_code == EXIT_USAGE
    assert _run("nosuchcommand").exit_code == EXIT_USAGE
    assert _run("quantize", "missing.pt").exit_code == EXIT_USAGE
    assert _run("quantize", "qpasses.zoo:MLP", "-o", "novalue").exit_code == EXIT_USAGE


def test_rules_list_show_check(tmp_path):
    r = _run("rules", "list")
    assert r.exit_code == 0 and "ptq_int8" in r.output and "canonicalize" in r.output and "calibrate" in r.output
    r = _run("rules", "show", "qdq_cleanup")
    assert r.exit_code == 0 and "merge_repeated_fake_quant" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: x\n    match: (conv2d $c ?x)\n    rewrite: fold_bnn($c)\n")
    r = _run("rules", "check", bad)
    assert r.exit_code == EXIT_ERROR
    assert f"{bad}:5:14: unknown action 'fold_bnn'" in r.output and "did you mean 'fold_bn'" in r.output
    bad.write_text("version: 1\nrules:\n  - name: x\n    match: (conv2dd $c ?x)\n    rewrite: bypass($c, ?x)\n")
    r = _run("rules", "check", bad)
    assert r.exit_code == EXIT_ERROR and f"{bad}:4:" in r.output and "conv2dd" in r.output
    r = _run("rules", "check", "rules/canonicalize.yaml", "rules/recipes/ptq_int8.yaml")
    assert r.exit_code == EXIT_OK and r.output.count(": ok") == 2


def test_explain_fx_and_onnx(tmp_path):
    r = _run("explain", "qpasses.zoo:ResNetLike", "fold_bn", "stem_1", "-r", "canonicalize")
    assert r.exit_code == 0 and "matches node stem_1" in r.output
    r = _run("explain", "qpasses.zoo:ResNetLike", "fold_bn", "stem_2", "-r", "canonicalize")
    assert r.exit_code == 0 and "stem_2 is relu, not a candidate anchor" in r.output
    from qpasses.onnx import export_onnx
    import qpasses
    x = torch.randn(2, 1, 8, 8)
    export_onnx(qpasses.trace(zoo.DigitsCNN().eval(), x), x, tmp_path / "d.onnx")
    r = _run("explain", tmp_path / "d.onnx", "fold_bn")
    assert r.exit_code == 0 and "would rewrite it" in r.output and "is not batch_norm" in r.output


def test_report_table():
    r = _run("report", "qpasses.zoo:MLP", "--data", "digits", "--no-train")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].split()[:4] == ["layer", "op", "w_bits", "a_bits"] and "SQNR" in lines[0]
    rows = [ln for ln in lines[2:] if ln.startswith("net.")]
    assert len(rows) == 3 and all(" linear " in ln and " 8 " in ln for ln in rows)
    sqnr = [float(ln.split()[6]) for ln in rows]
    assert all(20 < s < 80 for s in sqnr)
    r = _run("report", "qpasses.zoo:MLP", "--data", "digits", "--no-train", "-o", "w_bits=4", "--json")
    import json
    rows4 = json.loads(r.output)
    assert all(x["w_bits"] == 4 for x in rows4)
    assert sum(x["size_kib"] for x in rows4) == pytest.approx(sum(x["fp32_kib"] for x in rows4) / 8)


def test_draw_svg_and_html(tmp_path):
    r = _run("draw", "qpasses.zoo:MLP", "--recipe", "ptq_int8", "--data", "digits", "--no-train", "--out", tmp_path / "g.svg")
    assert r.exit_code == 0, r.output
    svg = (tmp_path / "g.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<rect") >= 10 and "#f6a04d" in svg  # fake quant coloured
    import xml.dom.minidom
    xml.dom.minidom.parseString(svg)  # well-formed
    r = _run("draw", "qpasses.zoo:MLP", "--out", tmp_path / "g.html")
    assert r.exit_code == 0 and "<svg" in (tmp_path / "g.html").read_text()
    assert _run("draw", "qpasses.zoo:MLP", "--out", tmp_path / "g.png").exit_code == EXIT_USAGE


def test_python_dash_m_exit_code():
    assert "qpasses" in _run("--version").output
    r = subprocess.run([sys.executable, "-m", "qpasses", "rules", "check", "no/such.yaml"], capture_output=True, text=True)
    assert r.returncode == EXIT_USAGE and "no/such.yaml" in r.stderr


def test_report_on_a_qdq_onnx_file(tmp_path):
    r = _run("quantize", "qpasses.zoo:MLP", "--data", "digits", "--no-train", "--no-progress", "--no-report",
             "--out", tmp_path / "m.onnx")
    assert r.exit_code == EXIT_OK, r.output
    r = _run("report", tmp_path / "m.onnx", "--data", "digits", "--json")
    assert r.exit_code == EXIT_OK, r.output
    import json
    rows = json.loads(r.output)
    assert [x["op"] for x in rows] == ["linear"] * 3 and all(x["w_bits"] == 8 and x["a_bits"] == 8 for x in rows)
    assert all(25 < x["sqnr_db"] < 90 for x in rows)
    assert _run("report", tmp_path / "m.onnx").exit_code == EXIT_USAGE  # needs --data


def test_demo(tmp_path):
    r = _run("demo", "--out", tmp_path / "demo.onnx")
    assert r.exit_code == EXIT_OK, r.output
    assert (tmp_path / "demo.onnx").is_file() and "accuracy (onnxruntime" in r.output


def test_input_shape_composed_recipes_and_export_graphs_saved(tmp_path):
    """No --data: trace from --input-shape; 'a,b' composes recipes; a torch.export graph (the
    transformer block traces only that way) is saved as a plain, loadable GraphModule."""
    import qpasses
    out = tmp_path / "t.pt"
    r = _run("quantize", "qpasses.zoo:TransformerEncoderBlock", "-r", "dynamic_int8,lower", "-s", "2,16,64",
             "--out", out, "--no-report")
    assert r.exit_code == EXIT_OK, r.output
    loaded = torch.load(out, weights_only=False)
    assert torch.ops.qpasses.dynamic_int8_linear.default in {n.target for n in loaded.graph.nodes}
    torch.manual_seed(0)                                   # the CLI builds factories under seed 0
    m = zoo.TransformerEncoderBlock().eval()
    want = qpasses.PassManager(["dynamic_int8", "lower"]).run(qpasses.trace(m, (torch.randn(2, 16, 64),)))
    x = torch.randn(3, 16, 64)                             # another batch size
    with torch.no_grad():
        assert torch.equal(loaded(x), want(x))
    r = _run("quantize", "qpasses.zoo:MLP", "-r", "dynamic_int8", "--input-shape", "2,x")
    assert r.exit_code == EXIT_USAGE and "is not a shape" in r.output
    r = _run("quantize", "qpasses.zoo:MLP", "-r", "dynamic_int8")
    assert r.exit_code == EXIT_ERROR and "--shape" in r.output


@pytest.mark.parametrize("recipe,bits", [("w4a16", [4, 4, 4]), ("dynamic_int8", [8, 8, 8]), ("bnn", [8, 1, 8]),
                                         ("ptq_int8,lower", [8, 8, 8])])
def test_report_every_quantizer_kind(recipe, bits):
    r = _run("report", "qpasses.zoo:MLP", "-r", recipe, "--data", "digits", "--no-train", "--json")
    assert r.exit_code == EXIT_OK, r.output
    import json
    rows = json.loads(r.output)
    assert [x["w_bits"] for x in rows] == bits
    assert rows[0]["size_kib"] == pytest.approx(128 * 64 * bits[0] / 8 / 1024)


def test_explain_without_a_node_lists_the_rule_candidates():
    r = _run("explain", "qpasses.zoo:ResNetLike", "fold_bn", "-r", "canonicalize")
    lines = [ln for ln in r.output.splitlines() if ln.startswith("rule 'fold_bn'")]
    assert r.exit_code == 0 and lines and all("matches node" in ln for ln in lines)   # only batch_norm anchors
    r = _run("explain", "qpasses.zoo:MLP", "fold_bn", "-r", "canonicalize")
    assert r.exit_code == 0 and "anchors on batch_norm; the traced graph has no such node" in r.output
