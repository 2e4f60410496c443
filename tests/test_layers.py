"""qpasses.layer_report: the per-layer table reads every kind of quantizer, and switching the
quantizers off gives back the float function."""
from __future__ import annotations

import math

import pytest
import torch

import qpasses
from qpasses import datasets, zoo
from qpasses.layer_report import layer_table, quantizers_off

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = zoo.MLP().eval()
    batches = datasets.calib_batches(n=64)
    return model, qpasses.trace(model, (batches[0],)), batches


@pytest.mark.parametrize("recipe,w_bits,a_bits", [
    ("ptq_int8", [8, 8, 8], [8, 8, 8]), ("w4a16", [4, 4, 4], [32, 32, 32]), ("dynamic_int8", [8, 8, 8], [8, 8, 8]),
    ("aciq4", None, [4, 4, 4]), ("bnn", [8, 1, 8], [8, 1, 8])])
def test_rows_bits_sizes_and_sqnr(mlp, recipe, w_bits, a_bits):
    model, gm, batches = mlp
    q = qpasses.PassManager(recipe).run(gm, data=batches)
    rows = layer_table(q, batches[0])
    assert len(rows) == 3 and [r["a_bits"] for r in rows] == a_bits
    if w_bits is not None:
        assert [r["w_bits"] for r in rows] == w_bits
        numel = [128 * 64, 64 * 128, 10 * 64]
        assert [r["size_kib"] for r in rows] == pytest.approx([n * b / 8 / 1024 for n, b in zip(numel, w_bits)])
    else:                                   # ACIQ: per-channel bits; the size sums them
        assert all(isinstance(r["w_bits"], (int, str)) for r in rows)
        assert 0 < sum(r["size_kib"] for r in rows) < sum(r["fp32_kib"] for r in rows) / 4
    for r in rows:                          # every layer is quantized: a finite error against float
        assert math.isfinite(r["sqnr_db"]) and r["sqnr_db"] < 100
    if recipe in ("ptq_int8", "dynamic_int8"):
        assert min(r["sqnr_db"] for r in rows) > 30


def test_quantizers_off_is_the_float_function_and_restores(mlp):
    model, gm, batches = mlp
    x = batches[0]
    for recipe in ("ptq_int8", "w4a16", "aciq4", "bnn"):
        q = qpasses.PassManager(recipe).run(gm, data=batches)
        with torch.no_grad():
            before = q(x)
            with quantizers_off(q):
                off = q(x)
            after = q(x)
        torch.testing.assert_close(off, model(x).detach(), rtol=1e-5, atol=1e-5)
        assert torch.equal(before, after) and not torch.equal(before, off)


def test_kernel_ops_get_rows_without_sqnr(mlp):
    _, gm, batches = mlp
    low = qpasses.PassManager(["ptq_int8", "lower"], device="cpu").run(gm, data=batches)
    rows = layer_table(low, batches[0])
    assert [r["op"] for r in rows] == ["int8_linear"] * 3 and all(math.isnan(r["sqnr_db"]) for r in rows)
    q = qpasses.PassManager("ptq_int8").run(gm, data=batches)
    fq = layer_table(q, batches[0])
    assert [r["w_scale"] for r in rows] == [r["w_scale"] for r in fq]      # the scales the kernels read
    assert [r["a_scale"] for r in rows] == [r["a_scale"] for r in fq]
    assert [r["size_kib"] for r in rows] == pytest.approx([r["size_kib"] for r in fq], rel=0.05)  # padded K
