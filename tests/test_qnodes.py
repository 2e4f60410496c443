"""The one graph form of a quantizer (qpasses.qnodes): a custom-op call whose scale and zero point are
``get_attr`` reads of a holder module."""
import torch
import torch.fx as fx
import torch.nn as nn

import qpasses
from qpasses.context import RewriteContext
from qpasses.numerics import FakeQuantize
from qpasses.qnodes import (QUANTIZER_OPS, as_module_call, as_quantizer_call, bypassed, holder_target,
                            quantizer_module)
from qpasses.zoo import DigitsCNN


def _ptq(model, x, level="fx", **opts):
    gm = qpasses.trace(model.eval(), (x,), mode=level)
    return qpasses.PassManager("ptq_int8", **opts).run(gm, data=[x, x * 0.5])


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in QUANTIZER_OPS]


def test_quantizer_module_reads_the_op_form_and_the_module_form():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    q = _ptq(DigitsCNN(), x)
    calls = _calls(q)
    assert len(calls) == 8                                   # 4 activations + 4 weights
    mods = dict(q.named_modules())
    for n in calls:
        fq = quantizer_module(q, n)
        assert isinstance(fq, FakeQuantize) and fq is quantizer_module(mods, n)
        assert holder_target(n) == n.args[1].target.rpartition(".")[0] == n.name
    # the same node as a module call: still found, and computes the same
    ref = q(x)
    rc = RewriteContext(q)
    n = calls[0]
    as_module_call(rc, n)
    q.recompile()
    assert n.op == "call_module" and isinstance(quantizer_module(q, n), FakeQuantize)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=0)
    as_quantizer_call(rc, n)
    q.graph.lint()
    q.recompile()
    assert n.op == "call_function" and n.target in QUANTIZER_OPS
    assert len([a for a in q.graph.nodes if a.op == "get_attr" and not a.users]) == 0
    torch.testing.assert_close(q(x), ref, rtol=0, atol=0)


def test_bypassed_runs_the_float_graph_and_restores_it():
    torch.manual_seed(0)
    m = DigitsCNN().eval()
    x = torch.randn(4, 1, 8, 8)
    q = _ptq(m, x)
    ref = q(x)
    with bypassed(q, list(q.graph.nodes)):
        out = q(x)
    with torch.no_grad():
        torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-5)   # BatchNorm folded: float up to rounding
    assert not torch.equal(out, ref)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=0)
    assert len(_calls(q)) == 8


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_state_dict_keys_and_shared_weights_survive_conversion():
    torch.manual_seed(0)
    m = _Shared().eval()
    x = torch.randn(5, 6)
    q = _ptq(m, x)
    keys = set(q.state_dict())
    assert {"fc.weight", "fc.bias"} <= keys                  # the weight is still the module's parameter
    holders = {holder_target(n) for n in _calls(q)}
    assert all(f"{h}.scale" in keys and f"{h}.zero_point" in keys for h in holders)
    # both weight quantizers read the one shared parameter
    reads = [n.args[0].target for n in _calls(q) if n.args[0].op == "get_attr"]
    assert reads == ["fc.weight", "fc.weight"]
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(q(x).flatten(), m(x).flatten(), dim=0) > 0.999


def test_lsq_scales_train_through_get_attr():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    gm = qpasses.trace(DigitsCNN().eval(), (x,))
    q = qpasses.PassManager("qat", quiet=True).run(gm, data=[x])
    lsq = [n for n in _calls(q) if "lsq" in str(n.target)]
    assert len(lsq) == 8, "qat gives LSQ quantizer op calls (4 activations, 4 weights)"
    fqs = [quantizer_module(q, n) for n in lsq]
    assert all(fq.learnable and isinstance(fq.scale, nn.Parameter) for fq in fqs)
    params = {id(p) for p in q.parameters()}
    assert all(id(fq.scale) in params for fq in fqs)          # an optimiser over q.parameters() sees them
    before = [fq.scale.detach().clone() for fq in fqs]
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    q(x).square().mean().backward()
    assert all(fq.scale.grad is not None and bool(torch.isfinite(fq.scale.grad).all()) for fq in fqs)
    opt.step()
    # the last layer's weight scales (a linear: no BatchNorm after it to normalise the change away)
    fc = quantizer_module(q, next(n for n in reversed(lsq) if n.args[0].op == "get_attr"))
    k = next(i for i, fq in enumerate(fqs) if fq is fc)
    assert not torch.equal(before[k], fc.scale.detach())
    # (scales feeding a training-mode BatchNorm get tiny gradients: it normalises a rescaled channel back)
    assert sum(not torch.equal(b, fq.scale.detach()) for b, fq in zip(before, fqs)) >= 2


def test_both_graph_levels_give_the_same_form():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    m = DigitsCNN().eval()
    for level in ("fx", "export"):
        q = _ptq(m, x, level=level)
        assert len(_calls(q)) == 8, level
        assert not any(n.op == "call_module" and isinstance(q.get_submodule(n.target), FakeQuantize)
                       for n in q.graph.nodes), level
