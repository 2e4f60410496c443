"""The ``lower`` family on ``w8a8_fp8`` graphs: fp8 linears -> ``fp8_linear`` / ``dynamic_fp8_linear``.

A lowered graph must call the fp8 kernel ops with the weight stored once as float8_e4m3fn, agree
with the fake-quant graph it came from (same fp8 codes and scales: only the fp32 rounding of the
sum and of the scale products separates them), run the Triton kernel (interpreter) bit for bit
like the CPU reference where the accumulation is exact, and list in ``pm.report`` what it did not
lower and why.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import qpasses  # noqa: E402
from qpasses import zoo  # noqa: E402
from qpasses.kernels import library as kops  # noqa: E402
from qpasses.numerics.fp8 import Fp8DynamicQuantize, Fp8FakeQuantize  # noqa: E402
from qpasses.context import RewriteContext  # noqa: E402
from qpasses.qnodes import as_quantizer_call, fp8_dynamic_granularity, quantizer_module  # noqa: E402

torch.set_num_threads(1)

Q = torch.ops.qpasses
F8 = torch.float8_e4m3fn
FP8_OPS = {"static": Q.fp8_linear.default, "dynamic": Q.dynamic_fp8_linear.default}


def kernel_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("qpasses.")]


def fp8_modules(gm):
    """The fp8 quantizer nodes: static ones (op calls on an Fp8FakeQuantize holder) and dynamic op calls."""
    return [n for n in gm.graph.nodes if fp8_dynamic_granularity(n) is not None or
            isinstance(quantizer_module(gm, n, None), (Fp8FakeQuantize, Fp8DynamicQuantize))]


def close(got, want, rel=1e-5):
    """fp32 rounding of a K-term sum and of the two scale products: relative to the output's range."""
    return float((got.float() - want.float()).abs().max()) <= rel * float(want.float().abs().max()) + 1e-6


def fp8_graph(model, x, activations, data=None, mode="fx"):
    gm = qpasses.trace(model, (x,), mode=mode)
    return qpasses.PassManager("w8a8_fp8", activations=activations).run(gm, data=data or [x])


def lower(fq, **opts):
    pm = qpasses.PassManager("lower", device="cpu", **opts)
    return pm.run(fq), pm


@pytest.mark.parametrize("level", ["fx", "export"])
@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_mlp_lowered_to_fp8_kernels_agrees_with_fake_quant(level, activations):
    torch.manual_seed(0)
    model = zoo.MLP().eval()
    x = zoo.example_input("mlp", 16)
    fq = fp8_graph(model, x, activations, mode=level)
    before = str(fq.graph)
    low, pm = lower(fq)
    assert str(fq.graph) == before, "the fake-quant input graph was modified"
    t = kernel_targets(low)
    assert t.count(FP8_OPS[activations]) == 3
    assert t.count(Q.quantize_fp8.default) == (3 if activations == "static" else 0)
    assert not fp8_modules(low), "every fp8 quantizer is gone: folded into the kernels' operands"
    st = pm.report["lower_fp8_linear"]
    assert st.candidates == 3 and st.rewrites == 3 and st.n_refused == 0
    assert pm.report["lower_quantized_weighted"].candidates == 0      # nothing left for the int8 rule
    assert len(pm.report.coverage.quantized) == 3 and not pm.report.coverage.missing
    infos = [n.meta["qpasses.lowered"] for n in low.graph.nodes if "qpasses.lowered" in n.meta]
    assert [i["activations"] for i in infos] == [activations] * 3
    assert all(i["kernel"] == str(FP8_OPS[activations]).split(".")[1] and i["format"] == "float8_e4m3fn"
               for i in infos)
    xt = zoo.example_input("mlp", 5, seed=1)                       # another batch: dynamic scales from it
    with torch.no_grad():
        want, got = fq(xt), low(xt)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.equal(want, model(xt))                        # the fake-quant graph does quantize
    assert close(got, want)


def weight_bytes(gm, dtype):
    return sum(t.numel() * t.element_size() for t in list(gm.parameters()) + list(gm.buffers())
               if t.dtype == dtype and t.dim() == 2)


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_weights_stored_once_as_float8_buffers(activations):
    torch.manual_seed(1)
    model = zoo.MLP().eval()
    x = zoo.example_input("mlp", 8)
    fq = fp8_graph(model, x, activations)
    low, _ = lower(fq)
    n_w = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert weight_bytes(fq, torch.float32) == 4 * n_w
    assert weight_bytes(low, F8) == n_w                            # one byte per weight
    assert weight_bytes(low, torch.float32) == 0                   # the float weights are gone
    f8 = {k: v for k, v in low.named_buffers() if v.dtype == F8}
    assert len(f8) == 3 and not any(p.dtype == F8 for p in low.parameters())
    assert not any(p.requires_grad for p in low.parameters())
    # the stored codes times the scales are exactly the fake-quantized weights
    wq = {n.args[0].target: quantizer_module(fq, n, None) for n in fq.graph.nodes
          if isinstance(quantizer_module(fq, n, None), Fp8FakeQuantize)
          and n.args[0].op == "get_attr"}
    lowered = [n for n in low.graph.nodes if n.target is FP8_OPS[activations]]
    windex = 2 if activations == "static" else 1
    for (wname, q), n in zip(wq.items(), lowered):
        w = fq.get_parameter(wname).detach()
        codes = getattr(low, n.args[windex].target)
        scale = getattr(low, n.args[windex + 1].target)
        assert codes.dtype == F8 and codes.shape == w.shape
        assert torch.equal(codes.float() * scale[:, None], q(w))
    rows = __import__("qpasses.layer_report", fromlist=["layer_table"]).layer_table(low, (x,))
    assert [r["op"] for r in rows] == [str(FP8_OPS[activations]).split(".")[1]] * 3
    assert sum(r["size_kib"] for r in rows) == n_w / 1024 and all(r["w_bits"] == 8 for r in rows)


def integer_code_mlp(seed):
    """A linear stack whose fp8 codes are integers: every weight row and every input row holds a
    448 and otherwise integers in [-16, 16], so every scale is exactly 1, and with integer biases
    each fp32 sum is an integer below 2**24, exact in any order (as in tests/kernels/test_fp8_gemm.py)."""
    g = torch.Generator().manual_seed(seed)

    def lin(n, k):
        m = nn.Linear(k, n)
        w = torch.randint(-16, 17, (n, k), generator=g).float()
        w[torch.arange(n), torch.randint(0, k, (n,), generator=g)] = 448.0
        m.weight.data.copy_(w)
        m.bias.data.copy_(torch.randint(-8, 9, (n,), generator=g).float())
        return m

    model = nn.Sequential(lin(24, 40), lin(24, 24)).eval()
    x = torch.randint(-16, 17, (5, 40), generator=g).float()
    x[:, 3] = 448.0
    return model, x


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_triton_kernel_bit_exact_vs_reference_in_a_lowered_graph(activations, monkeypatch):
    """The first layer's codes are integers (scales 1): Triton (interpreted) == CPU reference bit
    for bit there, and so the whole graph agrees to fp32 rounding of the second layer only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, x = integer_code_mlp(2)
    fq = fp8_graph(model[:1], x, activations)
    low, pm = lower(fq)
    assert pm.report["lower_fp8_linear"].rewrites == 1
    used = []
    real = kops._kmod
    monkeypatch.setattr(kops, "_kmod", lambda name: used.append(name) or real(name))
    with torch.no_grad():
        with kops.triton_policy("never"):
            ref = low(x)
        with kops.triton_policy("always"):
            tri = low(x)
        want = fq(x)
    assert used == ["triton_fp8"]
    assert torch.equal(tri, ref)
    # scales 1 and integer codes: the fake-quant graph's float matmul is exact too
    assert torch.equal(ref, want)
    # two layers (second layer's input codes are arbitrary): Triton and reference agree to rounding
    fq2 = fp8_graph(model, x, activations)
    low2, _ = lower(fq2)
    with torch.no_grad():
        with kops.triton_policy("never"):
            ref2 = low2(x)
        with kops.triton_policy("always"):
            tri2 = low2(x)
        want2 = fq2(x)
    assert close(tri2, ref2) and close(ref2, want2)


def test_quantize_fp8_codes_are_the_fake_quantizer_codes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, generator=g) * torch.exp(torch.randn(500, generator=g) * 3)
    x[:4] = torch.tensor([1e9, -1e9, 0.0, 448 * 0.05 * (1 + 1 / 16)])      # saturation, zero, a tie
    s = torch.tensor([0.05])
    codes = Q.quantize_fp8(x, s)
    assert codes.dtype == F8 and codes.shape == x.shape
    assert torch.equal(codes.float() * s, Q.fp8_fake_quant_per_tensor(x, s))
    assert codes[:2].float().tolist() == [448.0, -448.0]
    xb = x.to(torch.bfloat16)
    assert torch.equal(Q.quantize_fp8(xb, s).float() * s, Q.fp8_fake_quant_per_tensor(xb.float(), s))
    with pytest.raises(ValueError, match="one .per-tensor. scale"):
        Q.quantize_fp8(x, torch.ones(2))
    with pytest.raises(ValueError, match="float .not float8."):
        Q.quantize_fp8(codes, s)
    torch.library.opcheck(Q.quantize_fp8.default, (torch.randn(3, 7), torch.tensor([0.01])))


def test_conv_layers_refused_with_reason_and_linear_lowered():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    for activations in ("static", "dynamic"):
        fq = fp8_graph(model, x, activations)
        low, pm = lower(fq)
        st = pm.report["lower_fp8_linear"]
        assert st.rewrites == 1 and st.n_refused == 1
        assert "no kernel for conv2d" in st.refused[0][1] and "linear layers only" in st.refused[0][1]
        assert kernel_targets(low).count(FP8_OPS[activations]) == 1
        assert len(fp8_modules(low)) == 2                          # the conv's input and weight quantizers
        with torch.no_grad():
            assert close(low(x), fq(x))


def _first(gm, cls, pred=lambda m: True):
    return next(n for n in gm.graph.nodes if isinstance(quantizer_module(gm, n, None), cls)
                and pred(quantizer_module(gm, n, None)))


def test_inputs_without_an_fp8_kernel_are_refused_with_the_reason():
    torch.manual_seed(5)
    model = zoo.MLP().eval()
    x = zoo.example_input("mlp", 8)
    # a float input: remove the first activation quantizer
    fq = fp8_graph(model, x, "dynamic")
    aq = next(n for n in fq.graph.nodes if fp8_dynamic_granularity(n) == "per_token")
    aq.replace_all_uses_with(aq.args[0])
    fq.graph.erase_node(aq)
    fq.recompile()
    low, pm = lower(fq)
    st = pm.report["lower_fp8_linear"]
    assert st.rewrites == 2 and st.n_refused == 1
    assert "fp8 weights with a float (not fp8-quantized) input" in st.refused[0][1]
    with torch.no_grad():
        assert close(low(x), fq(x))
    # dynamic per-tensor activations on a linear: dynamic_fp8_linear quantizes per token
    fq = fp8_graph(model, x, "dynamic")
    next(n for n in fq.graph.nodes if fp8_dynamic_granularity(n) == "per_token").target = \
        Q.fp8_fake_quant_dynamic_tensor.default
    fq.recompile()
    low, pm = lower(fq)
    assert "dynamic per-tensor fp8 input" in pm.report["lower_fp8_linear"].refused[0][1]
    with torch.no_grad():
        assert close(low(x), fq(x))
    # a weight quantizer with scales along the input axis
    fq = fp8_graph(model, x, "static")
    wn = _first(fq, Fp8FakeQuantize, lambda m: m.axis == 0)
    w = fq.get_parameter(wn.args[0].target)
    quantizer_module(fq, wn, None).__init__(Fp8FakeQuantize.fit(w, 1).scale, axis=1)
    as_quantizer_call(RewriteContext(fq), wn)          # the holder changed kind: its node follows
    fq.recompile()
    assert wn.args[2] == 1
    low, pm = lower(fq)
    st = pm.report["lower_fp8_linear"]
    assert st.rewrites == 2 and "not per output channel (axis 0)" in st.refused[0][1]
    with torch.no_grad():
        assert close(low(x), fq(x))
    # float64 models: the kernels' outputs are float32 / float16 / bfloat16
    fq = fp8_graph(zoo.MLP().eval().double(), x.double(), "dynamic")
    low, pm = lower(fq)
    st = pm.report["lower_fp8_linear"]
    assert st.rewrites == 0 and st.n_refused == 3 and "torch.float64 input" in st.refused[0][1]
    with torch.no_grad():
        assert torch.equal(low(x.double()), fq(x.double()))


def test_skip_out_dtype_shared_input_and_second_run():
    class ThreeHeads(nn.Module):                                   # q / k / v read one activation
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8, bias=False), nn.Linear(16, 8)

        def forward(self, x):
            return self.q(x) * self.k(x) + self.v(x)

    torch.manual_seed(6)
    x = torch.randn(2, 6, 16)                                      # 3-d input: [batch, tokens, features]
    fq = fp8_graph(ThreeHeads().eval(), x, "static")
    assert len(fp8_modules(fq)) == 4                               # one activation + three weight quantizers
    low, pm = lower(fq)
    t = kernel_targets(low)
    assert t.count(Q.quantize_fp8.default) == 1 and t.count(Q.fp8_linear.default) == 3
    with torch.no_grad():
        assert close(low(x), fq(x))
    again, pm2 = lower(low)
    assert kernel_targets(again) == t and pm2.report["lower_fp8_linear"].candidates == 0   # no weighted op left

    skipped, pm = lower(fq, skip=["k"])
    st = pm.report["lower_fp8_linear"]
    assert st.rewrites == 2 and st.n_refused == 1 and "in skip" in st.refused[0][1]
    assert len(fp8_modules(skipped)) == 2                          # k's weight quantizer and the shared input one
    with torch.no_grad():
        assert close(skipped(x), fq(x))

    for activations in ("static", "dynamic"):
        fqa = fp8_graph(ThreeHeads().eval(), x, activations)
        bf, _ = lower(fqa, out_dtype="bfloat16")
        with torch.no_grad():
            y = bf(x)
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), fqa(x), rtol=2e-2, atol=2e-2)


def test_cpu_graph_refused_by_default_and_cuda_graph_lowered(monkeypatch):
    torch.manual_seed(7)
    x = zoo.example_input("mlp", 4)
    fq = fp8_graph(zoo.MLP().eval(), x, "static")
    pm = qpasses.PassManager("lower")
    low = pm.run(fq)
    st = pm.report["lower_fp8_linear"]
    assert st.rewrites == 0 and st.n_refused == 3
    assert all("qpasses.compile" in why and "device='cpu'" in why for _, why in st.refused)
    with torch.no_grad():
        assert torch.equal(low(x), fq(x))
    import qpasses.methods.lower.actions as lower_actions
    monkeypatch.setattr(lower_actions, "_weight_device", lambda ctx, op: torch.device("cuda", 0))
    pm = qpasses.PassManager("lower")
    low = pm.run(fq)
    assert kernel_targets(low).count(Q.fp8_linear.default) == 3 and pm.report["lower_fp8_linear"].n_refused == 0


def test_weight_device_is_read_through_the_fp8_quantizer():
    """``lower_device`` finds the weight behind an Fp8FakeQuantize (CPU here: refused as a CPU graph,
    not as 'an unknown device')."""
    x = zoo.example_input("mlp", 4)
    fq = fp8_graph(zoo.MLP().eval(), x, "dynamic")
    pm = qpasses.PassManager("lower")
    pm.run(fq)
    assert all("weight on cpu" in why for _, why in pm.report["lower_fp8_linear"].refused)


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_lowered_graph_exports_and_composes(activations):
    torch.manual_seed(8)
    model = zoo.MLP().eval()
    x = zoo.example_input("mlp", 4)
    gm = qpasses.trace(model, (x,))
    low = qpasses.PassManager(["w8a8_fp8", "lower"], activations=activations, device="cpu").run(gm, data=[x])
    assert kernel_targets(low).count(FP8_OPS[activations]) == 3
    ep = torch.export.export(low, (x,))
    names = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert FP8_OPS[activations] in names
    with torch.no_grad():
        assert torch.equal(ep.module()(x), low(x))


# ------------------------------------------------------------------------ transformers models
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=100, use_cache=False,
                                   max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  vocab_size=100, max_position_embeddings=32)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


class Out(nn.Module):
    def __init__(self, m, key):
        super().__init__()
        self.m, self.key = m, key

    def forward(self, ids):
        return getattr(self.m(input_ids=ids), self.key)


@pytest.mark.parametrize("activations", ["static", "dynamic"])
@pytest.mark.parametrize("name,make,key,n_linear", [("llama", tiny_llama, "logits", 2 * 7 + 1),
                                                    ("bert", tiny_bert, "last_hidden_state", 2 * 6)])
def test_tiny_transformers_lowered(name, make, key, n_linear, activations):
    m = Out(make(), key)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 100, (2, 12), generator=g) for _ in range(2)]
    ids = torch.randint(0, 100, (2, 12), generator=g)
    gm = qpasses.trace(m, (data[0],))
    fq = qpasses.PassManager("w8a8_fp8", activations=activations).run(gm, data=data)
    low, pm = lower(fq)
    st = pm.report["lower_fp8_linear"]
    assert st.rewrites == n_linear and st.n_refused == 0
    assert kernel_targets(low).count(FP8_OPS[activations]) == n_linear
    assert len(pm.report.coverage.quantized) == n_linear and not pm.report.coverage.missing
    if activations == "static":                                     # q / k / v (and gate / up) share a quantize_fp8
        assert kernel_targets(low).count(Q.quantize_fp8.default) < n_linear
    with torch.no_grad():
        want, got = fq(ids), low(ids)
    assert close(got, want, rel=1e-4)
    f8 = [b for b in low.buffers() if b.dtype == F8]
    assert len(f8) == n_linear
