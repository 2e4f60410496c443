"""``explain`` and the unmatched-``skip`` warning see the parameter values the run uses,
``with:`` of nested recipe steps included (issue 24): both read the plan's per-unit bindings
(:meth:`qpasses.plan.Plan.uses`, ``Unit.params``), the values the run binds its rules to."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn as nn

import qpasses
from qpasses.lang.rules import Rule, find_named, load_file
from qpasses.opclasses import node_paths


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(4, 3, 8, 8)
    return x, qpasses.trace(m, (x,))


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def node_of(gm, path):
    """The graph node of module ``path`` (names differ between graph levels)."""
    hits = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr") and path in node_paths(n)]
    assert hits, path
    return hits[0]


def refusal(pm, rule, node):
    return [why for n, why in pm.report[rule].refused if n == node.name]


NESTED = """\
    version: 1
    recipe: outer
    params:
      skip: inherit
    steps:
      - recipe: ptq_int8
        with: {skip: [conv1]}
    """


def test_explain_sees_the_skip_of_a_nested_with(tmp_path, setup):
    x, gm = setup
    f = write(tmp_path, NESTED)
    pm = qpasses.PassManager(str(f), quiet=True)
    assert pm.params["skip"] == []                       # the outer value: nothing skipped there
    conv1, conv2 = node_of(gm, "conv1"), node_of(gm, "conv2")
    e = pm.explain("weight_fake_quant", conv1, gm)
    assert not e and e.step == "constraint" and "matches skip pattern 'conv1'" in e.reason
    assert "skip=['conv1'] from with: of recipe step 'ptq_int8'" in e.bindings and f"{f}:7:" in e.bindings
    assert "r.yaml:7:" in str(e)
    # a Rule object (unbound, as loaded) is bound as the run binds it
    convert = find_named("convert")
    rule = next(r for r in convert.rules if r.name == "weight_fake_quant")
    e2 = pm.explain(rule, conv1, gm)
    assert (e2.matched, e2.step, e2.reason, e2.bindings) == (e.matched, e.step, e.reason, e.bindings)
    # ... also when loaded again from its file (another object, the same rule)
    again = next(r for r in load_file(convert.path).rules if r.name == "weight_fake_quant")
    assert again is not rule
    e3 = pm.explain(again, conv1, gm)
    assert (e3.matched, e3.reason) == (e.matched, e.reason)
    # a rule the plan does not run is bound to the run's own values
    other = Rule(name="other_wfq", match="(weighted $op ...)", unless=["skipped($op, ${skip})"],
                 rewrite="quantize_weight($op, bits=${w_bits})")
    assert pm.explain(other, conv1, gm).matched
    assert pm.explain("weight_fake_quant", conv2, gm).matched
    # the run refuses conv1 for exactly the reason explain gives, and rewrites conv2
    pm.run(gm, data=[x])
    assert refusal(pm, "weight_fake_quant", conv1) == [e.reason]
    assert conv2.name in pm.report["weight_fake_quant"].rewritten
    assert pm.report.warnings == []
    # the old behaviour (the outer, empty skip) would say conv1 is rewritten
    assert qpasses.PassManager("ptq_int8").explain("weight_fake_quant", conv1, gm).matched


def test_unmatched_skip_in_a_nested_with_warns_naming_the_entry(tmp_path, setup):
    x, gm = setup
    f = write(tmp_path, NESTED.replace("[conv1]", "[conv1, no_such_layer]"))
    pm = qpasses.PassManager(str(f), quiet=True)
    pm.run(gm, data=[x])
    assert len(pm.report.warnings) == 1, pm.report.warnings
    w = pm.report.warnings[0]
    assert w.startswith("skip pattern 'no_such_layer' (with: of recipe step 'ptq_int8' (")
    assert f"{f}:7:" in w and "matches no node name or module path" in w
    assert "conv1" not in w.replace("'no_such_layer'", "")   # the entry that does match is not named


def test_outer_and_nested_values_differing_are_both_used_and_shown(tmp_path, setup):
    """observe reads the run's skip (the option), convert a with: of its own."""
    x, gm = setup
    f = write(tmp_path, """\
        version: 1
        recipe: mixed
        params:
          skip: inherit
        steps:
          - rules: canonicalize
          - rules: observe
          - step: calibrate
          - rules: convert
            with: {skip: [conv1]}
        """)
    pm = qpasses.PassManager(str(f), skip=["fc"], quiet=True)
    conv1, fc = node_of(gm, "conv1"), node_of(gm, "fc")
    obs_fc = pm.explain("observe_weighted_inputs", fc, gm)
    assert not obs_fc and "matches skip pattern 'fc'" in obs_fc.reason and obs_fc.bindings == ""
    assert pm.explain("observe_weighted_inputs", conv1, gm).matched
    wfq_conv1 = pm.explain("weight_fake_quant", conv1, gm)
    assert not wfq_conv1 and "matches skip pattern 'conv1'" in wfq_conv1.reason
    assert "skip=['conv1'] from with: of rule family step 'convert'" in wfq_conv1.bindings
    assert pm.explain("weight_fake_quant", fc, gm).matched
    pm.run(gm, data=[x])
    assert pm.report.warnings == []
    assert refusal(pm, "observe_weighted_inputs", fc) and not refusal(pm, "observe_weighted_inputs", conv1)
    assert refusal(pm, "weight_fake_quant", conv1) and fc.name in pm.report["weight_fake_quant"].rewritten
    # a typo in the option is reported as the run's value; the with: value is not blamed
    pm = qpasses.PassManager(str(f), skip=["fx"], quiet=True)
    pm.run(gm, data=[x])
    assert pm.report.warnings == ["skip pattern 'fx' matches no node name or module path of the graph "
                                  "(nothing is skipped by it)"]


def test_a_skip_option_that_every_with_rebinds_is_reported(tmp_path, setup):
    x, gm = setup
    f = write(tmp_path, NESTED)
    pm = qpasses.PassManager(str(f), skip=["fc"], quiet=True)
    pm.run(gm, data=[x])
    assert len(pm.report.warnings) == 1
    w = pm.report.warnings[0]
    assert w.startswith("skip=['fc'] (the run's value) skips nothing: with: of recipe step 'ptq_int8'")
    assert node_of(gm, "fc").name in pm.report["weight_fake_quant"].rewritten    # what the warning is about


def test_a_rule_run_twice_with_different_with_is_explained_for_each(tmp_path, setup):
    x, gm = setup
    f = write(tmp_path, """\
        version: 1
        recipe: twice
        params:
          skip: inherit
        steps:
          - rules: observe
            with: {skip: [conv1]}
          - rules: observe
            with: {skip: [fc]}
        """)
    pm = qpasses.PassManager(str(f), quiet=True)
    e = pm.explain("observe_weighted_inputs", node_of(gm, "conv1"), gm)
    assert not e and "skip pattern 'conv1'" in e.reason and "r.yaml:7:" in e.bindings
    assert len(e.others) == 1 and e.others[0].matched and "r.yaml:9:" in e.others[0].bindings
    lines = str(e).splitlines()
    assert len(lines) == 2 and lines[1].startswith("also rule 'observe_weighted_inputs' matches node")


def test_cli_explain_reports_the_nested_value(tmp_path):
    from click.testing import CliRunner
    from qpasses.cli import main
    f = write(tmp_path, NESTED)
    r = CliRunner().invoke(main, ["explain", "qpasses.zoo:ResNetLike", "weight_fake_quant", "-r", str(f)])
    assert r.exit_code == 0, r.output
    assert "matches skip pattern" not in r.output                   # ResNetLike has no conv1
    g = write(tmp_path, NESTED.replace("[conv1]", "['stem.*']"), "s.yaml")
    r = CliRunner().invoke(main, ["explain", "qpasses.zoo:ResNetLike", "weight_fake_quant", "-r", str(g)])
    assert r.exit_code == 0, r.output
    skipped = [ln for ln in r.output.splitlines() if "matches skip pattern 'stem.*'" in ln]
    assert skipped and all("from with: of recipe step 'ptq_int8'" in ln for ln in skipped)
