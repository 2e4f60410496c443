"""The engine core: the rewrite context (module lookups, classification, call counts,
provenance), the run's copy, and what a run leaves behind."""
import operator
import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import qpasses
from qpasses.context import PROVENANCE_KEY, USER_RECORDS, RewriteContext, copy_graph_module
from qpasses.lang.registry import action
from qpasses.numerics import FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver, calc_qparams, \
    calc_symmetric_qparams, qrange
from qpasses.zoo import MODELS, ResNetLike, example_input


class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _gm():
    return fx.symbolic_trace(_TwoLinears())


def test_classification_follows_a_module_swap_made_any_way():
    gm = _gm()
    node = next(n for n in gm.graph.nodes if n.target == "a")
    with RewriteContext(gm) as rc:
        assert rc.classify(node) == "linear"
        rc.replace_module("a", nn.ReLU())                 # through the verb
        assert rc.classify(node) == "relu"
        gm.a = nn.GELU()                                  # behind the context's back
        assert rc.classify(node) == "gelu"
        node.target = "b"                                 # a retargeted node
        assert rc.classify(node) == "linear"


def test_call_counts_follow_creation_erasure_and_retargeting():
    gm = _gm()
    a = next(n for n in gm.graph.nodes if n.target == "a")
    b = next(n for n in gm.graph.nodes if n.target == "b")
    with RewriteContext(gm) as rc:
        assert not rc.is_shared_module(a)
        extra = rc.insert("call_module", "a", (a.args[0],), after=a)   # a second call of "a"
        assert rc.is_shared_module(a) and rc.call_count("a") == 2
        with gm.graph.inserting_after(extra):                         # made with fx directly
            third = gm.graph.call_module("a", (a.args[0],))
        assert rc.call_count("a") == 3
        rc.retarget(third, "b")
        assert rc.call_count("a") == 2 and rc.call_count("b") == 2
        rc.erase(extra)
        gm.graph.erase_node(third)                                    # erased with fx directly
        assert rc.call_count("a") == 1 and rc.call_count("b") == 1
        assert not rc.is_shared_module(b)


def test_nodes_made_while_a_rule_runs_carry_its_name_whoever_makes_them():
    """Provenance rides on fx's node-creation hook: pinned here."""
    gm = _gm()
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with RewriteContext(gm) as rc:
        with rc.tagging("my_rule"):
            n1 = rc.insert("call_function", torch.relu, (x,), after=x)
            with gm.graph.inserting_after(n1):
                n2 = gm.graph.call_function(torch.neg, (n1,))
        n3 = rc.insert("call_function", torch.abs, (x,), after=x)
    assert n1.meta[PROVENANCE_KEY] == n2.meta[PROVENANCE_KEY] == "my_rule"
    assert PROVENANCE_KEY not in n3.meta
    assert not gm._create_node_hooks and not gm._erase_node_hooks   # the context took its hooks away


_SEEN = []


@action("test_swap_linear_for_relu")
def _swap_linear_for_relu(ctx, op):
    ctx.replace_module(op.target, nn.ReLU())


@action("test_record_class")
def _record_class(ctx, op):
    if op.op == "call_module":
        _SEEN.append((op.target, ctx.classify(op), type(ctx.modules[op.target]).__name__))


def test_a_user_action_sees_its_own_module_swap_later_in_the_same_stage():
    swap = qpasses.Rule(name="swap", match="(linear $op ?x)", rewrite="test_swap_linear_for_relu($op)",
                        stage="s")
    look = qpasses.Rule(name="look", match="(relu $op ?x)", rewrite="test_record_class($op)", stage="s")
    _SEEN.clear()
    gm = _gm()
    x = torch.randn(3, 4)
    from qpasses.lang.rules import StageSpec
    family = qpasses.RuleFamily("user", [swap, look], [StageSpec("s")], {})
    out = qpasses.PassManager(family).run(gm)
    # the second rule of the stage matched the swapped modules as relu, by class and module
    assert ("a", "relu", "ReLU") in _SEEN and ("b", "relu", "ReLU") in _SEEN
    assert torch.equal(out(x), torch.relu(torch.relu(torch.relu(x))))
    assert isinstance(gm.a, nn.Linear)  # the input is untouched


def test_a_run_keeps_no_engine_state_in_meta():
    m = MODELS["digits_cnn"]().eval() if "digits_cnn" in MODELS else ResNetLike().eval()
    x = torch.randn(2, 1, 8, 8) if "digits_cnn" in MODELS else torch.randn(2, 1, 16, 16)
    gm = qpasses.trace(m, (x,))
    q = qpasses.PassManager("ptq_int8").run(gm, data=[x])
    engine = {k for k in q.meta if k.startswith("qpasses.")} - USER_RECORDS
    assert engine == set(), engine


def test_copy_shares_nothing_mutable_and_keeps_exported_graphs_trainable():
    m = MODELS["mlp"]().eval()
    x = example_input("mlp", batch=2)
    gm = qpasses.trace(m, (x,), mode="export")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)   # no LeafSpec deprecation noise
        c = copy_graph_module(gm)
    assert c.graph is not gm.graph and all(p is not q for p, q in zip(c.parameters(), gm.parameters()))
    c.train()
    c.eval()
    assert torch.equal(c(x), gm(x))


@pytest.mark.parametrize("level", ["fx", "export"])
def test_copy_memo_gives_what_deepcopy_gives(level):
    """copy_graph_module answers deepcopy's trivial parts up front (each module's empty hook
    tables, its tuples of numbers): pinned against a plain ``copy.deepcopy``: the same
    modules with the same attributes, no container or tensor shared with the input, tables
    shared inside the input stay shared inside the copy, and training the copy leaves the
    input as it was."""
    from collections import OrderedDict
    m = ResNetLike().eval()
    x = torch.randn(2, 1, 16, 16)
    gm = qpasses.trace(m, (x,), mode=level)
    convs = [mod for name, mod in gm.named_modules() if name]   # submodules (the root's extra
    assert len(convs) > 2                                          # attributes are not copied)
    convs[0].register_forward_hook(lambda *a: None)        # a non-empty hook table
    shared = OrderedDict()
    convs[0].extra_table = convs[-1].extra_table = shared  # one empty table held twice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = copy.deepcopy(gm)
        c = copy_graph_module(gm)
    mods, refs = dict(gm.named_modules()), dict(ref.named_modules())
    copies = dict(c.named_modules())
    assert list(copies) == list(refs) == list(mods)
    for name, cm in copies.items():
        om, rm = mods[name], refs[name]
        assert cm is not om and type(cm).__qualname__ == type(rm).__qualname__
        # (an exported graph's copy gets working train() / eval(): make_exported_trainable)
        assert set(vars(rm)) <= set(vars(cm)) and set(vars(cm)) - set(vars(rm)) <= {"train", "eval"}, name
        for k, r in vars(rm).items():
            v, o = vars(cm)[k], vars(om)[k]
            assert type(v).__qualname__ == type(r).__qualname__, (name, k)
            if isinstance(v, (dict, set, list)):
                assert v is not o and len(v) == len(r), (name, k)
            elif isinstance(v, tuple):
                assert v == r, (name, k)
    first = dict(c.named_modules())[next(k for k, v in mods.items() if v is convs[0])]
    last = dict(c.named_modules())[next(k for k, v in mods.items() if v is convs[-1])]
    assert first.extra_table is last.extra_table and first.extra_table is not shared
    assert len(first._forward_hooks) == 1 and first._forward_hooks is not convs[0]._forward_hooks
    assert all(p is not q for p, q in zip(c.parameters(), gm.parameters()))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    c.train()
    opt = torch.optim.SGD(c.parameters(), lr=0.1)
    c(x).sum().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(x), gm(x))


def test_copy_keeps_sharing_and_aliasing_as_deepcopy_does():
    """The module copier clones a tensor only where deepcopy's result is a clone; a shared
    parameter stays one parameter, buffers on one storage stay on one storage, and tensors
    deepcopy treats specially (a grad, attributes, a view) are deep-copied as deepcopy does."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight                       # tied weights
            whole = torch.arange(8.0)
            self.a.register_buffer("lo", whole[:4])              # two views of one storage
            self.b.register_buffer("hi", whole[4:])
            self.a.register_buffer("own", torch.ones(3))         # sole owner: cloned
            self.a.bias.grad = torch.full((4,), 2.0)             # deepcopy of a Parameter drops it
            self.b.extra = {"note": torch.zeros(2)}              # other state: deepcopy
            self.b.weird = torch.ones(2).requires_grad_()

        def forward(self, x):
            return self.b(self.a(x) + self.a.lo.sum() + self.b.hi.sum())

    gm = fx.symbolic_trace(Two())
    ref, c = copy.deepcopy(gm), copy_graph_module(gm)
    assert c.a.weight is c.b.weight and c.a.weight is not gm.a.weight
    assert ref.a.weight is ref.b.weight
    for m in (ref, c):
        assert m.a.lo.untyped_storage().data_ptr() == m.b.hi.untyped_storage().data_ptr()
        assert m.a.lo.untyped_storage().data_ptr() != gm.a.lo.untyped_storage().data_ptr()
        assert (m.a.bias.grad is None) == (ref.a.bias.grad is None)
        assert m.b.weird.requires_grad and type(m.a.weight) is nn.Parameter and m.a.weight.requires_grad
        assert m.b.extra["note"] is not gm.b.extra["note"]
    for (k, v), (k2, r) in zip(c.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, r) and v.stride() == r.stride() and v.dtype == r.dtype
    x = torch.randn(2, 4)
    assert torch.equal(c(x), gm(x))
    c.a.own.add_(1)
    assert torch.equal(gm.a.own, torch.ones(3))


@pytest.mark.parametrize("level", ["fx", "export"])
def test_a_converted_graph_survives_torch_export_with_one_node_per_quantizer(level):
    m = ResNetLike().eval()
    x = torch.randn(2, 1, 16, 16)
    gm = qpasses.trace(m, (x,), mode=level)
    q = qpasses.PassManager("ptq_int8").run(gm, data=[x])
    from qpasses.qnodes import QUANTIZER_OPS
    # every quantizer is one call_function of a custom op, its scale and zero point read by get_attr
    # from the holder module; no FakeQuantize is called as a module
    assert not any(n.op == "call_module" and isinstance(q.get_submodule(n.target), FakeQuantize)
                   for n in q.graph.nodes)
    calls = [n for n in q.graph.nodes if n.op == "call_function" and n.target in QUANTIZER_OPS]
    n_quant = len(calls)
    assert n_quant > 0
    for n in calls:
        s, z = n.args[1], n.args[2]
        assert s.op == z.op == "get_attr"
        holder = s.target.rpartition(".")[0]
        assert (s.target, z.target) == (f"{holder}.scale", f"{holder}.zero_point")
        assert isinstance(q.get_submodule(holder), FakeQuantize)
    ep = torch.export.export(q, (x,))
    fq_nodes = [n for n in ep.graph.nodes if n.op == "call_function"
                and ("fake_quant" in str(n.target))]
    assert len(fq_nodes) == n_quant
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), q(x))


def test_no_quantizer_hides_inside_an_op_module():
    m = ResNetLike().eval()
    x = torch.randn(2, 1, 16, 16)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(m, (x,)), data=[x])
    for name, mod in q.named_modules():
        if isinstance(mod, (FakeQuantize, MinMaxObserver)):
            assert "." not in name, f"quantizer {name} sits inside another module"


def test_symmetric_qparams_equal_calc_qparams():
    torch.manual_seed(0)
    amax = torch.cat([torch.rand(1000) * 10.0 ** torch.randint(-30, 30, (1000,)).float(),
                      torch.tensor([0.0, 1e-45, 3e38, float("inf"), float("nan")])])
    for bits in (2, 4, 8, 16):
        qmin, qmax = qrange(bits, signed=True, narrow=True)
        s1, z1 = calc_qparams(-amax, amax, qmin, qmax, symmetric=True)
        s2, z2 = calc_symmetric_qparams(amax, qmin, qmax)
        assert torch.equal(s1.nan_to_num(), s2.nan_to_num()) and s1.isnan().equal(s2.isnan())
        assert torch.equal(z1, z2) and z2.dtype == torch.int32



def test_module_attr_is_getattr():
    from qpasses.opclasses import module_attr

    class WithProp(torch.nn.Module):
        flag = "class"

        @property
        def prop(self):
            return 3

        @property
        def broken(self):
            raise AttributeError("no")

    class OwnGetattr(torch.nn.Module):
        def __getattr__(self, name):
            return "dynamic"

    m = WithProp()
    m.register_buffer("buf", torch.ones(1))
    m.register_parameter("p", None)
    m.sub = torch.nn.ReLU(inplace=True)
    m.plain = 7
    conv = torch.nn.Conv2d(2, 2, 1, bias=False)
    cases = [(m, n) for n in ("flag", "prop", "broken", "buf", "p", "sub", "plain", "missing", "training")]
    cases += [(conv, n) for n in ("weight", "bias", "stride", "inplace", "padding_mode")]
    cases += [(OwnGetattr(), "anything"), (None, "inplace"), (3, "real")]
    for obj, name in cases:
        sentinel = object()
        assert module_attr(obj, name, sentinel) is getattr(obj, name, sentinel), name



def test_run_drops_the_modules_its_rewrites_orphaned():
    import qpasses
    from qpasses.zoo import ResNetLike

    x = torch.randn(2, 1, 16, 16)
    gm = qpasses.trace(ResNetLike().eval(), (x,))
    pm = qpasses.PassManager("ptq_int8")
    q = pm.run(gm, data=[x])
    assert "prune" in pm.report.phases
    used = {n.target for n in q.graph.nodes if n.op == "call_module"}
    top = {name for name, _ in q.named_children()}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in q.modules())   # folded
    assert not any(type(m).__name__.endswith("Observer") for m in q.modules())  # converted
    assert {t.split(".")[0] for t in used} <= top
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in gm.modules())       # input untouched


def test_observer_state_updates_are_buffers():
    """The observers write their running ranges straight into ``_buffers``: still registered
    buffers (state_dict, load_state_dict, deepcopy, device moves), with the values of the
    plain min / max / moving-average formulas."""
    torch.manual_seed(1)
    xs = [torch.randn(4, 3, 5) * (i + 1) for i in range(4)]
    for axis in (None, 1):
        mm, ma = MinMaxObserver(axis=axis), MovingAverageMinMaxObserver(axis=axis, averaging_constant=0.25)
        for x in xs:
            mm(x)
            ma(x)
        dims = (0, 2) if axis == 1 else (0, 1, 2)
        lo = torch.stack([x.amin(dim=dims) for x in xs])
        hi = torch.stack([x.amax(dim=dims) for x in xs])
        assert torch.equal(mm.min_val, lo.amin(0)) and torch.equal(mm.max_val, hi.amax(0))
        elo, ehi = lo[0], hi[0]
        for i in range(1, len(xs)):
            elo, ehi = elo + 0.25 * (lo[i] - elo), ehi + 0.25 * (hi[i] - ehi)
        assert torch.equal(ma.min_val, elo) and torch.equal(ma.max_val, ehi)
        assert mm._batches == ma._batches == len(xs)
        assert dict(mm.named_buffers())["min_val"] is mm.min_val
        fresh = MinMaxObserver(axis=axis)
        fresh.load_state_dict(mm.state_dict())
        assert torch.equal(fresh.calculate_qparams()[0], mm.calculate_qparams()[0])
        assert torch.equal(copy.deepcopy(ma).max_val, ma.max_val)


class _KeepsBNFrozen(torch.nn.Module):
    """A module with its own ``train()``: its BatchNorm always stays in eval mode."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(3)
        self.lin = torch.nn.Linear(3, 3)

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x):
        return self.lin(self.bn(x))


def test_set_training_matches_train():
    from qpasses.frontend import set_training

    def flags(m):
        return {k: v.training for k, v in m.named_modules()}

    m = torch.nn.Sequential(torch.nn.Linear(3, 3), _KeepsBNFrozen(), torch.nn.Sequential(torch.nn.ReLU()))
    ref = copy.deepcopy(m)
    for mode in (True, False, True):
        set_training(m, mode)
        ref.train(mode)
        assert flags(m) == flags(ref)
    assert m[1].bn.training is False and m[1].lin.training is True

    # an exported graph's root refuses train(): its flag and its submodules are set directly
    ep = torch.export.export(torch.nn.Sequential(torch.nn.Linear(3, 3)).eval(), (torch.randn(2, 3),))
    g = ep.module()
    g.add_module("obs", MinMaxObserver())
    set_training(g, True)
    assert g.training is True and g.obs.training is True
    set_training(g, False)
    assert g.training is False and g.obs.training is False



def test_module_classification_memo_follows_registration():
    import torch.nn as nn
    from qpasses import opclasses as ops

    class MyAct(nn.ReLU):
        pass
    g = fx.Graph()
    n = g.call_module("a", (g.placeholder("x"),))
    assert ops.classify(n, {"a": MyAct()}) == "relu"          # memoised for MyAct
    ops.register_module_class(MyAct, "my_act_for_memo_test")   # registration clears the memo
    try:
        assert ops.classify(n, {"a": MyAct()}) == "my_act_for_memo_test"
        assert ops.classify(n, {"a": nn.ReLU()}) == "relu"
    finally:
        ops._BY_MODULE.remove((MyAct, "my_act_for_memo_test"))
        ops._BY_MODULE_TYPE.clear()
        ops.OP_CLASSES.pop("my_act_for_memo_test", None)



def test_hooks_registered_on_a_result_never_reach_the_input():
    import qpasses
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 4, 4)
    gm = qpasses.trace(m, (x,))
    q = qpasses.PassManager("canonicalize").run(gm)
    fired = []
    q.get_submodule("2").register_forward_hook(lambda *a: fired.append("copy"))
    q.register_forward_pre_hook(lambda *a: fired.append("copy root"))
    gm(x)
    assert fired == []
    q(x)
    assert fired == ["copy root", "copy"]
    assert gm._replace_hooks is not q._replace_hooks and gm._deepcopy_hooks is not q._deepcopy_hooks




def test_engine_benchmark_prints_its_tables(capsys):
    """benchmarks/engine.py runs end to end (tiny sizes, qpasses side only) and its rows are real."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "engine.py"
    spec = importlib.util.spec_from_file_location("qpasses_bench_engine", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--sizes", "60", "120", "--ao-limit", "0", "--pt2e-limit", "0", "--repeat", "2"])
    out = capsys.readouterr().out
    assert "(rewrites missing!)" not in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4  # two sizes, in the main table and in the phase table
    for row in rows[:2]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        nodes, seconds, gb = int(cells[0]), float(cells[1]), float(cells[7])
        assert 40 <= nodes <= 140 and seconds > 0 and cells[2] == "not run" and cells[4] == "not run" and gb > 0
    assert any(line.startswith("target per-node cost growth <= 2x: ") for line in out.splitlines())
    # the verdicts follow the numbers they are given
    v = mod.target_verdicts([(352, 0.1, 2.0, 0.5), (1402, 0.2, 8.0, 0.6), (99997, 24.0, None, 2.5)])
    assert v[0].startswith("target >= 30x torch.ao at 1.4k-2.8k nodes: met (1402: 40.0x)")
    assert v[1].startswith("target per-node cost growth <= 2x: met")
    assert v[2].startswith("target 100k nodes in <= 30 s and <= 3 GB: met")
    v = mod.target_verdicts([(350, 0.01, 0.05, 0.5), (2800, 0.5, 5.0, 1.0), (100000, 31.0, None, 3.5)])
    assert all("NOT met" in line for line in v)


def test_delete_unused_submodules_keeps_what_fx_keeps():
    """qpasses' linear-time pruning against GraphModule.delete_all_unused_submodules (quadratic)."""
    from qpasses.context import delete_unused_submodules
    from qpasses.zoo import MobileNetV2Like

    for model, shape in ((ResNetLike(), (1, 1, 16, 16)), (MobileNetV2Like(), (1, 1, 16, 16))):
        x = torch.randn(*shape)
        gm = qpasses.trace(model.eval(), (x,))
        work = copy.deepcopy(gm)
        for n in list(work.graph.nodes):  # orphan every BatchNorm: its users read its input
            if n.op == "call_module" and isinstance(work.get_submodule(n.target), torch.nn.BatchNorm2d):
                n.replace_all_uses_with(n.args[0])
                work.graph.erase_node(n)
        work.recompile()
        ref = copy.deepcopy(work)
        ref.delete_all_unused_submodules()
        assert delete_unused_submodules(work) > 0
        assert [k for k, _ in work.named_modules()] == [k for k, _ in ref.named_modules()]
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in work.modules())
        torch.testing.assert_close(work(x), ref(x))


# ----------------------------------------------------------------------------- in-place writes

class _ResidualInplace(torch.nn.Module):
    """``out = bn(conv(x)); out += x`` (HF ResNet's residual: ``aten.add_`` writes its first
    operand only, so the block input ``x`` is read, not written)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(x)
        out = self.bn(self.conv(x))
        out += x
        return out


@pytest.mark.parametrize("level", ["fx", "export"])
def test_inplace_add_writes_its_first_operand_only(level):
    from qpasses.opclasses import mutated_inputs
    m = _ResidualInplace().eval()
    m.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 4, 8, 8)
    gm = qpasses.trace(m, (x,), mode=level)
    adds = [n for n in gm.graph.nodes if "add" in str(n.target) or n.target in (operator.iadd,)]
    assert adds, gm.graph
    written = mutated_inputs(adds[0])
    if level == "export":   # aten.add_: the accumulator, not the residual
        assert adds[0].target == torch.ops.aten.add_.Tensor
        assert len(written) == 1 and written[0] is adds[0].args[0]
    else:                   # fx records ``out += x`` as an out-of-place add
        assert written == []
    pm = qpasses.PassManager("canonicalize", progress=False)
    q = pm.run(gm)
    assert pm.report["fold_bn"].rewrites == 1, pm.report["fold_bn"].refused
    torch.testing.assert_close(q(x), m(x), rtol=1e-5, atol=1e-5)


def test_inplace_write_to_a_match_input_still_refuses():
    """The guard still refuses a match one of whose external inputs an in-place op writes."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            x = torch.relu(x)
            y = self.bn(self.conv(x))
            x.add_(1.0)   # writes the conv's input after the conv read it
            return y + x

    gm = qpasses.trace(M().eval(), (torch.randn(2, 4, 8, 8),), mode="fx")
    pm = qpasses.PassManager("canonicalize", progress=False)
    pm.run(gm)
    assert pm.report["fold_bn"].rewrites == 0
    assert "mutated in place" in str(pm.report["fold_bn"].refused)


def test_lint_failure_names_the_rule(tmp_path):
    """A user action that leaves the graph out of order: the run stops with a RewriteError that
    names the stage and the rule that rewrote, and the input graph is unchanged."""
    from qpasses import action
    from qpasses.errors import RewriteError

    @action("test_use_before_def", replaces=False)
    def _use_before_def(ctx, op):
        first = next(iter(ctx.graph.nodes))
        with ctx.graph.inserting_before(first):
            ctx.graph.call_function(torch.neg, (op,))   # reads op before it is defined

    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nfamily: bad\nstages:\n  - {name: s, mode: once}\nrules:\n"
                 "  - name: break_order\n    stage: s\n    match: (relu $op ?x)\n    rewrite: test_use_before_def($op)\n")
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    gm = qpasses.trace(m, (torch.randn(2, 4),), mode="fx")
    before = str(gm.graph)
    from qpasses.lang.registry import ACTIONS
    try:
        with pytest.raises(RewriteError, match=r"bad\.s \(rules break_order\)"):
            qpasses.PassManager(str(p), progress=False).run(gm)
    finally:
        ACTIONS.pop("test_use_before_def", None)   # the fuzz tests draw from the registry
    assert str(gm.graph) == before


def test_get_attr_verb_refuses_a_missing_attribute():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    with RewriteContext(gm) as rc:
        out = next(iter(gm.graph.find_nodes(op="output")))
        n = rc.get_attr("0.weight", before=out)
        assert n.op == "get_attr" and n.target == "0.weight"
        rc.erase(n)
        for bad in ("0.nope", "missing.weight"):
            with pytest.raises(qpasses.RewriteError, match=bad.replace(".", r"\.")):
                rc.get_attr(bad, before=out)
    gm.graph.lint()
