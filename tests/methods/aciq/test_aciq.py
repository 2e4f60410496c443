"""ACIQ numerics (clipping, bit allocation, bias correction), the ``aciq`` family and ``aciq4`` recipe."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qpasses
from qpasses import datasets
from qpasses.errors import OptionError
from qpasses.methods.aciq.lib import ChannelBitsFakeQuant, aciq_weight_quantizer, effective_bits
from qpasses.numerics.aciq import aciq_alpha, aciq_mse, allocate_bits, bias_correct_weight, fit_laplace_b

from conftest import randomize_bn
from qpasses.qnodes import quantizer_module

# ------------------------------------------------------------------------------ closed form


PAPER = {"laplace": [2.83, 3.89, 5.03, 6.20, 7.41, 8.64, 9.89],
         "gauss": [1.71, 2.15, 2.55, 2.94, 3.29, 3.61, 3.92]}


@pytest.mark.parametrize("prior", ["laplace", "gauss"])
def test_alpha_matches_paper_table(prior):
    for bits, want in zip(range(2, 9), PAPER[prior]):
        assert aciq_alpha(bits, prior) == pytest.approx(want, abs=0.011)
    assert aciq_alpha(4, prior, 2.5) == pytest.approx(2.5 * aciq_alpha(4, prior))  # linear in the scale


@pytest.mark.parametrize("prior", ["laplace", "gauss"])
def test_alpha_minimises_the_closed_form_mse(prior):
    for bits in range(2, 9):
        a0 = aciq_alpha(bits, prior)
        grid = torch.linspace(0.5 * a0, 1.5 * a0, 20001, dtype=torch.float64)
        mse = torch.tensor([aciq_mse(float(a), bits, prior) for a in grid[::20]])
        a_num = float(grid[::20][mse.argmin()])
        assert a_num == pytest.approx(a0, rel=2e-3)


def _quantizer_mse(alpha: float, bits: int, prior: str) -> float:
    """E[(Q(X) - X)^2] of the real quantizer (clip to [-alpha, alpha], 2**bits equal bins, mid-point
    reconstruction) for a unit Laplace / Gaussian X, by numerical integration over a fine grid."""
    lim = 40.0 if prior == "laplace" else 12.0
    x = torch.linspace(-lim, lim, 60_001, dtype=torch.float64)
    p = 0.5 * torch.exp(-x.abs()) if prior == "laplace" else torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    d = 2 * alpha / 2 ** bits
    q = (torch.floor((x.clamp(-alpha, alpha) + alpha) / d).clamp(max=2 ** bits - 1) + 0.5) * d - alpha
    return float(torch.trapezoid(p * (q - x) ** 2, x))


@pytest.mark.parametrize("prior", ["laplace", "gauss"])
def test_alpha_vs_numerical_mse_minimisation(prior):
    """Minimise the true quantizer MSE numerically: the closed-form alpha is (near) its optimum."""
    for bits in range(2, 9):
        a0 = aciq_alpha(bits, prior)
        grid = torch.linspace(0.8 * a0, 1.3 * a0, 11)
        mse = [_quantizer_mse(float(a), bits, prior) for a in grid]
        ratio = _quantizer_mse(a0, bits, prior) / min(mse)
        # the paper's noise model (Delta^2/12 per bin) is loosest at 2-3 bits
        assert ratio <= (1.10 if bits <= 3 else 1.02), (bits, ratio)
        assert _quantizer_mse(a0, bits, prior) < _quantizer_mse(3 * a0, bits, prior)  # clipping pays


def test_fit_laplace_b():
    g = torch.Generator().manual_seed(1)
    u = torch.rand(200_000, generator=g) - 0.5
    x = 0.7 * -torch.sign(u) * torch.log1p(-2 * u.abs()) + 3.0
    assert float(fit_laplace_b(x)) == pytest.approx(0.7, rel=0.02)
    w = torch.stack([x[:1000], 2 * x[1000:2000]])
    assert fit_laplace_b(w, axis=0).shape == (2,)


# ------------------------------------------------------------------------------ bit allocation


@pytest.mark.parametrize("rule", ["paper", "mse"])
def test_allocation_respects_budget(rule):
    g = torch.Generator().manual_seed(0)
    for n, avg in [(8, 4), (37, 3), (64, 4), (5, 2)]:
        ranges = torch.rand(n, generator=g) ** 3 * 10 + 1e-3
        bits = allocate_bits(ranges, n * avg, min_bits=2, max_bits=8, rule=rule)
        assert bits.shape == (n,) and int(bits.sum()) <= n * avg
        assert int(bits.min()) >= 2 and int(bits.max()) <= 8
        order = torch.argsort(ranges)
        assert torch.all(bits[order][1:] >= bits[order][:-1])   # wider range -> never fewer bits
    with pytest.raises(ValueError):
        allocate_bits(torch.ones(4), 7, min_bits=2)


def test_paper_allocation_follows_two_thirds_power():
    """2**M_i ∝ R_i**(2/3): ranges 1 and 8**3 = 512 differ by a factor 8**2 = 64 = 2**6 in 2**M."""
    ranges = torch.tensor([1.0, 512.0])
    bits = allocate_bits(ranges, 2 * 8, min_bits=1, max_bits=16, rule="paper")
    assert int(bits[1] - bits[0]) == 6
    # wider spread of ranges gets more bits where the range is large, and lowers the expected noise
    ranges = torch.tensor([0.1, 0.2, 0.5, 1.0, 4.0, 8.0])
    bits = allocate_bits(ranges, 6 * 4, min_bits=2, max_bits=8, rule="paper")
    noise = lambda b: float((ranges ** 2 / 4.0 ** b.double()).sum())  # noqa: E731
    assert noise(bits) < noise(torch.full((6,), 4))


# ------------------------------------------------------------------------------ bias correction


def test_bias_correction_zeroes_per_channel_mean_error():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1) + 0.05 * torch.randn(16, 1, 1, 1)
    mod, _ = aciq_weight_quantizer(w, bits=3, bias_correction=False, allocate=False)
    wq = mod(w)
    before = (wq - w).mean(dim=(1, 2, 3)).abs()
    wc = bias_correct_weight(w, wq, axis=0)
    after = (wc - w).mean(dim=(1, 2, 3)).abs()
    assert before.max() > 1e-3 and after.max() < 1e-6
    torch.testing.assert_close(wc.std(dim=(1, 2, 3), unbiased=False), w.std(dim=(1, 2, 3), unbiased=False))
    # the quantizer with bias_correction=True applies exactly this map
    mod_bc, _ = aciq_weight_quantizer(w, bits=3, bias_correction=True, allocate=False)
    torch.testing.assert_close(mod_bc(w), wc, rtol=1e-4, atol=1e-5)
    assert (mod_bc(w) - w).mean(dim=(1, 2, 3)).abs().max() < 1e-6


def test_channel_bits_quantizer_uses_each_channels_bits():
    torch.manual_seed(0)
    w = torch.randn(6, 40) * torch.tensor([0.1, 0.2, 0.5, 1.0, 3.0, 9.0])[:, None]
    mod, info = aciq_weight_quantizer(w, bits=4, bias_correction=False, clip=False)
    assert info["used"] <= info["budget"] == 24
    codes = mod.int_repr(w)
    for i, b in enumerate(info["bits"]):
        qmax = 2 ** (b - 1) - 1
        assert int(codes[i].abs().max()) == qmax              # no clipping: the channel max hits qmax
        assert len(torch.unique(codes[i])) <= 2 * qmax + 1
    assert info["bits"][-1] > info["bits"][0]
    assert effective_bits(4) == pytest.approx(math.log2(14))


# ------------------------------------------------------------------------------ rules and recipe


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)
        self.v = nn.Linear(10, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        y = self.fc(h)
        return y + F.linear(y, self.v(y).reshape(-1, 10)[:10])  # a linear whose weight is an activation


@pytest.fixture(scope="module")
def net_data():
    torch.manual_seed(0)
    m = randomize_bn(Net()).eval()
    data = [torch.randn(10, 1, 8, 8) for _ in range(4)]
    return m, data


def test_recipe_matches_refuses_and_stays_close(net_data, level):
    m, data = net_data
    gm = qpasses.trace(m, (data[0],), mode=level)
    code = gm.code
    pm = qpasses.PassManager("aciq4", w_bits=8, a_bits=8)
    q = pm.run(gm, data=data)
    assert gm.code == code
    st = pm.report["aciq.aciq_weight"]
    assert st.rewrites == 3 and st.n_refused == 1
    assert "not a constant" in st.refused[0][1]
    fqs = [n for n in q.graph.nodes if isinstance(quantizer_module(q, n, None),
                                                                              ChannelBitsFakeQuant)]
    assert len(fqs) == 3
    assert pm.report["convert.weight_fake_quant"].rewrites == 0  # ACIQ weights are left alone by convert
    assert pm.report["convert.activation_fake_quant"].rewrites >= 3
    with torch.no_grad():
        ref, out = m(data[0]), q(data[0])
    assert F.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
    # W4A4 variants all run and stay in a sane error range (random weights: no ordering claimed)
    x = torch.cat(data)
    with torch.no_grad():
        r = m(x)
        for opts in (dict(), dict(bit_allocation=False, bias_correction=False), dict(prior="gauss")):
            out = qpasses.PassManager("aciq4", **opts).run(gm, data=data)(x)
            assert (out - r).pow(2).mean() < 0.2 * r.pow(2).mean()


def test_aciq_clipping_beats_minmax_on_laplace_weights():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(32, 256, generator=g) - 0.5
    w = -torch.sign(u) * torch.log1p(-2 * u.abs()) * torch.rand(32, 1, generator=g)  # Laplace rows
    for bits in (3, 4):
        clip, info = aciq_weight_quantizer(w, bits, allocate=False, bias_correction=False, clip=True)
        plain, _ = aciq_weight_quantizer(w, bits, allocate=False, bias_correction=False, clip=False)
        assert info["clipped_fraction"] > 0
        assert (clip(w) - w).pow(2).mean() < 0.9 * (plain(w) - w).pow(2).mean()
        # bit allocation lowers the error further when channel ranges differ
        alloc, info = aciq_weight_quantizer(w, bits, allocate=True, bias_correction=False, clip=True)
        assert info["used"] <= info["budget"]
        assert (alloc(w) - w).pow(2).mean() < (clip(w) - w).pow(2).mean()


def test_idempotent(net_data):
    m, data = net_data
    gm = qpasses.trace(m, (data[0],))
    q = qpasses.PassManager("aciq4").run(gm, data=data)
    pm = qpasses.PassManager("aciq4")
    q2 = pm.run(q, data=data)
    assert pm.report["aciq.aciq_weight"].rewrites == 0
    assert pm.report["observe.observe_weighted_inputs"].rewrites == 0
    with torch.no_grad():
        torch.testing.assert_close(q(data[1]), q2(data[1]))


def test_weights_quantized_by_aciq_family_alone(net_data):
    m, data = net_data
    gm = qpasses.trace(m, (data[0],))
    pm = qpasses.PassManager(["canonicalize", "aciq"], w_bits=3, bias_correction=False)
    q = pm.run(gm)  # no data needed: weights only
    metas = [n.meta["qpasses.quant"]["weight"] for n in q.graph.nodes if "qpasses.quant" in n.meta]
    assert len(metas) == 3
    for meta in metas:
        a = meta["aciq"]
        assert a["used"] <= a["budget"] and a["budget"] == 3 * len(a["bits"])
        assert 0 <= a["clipped_fraction"] < 0.5


@pytest.mark.parametrize("bad", [dict(w_bits=0), dict(a_bits=0), dict(a_bits=17), dict(w_bits=9),
                                 dict(prior="cauchy"), dict(alloc_rule="greedy"), dict(min_bits=1),
                                 dict(bogus=True), dict(bit_allocation="sometimes")])
def test_options_validated(bad):
    with pytest.raises(OptionError):
        qpasses.PassManager("aciq4", **bad)


def test_inconsistent_bit_bounds_raise(net_data):
    m, data = net_data
    gm = qpasses.trace(m, (data[0],))
    with pytest.raises(OptionError, match="min_bits"):
        qpasses.PassManager(["canonicalize", "aciq"], w_bits=3, min_bits=4).run(gm)


@pytest.mark.slow
def test_digits_w3a3_full_aciq_beats_naive():
    torch.set_num_threads(1)
    m = datasets.train_digits_cnn().eval()
    x, y = datasets.load_digits_tensors("test")
    calib = datasets.calib_batches()
    gm = qpasses.trace(m, (calib[0],))
    naive = qpasses.PassManager("ptq_int8", w_bits=3, a_bits=3).run(gm, data=calib)
    full = qpasses.PassManager("aciq4", w_bits=3, a_bits=3).run(gm, data=calib)
    acc_naive, acc_full = datasets.accuracy(naive, x, y), datasets.accuracy(full, x, y)
    fp32 = datasets.accuracy(m, x, y)
    # measured: FP32 99.4, min-max 87.8, aciq4 97.2 (81 % of the loss recovered); on a CPU
    # without AVX-512 VNNI the CNN trains differently: 99.2 / 95.0 / 97.0 (48 %)
    assert acc_full >= acc_naive + 1.0, (fp32, acc_naive, acc_full)
    assert acc_full - acc_naive >= 0.4 * (fp32 - acc_naive), (fp32, acc_naive, acc_full)


def test_paper_allocation_uses_the_whole_budget():
    g = torch.Generator().manual_seed(3)
    for n in (3, 10, 16, 33):
        ranges = 1 + 0.3 * torch.rand(n, generator=g)   # similar ranges: rounding alone would waste bits
        bits = allocate_bits(ranges, 4 * n + 1, min_bits=2, max_bits=8, rule="paper")
        assert int(bits.sum()) == 4 * n + 1
    assert int(allocate_bits(torch.ones(4), 100, max_bits=8, rule="paper").sum()) == 32  # capped
