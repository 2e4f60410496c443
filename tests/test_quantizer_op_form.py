"""The quantizer kinds beyond FakeQuantize in the one graph form (issue 19, Deliver 1): each quantizer is
one ``call_function`` of a ``torch.library`` custom op whose qparams are ``get_attr`` nodes of a holder
module the graph never calls; torch.export keeps it one node; the numerics are those of the holder's
own forward; state_dict keys and the back-ends' results do not change."""
import pytest
import torch
import torch.nn as nn

import qpasses
from qpasses.kernels import packing
from qpasses.kernels.lowering import Int4GroupFakeQuantize
from qpasses.qnodes import QUANTIZER_OPS, holder_target, quantizer_module

Q = torch.ops.qpasses


class _MLP(nn.Module):
    def __init__(self, k=96, h=64, n=10):
        super().__init__()
        self.fc1 = nn.Linear(k, h)
        self.fc2 = nn.Linear(h, h, bias=False)
        self.fc3 = nn.Linear(h, n)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _calls(gm, op):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


def _module_calls(gm, kinds):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kinds)]


# ------------------------------------------------------------------------------------------ int4
def _w4a16(level, symmetric, group_size=32, seed=0):
    torch.manual_seed(seed)
    m = _MLP().eval()
    x = torch.randn(4, 96)
    gm = qpasses.trace(m, (x,), mode=level)
    q = qpasses.PassManager("w4a16", group_size=group_size, symmetric=symmetric, quiet=True).run(gm)
    return m, x, q


@pytest.mark.parametrize("level", ["fx", "export"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_group_quantizer_is_one_op_node_on_get_attr_qparams(level, symmetric):
    m, x, q = _w4a16(level, symmetric)
    assert not _module_calls(q, (Int4GroupFakeQuantize,))          # the holder is never called
    calls = _calls(q, Q.fake_quant_per_group.default)
    assert len(calls) == 3 and all(n.target in QUANTIZER_OPS for n in calls)
    for n in calls:
        w, s, z, gs, qmin, qmax = n.args
        holder = q.get_submodule(holder_target(n))
        assert isinstance(holder, Int4GroupFakeQuantize) and quantizer_module(q, n, (Int4GroupFakeQuantize,)) is holder
        assert w.op == s.op == z.op == "get_attr"
        assert s.target == f"{holder_target(n)}.scales"
        assert z.target == f"{holder_target(n)}." + ("zero_point" if symmetric else "zeros")
        assert (gs, qmin, qmax) == (32, 0, 15)
        # the node computes what the holder's forward computes on the same weight, bit for bit, and
        # the value an independent round-to-nearest of the fitted grid gives
        wt = qpasses.opclasses.get_attr_value(q, w.target)
        got = n.target(wt, qpasses.opclasses.get_attr_value(q, s.target), qpasses.opclasses.get_attr_value(q, z.target),
                       gs, qmin, qmax)
        assert torch.equal(got, holder(wt))
        sx = holder.scales.repeat_interleave(32, dim=1)
        zx = (holder.zeros if holder.zeros is not None else torch.full_like(holder.scales, 8.0)).repeat_interleave(32, 1)
        ref = (torch.clamp(torch.round(wt * torch.reciprocal(sx)) + zx, 0, 15) - zx) * sx
        assert torch.equal(got, ref)
        # the codes the int4 kernel is handed dequantize to exactly that value
        assert torch.equal((holder.codes(wt).float() - zx) * sx, got)
    # state_dict: the holder's keys are those of the module form (no zero_point for symmetric)
    keys = {k for k in q.state_dict() if "fq4" in k}
    want = {f"{holder_target(n)}.scales" for n in calls}
    if not symmetric:
        want |= {f"{holder_target(n)}.zeros" for n in calls}
    assert keys == want


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_graph_survives_torch_export_one_node_per_quantizer(symmetric):
    m, x, q = _w4a16("fx", symmetric)
    ep = torch.export.export(q, (x,))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is Q.fake_quant_per_group.default]
    assert len(nodes) == 3
    with torch.no_grad():
        assert torch.equal(ep.module()(x), q(x))


def test_int4_graph_equals_the_module_form_it_replaces():
    """The graph with every quantizer node turned back into a call of its holder (the old module
    form) computes the same outputs, bit for bit."""
    from qpasses.context import RewriteContext
    from qpasses.qnodes import as_module_call, as_quantizer_call
    m, x, q = _w4a16("fx", False)
    with torch.no_grad():
        op_form = q(x)
    rc = RewriteContext(q)
    nodes = _calls(q, Q.fake_quant_per_group.default)
    for n in nodes:
        as_module_call(rc, n)
    q.recompile()
    assert len(_module_calls(q, (Int4GroupFakeQuantize,))) == 3 and not _calls(q, Q.fake_quant_per_group.default)
    with torch.no_grad():
        assert torch.equal(q(x), op_form)
    for n in nodes:
        as_quantizer_call(rc, n)
    q.recompile()
    assert len(_calls(q, Q.fake_quant_per_group.default)) == 3
    with torch.no_grad():
        assert torch.equal(q(x), op_form)


def test_int4_holder_rounds_ties_as_the_op_and_fits_as_packing():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    fq = Int4GroupFakeQuantize.fit(w, 32, True)
    _, s, z = packing.quantize_int4(w, 32, symmetric=True)
    assert torch.equal(fq.scales, s) and z is None and "zero_point" not in fq.state_dict()
    w[2, 3] = 2.5 * fq.scales[2, 0]      # exactly half-way between two codes
    sx = fq.scales.repeat_interleave(32, 1)
    want = torch.clamp(torch.round(w * torch.reciprocal(sx)) + 8, 0, 15)
    assert torch.equal(fq.codes(w).float(), want)
    assert torch.equal(fq(w), Q.fake_quant_per_group(w, fq.scales, fq.zero_point, 32, 0, 15))


def test_int4_gptq_scales_written_in_place_are_what_the_graph_reads():
    """GPTQ writes new scales / zeros into the holder's buffers: the quantizer node's get_attr reads
    them (no stale copy)."""
    m, x, q = _w4a16("fx", False)
    n = _calls(q, Q.fake_quant_per_group.default)[0]
    holder = q.get_submodule(holder_target(n))
    wt = qpasses.opclasses.get_attr_value(q, n.args[0].target)
    with torch.no_grad():
        before = q(x)
        holder.scales.mul_(2.0)
        after = q(x)
    assert not torch.equal(before, after)
    assert torch.equal(n.target(wt, holder.scales, holder.zeros, 32, 0, 15), holder(wt))


def test_int4_lowering_after_op_form_is_the_kernel_on_the_holder_codes():
    m, x, q = _w4a16("fx", True)
    low = qpasses.PassManager("lower", device="cpu", quiet=True).run(q)
    assert len(_calls(low, Q.int4_weight_only_linear.default)) == 3
    assert not _calls(low, Q.fake_quant_per_group.default)
    assert not any(n.op == "get_attr" and "fq4" in str(n.target) for n in low.graph.nodes)
    with torch.no_grad():
        want, got = q(x), low(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6
