"""GENIE: swing convolutions, GENIE-D distillation, GENIE-M quantizers, reconstruction, recipes, DDP."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qpasses
from conftest import free_port as _free_port
from qpasses.errors import OptionError, StepError
from qpasses.methods.genie.lib import (Generator, GenieWeightQuantizer, SwingConv1d, SwingConv2d, distill_batch,
                                   to_swing)
from qpasses.numerics import FakeQuantize
from qpasses.numerics.rounding import AdaRoundQuantizer, BetaSchedule, rectified_sigmoid

from conftest import randomize_bn
from qpasses.qnodes import quantizer_module

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- small models
class Strided2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class Signal1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 5, padding=2)
        self.b1 = nn.BatchNorm1d(4)
        self.c2 = nn.Conv1d(4, 6, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean(2))


def _gm(model, shape, seed=0):
    torch.manual_seed(seed)
    randomize_bn(model, seed).eval()
    return qpasses.trace(model, (torch.randn(2, *shape),))


FAST = dict(samples=16, distill_batch_size=8, distill_iters=3, recon_iters=3, recon_batch_size=8,
            calib_batch_size=8)


# ----------------------------------------------------------------------------- swing convolution
def test_swing_module_same_tensors_both_directions():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    sw = to_swing(conv, jitter=1)
    assert isinstance(sw, SwingConv2d) and sw.weight is conv.weight and sw.bias is conv.bias
    back = sw.to_conv()
    assert type(back) is nn.Conv2d and back.weight is conv.weight and back.bias is conv.bias
    assert back.stride == conv.stride and back.padding == conv.padding


def test_swing_identity_in_eval_and_shift_while_swinging():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).eval()
    sw = to_swing(conv).eval()
    x = torch.randn(1, 2, 9, 9)
    assert torch.equal(sw(x), conv(x))
    sw.swing = True
    ref = conv(x)
    xp = F.pad(x, [1, 1, 1, 1], mode="reflect")
    shifted = [conv(xp[:, :, i:i + 9, j:j + 9]) for i in range(3) for j in range(3)]
    outs = [sw(x) for _ in range(30)]
    assert all(o.shape == ref.shape for o in outs)
    assert all(any(torch.allclose(o, s) for s in shifted) for o in outs)
    assert any(not torch.allclose(o, ref) for o in outs)  # it does swing


def test_swing_conv1d():
    conv = nn.Conv1d(2, 3, 3, stride=2, padding=1)
    sw = to_swing(conv)
    assert isinstance(sw, SwingConv1d)
    x = torch.randn(2, 2, 11)
    sw.eval()
    assert torch.equal(sw(x), conv(x))


@pytest.mark.parametrize("model,shape", [(Strided2d, (1, 8, 8)), (Signal1d, (2, 16))])
def test_swing_rules_swap_in_and_out(model, shape):
    gm = _gm(model(), shape)
    pm = qpasses.PassManager("swing_conv")
    sgm = pm.run(gm)
    swung = [m for m in sgm.modules() if isinstance(m, (SwingConv1d, SwingConv2d))]
    assert len(swung) == 1 and swung[0].stride[0] == 2       # only the strided conv
    assert pm.report["swing_on"].rewrites == 1
    assert not any(isinstance(m, (SwingConv1d, SwingConv2d)) for m in gm.modules())  # input untouched
    assert torch.equal(sgm.c2.weight, gm.c2.weight) and torch.equal(sgm.c2.bias, gm.c2.bias)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.equal(sgm(x), gm(x))                    # eval: identity crop
    back = qpasses.PassManager("swing_off").run(sgm)
    assert type(back.c2) in (nn.Conv1d, nn.Conv2d)
    assert torch.equal(back.c2.weight, gm.c2.weight) and torch.equal(back.c2.bias, gm.c2.bias)
    with torch.no_grad():
        assert torch.equal(back(x), gm(x))


# ----------------------------------------------------------------------------- GENIE-D
def test_generator_any_shape():
    for shape in [(5,), (2, 12), (3, 7, 9), (1, 3, 4, 5)]:
        g = Generator(shape, latent_dim=8, hidden=4)
        assert g(torch.randn(4, 8)).shape == (4, *shape)


def _capture(gm):
    from qpasses.matcher import Matcher
    from qpasses.methods.genie.lib import bn_capture_module
    m = Matcher(gm)
    bns = m.index(["batch_norm"])
    targets = []
    for bn in bns:
        v = m.view(bn)
        targets.append((v.tensor("running_mean"), torch.sqrt(v.tensor("running_var") + v.get("eps"))))
    return bn_capture_module(gm, bns), targets, bns


def test_bn_inputs_found_on_graph():
    gm = _gm(Strided2d(), (1, 8, 8))
    cap, targets, bns = _capture(gm)
    assert [n.target for n in bns] == ["b1", "b2"]
    x = torch.randn(2, 1, 8, 8)
    f1, f2 = cap(x)
    assert torch.allclose(f1, gm.c1(x)) and torch.allclose(f2, gm.c2(F.relu(gm.b1(gm.c1(x)))))


def _real_stats_model():
    """Strided2d whose BN statistics come from "real" data (smoothed noise), so they are attainable."""
    torch.manual_seed(0)
    m = Strided2d()
    for b in (m.b1, m.b2):
        b.momentum = None
    real = F.avg_pool2d(torch.randn(256, 1, 10, 10), 3, 1) * 3
    m.train()
    with torch.no_grad():
        m(real)
    m.eval()
    return qpasses.trace(m, (real[:2],)), real


def test_latents_get_gradients_and_loss_drops():
    from qpasses.methods.genie.lib import bn_loss
    gm, real = _real_stats_model()
    cap, targets, _ = _capture(gm)
    with torch.no_grad():
        noise = float(bn_loss(cap(torch.randn(16, 1, 8, 8)), targets))
        real_loss = float(bn_loss(cap(real[:16]), targets))
    st = {}
    x, loss = distill_batch(cap, targets, (1, 8, 8), 16, iters=40, latent_dim=8, hidden=8, state=st)
    assert x.shape == (16, 1, 8, 8) and torch.isfinite(x).all()
    assert not torch.allclose(st["z0"], st["z"])                # latents were optimised
    with torch.no_grad():
        got = float(bn_loss(cap(x), targets))
    assert got < 0.5 * noise and got < real_loss                # matches the BN statistics
    st2 = {}
    distill_batch(cap, targets, (1, 8, 8), 8, iters=3, latent_dim=8, hidden=8, mode="generator", state=st2)
    assert torch.equal(st2["z0"], st2["z"])                      # generator-only ablation: latents fixed
    st3 = {}
    x3, _ = distill_batch(cap, targets, (1, 8, 8), 8, iters=3, mode="latents", state=st3)
    assert st3["generator"] is None and x3.shape == (8, 1, 8, 8)


@pytest.mark.parametrize("model,shape", [(Strided2d, (1, 8, 8)), (Signal1d, (2, 16))])
def test_distill_step_images_and_signals(model, shape, tmp_path):
    gm = _gm(model(), shape)
    path = tmp_path / "syn.pt"
    pm = qpasses.PassManager("genie_distill", samples=10, distill_batch_size=4,
                             distill_iters=2, save_to=str(path))
    out = pm.run(gm)
    data = out.meta["qpasses.synthetic_data"]
    assert data.shape == (10, *shape)
    info = pm.report.steps[0].info
    assert info["bn_layers"] == 2 and info["samples"] == 10 and info["batches"] == 3
    saved = torch.load(path)
    assert torch.equal(saved["data"], data)
    assert "qpasses.synthetic_data" not in gm.meta
    assert not any(isinstance(m, (SwingConv1d, SwingConv2d)) for m in out.modules())


def test_distill_errors():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    gm = qpasses.trace(mlp, (torch.randn(2, 4),))
    with pytest.raises(StepError, match="BatchNorm"):
        qpasses.PassManager("distill").run(gm)
    with pytest.raises(OptionError):
        qpasses.PassManager("genie", distill_mode="nonsense")
    with pytest.raises(OptionError):
        qpasses.PassManager("genie", samples=0)
    gm2 = _gm(Strided2d(), (1, 8, 8))
    with pytest.raises(OptionError, match="input_shape"):
        qpasses.PassManager("distill", input_shape=["a"]).run(gm2)


# ----------------------------------------------------------------------------- GENIE-M quantizer
def test_adaround_quantizer_init_and_hard():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3) * 0.3
    s = w.abs().amax((1, 2, 3)) / 7
    q = AdaRoundQuantizer(w, s, 0, -7, 7, axis=0, learn_scale=True)
    assert torch.allclose(q(), w, atol=1e-5)                    # soft init reproduces the float weight
    hw = q.hard_weight()
    codes = hw / s.reshape(-1, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7
    assert torch.equal(torch.floor(w / s.reshape(-1, 1, 1, 1)), q.w_floor)  # base integer fixed at init
    # hard rounding is floor or ceil of w/s
    diff = codes.round() - q.w_floor
    assert ((diff == 0) | (diff == 1)).all()
    q().sum().backward()
    assert q.scale.grad is not None and q.alpha.grad is not None  # step size learned jointly
    assert torch.equal(q.int_weight().float(), codes.round())


def test_rectified_sigmoid_and_regularizer():
    a = torch.tensor([-100.0, 0.0, 100.0])
    h = rectified_sigmoid(a)
    assert h[0] == 0 and h[2] == 1 and abs(float(h[1]) - 0.5) < 1e-6
    w = torch.tensor([0.0, 1.0])
    q = AdaRoundQuantizer(w, 1.0, 0, -8, 7, axis=None)
    with torch.no_grad():
        q.alpha.copy_(torch.tensor([-100.0, 100.0]))
    assert float(q.regularizer(2.0).detach()) == 0.0
    with torch.no_grad():
        q.alpha.zero_()
    assert float(q.regularizer(2.0).detach()) > 1.9


def test_beta_schedule():
    b = BetaSchedule(start=20, end=2, warmup=0.2, iters=100)
    assert not b.active(19) and b.active(20)
    assert b(0) == 20 and b(20) == 20 and b(100) == 2 and 2 < b(60) < 20
    with pytest.raises(ValueError):
        BetaSchedule(iters=0)


def test_weight_quantizer_bake_on_grid():
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    fq = FakeQuantize(w.abs().amax(1) / 7, torch.zeros(3, dtype=torch.int32), -7, 7, axis=0, symmetric=True)
    gq = GenieWeightQuantizer(fq, w)
    new, hw = gq.bake()
    assert isinstance(new, FakeQuantize) and torch.allclose(new(hw), hw, atol=1e-6)


# ----------------------------------------------------------------------------- reconstruct / recipes
class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bs = nn.BatchNorm2d(6)
        self.c1 = nn.Conv2d(6, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.b2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bs(self.stem(x)))
        y = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(y)) + x)
        return self.fc(x.mean((2, 3)))


def _mse(a, b):
    return float((a - b).pow(2).mean())


def test_adaround_recipe_reconstruction_helps():
    torch.manual_seed(0)
    gm = _gm(Res(), (1, 8, 8))
    data = [torch.randn(32, 1, 8, 8) for _ in range(4)]
    x = torch.randn(64, 1, 8, 8)
    opts = dict(w_bits=3, a_bits=4, calib_batch_size=32, recon_batch_size=32)
    pm = qpasses.PassManager("adaround", recon_iters=150, **opts)
    q = pm.run(gm, data=data)
    base = qpasses.PassManager("adaround", reconstruct=False, **opts).run(gm, data=data)
    with torch.no_grad():
        ref = gm(x)
        e_rec, e_base = _mse(q(x), ref), _mse(base(x), ref)
    assert e_rec < e_base
    info = pm.report.steps[-1].info
    assert info["blocks"] == 3 and info["weight_quantizers"] == 4
    # baked: plain FakeQuantize modules, weights on their grid
    from qpasses.methods.genie.lib import GenieActQuantizer
    assert not any(isinstance(m, (GenieWeightQuantizer, GenieActQuantizer)) for m in q.modules())
    for n in q.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith("weight_fq"):
            fq = quantizer_module(q, n, None)
            w = q.get_parameter(n.args[0].target) if n.args[0].op == "get_attr" else None
            assert w is not None and torch.allclose(fq(w), w, atol=1e-6)


def test_genie_zero_shot_recipe_runs_without_data():
    gm = _gm(Strided2d(), (1, 8, 8))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    pm = qpasses.PassManager("genie", **FAST)
    q = pm.run(gm)  # no data
    steps = [s.name for s in pm.report.steps]
    assert steps == ["distill", "calibrate_synthetic", "reconstruct"]
    assert pm.report.steps[1].info["source"] == "synthetic"
    bits = {n.name: n.meta["qpasses.quant"]["weight"]["bits"] for n in q.graph.nodes if "qpasses.quant" in n.meta}
    assert sorted(bits.values()) == [4, 8, 8]  # first and last weighted layers at 8 bits
    with torch.no_grad():
        assert torch.isfinite(q(torch.randn(4, 1, 8, 8))).all()
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k])
    assert isinstance(gm.c2, nn.Conv2d) and not isinstance(gm.c2, SwingConv2d)


def test_genie_result_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    gm = _gm(Strided2d(), (1, 8, 8))
    q = qpasses.PassManager("genie", **FAST).run(gm)
    x = torch.randn(4, 1, 8, 8)
    path = tmp_path / "genie.onnx"
    qpasses.export_onnx(q, (x,), str(path))
    sess = ort.InferenceSession(str(path))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), q(x), atol=1e-5)


def test_genie_recipe_on_aten_graph():
    m = randomize_bn(Strided2d()).eval()
    gm = qpasses.trace(m, (torch.randn(2, 1, 8, 8),), mode="export")
    assert gm.meta["qpasses.level"] == "aten"
    pm = qpasses.PassManager("genie", **FAST)
    q = pm.run(gm)
    assert pm.report.steps[0].info["bn_layers"] == 2 and pm.report.steps[-1].info["blocks"] == 3
    # functional (aten) convolutions cannot swing: refused with a reason, not silently skipped
    assert any("functional" in why for _, why in pm.report["swing_on"].refused)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert float(qpasses.numerics.sqnr(m(x), q(x))) > 10


def test_genie_recipe_1d_signal():
    gm = _gm(Signal1d(), (2, 16))
    q = qpasses.PassManager("genie", **FAST).run(gm)
    with torch.no_grad():
        assert q(torch.randn(3, 2, 16)).shape == (3, 3)


def test_reconstruct_needs_converted_graph():
    gm = _gm(Strided2d(), (1, 8, 8))
    with pytest.raises(StepError, match="convert"):
        qpasses.PassManager("reconstruct").run(gm, data=[torch.randn(4, 1, 8, 8)])


# ----------------------------------------------------------------------------- two processes (gloo)
def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gm = _gm(Strided2d(), (1, 8, 8))
        pm = qpasses.PassManager("genie", **dict(FAST, samples=16))
        q = pm.run(gm)
        syn = q.meta["qpasses.synthetic_data"]
        state = {k: v for k, v in q.state_dict().items()}
        torch.save({"syn": syn, "state": state, "steps": [s.info for s in pm.report.steps]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["syn"].shape == (8, 1, 8, 8) and r1["syn"].shape == (8, 1, 8, 8)  # each rank its shard
    assert not torch.allclose(r0["syn"], r1["syn"])
    assert r0["steps"][0]["world_size"] == 2 and r1["steps"][2]["world_size"] == 2
    # the quantizers are shared: same init (rank 0's), all-reduced gradients -> identical results
    for k, v in r0["state"].items():
        if k.startswith("act_q"):
            continue  # calibration leftovers (observers no longer in the graph) are per-rank
        assert torch.allclose(v.float(), r1["state"][k].float(), atol=1e-6), k


def test_genie_repeatable_from_its_seed_and_leaves_the_global_generator_alone():
    gm = _gm(Strided2d(), (1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    state = torch.random.get_rng_state()
    a = qpasses.PassManager("genie", **FAST).run(gm)
    assert torch.equal(torch.random.get_rng_state(), state)        # distill and QDrop draw from a forked RNG
    b = qpasses.PassManager("genie", **FAST).run(gm)
    c = qpasses.PassManager("genie", **dict(FAST, seed=1)).run(gm)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))


# ----------------------------------------------------------------------------- refusals and presets
def test_genie_refuses_a_model_without_batchnorm_statistics():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(StepError, match="no BatchNorm layer"):
        qpasses.PassManager("genie", **FAST).run(qpasses.trace(mlp, (torch.randn(2, 4),)))
    fresh = Strided2d().eval()                                   # never trained: mean 0, var 1 everywhere
    with pytest.raises(StepError, match="initial statistics"):
        qpasses.PassManager("genie", **FAST).run(qpasses.trace(fresh, (torch.randn(2, 1, 8, 8),)))
    m = randomize_bn(Strided2d())
    m.b1 = nn.BatchNorm2d(4, track_running_stats=False)
    m.eval()
    with pytest.raises(StepError, match="no running statistics"):
        qpasses.PassManager("genie", **FAST).run(qpasses.trace(m, (torch.randn(2, 1, 8, 8),)))


def test_genie_presets_fill_the_sizes_left_unset():
    from qpasses.methods.genie.distill import GENIE_PRESETS
    assert qpasses.PassManager("genie").params["preset"] == "fast"
    with pytest.raises(OptionError):
        qpasses.PassManager("genie", preset="nonsense")
    gm = _gm(Strided2d(), (1, 8, 8))
    pm = qpasses.PassManager("genie", distill_iters=2, recon_iters=2)      # sizes from preset=fast
    pm.run(gm)
    fast = GENIE_PRESETS["fast"]
    assert pm.report.steps[0].info["samples"] == fast["samples"]
    pm = qpasses.PassManager("genie_distill", preset="paper", distill_iters=1, distill_batch_size=256)
    pm.run(gm)                                                  # the paper's 1024 samples, shortened here
    assert pm.report.steps[0].info["samples"] == GENIE_PRESETS["paper"]["samples"] == 1024
    assert GENIE_PRESETS["paper"]["distill_iters"] == 4000 and GENIE_PRESETS["paper"]["recon_iters"] == 20000
