"""The ``haq`` recipe: cost models, quantization simulator, DDPG search, HAWQ-style baselines."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import qpasses
from qpasses.qnodes import quantizer_module
from qpasses import datasets, zoo
from qpasses.methods.bits.actions import load_bit_map
from qpasses.errors import OptionError, StepError
from qpasses.methods.bits import haq

from conftest import randomize_bn


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    m = randomize_bn(zoo.DigitsCNN(8)).eval()
    x, _ = datasets.load_digits_tensors("calib")
    gm = qpasses.trace(m, (x[:8],))
    return gm, list(x[:128].split(32))


def _canon(gm):
    return qpasses.PassManager("canonicalize").run(gm)


def _fq_bits(q):
    """weight bits of the converted weighted ops, in graph order."""
    return [quantizer_module(q, n.args[1], None).bits for n in q.graph.nodes
            if n.op == "call_function" and "weight" in n.meta.get("qpasses.quant", {})]


# --------------------------------------------------------------------------- layers & costs
def test_extract_layers_features_and_macs(digits):
    gm, _ = digits
    layers, nodes = haq.extract_layers(_canon(gm))
    assert [l.name for l in layers] == ["features.0", "features.3", "features.7", "fc"]
    c1, c2, c3, fc = layers
    assert (c1.cin, c1.cout, c1.kernel, c1.params, c1.macs) == (1, 8, 9, 72, 8 * 8 * 8 * 9)
    assert c3.macs == 16 * 4 * 4 * 8 * 9 and c3.in_numel == 8 * 4 * 4
    assert (fc.op, fc.cin, fc.cout, fc.macs) == ("linear", 16, 10, 160)
    assert not any(l.is_depthwise for l in layers)


def test_cost_models_closed_forms(tmp_path):
    l = haq.Layer(0, "a", "a", "conv2d", 64, 64, 9, 1, 1, 64 * 64 * 9, 64 * 64 * 9 * 1024, 64 * 1024,
                  64 * 1024, False)
    assert haq.SizeCost().layer_cost(l, 4, 8) == l.params * 4 / 8
    assert haq.BOPsCost().layer_cost(l, 4, 8) == l.macs * 32
    h100 = haq.RooflineLatency("h100", batch=1)
    t8, t4 = h100.layer_cost(l, 8, 8), h100.layer_cost(l, 4, 8)
    mem8 = (l.params * 8 + l.in_numel * 8 + l.out_numel * 16) / 8 / 3.35e12
    comp = 2 * l.macs / 1978.9e12
    assert t8 == pytest.approx(max(mem8, comp))
    assert t4 <= t8                                          # fewer weight bits: fewer bytes
    # 512->512 3x3 conv on 14x14: ~3000 int8 ops per byte, above the H100 ridge point (~590)
    dense = haq.Layer(0, "b", "b", "conv2d", 512, 512, 9, 1, 1, 512 * 512 * 9, 512 * 512 * 9 * 196, 512 * 196,
                      512 * 196, False)
    big = haq.RooflineLatency("h100", batch=4096)
    assert big.layer_cost(dense, 8, 8) == pytest.approx(2 * dense.macs * 4096 / 1978.9e12)   # compute bound
    assert big.layer_cost(dense, 16, 16) == pytest.approx(2 * dense.macs * 4096 / 989.4e12)  # fp16 rate
    assert haq.RooflineLatency("h200").layer_cost(l, 8, 8) < t8                      # faster HBM
    with pytest.raises(StepError, match="unknown roofline device"):
        haq.RooflineLatency("tpu")
    p = tmp_path / "lat.json"
    p.write_text(json.dumps({"unit": "us", "layers": {"a": {"w8a8": 3.0, "4,8": 2.0}}}))
    tab = haq.TableLatency(str(p))
    assert tab.layer_cost(l, 8, 8) == 3.0 and tab.layer_cost(l, 4, 8) == 2.0
    with pytest.raises(StepError, match="no entry w2a8"):
        tab.layer_cost(l, 2, 8)


def test_enforce_budget_lowers_until_it_fits(digits):
    gm, _ = digits
    layers, _ = haq.extract_layers(_canon(gm))
    cost = haq.SizeCost()
    budget = cost.total(layers, [3] * 4, [8] * 4)
    ws, as_ = haq.enforce_budget(layers, [8] * 4, [8] * 4, cost, budget, 2, False)
    assert cost.total(layers, ws, as_) <= budget and min(ws) >= 2
    with pytest.raises(StepError, match="cannot be met"):
        haq.enforce_budget(layers, [8] * 4, [8] * 4, cost, budget / 10, 2, False)


# --------------------------------------------------------------------------- simulator
def test_quant_sim_matches_real_pipeline(digits):
    gm, data = digits
    cg = _canon(gm)
    layers, _ = haq.extract_layers(cg)
    sim = haq.QuantSim(cg, layers, [3, 5], [8], data)
    sim.set_bits([5, 3, 3, 5], [8] * 4)
    q = qpasses.PassManager("mixed_ptq", bit_map={"features.0": [5, 8], "features.3": [3, 8], "features.7": [3, 8],
                                                  "fc": [5, 8]}).run(gm, data=data)
    x = torch.cat(data)[:64]
    with torch.no_grad():
        assert torch.allclose(sim.gm(x), q(x), atol=1e-5)
        sim.set_bits(None, None)
        assert torch.allclose(sim.gm(x), gm(x), atol=1e-5)       # float configuration = the float model


def test_hutchinson_matches_exact_trace():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    gm = qpasses.trace(m, (x,))
    layers, _ = haq.extract_layers(gm)
    est = haq.hutchinson_traces(gm, layers, [(x,)], [y], iters=300)
    w0 = m[0].weight.detach().clone()

    def f(w):
        return nn.functional.cross_entropy(m[2](torch.tanh(nn.functional.linear(x, w, m[0].bias))), y)

    exact = torch.autograd.functional.hessian(f, w0).reshape(w0.numel(), -1).diagonal().sum()
    assert est[0] == pytest.approx(float(exact), rel=0.25)
    assert est[1] >= 0


def test_ddpg_agent_basics():
    ag = haq.DDPGAgent(4, seed=0, batch_size=8)
    s = torch.rand(4)
    assert 0 <= ag.act(s) <= 1 and 0 <= ag.act(s, explore=False) <= 1
    for i in range(16):
        ag.remember(torch.rand(4), float(i % 2), float(i % 2))
    assert ag.update() is not None
    sig = ag.sigma
    ag.decay()
    assert ag.sigma < sig


# --------------------------------------------------------------------------- recipe
@pytest.mark.parametrize("constraint,budget,extra", [("size", 0.45, {}), ("bops", 0.45, {"search_activations": True}),
                                                     ("latency", 0.8, {"device": "h200"})])
def test_haq_respects_its_constraint(digits, tmp_path, constraint, budget, extra):
    gm, data = digits
    path = tmp_path / "bits.json"
    pm = qpasses.PassManager("haq", constraint=constraint, budget=budget, episodes=6, warmup=2, save_map=str(path),
                             hutchinson_iters=2, **extra)
    q = pm.run(gm, data=data)
    info = pm.report.steps[0].info
    assert info["cost"] <= info["budget"] * (1 + 1e-9) and info["episodes"] == 6
    rows = pm.report.layers
    assert [r["layer"] for r in rows] == ["features.0", "features.3", "features.7", "fc"]
    assert all({"layer", "op", "w_bits", "a_bits", "cost", "sensitivity"} <= set(r) for r in rows)
    assert all(2 <= r["w_bits"] <= 8 for r in rows)
    assert _fq_bits(q) == [r["w_bits"] for r in rows]        # the graph is quantized as chosen
    assert sum(r["cost"] for r in rows) == pytest.approx(info["cost"])
    assert "w_bits" in info["table"]
    # the saved map reproduces the same quantization through assign_bits
    m = load_bit_map(str(path))
    assert {k: v["w_bits"] for k, v in m.items()} == {r["layer"]: r["w_bits"] for r in rows}
    q2 = qpasses.PassManager("mixed_ptq", bit_map_file=str(path)).run(gm, data=data)
    assert _fq_bits(q2) == _fq_bits(q)


@pytest.mark.parametrize("method", ["hessian", "perturbation"])
def test_greedy_baselines_respect_budget(digits, method):
    gm, data = digits
    pm = qpasses.PassManager("haq", method=method, constraint="size", budget_bits=[3, 8], hutchinson_iters=2)
    pm.run(gm, data=data)
    info = pm.report.steps[0].info
    assert info["cost"] <= info["budget"] and info["avg_w_bits"] <= 3.0
    assert all(r["sensitivity"] >= 0 for r in pm.report.layers)


def test_haq_errors(digits):
    gm, data = digits
    with pytest.raises(StepError, match="below the cost"):
        qpasses.PassManager("haq", budget=0.1, episodes=2).run(gm, data=data)
    with pytest.raises(OptionError):
        qpasses.PassManager("haq", method="random")
    with pytest.raises(OptionError, match="weight bits only"):
        qpasses.PassManager("haq", method="hessian", search_activations=True).run(gm, data=data)
    with pytest.raises(StepError, match="needs data"):
        qpasses.PassManager("haq", episodes=2).run(gm)


@pytest.mark.slow
def test_haq_on_trained_digits_finds_good_config():
    torch.set_num_threads(1)
    model = datasets.train_digits_cnn()
    xtr, ytr = datasets.load_digits_tensors("train")
    xte, yte = datasets.load_digits_tensors("test")
    gm = qpasses.trace(model, (xtr[:8],))
    data = list(xtr[:640].split(64))
    val = list(zip(xtr[640:].split(128), ytr[640:].split(128)))
    pm = qpasses.PassManager("haq", budget=2.5 / 8, episodes=80, val_data=val)
    q = pm.run(gm, data=data)
    info = pm.report.steps[0].info
    assert info["cost"] <= info["budget"]
    uni = qpasses.PassManager("mixed_ptq", bit_map={"*": [2, 8]}).run(gm, data=data)   # what fits uniformly
    assert datasets.accuracy(q, xte, yte) > datasets.accuracy(uni, xte, yte) + 10


def test_seconds_budget_and_export_graph():
    torch.manual_seed(0)
    m = zoo.DigitsCNN(8).eval()
    x, _ = datasets.load_digits_tensors("calib")
    gm = qpasses.trace(m, (x[:8],), mode="export")
    pm = qpasses.PassManager("haq", episodes=50, seconds=0.0, hutchinson_iters=2)
    q = pm.run(gm, data=list(x[:128].split(32)))
    info = pm.report.steps[0].info
    assert info["episodes"] == 1                               # the time budget stopped the search
    assert [r["layer"] for r in pm.report.layers] == ["features.0", "features.3", "features.7", "fc"]
    assert info["cost"] <= info["budget"]
    with torch.no_grad():
        assert torch.isfinite(q(x[:4])).all()


def test_per_position_outputs_are_scored_on_the_last_dimension():
    """A transformer block's [N, S, D] output: labels are per position ([N, S]), in the label-free
    default (float top-1 per position) and with val_data; labels of another shape are refused by name."""
    torch.manual_seed(0)
    m = zoo.TransformerEncoderBlock().eval()
    data = [zoo.example_input("transformer", 4, seed=s) for s in range(4)]
    gm = qpasses.trace(m, (data[0],))
    out, t = haq.classification(torch.randn(4, 10), torch.arange(4))      # a classifier's output: as it is
    assert out.shape == (4, 10) and t.shape == (4,)
    pm = qpasses.PassManager("haq", method="hessian", budget_bits=[4, 8], hutchinson_iters=1)
    q = pm.run(gm, data=data)
    info = pm.report.steps[0].info
    assert info["cost"] <= info["budget"] and info["avg_w_bits"] <= 4.0
    with torch.no_grad():
        assert torch.isfinite(q(data[0])).all()
    val = [(d, m(d).argmax(-1)) for d in data[2:]]                          # per-position labels
    pm = qpasses.PassManager("haq", episodes=2, val_data=val)
    pm.run(gm, data=data[:2])
    assert pm.report.steps[0].info["cost"] <= pm.report.steps[0].info["budget"]
    with pytest.raises(StepError, match=r"labels of shape \(8,\) do not fit a model output of shape \(8, 16, 64\)"):
        qpasses.PassManager("haq", episodes=2, val_data=[(d, torch.zeros(4, dtype=torch.long))
                                                         for d in data[2:]]).run(gm, data=data[:2])
    assert gm.graph is not None and len(gm.graph.nodes) == len(qpasses.trace(m, (data[0],)).graph.nodes)
