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


def test_quantize_pt2_to_onnx_and_pt2(tmp_path):
    torch.manual_seed(0)
    m = zoo.MLP().eval()
    qpasses.save(m, tmp_path / "m.pt2", example_inputs=torch.randn(2, 1, 8, 8))
    torch.save(torch.randn(64, 1, 8, 8), tmp_path / "calib.pt")
    r = _run("quantize", tmp_path / "m.pt2", "--data", tmp_path / "calib.pt", "-o", "w_bits=4", "--no-progress",
             "--out", tmp_path / "q.onnx")
    assert r.exit_code == EXIT_OK, r.output
    assert "weight_fake_quant" in r.output and "wrote" in r.output
    model = onnx.load(tmp_path / "q.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert any(i.data_type == onnx.TensorProto.INT4 for i in model.graph.initializer)
    r = _run("quantize", tmp_path / "m.pt2", "--data", tmp_path / "calib.pt", "--no-progress", "--no-report",
             "--out", tmp_path / "q.pt2")
    assert r.exit_code == EXIT_OK, r.output
    qgm = qpasses.load(tmp_path / "q.pt2")                 # a torch.export archive: no pickle
    assert sum("fake_quant" in str(n.target) for n in qgm.graph.nodes) == 6  # 3 activations, 3 weights
    r = _run("report", tmp_path / "q.pt2", "--as-is", "--data", tmp_path / "calib.pt")
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
    assert _run("quantize", "missing.pt2").exit_code == EXIT_USAGE
    assert _run("quantize", "missing.onnx").exit_code == EXIT_USAGE
    r = _run("quantize", "missing.pt")                      # a pickle suffix: refused without opening
    assert r.exit_code == EXIT_ERROR and "does not load pickled models" in r.output
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
    r = _run("rules", "check", "qpasses/methods/canonicalize/canonicalize.yaml", "qpasses/methods/ptq/recipes/ptq_int8.yaml")
    assert r.exit_code == EXIT_OK and r.output.count(": ok") == 2
    r = _run("rules", "check", "qpasses/methods/params.yaml")
    assert r.exit_code == EXIT_OK and "ok (shared declarations" in r.output
    bad.write_text("version: 1\nshared: params\nparams:\n  skip: inherit\n")
    r = _run("rules", "check", bad)
    assert r.exit_code == EXIT_ERROR and f"{bad}:4:3: shared parameter 'skip' cannot be 'inherit'" in r.output


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
    assert r.exit_code == 0 and "would rewrite it" in r.output and "not a candidate anchor (batch_norm)" in r.output  # the fx wording: one driver


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


def test_demo_is_the_quantize_command(tmp_path):
    """`qpasses demo` prints what `qpasses quantize qpasses.zoo:DigitsCNN --data digits --out ...`
    prints: the per-rule report included."""
    r = _run("demo", "--out", tmp_path / "demo.onnx")
    assert r.exit_code == EXIT_OK, r.output
    assert (tmp_path / "demo.onnx").is_file() and "accuracy (onnxruntime" in r.output
    assert "convert.weight_fake_quant" in r.output and "first reason" in r.output
    q = _run("quantize", "qpasses.zoo:DigitsCNN", "--data", "digits", "--out", tmp_path / "q.onnx")
    assert q.exit_code == EXIT_OK
    # timings, and progress bars (tqdm redraws a bar only when a step outlasts its refresh interval,
    # so whether a bar line shows depends on the machine's load)
    strip = lambda out: [ln.strip() for ln in out.splitlines() if ln.strip() and "batch/s]" not in ln
                         and not ln.strip().startswith(("steps:", "done in", "accuracy ("))]
    assert strip(r.output) == strip(q.output)


def test_input_shape_composed_recipes_and_export_graphs_saved(tmp_path):
    """No --data: trace from --input-shape; 'a,b' composes recipes; a torch.export graph (the
    transformer block traces only that way) is saved as a plain, loadable GraphModule."""
    import qpasses
    out = tmp_path / "t.pt2"
    r = _run("quantize", "qpasses.zoo:TransformerEncoderBlock", "-r", "dynamic_int8,lower", "-o", "device=cpu", "-s", "2,16,64",
             "--out", out, "--no-report")
    assert r.exit_code == EXIT_OK, r.output
    loaded = qpasses.load(out)
    assert torch.ops.qpasses.dynamic_int8_linear.default in {n.target for n in loaded.graph.nodes}
    torch.manual_seed(0)                                   # the CLI builds factories under seed 0
    m = zoo.TransformerEncoderBlock().eval()
    want = qpasses.PassManager(["dynamic_int8", "lower"], device="cpu").run(qpasses.trace(m, (torch.randn(2, 16, 64),)))
    x = torch.randn(3, 16, 64)                             # another batch size
    with torch.no_grad():
        assert torch.equal(loaded(x), want(x))
    r = _run("quantize", "qpasses.zoo:MLP", "-r", "dynamic_int8", "--input-shape", "2,x")
    assert r.exit_code == EXIT_USAGE and "is not a shape" in r.output
    r = _run("quantize", "torch.nn:Identity", "-r", "dynamic_int8")  # no example known: asks for -s
    assert r.exit_code == EXIT_ERROR and "-s N,C,..." in r.output
    r = _run("quantize", "qpasses.zoo:MLP", "-r", "dynamic_int8", "--out", tmp_path / "t.pt")
    assert r.exit_code == EXIT_USAGE and "writes no pickles" in r.output


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


# ----------------------------------------------------------------------------- files are data

class _Touch:
    """Unpickling this object creates the marker file (what a hostile .pt file would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _error_lines(output):
    return [ln for ln in output.splitlines() if ln.lower().startswith(("error:", "internal error:"))]


def _assert_clean_failure(r, codes=(EXIT_ERROR, EXIT_USAGE)):
    assert r.exit_code in codes, r.output
    assert "Traceback" not in r.output
    assert len(_error_lines(r.output)) == 1, r.output


def test_malicious_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": _Touch(marker)}, evil)
    for suffix in (".pt2", ".onnx", ".npy", ".pth"):
        (tmp_path / f"evil{suffix}").write_bytes(evil.read_bytes())
    calls = [["quantize", evil], ["quantize", tmp_path / "evil.pth"], ["report", evil], ["report", evil, "--as-is"],
             ["explain", evil, "fold_bn"], ["draw", evil, "--out", tmp_path / "g.svg"],
             ["quantize", tmp_path / "evil.pt2"], ["report", tmp_path / "evil.pt2", "--as-is"],
             ["explain", tmp_path / "evil.pt2", "fold_bn"], ["draw", tmp_path / "evil.pt2", "--out", tmp_path / "g.svg"],
             ["quantize", tmp_path / "evil.onnx", "--data", "digits"], ["explain", tmp_path / "evil.onnx", "fold_bn"],
             ["report", tmp_path / "evil.onnx", "--data", "digits"],
             ["quantize", "qpasses.zoo:MLP", "--data", evil], ["report", "qpasses.zoo:MLP", "--data", evil],
             ["draw", "qpasses.zoo:MLP", "--data", evil, "--out", tmp_path / "g.svg"],
             ["quantize", "qpasses.zoo:MLP", "--data", tmp_path / "evil.npy"],
             ["quantize", "qpasses.zoo:MLP", "--weights", evil, "-r", "dynamic_int8"],
             ["explain", "qpasses.zoo:MLP", "fold_bn", "--weights", evil]]
    for args in calls:
        r = _run(*args, "--no-train") if args[0] in ("report", "draw") else _run(*args)
        _assert_clean_failure(r)
        assert not marker.exists(), args
    r = _run("quantize", "qpasses.zoo:MLP", "--data", evil)
    assert "pickled" in r.output and "refused" in r.output
    # the installed program too (not only click's runner)
    p = subprocess.run([sys.executable, "-m", "qpasses", "report", str(evil), "--data", str(evil)],
                       capture_output=True, text=True)
    assert p.returncode == EXIT_ERROR and "Traceback" not in p.stderr and len(_error_lines(p.stderr)) == 1
    assert not marker.exists()


def test_bad_files_exit_with_one_line_and_debug_shows_the_traceback(tmp_path):
    from qpasses.onnx import export_onnx
    (tmp_path / "text.onnx").write_bytes(b"\x08\x07 these bytes are not an ONNX model \xff\xfe" * 10)
    x = torch.randn(2, 1, 8, 8)
    export_onnx(qpasses.trace(zoo.MLP().eval(), x), x, tmp_path / "ok.onnx")
    data = (tmp_path / "ok.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    torch.save(torch.randn(8, 1, 8, 8), tmp_path / "calib.pt")
    data = (tmp_path / "calib.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    qpasses.save(zoo.MLP().eval(), tmp_path / "m.pt2", example_inputs=x)
    data = (tmp_path / "m.pt2").read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.npy").write_bytes(b"not numpy")
    for args in (["quantize", tmp_path / "text.onnx", "--data", "digits"], ["explain", tmp_path / "text.onnx", "fold_bn"],
                 ["report", tmp_path / "text.onnx", "--data", "digits"],
                 ["quantize", tmp_path / "cut.onnx", "--data", "digits"],
                 ["quantize", "qpasses.zoo:MLP", "--data", tmp_path / "cut.pt"],
                 ["quantize", "qpasses.zoo:MLP", "--data", tmp_path / "text.npy"],
                 ["quantize", tmp_path / "cut.pt2", "-r", "dynamic_int8"],
                 ["report", tmp_path / "cut.pt2", "--as-is"],
                 ["quantize", tmp_path / "missing.onnx"], ["quantize", "qpasses.zoo:MLP", "--data", tmp_path / "no.pt"],
                 ["draw", tmp_path / "missing.pt2", "--out", tmp_path / "g.svg"]):
        _assert_clean_failure(_run(*args))
    r = _run("quantize", tmp_path / "text.onnx", "--data", "digits")
    assert r.exit_code == EXIT_ERROR and "is not a valid ONNX model" in r.output
    r = _run("--debug", "quantize", tmp_path / "text.onnx", "--data", "digits")
    assert r.exit_code == EXIT_ERROR and "Traceback" in r.output


def test_data_npy_npz_and_weights(tmp_path):
    import numpy as np
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype("float32")
    np.save(tmp_path / "calib.npy", x)
    np.savez(tmp_path / "calib.npz", x=x, y=np.zeros(40, dtype="int64"))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    trained = zoo.MLP().eval()
    torch.save(trained.state_dict(), tmp_path / "state.pt")
    r = _run("quantize", "qpasses.zoo:MLP", "--data", tmp_path / "calib.npy", "--weights", tmp_path / "state.pt",
             "--no-progress", "--no-report", "--out", tmp_path / "q.pt2")
    assert r.exit_code == EXIT_OK, r.output
    want = qpasses.PassManager("ptq_int8").run(qpasses.trace(trained, torch.from_numpy(x[:32])),
                                               data=list(torch.from_numpy(x).split(32)))
    with torch.no_grad():
        assert torch.equal(qpasses.load(tmp_path / "q.pt2")(torch.from_numpy(x[:5])), want(torch.from_numpy(x[:5])))
    r = _run("quantize", "qpasses.zoo:MLP", "--data", tmp_path / "calib.npz", "--no-train", "--no-progress")
    assert r.exit_code == EXIT_OK and "accuracy: fp32" in r.output   # (x, y) from the .npz
    r = _run("quantize", "qpasses.zoo:MLP", "--data", tmp_path / "objects.npy")
    _assert_clean_failure(r)
    assert "pickled" in r.output
    r = _run("quantize", "qpasses.zoo:ResNetLike", "--weights", tmp_path / "state.pt", "-r", "dynamic_int8")
    assert r.exit_code == EXIT_ERROR and "does not fit" in r.output


# ----------------------------------------------------------------------------- issue 23

_FACTORIES = '''
import torch
import torch.nn as nn


def with_example():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


with_example.example_inputs = lambda: (torch.randn(2, 3, 12, 12),)


def no_example():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
'''


def test_explain_and_draw_take_the_models_own_example(tmp_path, monkeypatch):
    (tmp_path / "cli_factories.py").write_text(_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = _run("explain", "cli_factories:with_example", "fold_bn", "-r", "canonicalize")
    assert r.exit_code == EXIT_OK and "matches node" in r.output, r.output
    r = _run("draw", "cli_factories:with_example", "--out", tmp_path / "g.svg")
    assert r.exit_code == EXIT_OK, r.output
    for args in (["explain", "cli_factories:no_example", "fold_bn"],
                 ["draw", "cli_factories:no_example", "--out", tmp_path / "g.svg"]):
        r = _run(*args)
        _assert_clean_failure(r, (EXIT_ERROR,))
        assert "pass --data" in r.output and "-s 1,3,H,W" in r.output   # which -s: from the first Conv2d
    assert _run("explain", "cli_factories:no_example", "fold_bn", "-s", "1,3,8,8").exit_code == EXIT_OK
    # a .pt2 archive carries its example inputs: a transformer-shaped one ([N, 16, 64]), no -s
    x = torch.randn(2, 16, 64)
    qpasses.save(zoo.TransformerEncoderBlock().eval(), tmp_path / "t.pt2", example_inputs=x)
    r = _run("explain", tmp_path / "t.pt2", "dynamic_linear", "-r", "dynamic_int8")
    assert r.exit_code == EXIT_OK and "matches node" in r.output, r.output
    r = _run("draw", tmp_path / "t.pt2", "--out", tmp_path / "t.svg")
    assert r.exit_code == EXIT_OK, r.output


def test_training_line_only_when_training_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("QPASSES_CACHE", str(tmp_path / "cache"))
    args = ("quantize", "qpasses.zoo:DigitsCNN", "--data", "digits", "--no-progress", "--no-report")
    first = _run(*args)
    assert first.exit_code == EXIT_OK and "training on the scikit-learn digits" in first.output
    second = _run(*args)                                    # weights from the cache: no training, no line
    assert second.exit_code == EXIT_OK and "training on" not in second.output
    assert first.output.splitlines()[-2] == second.output.splitlines()[-2]   # the same accuracy line


def test_report_table_separates_not_applicable_from_refused():
    from qpasses.report import Report
    rep = Report()
    na = rep.rule("needs_bn", "fam", "s")
    na.candidate("relu_1")
    na.fail("relu_1", "relu_1 is relu, not batch_norm")
    ref = rep.rule("fold", "fam", "s")
    ref.candidate("bn")
    ref.match("bn")
    ref.refuse("bn", "batch norm in training mode")
    lines = rep.table().splitlines()
    assert lines[0].split()[5:8] == ["n/a", "refused", "first"]
    row_na = next(ln for ln in lines if ln.startswith("fam.needs_bn")).split()
    row_ref = next(ln for ln in lines if ln.startswith("fam.fold")).split()
    assert row_na[5:8] == ["1", "0", "n/a:"] and row_ref[5:8] == ["0", "1", "refused:"]
    r = _run("quantize", "qpasses.zoo:ResNetLike", "-r", "canonicalize", "-s", "2,1,8,8")
    assert r.exit_code == EXIT_OK and " n/a " in r.output.splitlines()[0]


def test_rules_list_shows_declared_arguments():
    from qpasses.lang.registry import ACTIONS, CONSTRAINTS, DATA_STEPS, describe_args
    r = _run("rules", "list")
    assert r.exit_code == 0
    out = r.output
    # every data step, action and constraint is listed with what it declares
    for kind, table in (("step", DATA_STEPS), ("action", ACTIONS), ("constraint", CONSTRAINTS)):
        for name, reg in table.items():
            sig = describe_args(name, kind)
            if len(sig) <= 100:
                assert f"{kind:10} {sig}" in out, sig
            else:
                assert f"{kind:10} {name}(" in out, name
                for a in reg.args.values():
                    assert a.describe() in out, (name, a.describe())
    assert "bits: int in [2, 16] = 8" in out                     # observe_input's declared range
    assert "no_data: str | null in {'error', 'first_batch'} = 'error'" in out   # calibrate's declared choices
    r = _run("rules", "list", "constraints")
    assert r.exit_code == 0 and "constraint skipped(node: node" in r.output and "recipe " not in r.output
    assert _run("rules", "list", "nonsense").exit_code == EXIT_USAGE


def test_quantize_help_lists_data_free_recipes_from_the_recipes(tmp_path, monkeypatch):
    r = _run("quantize", "--help")
    text = " ".join(r.output.split())
    i = text.index("Recipes that run without --data:")
    listed = text[i:].split(":", 1)[1].split(".")[0].replace(",", " ").split()
    assert {"qat", "bnn", "dynamic_int8", "w4a16", "genie", "lower"} <= set(listed), listed
    assert "ptq_int8" not in listed and "adaround" not in listed and "haq" not in listed
    # derived, not written down: a user recipe that needs no data appears, one that does does not
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "my_nodata.yaml").write_text(
        "version: 1\nrecipe: my_nodata\nsteps:\n  - rules: canonicalize\n  - step: calibrate\n    with: {no_data: first_batch}\n")
    (tmp_path / "recipes" / "my_data.yaml").write_text(
        "version: 1\nrecipe: my_data\nsteps:\n  - rules: canonicalize\n  - step: calibrate\n")
    monkeypatch.setenv("QPASSES_RULES_PATH", str(tmp_path))
    from qpasses.cli import data_free_recipes
    names = data_free_recipes()
    assert "my_nodata" in names and "my_data" not in names
    # and what the list says holds: each data-free recipe runs without data
    gm = qpasses.trace(zoo.DigitsCNN().eval(), (zoo.example_input("digits_cnn", batch=2),))
    for name in ("qat", "bnn", "my_nodata"):
        qpasses.PassManager(name, quiet=True).run(gm)
