"""Matcher: bindings, alternatives, commutativity, explain, linear cost without recursion."""
import operator
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import qpasses
from qpasses import PassManager, Rule
from qpasses.lang.syntax import parse_pattern
from qpasses.matcher import Match, MatchFailure, Matcher


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = x + self.conv(x)          # conv on the right: commutative match needed
        y = torch.relu(y)
        z = y.mean((2, 3))
        return F.gelu(self.fc(z)) * 2


def graph(level):
    m = Residual().eval()
    return qpasses.trace(m, torch.randn(1, 4, 6, 6), mode=level)


def find(gm, cls):
    mt = Matcher(gm)
    return [n for n in gm.graph.nodes if mt.classify(n) == cls]


def test_commutative_add_and_same_binding(level):
    gm = graph(level)
    mt = Matcher(gm)
    add = find(gm, "add")[0]
    m = mt.match(parse_pattern("(add $a (conv2d $c ?x) ?x)"), add)
    assert isinstance(m, Match)
    assert m["c"] in m.nodes and m["x"] is m["c"].args[0] if level == "fx" else isinstance(m, Match)
    # ?x must be the same value at both places: the conv input *is* the skip input here
    bad = mt.match(parse_pattern("(add $a (conv2d $c ?x) (relu _))"), add)
    assert isinstance(bad, MatchFailure) and "is not" in bad.reason


def test_attribute_and_module_constraints(level):
    gm = graph(level)
    mt = Matcher(gm)
    conv = find(gm, "conv2d")[0]
    assert isinstance(mt.match(parse_pattern("(conv2d $c ?x :groups 1 :padding 1)"), conv), Match)
    f = mt.match(parse_pattern("(conv2d $c ?x :groups 2)"), conv)
    assert isinstance(f, MatchFailure) and ":groups is 1" in f.reason
    # the same :module constraint at both levels: the module call (fx), or the module class the aten
    # op was traced in (export); short and qualified names; base classes only where the class is known
    assert isinstance(mt.match(parse_pattern("(conv2d $c ?x :module Conv2d)"), conv), Match)
    assert isinstance(mt.match(parse_pattern("(conv2d $c ?x :module torch.nn.modules.conv.Conv2d)"), conv), Match)
    f = mt.match(parse_pattern("(conv2d $c ?x :module Linear)"), conv)
    assert "module type is Conv2d" in f.reason
    if level == "fx":
        assert isinstance(mt.match(parse_pattern("(conv2d $c ?x :module _ConvNd)"), conv), Match)
    relu = find(gm, "relu")[0]                       # torch.relu in Residual.forward: no module of its own
    f = mt.match(parse_pattern("(relu $r ?x :module ReLU)"), relu)
    assert isinstance(f, MatchFailure)


def test_input_count_and_rest():
    gm = graph("fx")
    mt = Matcher(gm)
    add = find(gm, "add")[0]
    f = mt.match(parse_pattern("(add $a ?x)"), add)
    assert isinstance(f, MatchFailure) and "has 2 input(s)" in f.reason
    assert isinstance(mt.match(parse_pattern("(add $a ?x ...)"), add), Match)


def test_same_rule_matches_both_levels():
    rule = Rule(name="gelu_of_linear", match="(gelu $g (linear $l ?x))", rewrite="bypass($g, $l)")
    counts = {}
    for level in ("fx", "export"):
        gm = graph(level)
        pm = PassManager(rule)
        out = pm.run(gm)
        counts[level] = pm.report["gelu_of_linear"].rewrites
        assert len(find(out, "gelu")) == 0
    assert counts == {"fx": 1, "export": 1}


def test_explain_names_the_failing_step(level):
    gm = graph(level)
    pm = PassManager("canonicalize")
    relu = find(gm, "relu")[0]
    e = pm.explain("fold_bn", relu, gm)
    assert not e.matched and "not a candidate anchor" in e.reason
    rule = Rule(name="r", match="(mul $m (gelu $g (conv2d $c ?x)) ...)", rewrite="bypass($m, $g)")
    pm = PassManager(rule)
    mul = find(gm, "mul")[0]
    e = pm.explain("r", mul, gm)
    assert not e.matched and "conv2d" in e.step and "linear" in e.reason
    rule2 = Rule(name="r2", match="(mul $m (gelu $g ?x) ...)", where=["single_use($m)"], unless=["has_users($g)"],
                 rewrite="bypass($m, $g)")
    e2 = PassManager(rule2).explain("r2", mul, gm)
    assert not e2.matched and e2.step == "constraint" and "unless has_users($g)" in e2.reason


def _long_chain(n_nodes):
    """A straight fx graph of n add/relu nodes built directly (no tracing cost)."""
    g = fx.Graph()
    x = g.placeholder("x")
    cur = x
    for i in range(n_nodes // 2):
        cur = g.call_function(operator.add, (cur, x))
        cur = g.call_function(torch.relu, (cur,))
    g.output(cur)
    return fx.GraphModule(nn.Module(), g)


@pytest.mark.slow
def test_100k_nodes_no_recursion():
    limit = sys.getrecursionlimit()
    gm = _long_chain(100_000)
    sys.setrecursionlimit(200)  # any recursion over the graph would blow up here
    try:
        rule = Rule(name="relu_add", match="(relu $r (add $a ?x ?y))", rewrite="bypass($r, $a)")
        pm = PassManager(rule)
        out = pm.run(gm)
        assert pm.report["relu_add"].rewrites == 100_000 // 2
        assert not find(out, "relu")
    finally:
        sys.setrecursionlimit(limit)
    # (how the time grows with size is measured by benchmarks/engine.py, not asserted here)


@pytest.mark.slow
def test_ptq_int8_on_a_100k_node_residual_chain():
    from qpasses.zoo import chain_for_nodes
    model = chain_for_nodes(100_000).eval()
    with torch.no_grad():  # keep 14k residual blocks from overflowing float32
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(1e-4)
    x = torch.randn(1, 8, 4, 4)
    gm = qpasses.trace(model, (x,), mode="fx")
    assert len(gm.graph.nodes) > 95_000
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)
    try:
        pm = PassManager("ptq_int8")
        q = pm.run(gm, data=[x])
    finally:
        sys.setrecursionlimit(limit)
    n_conv = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert pm.report["fold_bn"].rewrites == n_conv
    assert pm.report["weight_fake_quant"].rewrites == n_conv
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all() and out.shape == ref.shape


def test_is_module_constraint_at_both_levels(level):
    gm = graph(level)
    rule = Rule(name="convs", match="(conv2d $c ?x ...)", where=["is_module($c, Conv2d)"], rewrite="bypass($c, ?x)")
    pm = PassManager(rule)
    pm.run(gm)
    assert pm.report["convs"].matches == 1 and pm.report["convs"].n_refused == 0
    rule = Rule(name="lin", match="(conv2d $c ?x ...)", where=["is_module($c, Linear)"], rewrite="bypass($c, ?x)")
    pm = PassManager(rule)
    pm.run(gm)
    assert pm.report["lin"].rewrites == 0 and "Conv2d" in pm.report["lin"].refused[0][1]
