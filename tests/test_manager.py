"""PassManager: input never modified (even on failure), fixpoint limits, provenance, report."""
import pytest
import torch
import torch.nn as nn

import qpasses
from qpasses import zoo
from qpasses import PassManager, Refuse, RewriteError, Rule, action
from qpasses.manager import PROVENANCE_KEY


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))))


@action("test_break_midway")
def _break_midway(ctx, node):
    # modify the graph, then fail: the caller's graph must not see any of it
    with ctx.graph.inserting_after(node):
        ctx.graph.call_function(torch.neg, (node,))
    ctx.gm.a.weight.data.zero_() if hasattr(ctx.gm, "a") else None
    raise ValueError("boom")


@action("test_wrap_relu")
def _wrap_relu(ctx, node):
    users = list(node.users)
    with ctx.graph.inserting_after(node):
        new = ctx.graph.call_function(torch.relu, (node,))
    for u in users:
        u.replace_input_with(node, new)


@action("test_refuse")
def _refuse(ctx, node):
    raise Refuse("not today")


def test_input_untouched_when_a_rule_raises(level):
    m = Tiny().eval()
    x = torch.randn(2, 4)
    gm = qpasses.trace(m, x, mode=level)
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    pm = PassManager(Rule(name="broken", match="(relu $r ...)", rewrite="test_break_midway($r)"))
    with pytest.raises(RewriteError, match="rule 'broken'.*failed on node .*boom"):
        pm.run(gm)
    assert gm.code == code
    for k, v in gm.state_dict().items():
        assert torch.equal(v, state[k])
    torch.testing.assert_close(gm(x), m(x))


def test_created_nodes_carry_provenance_and_are_not_rematched():
    gm = qpasses.trace(Tiny(), torch.randn(2, 4), mode="fx")
    rule = Rule(name="wrap", match="(relu $r ...)", rewrite="test_wrap_relu($r)", stage="s")
    pm = PassManager(rule)
    out = pm.run(gm)
    created = [n for n in out.graph.nodes if n.meta.get(PROVENANCE_KEY) == "wrap"]
    assert len(created) == 2 and pm.report["wrap"].rewrites == 2


def test_fixpoint_hard_limit(tmp_path):
    f = tmp_path / "loop.yaml"
    f.write_text("""
version: 1
stages: [{name: s, mode: fixpoint, max_iterations: 3}]
rules:
  - name: wrap
    match: (relu $r ...)
    rewrite: test_wrap_relu($r)
""")
    gm = qpasses.trace(Tiny(), torch.randn(2, 4), mode="fx")
    pm = PassManager(str(f))
    out = pm.run(gm)
    # provenance stops the rule from chasing its own output; each iteration wraps the
    # original relus' newest wrapper only once, and the hard limit stops it
    assert pm.report.stages[0].iterations <= 3
    assert len(list(out.graph.nodes)) < 30


def test_refusals_are_reported():
    gm = qpasses.trace(Tiny(), torch.randn(2, 4), mode="fx")
    pm = PassManager(Rule(name="no", match="(relu $r ...)", rewrite="test_refuse($r)"))
    pm.run(gm)
    st = pm.report["no"]
    assert st.candidates == 2 and st.matches == 2 and st.rewrites == 0 and st.n_refused == 2
    assert st.refused[0][1] == "not today"
    assert "not today" in str(pm.report)


def test_run_rejects_non_graph_modules():
    with pytest.raises(qpasses.OptionError, match="qpasses.trace"):
        PassManager("canonicalize").run(Tiny())


def test_trace_errors_are_clear():
    class Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow on values: neither tracer can
                return x.nonzero().float().sum() * torch.tensor(float(x.sum()))
            return x

    with pytest.raises(qpasses.TraceError) as e:
        qpasses.trace(Bad(), torch.ones(3))
    assert "symbolic_trace failed" in str(e.value) and "torch.export.export failed" in str(e.value)


def test_transformer_falls_back_to_export():
    from qpasses.zoo import TransformerEncoderBlock, example_input
    m = TransformerEncoderBlock().eval()
    x = example_input("transformer")
    gm = qpasses.trace(m, x)
    assert gm.meta["qpasses.level"] == "aten"
    torch.testing.assert_close(gm(x), m(x))
    shapes = [n.meta.get("qpasses.shape") for n in gm.graph.nodes
              if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)]
    assert len(shapes) > 5 and all(s is not None for s in shapes)
    # the batch dimension is exported dynamic: other batch sizes run too
    x3 = torch.cat([x, x, x])
    torch.testing.assert_close(gm(x3), m(x3))


def test_report_counts_a_refused_node_once_across_fixpoint_passes():
    class ConvUsedTwice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.bn = torch.nn.BatchNorm2d(3)
            self.conv2 = torch.nn.Conv2d(3, 3, 1)
            self.bn2 = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn2(self.conv2(self.bn(y) + y))

    x = torch.randn(1, 3, 4, 4)
    gm = qpasses.trace(ConvUsedTwice().eval(), (x,))
    pm = qpasses.PassManager("canonicalize")
    out = pm.run(gm)
    st = pm.report["fold_bn"]
    stage = [s for s in pm.report.stages if s.stage == "canonicalize"][0]
    assert stage.iterations == 2  # a fixpoint stage: the second pass sees the refusal again
    assert (st.candidates, st.matches, st.rewrites, st.n_refused) == (2, 2, 1, 1)
    assert st.refused == [("bn", "interior node conv is also used outside the match (by add)")]
    torch.testing.assert_close(out(x), gm(x))


def test_data_may_be_a_loader_of_inputs_and_labels():
    """A DataLoader's (inputs, labels) batches: the labels are not model inputs; a model that
    takes two inputs still gets both."""
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    gm = qpasses.trace(zoo.DigitsCNN().eval(), (x[:2],))
    with_labels = qpasses.PassManager("ptq_int8", verify=True).run(gm, data=DataLoader(TensorDataset(x, y), 16))
    inputs_only = qpasses.PassManager("ptq_int8").run(gm, data=list(x.split(16)))
    with torch.no_grad():
        assert torch.equal(with_labels(x), inputs_only(x))

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, p, q):
            return self.a(p) + self.b(q)

    p, q = torch.randn(8, 4), torch.randn(8, 4) * 5
    g2 = qpasses.trace(Two().eval(), (p, q))
    pm = qpasses.PassManager("ptq_int8")
    out = pm.run(g2, data=[(p, q, torch.zeros(8))])        # third item: a label
    ranges = sorted(float(m.scale) for m in out.modules() if type(m).__name__ == "FakeQuantize" and m.axis is None)
    assert len(ranges) == 2 and ranges[1] > 3 * ranges[0]   # q's (5x wider) range reached its own observer


def test_trace_specialises_optional_inputs_not_given():
    """forward(x, mask=None) traced with (x,): fx specialises on mask=None (it would otherwise be
    a proxy, and `mask is None` false); batches shaped like the example give one input."""
    from torch.utils.data import DataLoader, TensorDataset

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x, mask=None, scale: float = 2.0):
            y = self.l(x) * scale
            return y if mask is None else y * mask

    torch.manual_seed(0)
    m = M().eval()
    x, y = torch.randn(16, 4), torch.randint(0, 4, (16,))
    for mode in ("fx", "export"):
        gm = qpasses.trace(m, (x[:2],), mode=mode)
        torch.testing.assert_close(gm(x), m(x))
        q = qpasses.PassManager("ptq_int8").run(gm, data=DataLoader(TensorDataset(x, y), 8))  # labels unused
        assert torch.isfinite(q(x)).all()
    mask = torch.rand(2, 4)
    gm = qpasses.trace(m, (x[:2], mask), mode="fx")               # given: traced as an input
    torch.testing.assert_close(gm(x[:2], mask), m(x[:2], mask))
