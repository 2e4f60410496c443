"""The engine's fast paths give exactly what the slower public APIs give.

``qpasses.fxfast`` (node creation, graph copy), the batched / reduced-op qparams of the
convert stage and the cheap module construction must be indistinguishable from
``Graph.create_node``, ``copy.deepcopy(graph)``, ``calc_qparams`` and
``Observer.calculate_qparams``.
"""
import copy
import operator
import warnings

import pytest
import torch
import torch.fx as fx

from qpasses.fxfast import copy_graph, new_node
from qpasses.lang.registry import action, data_step
from qpasses.numerics import (FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver,
                              calc_qparams, calc_symmetric_qparams, qrange)
from qpasses.numerics.observers import calculate_qparams_many
from qpasses.zoo import conv_bn_chain


def _graph_summary(g: fx.Graph):
    return [(n.name, n.op, n.target, repr(n.args), repr(n.kwargs), n.type, dict(n.meta), list(u.name for u in n.users))
            for n in g.nodes]


def test_new_node_matches_create_node():
    def build(make):
        g = fx.Graph()
        x = g.placeholder("x")
        a = make(g, "call_function", torch.conv2d, (x, x, None, (1, 1), (0, 0), (1, 1), 1), None)
        b = make(g, "call_module", "blocks.0.conv1", (a,), None)
        c = make(g, "get_attr", "blocks.0.conv1.weight", None, None)
        d = make(g, "call_function", torch.cat, ([a, b, c], 1), {"out": None})
        e = make(g, "call_method", "relu_", (d,), None)
        f = make(g, "call_function", operator.add, (e, 1.5), None)
        make(g, "call_function", torch.relu, (f,), None)  # a second relu-named node: unique names
        make(g, "call_function", torch.relu, (f,), None)
        g.output(f)
        return g

    slow = build(lambda g, op, t, a, k: g.create_node(op, t, a, k))
    fast = build(lambda g, op, t, a, k: new_node(g, op, t, a, k))
    fast.lint()
    assert _graph_summary(fast) == _graph_summary(slow)
    assert str(fast) == str(slow)
    assert fast.python_code("self").src == slow.python_code("self").src
    assert len(fast.find_nodes(op="call_function", target=torch.relu)) == 2


def test_new_node_respects_insert_point_and_hooks():
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ReLU()))
    seen = []
    gm._register_create_node_hook(seen.append)
    first = next(n for n in gm.graph.nodes if n.op == "call_module")
    with gm.graph.inserting_before(first):
        n = new_node(gm.graph, "call_function", torch.neg, (first.args[0],))
    assert seen == [n] and n.next is first
    gm.graph.lint()


def test_new_node_still_warns_about_raw_symbolic_args():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    s = ShapeEnv().create_unbacked_symint()
    g = fx.Graph()
    x = g.placeholder("x")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        new_node(g, "call_function", torch.ops.aten.view.default, (x, [s]))
    assert any("SymInt" in str(m.message) for m in w)


@pytest.mark.parametrize("level", ["fx", "export"])
def test_copy_graph_matches_deepcopy(level):
    import qpasses
    model = conv_bn_chain(3, 4).eval()
    gm = qpasses.trace(model, (torch.randn(1, 4, 6, 6),), mode=level)
    a, b = copy.deepcopy(gm.graph), copy_graph(gm.graph)
    assert _graph_summary(a) == _graph_summary(b)
    assert a.python_code("self").src == b.python_code("self").src
    # new nodes, meta one level deep (values shared, dicts not)
    for old, new in zip(gm.graph.nodes, b.nodes):
        assert old is not new and old.meta is not new.meta
        assert all(new.meta[k] is v for k, v in old.meta.items())
    b.lint()
    # names created later stay unique in the copy
    out = next(n for n in b.nodes if n.op == "output")
    with b.inserting_before(out):
        fresh = new_node(b, "call_function", torch.relu, (out.args[0],))
    assert fresh.name not in {n.name for n in gm.graph.nodes}


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


def test_observer_qparams_in_one_batch_are_bit_identical():
    torch.manual_seed(0)
    obs = []
    for i in range(300):
        kind = [MinMaxObserver, MovingAverageMinMaxObserver][i % 2]
        o = kind(bits=[8, 4][i % 3 == 0], symmetric=i % 5 == 0, axis=0 if i % 7 == 0 else None)
        scale = 10.0 ** float(torch.randint(-6, 6, ()))
        for _ in range(2):
            x = torch.randn(3, 16) * scale + float(torch.randn(())) * scale * (i % 4)
            o(x if i % 11 else x.abs())
        obs.append(o)
    obs.append(MinMaxObserver())                                 # no data: left out
    obs.append(PercentileObserver())                             # its own range rule: left out
    obs[-1](torch.randn(64))
    bad = MinMaxObserver()
    bad(torch.tensor([1.0, float("inf")]))                       # non-finite: left out
    obs.append(bad)
    got = calculate_qparams_many(obs)
    assert len(got) == 300
    for o in obs[:300]:
        s, z = got[id(o)]
        s0, z0 = o.calculate_qparams()
        assert torch.equal(s, s0) and torch.equal(z, z0) and s.dtype == s0.dtype and z.dtype == z0.dtype


def test_fast_module_construction_is_a_normal_module():
    fq = FakeQuantize(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), -127, 127, axis=0, bits=8, symmetric=True)
    assert list(fq.state_dict()) == ["scale", "zero_point"] and fq.bits == 8 and fq.axis == 0
    lfq = FakeQuantize(0.1, 3, 0, 255, learnable=True)
    assert [n for n, _ in lfq.named_parameters()] == ["scale"] and list(lfq.state_dict()) == ["scale", "zero_point"]
    with pytest.raises(ValueError):
        FakeQuantize(torch.tensor([0.1, float("nan")]), 0, -127, 127, axis=0)
    with pytest.raises(ValueError):
        FakeQuantize(0.0, 0, 0, 255)
    o = MinMaxObserver(bits=8, symmetric=True, axis=1)
    assert list(o.state_dict()) == ["min_val", "max_val"] and (o.qmin, o.qmax) == (-128, 127)
    copy.deepcopy(o)
    copy.deepcopy(fq)


def test_module_table_matches_named_modules():
    import qpasses
    from qpasses import zoo
    from qpasses.fxfast import module_table
    shared = torch.nn.ReLU()
    odd = torch.nn.Sequential(torch.nn.Sequential(shared, torch.nn.Linear(2, 2)), shared, torch.nn.ModuleList([shared]))
    odd.add_module("empty", None)
    models = [odd, zoo.MODELS["resnet"](), zoo.CatNet()]
    models.append(qpasses.trace(zoo.conv_bn_chain(3, 4), (torch.randn(1, 4, 6, 6),), mode="fx"))
    for m in models:
        assert list(module_table(m).items()) == list(m.named_modules())


def test_absmax_qparams_many_is_bit_identical():
    from qpasses.numerics import absmax_qparams, absmax_qparams_many
    torch.manual_seed(0)
    for shape, axis in [((8, 4, 3, 3), 0), ((8, 4, 3, 3), 1), ((6, 5), 0), ((6, 5), None), ((4, 2, 3), 1), ((7,), 0)]:
        ws = [torch.randn(shape) * 10.0 ** float(torch.randint(-8, 8, ())) for _ in range(50)]
        ws[3] = torch.zeros(shape)
        ws[5] = ws[5].double()
        ws[7][0] = float("nan")
        ws = [w if w.dtype == torch.float32 else w.float() for w in ws]
        for bits in (4, 8):
            qmin, qmax = qrange(bits, signed=True, narrow=True)
            many = absmax_qparams_many(ws, axis, qmin, qmax)
            for w, (s, z) in zip(ws, many):
                s0, z0 = absmax_qparams(w, axis, qmin, qmax)
                assert s.shape == s0.shape and z.shape == z0.shape and z.dtype == z0.dtype == torch.int32
                assert torch.equal(s.nan_to_num(), s0.nan_to_num()) and torch.equal(s.isnan(), s0.isnan())
                assert torch.equal(z, z0)


def test_default_node_names_are_fx_names():
    from qpasses.fxfast import _candidate_name
    g = fx.Graph()
    targets = ["blocks.0.conv1.weight", "act_fq_12", "fooBar", "Conv.Weight", "__add__", "__x", "ümlaut", "ÜBER",
               "a.B.c", "x_1", "ALL_CAPS", "0abc", "", torch.relu, operator.add, torch.conv2d, torch.ops.aten.add.Tensor]
    for t in targets:
        assert _candidate_name(g, t) == g._target_to_str(t), t
        assert _candidate_name(g, t) == g._target_to_str(t), t  # memoised answer too


def test_module_attr_is_getattr():
    from qpasses.ops import module_attr

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


def test_engine_benchmark_prints_its_tables(capsys):
    """benchmarks/engine.py runs end to end (tiny sizes, qpasses side only) and its rows are real."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "engine.py"
    spec = importlib.util.spec_from_file_location("qpasses_bench_engine", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--sizes", "60", "120", "--ao-limit", "0", "--repeat", "2"])
    out = capsys.readouterr().out
    assert "(rewrites missing!)" not in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4  # two sizes, in the main table and in the phase table
    main_rows, phase_rows = rows[:2], rows[2:]
    for row in main_rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        nodes, seconds = int(cells[0]), float(cells[1])
        assert 40 <= nodes <= 140 and seconds > 0 and cells[2] == "not run"
    header = [line for line in out.splitlines() if line.startswith("| nodes | copy")]
    assert header and "codegen (s)" in header[0] and "convert.convert (s)" in header[0]
    for row in phase_rows:
        assert all(float(c) >= 0 for c in row.strip("|").split("|")[1:])
    assert any(line.startswith("target linear growth: ") for line in out.splitlines())
    # the verdicts follow the numbers they are given
    v = mod.target_verdicts([(352, 0.1, 2.0), (9998, 2.2, 160.0), (99997, 24.0, None)])
    assert v[0].startswith("target >= 10x torch.ao where it runs: met (20.0x-72.7x")
    assert v[1].startswith("target 10k nodes under 1 s: NOT met (9998 nodes: 2.200 s)")
    assert v[2].startswith("target linear growth: met")
    v = mod.target_verdicts([(350, 0.01, 0.05), (10000, 0.9, None)])
    assert "NOT met" in v[0] and v[1].startswith("target 10k nodes under 1 s: met") and "NOT met" in v[2]


def test_delete_unused_submodules_matches_fx():
    """Same modules kept as GraphModule.delete_all_unused_submodules, on graphs after rewrites."""
    import qpasses
    from qpasses.fxfast import delete_unused_submodules
    from qpasses.zoo import MobileNetV2Like, ResNetLike

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
        removed = delete_unused_submodules(work)
        assert removed > 0
        assert [k for k, _ in work.named_modules()] == [k for k, _ in ref.named_modules()]
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in work.modules())
        torch.testing.assert_close(work(x), ref(x))


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


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "linear"])
@pytest.mark.parametrize("bias, affine", [(True, True), (False, True), (True, False)])
def test_fold_bn_params_many_is_bit_identical(kind, bias, affine):
    from qpasses.actions.fold import fold_bn_params, fold_bn_params_many
    torch.manual_seed(0)
    shape = {"conv2d": (6, 3, 3, 3), "conv1d": (6, 3, 5), "linear": (6, 7)}[kind]
    items = []
    for i in range(5):
        w = torch.randn(shape) * 3
        b = torch.randn(6) if bias else None
        mean, var = torch.randn(6), torch.rand(6) * 2 + 1e-3
        gamma, beta = (torch.randn(6), torch.randn(6)) if affine else (None, None)
        items.append((w, b, mean, var, gamma, beta, 1e-5 * (i + 1)))
    many = fold_bn_params_many(items, kind)
    for it, (w_new, b_new) in zip(items, many):
        w1, b1 = fold_bn_params(*it, kind)
        assert torch.equal(w_new, w1) and torch.equal(b_new, b1)
        assert w_new.untyped_storage().nbytes() == w_new.numel() * 4  # its own tensor, not a view of the batch


def test_fake_quantize_from_checked_equals_the_constructor():
    s, z = torch.rand(2, 5) + 0.01, torch.randint(-3, 3, (2, 5), dtype=torch.int32)
    for axis, (scale, zp) in ((0, (s[0], z[0])), (None, (s[1, 0], z[1, 0]))):
        a = FakeQuantize(scale, zp, -8, 7, axis=axis, bits=4, symmetric=True)
        b = FakeQuantize.from_checked(scale, zp, -8, 7, axis=axis, bits=4, symmetric=True)
        assert a.__dict__.keys() == b.__dict__.keys()
        assert {k: v for k, v in a.__dict__.items() if not k.startswith("_")} == \
               {k: v for k, v in b.__dict__.items() if not k.startswith("_")}
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
        assert b.scale.data_ptr() != scale.data_ptr()  # own copies
        x = torch.randn(5, 3) * 4
        assert torch.equal(a(x), b(x))


def test_module_classification_memo_follows_registration():
    import torch.nn as nn
    from qpasses import ops

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


def test_fast_lint_agrees_with_fx_lint():
    from qpasses.fxfast import lint
    gm = fx.symbolic_trace(conv_bn_chain(3, 4))
    assert lint(gm.graph) is None and gm.graph.lint() is None
    g = gm.graph

    def same_error(mutate, undo):
        mutate()
        with pytest.raises(Exception) as fx_err:
            g.lint()
        with pytest.raises(Exception) as ours:
            lint(g)
        assert type(ours.value) is type(fx_err.value) and str(ours.value) == str(fx_err.value)
        undo()
        lint(g)

    conv = next(n for n in g.nodes if n.op == "call_module" and n.target.endswith("conv2"))
    old = conv.target
    same_error(lambda: setattr(conv, "target", "blocks.0.nope"), lambda: setattr(conv, "target", old))
    same_error(lambda: setattr(conv, "target", "blocks.9.conv1"), lambda: setattr(conv, "target", old))
    same_error(lambda: setattr(conv, "target", "blocks.0.conv1.weight"), lambda: setattr(conv, "target", old))
    first = next(n for n in g.nodes if n.op == "call_module")
    last = next(n for n in reversed(g.nodes) if n.op == "call_module")
    args = first.args
    same_error(lambda: setattr(first, "args", (last,)), lambda: setattr(first, "args", args))
    relu = next(n for n in g.nodes if n.op == "call_module" and "relu" in n.target)
    rt = relu.target
    same_error(lambda: setattr(relu, "op", "bogus_op"), lambda: setattr(relu, "op", "call_module"))
    assert relu.target == rt


def test_recompile_keeps_the_find_nodes_table():
    from qpasses.fxfast import recompile
    m = conv_bn_chain(3, 4).eval()
    gm, ref = fx.symbolic_trace(m), fx.symbolic_trace(m)
    ref.recompile()
    table = gm.graph._find_nodes_lookup_table
    recompile(gm)
    assert gm.code == ref.code
    assert gm.graph._find_nodes_lookup_table is table
    assert [n.name for n in gm.graph.find_nodes(op="call_module")] == \
           [n.name for n in ref.graph.find_nodes(op="call_module")]
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == ["x"]
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(gm(x), ref(x))
    assert all(n._repr_fn is None for n in gm.graph.nodes)  # restored, as recompile() leaves them


class _Custom(torch.nn.Module):
    """A class the fast copy does not know: copied through copy.deepcopy."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.table = {"a": [1, 2]}

    def forward(self, x):
        return self.lin(x)


def _copy_fixture():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(64, 4), _Custom())
    m[4].weight_alias = m[4].weight          # a tensor kept as a plain attribute as well
    m[2].notes = ["kept", "per module"]      # a user attribute that is a list
    m[2].register_forward_hook(_hook)
    outer = torch.nn.Module()
    outer.body, outer.shared = m, m[4]        # one module reachable under two names
    return outer


def _hook(mod, args, out):
    return out


def _structure(m):
    out = []
    for name, mod in m.named_modules(remove_duplicate=False):
        attrs = {k: v for k, v in mod.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
        out.append((name, type(mod), sorted(attrs), {k: (v.dtype, tuple(v.shape)) for k, v in mod.state_dict().items()},
                    {k: type(v) for k, v in attrs.items()}))
    return out


def test_copy_module_tree_equals_deepcopy_and_shares_nothing_mutable():
    from qpasses.modcopy import copy_module_tree
    m = _copy_fixture()
    ref, new = copy.deepcopy(m), copy_module_tree(m)
    assert _structure(new) == _structure(ref)
    for (k, a), (_, b) in zip(m.state_dict(keep_vars=True).items(), new.state_dict(keep_vars=True).items()):
        assert torch.equal(a, b) and a is not b and a.data_ptr() != b.data_ptr(), k
        assert type(a) is type(b) and a.requires_grad == b.requires_grad, k
    assert new.shared is new.body[4] and new.body[4].weight_alias is new.body[4].weight  # identities kept
    olds = {id(v) for mod in m.modules() for v in mod.__dict__.values()}
    for mod in new.modules():
        assert mod not in set(m.modules())
        for k, v in mod.__dict__.items():
            if isinstance(v, (dict, list, set, torch.Tensor, torch.nn.Module)):
                assert id(v) not in olds, f"{type(mod).__name__}.{k} is shared with the original"
    body, nb = m.body, new.body
    assert nb[2].notes == ["kept", "per module"] and list(nb[2]._forward_hooks.values()) == [_hook]
    assert nb[5].table == {"a": [1, 2]} and nb[5].table["a"] is not body[5].table["a"]
    x = torch.randn(2, 3, 4, 4)
    body.eval(), nb.eval()
    assert torch.equal(body(x), nb(x))


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


def test_module_table_handed_from_stage_to_stage_is_exact(monkeypatch):
    """The PassManager hands one module table from stage to stage while only qpasses' own
    actions ran; at every hand-over it must be exactly what the module tree holds."""
    import qpasses
    from qpasses import manager
    from qpasses.fxfast import module_table
    from qpasses.zoo import MODELS, example_input
    handed, bad = [], []

    class Checking(manager.Matcher):
        def __init__(self, gm, modules=None):
            if modules is not None:
                handed.append(gm)
                real = module_table(gm)
                bad.extend(("missing or stale", k) for k, m in real.items() if modules.get(k) is not m)
                for k, m in modules.items():
                    try:
                        if gm.get_submodule(k) is not m:
                            bad.append(("not the module there", k))
                    except AttributeError:
                        bad.append(("no longer in the tree", k))
            super().__init__(gm, modules)

    monkeypatch.setattr(manager, "Matcher", Checking)
    for name in ("resnet", "mobilenetv2"):
        x = example_input(name, batch=4)
        gm = qpasses.trace(MODELS[name]().eval(), (x,))
        for recipe in ("ptq_int8", "int_only", "bnn", "dynamic_int8", "aciq4", "w4a16", "mixed_ptq", "qat", "lower"):
            qpasses.PassManager(recipe).run(gm, data=[x, x])
            assert bad == [], (name, recipe, bad[:5])
    assert len(handed) > 30


@action("test_swap_linear_behind_the_table")
def _swap_linear(ctx, node):
    setattr(ctx.gm, node.target, torch.nn.Linear(4, 4))  # not through qpasses' helpers


@action("test_record_linear_module")
def _record_linear(ctx, node):
    _SEEN.append(ctx.view(node).module is ctx.gm.get_submodule(node.target))


_SEEN = []


def test_a_user_action_makes_the_next_stage_rebuild_its_module_table():
    import qpasses
    from qpasses import PassManager, Rule
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    gm = qpasses.trace(m, (torch.randn(2, 4),), mode="fx")
    _SEEN.clear()
    PassManager([Rule(name="swap", match="(linear $l ...)", rewrite="test_swap_linear_behind_the_table($l)",
                      stage="s1"),
                 Rule(name="look", match="(linear $l ...)", rewrite="test_record_linear_module($l)", stage="s2")]
                ).run(gm)
    assert _SEEN == [True]


@data_step("test_swap_linear_in_step", keeps_modules=True)
def _swap_in_step(ctx):
    for n in ctx.gm.graph.nodes:
        if n.op == "call_module" and isinstance(ctx.gm.get_submodule(n.target), torch.nn.Linear):
            setattr(ctx.gm, n.target, torch.nn.Linear(4, 4))  # behind the module table's back


def test_only_qpasses_own_model_running_steps_keep_the_module_table():
    """calibrate (declared to only run the model) keeps the table on a model of torch.nn
    modules; a step from outside qpasses, even one declaring the same, makes the next stage
    rebuild it, and so does a module class whose forward qpasses cannot vouch for."""
    import qpasses
    from qpasses import PassManager, Rule
    from qpasses.fxfast import module_table
    from qpasses.manager import _keeps_modules
    x = torch.randn(2, 4)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    gm = qpasses.trace(m, (x,), mode="fx")
    _SEEN.clear()
    PassManager(["test_swap_linear_in_step",
                 Rule(name="look", match="(linear $l ...)", rewrite="test_record_linear_module($l)", stage="s2")]
                ).run(gm, data=[x])
    assert _SEEN == [True]
    assert _keeps_modules("calibrate", module_table(gm))
    assert not _keeps_modules("test_swap_linear_in_step", module_table(gm))

    class Mine(torch.nn.Module):
        def forward(self, v):
            return v
    assert not _keeps_modules("calibrate", {"": gm, "mine": Mine()})


def test_runs_on_an_exported_graph_give_no_pytree_deprecation_warning():
    """An exported graph's code generator and root hold pytree specs; deep-copying them made
    torch warn (FutureWarning, deprecated LeafSpec) on every run.  The copies share the specs
    (frozen dataclasses) and keep the same calling convention."""
    import qpasses
    from qpasses.fxfast import copy_graph
    from qpasses.zoo import MODELS, example_input
    m = MODELS["mlp"]().eval()
    x = example_input("mlp", batch=2)
    gm = qpasses.trace(m, (x,), mode="export")
    assert getattr(gm.graph._codegen, "pytree_info", None) is not None  # the case this is about
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        g = copy_graph(gm.graph)
        q = qpasses.PassManager("ptq_int8").run(gm, data=[x])
    assert g._codegen is not gm.graph._codegen
    assert g._codegen.pytree_info == gm.graph._codegen.pytree_info
    assert q.graph._codegen.pytree_info.in_spec is gm.graph._codegen.pytree_info.in_spec
    with torch.no_grad():
        ref = m(x)
        assert torch.allclose(q(x), ref, atol=0.05 * float(ref.abs().max()))
