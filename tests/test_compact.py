"""The compact quantized modules observe and convert leave in module-level graphs, and their
expansion to the decomposed form every later rule reads."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn

import qpasses
from qpasses import zoo
from qpasses.compact import (FakeQuantConv2d, compact_module, expand_compact, has_compact, input_quantizer, is_compact,
                             plain_module)
from qpasses.fxfast import graph_shape, same_shape
from qpasses.numerics import FakeQuantize

torch.manual_seed(0)

_MODULES = [
    (lambda: nn.Linear(6, 5), (3, 6)),
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1), (2, 4, 11)),
    (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (2, 4, 9, 9)),
    (lambda: nn.Conv3d(2, 4, 3, padding=1, bias=False), (1, 2, 5, 5, 5)),
    (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1), (2, 4, 7)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose3d(2, 4, 2, stride=2), (1, 2, 3, 3, 3)),
]


def _fq(mod: nn.Module) -> FakeQuantize:
    axis = 1 if isinstance(mod, nn.modules.conv._ConvTransposeNd) and mod.groups == 1 else 0
    w = mod.weight.detach()
    amax = w.abs().amax(dim=[d for d in range(w.dim()) if d != axis]) if axis is not None else w.abs().max()
    return FakeQuantize(amax / 7, torch.zeros_like(amax, dtype=torch.int32), -7, 7, axis=axis)


@pytest.mark.parametrize("make, shape", _MODULES)
def test_compact_module_computes_the_functional_form(make, shape):
    mod = make().eval()
    x = torch.randn(*shape)
    fq = _fq(mod)
    c = compact_module(mod, fq)
    assert is_compact(c) and isinstance(c, type(mod)) and c.weight is mod.weight and c.weight_fq is fq
    # the reference: the module's own forward with the fake-quantized weight put in its place
    ref = make().eval()
    ref.load_state_dict(mod.state_dict())
    with torch.no_grad():
        ref.weight.copy_(fq(mod.weight))
        assert torch.equal(c(x), ref(x))
    back = plain_module(c)
    assert type(back) is type(mod) and "weight_fq" not in back._modules and back.weight is mod.weight
    assert not is_compact(mod)  # the source module is untouched
    # pickles by its module-level class
    c2 = pickle.loads(pickle.dumps(c))
    assert type(c2) is type(c)
    with torch.no_grad():
        assert torch.equal(c2(x), c(x))


def test_only_plain_zero_padded_classes_have_a_compact_form():
    class MyConv(nn.Conv2d):
        pass
    with pytest.raises(TypeError, match="MyConv"):
        compact_module(MyConv(1, 1, 1), FakeQuantize(1.0, 0, -7, 7))
    with pytest.raises(TypeError, match="Conv2d"):
        compact_module(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), FakeQuantize(1.0, 0, -7, 7))


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    m = zoo.ResNetLike().eval()
    x = zoo.example_input("resnet", 4)
    return m, qpasses.trace(m, (x,), mode="fx"), x


def test_ptq_int8_returns_compact_modules_that_expand_to_the_same_numbers(resnet):
    m, gm, x = resnet
    pm = qpasses.PassManager("ptq_int8")
    q = pm.run(gm, data=[x])
    n_weight = pm.report["weight_fake_quant"].rewrites
    compact = [n for n in q.graph.nodes if n.op == "call_module" and is_compact(q.get_submodule(n.target))]
    assert len(compact) == n_weight > 0
    assert not has_compact(gm)                          # the input graph module is untouched
    d = qpasses.decomposed(q)
    assert not has_compact(d) and has_compact(q)         # decomposed() copies
    inside = [n for n in compact if input_quantizer(q.get_submodule(n.target)) is not None]
    assert len(inside) == pm.report["input_fake_quant"].rewrites > 0   # observed inside, then converted
    assert all(isinstance(input_quantizer(q.get_submodule(n.target)), FakeQuantize) for n in inside)
    assert len(d.graph.nodes) == len(q.graph.nodes) + 3 * n_weight + len(inside) - sum(
        1 for n in compact if q.get_submodule(n.target).bias is None)
    def act_fq(g):                                       # activation fake quant nodes
        return [n for n in g.graph.nodes if n.op == "call_module" and n.target.startswith("act_q")
                and isinstance(g.get_submodule(n.target), FakeQuantize)]
    assert len(act_fq(d)) == len(act_fq(q)) + len(inside)  # each input_q became an act_q_N node
    with torch.no_grad():
        assert torch.equal(q(x), d(x))
    wfq = [n for n in d.graph.nodes if n.op == "call_module" and n.target.startswith("weight_fq")]
    assert len(wfq) == n_weight and all(n.args[0].op == "get_attr" for n in wfq)
    assert qpasses.decomposed(d) is d                     # nothing to expand: the same object


def test_a_later_stage_sees_the_decomposed_form(resnet):
    m, gm, x = resnet
    q = qpasses.PassManager("ptq_int8").run(gm, data=[x])
    pm = qpasses.PassManager("int_bias")                 # reads fq(get_attr weight) -> conv2d
    out = pm.run(q)
    assert pm.report["int32_bias_grid"].rewrites > 0
    assert not has_compact(out) and has_compact(q)
    # in one run too: convert, then another family
    pm = qpasses.PassManager(["ptq_int8", "int_bias"])
    out2 = pm.run(gm, data=[x])
    assert pm.report["int32_bias_grid"].rewrites == pm.report["weight_fake_quant"].rewrites
    with torch.no_grad():
        assert torch.allclose(out(x), out2(x))


def test_convert_swaps_modules_only_so_the_code_is_not_regenerated(resnet, monkeypatch):
    m, gm, x = resnet
    prepared = qpasses.PassManager(["canonicalize", "observe"]).run(gm)
    with torch.no_grad():
        prepared(x)
    pm = qpasses.PassManager("convert")
    q = pm.run(prepared)
    assert pm.report["weight_fake_quant"].rewrites > 0 and pm.report["activation_fake_quant"].rewrites > 0
    assert q.code == prepared.code                       # same nodes, names and targets
    # ptq_int8 generates code once: for calibration (convert then changes no node)
    calls = []
    real = torch.fx.GraphModule.recompile
    monkeypatch.setattr(torch.fx.GraphModule, "recompile", lambda self: calls.append(1) or real(self))
    pm = qpasses.PassManager("ptq_int8")
    q = pm.run(gm, data=[x])
    assert len(calls) == 1 and pm.report["weight_fake_quant"].rewrites > 0
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


def test_a_shared_module_gets_the_decomposed_form():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))
    torch.manual_seed(0)
    m = Twice().eval()
    x = torch.randn(8, 4)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(m, (x,)), data=[x])
    assert not has_compact(q)
    assert sum(1 for n in q.graph.nodes if n.op == "call_module" and n.target.startswith("weight_fq")) == 2


def test_expand_in_place_and_graph_shape():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(2, 3, 6, 6)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(m, (x,)), data=[x])
    before = graph_shape(q.graph)
    assert same_shape(before, graph_shape(q.graph))
    with torch.no_grad():
        ref = q(x)
    assert expand_compact(q) == 1
    assert not same_shape(before, graph_shape(q.graph))
    q.recompile()
    assert isinstance(q.get_submodule("0"), nn.Conv2d) and not isinstance(q.get_submodule("0"), FakeQuantConv2d)
    with torch.no_grad():
        assert torch.equal(q(x), ref)
    assert expand_compact(q) == 0


def test_runs_leave_the_input_meta_alone(resnet):
    m, gm, x = resnet
    prepared = qpasses.PassManager(["canonicalize", "observe"]).run(gm)
    with torch.no_grad():
        prepared(x)
    before = {k: (dict(v) if isinstance(v, dict) else v) for k, v in prepared.meta.items()}
    q = qpasses.PassManager("convert").run(prepared)
    assert prepared.meta.keys() == before.keys()
    assert prepared.meta["qpasses.state"] == before["qpasses.state"] and "compact" not in prepared.meta["qpasses.state"]
    assert q.meta["qpasses.state"] is not prepared.meta["qpasses.state"]


def test_compact_and_plain_forms_have_hook_tables_of_their_own():
    conv = nn.Conv2d(3, 4, 3)
    hook = conv.register_forward_hook(lambda *a: None)
    fq = FakeQuantize(torch.full((4,), 0.1), torch.zeros(4, dtype=torch.int32), -127, 127, axis=0)
    comp = compact_module(conv, fq)
    assert list(comp._forward_hooks) == [hook.id]                  # the hooks come along ...
    assert comp._forward_hooks is not conv._forward_hooks          # ... in a table of its own
    comp.register_forward_pre_hook(lambda *a: None)
    assert not conv._forward_pre_hooks
    back = plain_module(comp)
    assert type(back) is nn.Conv2d and back._forward_pre_hooks is not comp._forward_pre_hooks
    assert back.weight is conv.weight                              # parameters stay shared


def _observer_nodes(g):
    from qpasses.numerics import Observer
    return [n for n in g.graph.nodes if n.op == "call_module" and isinstance(g.get_submodule(n.target), Observer)]


def test_observe_puts_the_observer_inside_unless_another_weighted_op_reads_the_value(resnet):
    m, gm, x = resnet
    pm = qpasses.PassManager("observe")
    obs = pm.run(gm)
    inside = [n for n in obs.graph.nodes if n.op == "call_module" and input_quantizer(obs.get_submodule(n.target))]
    shared = _observer_nodes(obs)
    # the residual stage's conv1 and its 1x1 downsample read one value: one shared observer node
    assert len(shared) == 1 and sorted(u.name for u in shared[0].users) == ["stages_1_0_conv1",
                                                                            "stages_1_0_downsample_0"]
    assert len(inside) + 2 == pm.report["observe_weighted_inputs"].rewrites
    assert len(obs.graph.nodes) == len(gm.graph.nodes) + 1   # only the shared observer is a node
    with torch.no_grad():
        assert torch.equal(obs(x), gm(x))                      # observers are identities
    d = qpasses.decomposed(obs)                               # the form without compact modules
    assert len(_observer_nodes(d)) == 1 + len(inside) and not has_compact(d)
    # calibrating either form gives the same qparams, and convert turns both into the same numbers
    with torch.no_grad():
        obs(x), d(x)
    q1, q2 = qpasses.PassManager("convert").run(obs), qpasses.PassManager("convert").run(d)
    from qpasses.compact import weight_quantizer
    from qpasses.numerics import Observer
    for n in inside:                                           # the input of the run is untouched
        mod = obs.get_submodule(n.target)
        assert weight_quantizer(mod) is None and isinstance(input_quantizer(mod), Observer)
        assert weight_quantizer(q1.get_submodule(n.target)) is not None
    with torch.no_grad():
        assert torch.equal(q1(x), q2(x))


def test_observe_outputs_do_not_observe_a_value_twice(resnet):
    m, gm, x = resnet
    d = qpasses.decomposed(qpasses.PassManager("observe", observe_outputs=True).run(gm))
    nodes = _observer_nodes(d)
    assert nodes and not any(n.args[0] in nodes for n in nodes)  # no observer reads an observer


def test_units_that_do_not_read_the_compact_form_get_it_expanded(resnet):
    m, gm, x = resnet
    from qpasses.manager import _reads_compact
    pm = qpasses.PassManager(["observe", "observe"])       # observe_input is not registered compact
    out = pm.run(gm)
    first, second = pm.report.stages
    assert first.rewrites > 0 and second.rewrites == 0     # the second saw every observer (expanded)
    assert not has_compact(out) and len(_observer_nodes(out)) == first.rewrites - 1
    units = {(u.kind, u.family or getattr(u.step, "name", None)): _reads_compact(u)
             for u in qpasses.PassManager("ptq_int8").units}
    assert units == {("stage", "canonicalize"): False, ("stage", "observe"): False,
                     ("step", "calibrate"): True, ("stage", "convert"): True}


def test_convert_twice_converts_nothing_more(resnet):
    m, gm, x = resnet
    q = qpasses.PassManager("ptq_int8").run(gm, data=[x])
    pm = qpasses.PassManager("convert")
    q2 = pm.run(q)
    assert sum(pm.report[r].rewrites for r in ("activation_fake_quant", "input_fake_quant", "weight_fake_quant")) == 0
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
