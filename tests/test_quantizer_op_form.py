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


# --------------------------------------------------------------------------- the module form, rebuilt
def _to_module_form(gm):
    """Rebuild the form these quantizers had before (a ``call_module`` of the quantizer per node):
    holder-backed op nodes call their holder; each dynamic fp8 / binary op node calls a new
    ``Fp8DynamicQuantize`` / ``BinaryActivation`` / ``BinaryWeight``.  In place; returns ``gm``."""
    from qpasses.context import RewriteContext
    from qpasses.numerics.fp8 import Fp8DynamicQuantize
    from qpasses.qnodes import as_module_call, fp8_dynamic_granularity, is_quantizer_call
    rc = RewriteContext(gm)
    for i, n in enumerate(list(gm.graph.nodes)):
        if is_quantizer_call(n):
            as_module_call(rc, n)
        elif fp8_dynamic_granularity(n) is not None:
            name = f"fp8_dyn_module_{i}"
            gm.add_submodule(name, Fp8DynamicQuantize(fp8_dynamic_granularity(n) == "per_token"))
            n.op, n.target, n.args = "call_module", name, (n.args[0],)
        elif n.op == "call_function" and n.target in (Q.binary_sign.default, Q.binary_weight.default):
            from qpasses.methods.binary.lib import BinaryActivation, BinaryWeight
            name = f"binary_module_{i}"
            mod = BinaryActivation() if n.target is Q.binary_sign.default else \
                BinaryWeight(scale=n.args[2], axis=n.args[1])
            gm.add_submodule(name, mod)
            n.op, n.target, n.args = "call_module", name, (n.args[0],)
    gm.graph.lint()
    gm.recompile()
    return gm


def _copy(gm):
    import copy
    return copy.deepcopy(gm)


# ------------------------------------------------------------------------------------------ fp8
def _fp8(level, activations, seed=0):
    torch.manual_seed(seed)
    m = _MLP().eval()
    x = torch.randn(4, 96) * 3
    gm = qpasses.trace(m, (x,), mode=level)
    q = qpasses.PassManager("w8a8_fp8", activations=activations, quiet=True).run(gm, data=[x, torch.randn(4, 96)])
    return m, x, q


@pytest.mark.parametrize("level", ["fx", "export"])
@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_fp8_quantizers_are_op_nodes_and_equal_the_module_form(level, activations):
    from qpasses.numerics.fp8 import Fp8DynamicQuantize, Fp8FakeQuantize
    from qpasses.qnodes import fp8_dynamic_granularity
    m, x, q = _fp8(level, activations)
    assert not _module_calls(q, (Fp8FakeQuantize, Fp8DynamicQuantize))
    w = _calls(q, Q.fp8_fake_quant_per_channel.default)
    assert len(w) == 3
    for n in w:      # fp8_fake_quant_per_channel(get_attr W, get_attr holder.scale, 0)
        assert n.args[0].op == n.args[1].op == "get_attr" and n.args[2] == 0
        assert n.args[1].target == f"{holder_target(n)}.scale"
        assert isinstance(quantizer_module(q, n, (Fp8FakeQuantize,)), Fp8FakeQuantize)
    if activations == "static":
        a = _calls(q, Q.fp8_fake_quant_per_tensor.default)
        assert len(a) == 3 and all(n.args[1].op == "get_attr" for n in a)
        assert {k for k in q.state_dict() if k.startswith(("act_q", "weight_fp8"))} == \
            {f"{holder_target(n)}.scale" for n in a + w}
    else:            # stateless: plain op calls, no holder, no state
        a = _calls(q, Q.fp8_fake_quant_per_token.default)
        assert len(a) == 3 and all(len(n.args) == 1 and fp8_dynamic_granularity(n) == "per_token" for n in a)
        assert not any(k.startswith("act_q") for k in q.state_dict())
    with torch.no_grad():
        op_form = q(x)
        module_form = _to_module_form(_copy(q))
        assert len(_module_calls(module_form, (Fp8FakeQuantize, Fp8DynamicQuantize))) == 6
        assert torch.equal(module_form(x), op_form)


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_fp8_graph_survives_torch_export_one_node_per_quantizer(activations):
    m, x, q = _fp8("fx", activations)
    ops = {Q.fp8_fake_quant_per_channel.default, Q.fp8_fake_quant_per_tensor.default,
           Q.fp8_fake_quant_per_token.default}
    n_fx = sum(1 for n in q.graph.nodes if n.op == "call_function" and n.target in ops)
    assert n_fx == 6
    ep = torch.export.export(q, (x,))
    assert sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target in ops) == n_fx
    with torch.no_grad():
        assert torch.equal(ep.module()(x), q(x))
    ep2 = torch.export.export(q, (torch.randn(7, 96),), dynamic_shapes=({0: torch.export.Dim("b")},))
    with torch.no_grad():
        assert torch.equal(ep2.module()(x), q(x))


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_fp8_lowering_of_the_op_form_equals_lowering_of_the_module_form(activations):
    """The lowered graph (``fp8_linear`` / ``dynamic_fp8_linear``) is the same, constant for constant,
    whether the fp8 quantizers were op nodes or module calls."""
    m, x, q = _fp8("fx", activations)
    kernel = Q.fp8_linear.default if activations == "static" else Q.dynamic_fp8_linear.default
    low = qpasses.PassManager("lower", device="cpu", quiet=True).run(q)
    low_m = qpasses.PassManager("lower", device="cpu", quiet=True).run(_to_module_form(_copy(q)))
    assert len(_calls(low, kernel)) == len(_calls(low_m, kernel)) == 3
    assert not [n for n in low.graph.nodes if n.op == "call_function" and "fp8_fake_quant" in str(n.target)]
    sd, sdm = low.state_dict(), low_m.state_dict()
    assert sd.keys() == sdm.keys() and all(torch.equal(sd[k], sdm[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(low(x), low_m(x))


# --------------------------------------------------------------------------------- checkpoints
CKPT = [("w4a16", {"group_size": 32}), ("w4a16", {"group_size": 32, "symmetric": False}),
        ("w8a8_fp8", {"activations": "static"}), ("w8a8_fp8", {"activations": "dynamic"})]


@pytest.mark.parametrize("recipe,opts", CKPT, ids=[f"{r}-{'-'.join(map(str, o.values()))}" for r, o in CKPT])
def test_compressed_tensors_entries_are_those_of_the_module_form(recipe, opts):
    transformers = pytest.importorskip("transformers")
    from qpasses.checkpoint import compressed_entries
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=50, use_cache=False, max_position_embeddings=16)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    q = qpasses.PassManager(recipe, quiet=True, **opts).run(qpasses.trace(hf, (ids,)), data=[ids])
    got, floats = compressed_entries(q, hf)
    want, floats_m = compressed_entries(_to_module_form(_copy(q)), hf)
    assert floats == floats_m and [e.name for e in got] == [e.name for e in want] and len(got) == 8   # 7 linears and lm_head
    for a, b in zip(got, want):
        assert a.signature() == b.signature()
        for t in ("weight", "scale", "zero_point"):
            ta, tb = getattr(a, t), getattr(b, t)
            assert (ta is None and tb is None) or torch.equal(ta, tb)
        assert a.act.keys() == b.act.keys()
        if "scale" in a.act:
            assert torch.equal(a.act["scale"], b.act["scale"])


def test_fp8_onnx_export_of_the_op_form(tmp_path):
    pytest.importorskip("onnxruntime")
    import numpy as np
    from qpasses.onnx import run_onnx
    for activations in ("static", "dynamic"):
        m, x, q = _fp8("fx", activations)
        model = qpasses.export_onnx(q, x, str(tmp_path / f"{activations}.onnx"), opset=21)
        ops = [n.op_type for n in model.graph.node]
        assert "DequantizeLinear" in ops
        with torch.no_grad():
            ref = q(x).numpy()
        assert np.abs(run_onnx(model, x)[0] - ref).max() <= 1e-5 * np.abs(ref).max()


# ------------------------------------------------------------------------------------------ ACIQ
def _aciq(level, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 6 * 6, 10)).eval()
    x = torch.randn(4, 3, 8, 8)
    gm = qpasses.trace(m, (x,), mode=level)
    q = qpasses.PassManager("aciq4", quiet=True).run(gm, data=[x, torch.randn(4, 3, 8, 8)])
    return m, x, q


def _channel_bits_reference(w, mod):
    """ChannelBitsFakeQuant's arithmetic, written out: gain * clamp(round(w / s), -qmax, qmax) * s + offset."""
    shape = [1] * w.dim()
    shape[mod.axis % w.dim()] = -1
    s, qm, g, o = (t.reshape(shape) for t in (mod.scale, mod.qmax, mod.gain, mod.offset))
    q = torch.minimum(torch.maximum(torch.round(w / s), -qm), qm) * s
    return q * g + o


@pytest.mark.parametrize("level", ["fx", "export"])
def test_aciq_channel_bits_quantizer_is_one_op_node(level):
    from qpasses.methods.aciq.lib import ChannelBitsFakeQuant
    m, x, q = _aciq(level)
    assert not _module_calls(q, (ChannelBitsFakeQuant,))
    calls = _calls(q, Q.fake_quant_channel_bits.default)
    assert len(calls) == 3
    for n in calls:
        holder = quantizer_module(q, n, (ChannelBitsFakeQuant,))
        t = holder_target(n)
        assert [a.target for a in n.args[1:5]] == [f"{t}.{a}" for a in ("scale", "qmax", "gain", "offset")]
        assert n.args[5] == holder.axis
        w = qpasses.opclasses.get_attr_value(q, n.args[0].target).detach()
        got = n.target(w, *(qpasses.opclasses.get_attr_value(q, a.target) for a in n.args[1:5]), n.args[5])
        assert torch.equal(got, _channel_bits_reference(w, holder)) and torch.equal(got, holder(w))
    with torch.no_grad():
        op_form = q(x)
        assert torch.equal(_to_module_form(_copy(q))(x), op_form)
    ep = torch.export.export(q, (x,))
    assert len([n for n in ep.graph.nodes if n.op == "call_function"
                and n.target is Q.fake_quant_channel_bits.default]) == 3
    with torch.no_grad():
        assert torch.equal(ep.module()(x), op_form)


def test_fake_quant_channel_bits_op_checks_and_gradient():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g)
    s = torch.tensor([0.1, 0.2, 0.05, 0.3])
    qm = torch.tensor([7.0, 1.0, 127.0, 3.0])
    gain, off = torch.tensor([1.0, 0.9, 1.1, 1.0]), torch.tensor([0.0, 0.01, -0.02, 0.0])
    torch.library.opcheck(Q.fake_quant_channel_bits.default, (w, s, qm, gain, off, 0))
    with pytest.raises(ValueError, match="qmax has 3 elements"):
        Q.fake_quant_channel_bits(w, s, qm[:3], gain, off, 0)
    wr = w.clone().requires_grad_(True)
    Q.fake_quant_channel_bits(wr, s, qm, gain, off, 0).sum().backward()
    inside = torch.round(w / s[:, None]).abs() <= qm[:, None]
    assert torch.equal(wr.grad, gain[:, None].expand_as(w) * inside)


# ---------------------------------------------------------------------------------------- binary
def _sign_ste_before(x):
    """The straight-through sign the binary modules computed before they called an op."""
    from qpasses.methods.binary.lib import sign_pm1
    c = torch.clamp(x, -1.0, 1.0)
    return c + (sign_pm1(x) - c).detach()


@pytest.mark.parametrize("level", ["fx", "export"])
def test_binary_quantizers_are_plain_op_nodes(level):
    from qpasses import datasets, zoo
    from qpasses.methods.binary.lib import BinaryActivation, BinaryWeight
    torch.manual_seed(0)
    m = zoo.DigitsCNN(8).eval()
    x, _ = datasets.load_digits_tensors("calib")
    gm = qpasses.trace(m, (x[:8],), mode=level)
    q = qpasses.PassManager("bnn", quiet=True).run(gm, data=list(x[:64].split(32)))
    assert not _module_calls(q, (BinaryWeight, BinaryActivation))
    ws, acts = _calls(q, Q.binary_weight.default), _calls(q, Q.binary_sign.default)
    assert len(ws) == 2 and len(acts) == 2
    for n in ws:    # binary_weight(get_attr latent weight, axis, scale): alpha * sign(w), as before
        w = qpasses.opclasses.get_attr_value(q, n.args[0].target).detach()
        assert n.args[1:] == (0, True)
        before = _sign_ste_before(w) * w.abs().mean(dim=(1, 2, 3), keepdim=True)
        assert torch.equal(n.target(w, *n.args[1:]), before)
    xs = x[:16]
    with torch.no_grad():
        op_form = q(xs)
        assert torch.equal(_to_module_form(_copy(q))(xs), op_form)
    ep = torch.export.export(q, (xs,))
    assert len(_calls(ep.graph_module, Q.binary_weight.default)) == 2
    assert len(_calls(ep.graph_module, Q.binary_sign.default)) == 2
    with torch.no_grad():
        assert torch.equal(ep.module()(xs), op_form)


def test_binary_ops_gradients_are_those_of_the_module_form():
    torch.manual_seed(0)
    w = (torch.randn(6, 4, 3, 3) * 1.3)
    g = torch.randn_like(w)
    for scale in (True, False):
        a, b = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
        Q.binary_weight(a, 0, scale).backward(g)
        ref = _sign_ste_before(b)
        if scale:
            ref = ref * b.abs().mean(dim=(1, 2, 3), keepdim=True)
        ref.backward(g)
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    x = torch.randn(5, 7) * 2
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    Q.binary_sign(a).backward(torch.ones(5, 7))
    _sign_ste_before(b).backward(torch.ones(5, 7))
    assert torch.equal(a.grad, b.grad)
    torch.library.opcheck(Q.binary_weight.default, (w, 0, True))
    torch.library.opcheck(Q.binary_sign.default, (x,))


def test_layer_report_switches_binary_op_nodes_off_to_their_float_activation():
    from qpasses import datasets, zoo
    from qpasses.layer_report import layer_table, quantizers_off
    torch.manual_seed(0)
    m = zoo.DigitsCNN(8).eval()
    x, _ = datasets.load_digits_tensors("calib")
    q = qpasses.PassManager("bnn", quiet=True).run(qpasses.trace(m, (x[:8],)), data=list(x[:64].split(32)))
    acts = _calls(q, Q.binary_sign.default)
    relu_dropped = [n for n in acts if n.meta.get("qpasses.float_activation") == "relu"]
    assert relu_dropped                              # drop_relu recorded what the sign replaced
    seen = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            seen[n.name] = r
            return r
    with torch.no_grad(), quantizers_off(q):
        Rec(q).run(x[:4])
    for n in relu_dropped:                           # off: the ReLU it replaced, not a sign
        assert torch.equal(seen[n.name], torch.relu(seen[n.args[0].name]))
    assert all(n.target is Q.binary_sign.default for n in acts)      # restored afterwards
    rows = layer_table(q, x[:4])
    assert sorted((r["w_bits"], r["a_bits"]) for r in rows if r["w_bits"] == 1) == [(1, 1), (1, 1)]


# ------------------------------------------------------------------------------- saved archives
SAVED = [("w4a16", {"group_size": 32}), ("w4a16", {"group_size": 32, "symmetric": False}),
         ("w8a8_fp8", {}), ("w8a8_fp8", {"activations": "dynamic"}), ("aciq4", {})]


@pytest.mark.parametrize("recipe,opts", SAVED, ids=[f"{r}-{'-'.join(map(str, o.values()))}" for r, o in SAVED])
def test_saved_archive_keeps_the_quantizer_ops_and_the_numerics(tmp_path, recipe, opts):
    torch.manual_seed(0)
    m = _MLP().eval()
    x = torch.randn(4, 96)
    q = qpasses.PassManager(recipe, quiet=True, **opts).run(qpasses.trace(m, (x,)), data=[x])
    ops = {n.target for n in q.graph.nodes if n.op == "call_function" and str(n.target).startswith("qpasses.")}
    assert ops
    path = str(tmp_path / "q.pt2")
    qpasses.save(q, path)
    ep = qpasses.load(path)
    loaded = ep.module() if hasattr(ep, "module") else ep
    assert ops <= {n.target for n in ep.graph.nodes if n.op == "call_function"}
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
