"""GENIE evidence table: zero-shot W4A4 on the scikit-learn digits CNNs (BatchNorm, trained on real data).

Rows: FP32; min-max W4A4 calibrated on 256 real images (``ptq_int8``, every layer 4-bit, and the
same with the first/last weighted layers at 8 bits like genie); zero-shot ``genie`` (full, and
ablations: no swing convolutions, generator only (latents fixed), latents only (no generator),
calibration on the synthetic set without reconstruction); few-shot ``adaround`` on the 256 real
images.  Columns: test accuracy (500 held-out images) per model, mean over seeds.

Models: ``DigitsCNN`` (``qpasses.datasets.train_digits_cnn()``, no strided convolution) and a
variant with a stride-2 convolution in place of the max-pool (where swing convolutions act).

    python benchmarks/genie_table.py             # full table (several minutes on 2 cores)
    python benchmarks/genie_table.py --quick     # tiny iterations, one seed (smoke test)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import os

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import qpasses  # noqa: E402
from qpasses.datasets import accuracy, calib_batches, load_digits_tensors, train_classifier, train_digits_cnn  # noqa: E402
from qpasses.numerics import sqnr  # noqa: E402


class DigitsStridedCNN(nn.Module):
    """DigitsCNN with a stride-2 3x3 convolution in place of the 2x2 max-pool (8x8 -> 4x4)."""

    def __init__(self, w: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))


def strided_cnn() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = DigitsStridedCNN()
    return train_classifier(m, epochs=15, lr=0.01, seed=0, cache_key="digits_strided_cnn", weight_decay=1e-4)


def rows(quick: bool, w: int, a: int, samples: int = 0):
    it = dict(distill_iters=20, recon_iters=20, samples=64) if quick else {}
    if samples and not quick:
        it["samples"] = samples
    b = dict(w_bits=w, a_bits=a)
    return [
        (f"min-max W{w}A{a}, real data (all layers {w}/{a}-bit)", "minmax", dict(b)),
        (f"min-max W{w}A{a}, real data (first/last 8-bit)", "minmax_edge", dict(b)),
        (f"genie W{w}A{a} zero-shot", "genie", dict(it, **b)),
        ("  - no swing convolution", "genie", dict(it, swing=False, **b)),
        ("  - generator only (latents fixed)", "genie", dict(it, distill_mode="generator", **b)),
        ("  - latents only (no generator)", "genie", dict(it, distill_mode="latents", **b)),
        ("  - no reconstruction (calibration on synthetic data)", "genie", dict(it, reconstruct=False, **b)),
        (f"adaround W{w}A{a} few-shot (256 real images, GENIE-M)", "adaround", dict(
            b, **(dict(recon_iters=20) if quick else {}))),
    ]


def run_row(kind: str, opts: dict, gm, seed: int):
    calib = calib_batches()
    if kind == "minmax":
        return qpasses.PassManager("ptq_int8", **opts).run(gm, data=calib)
    if kind == "minmax_edge":
        pm = qpasses.PassManager(["canonicalize", "edge_bits", "observe", "calibrate", "convert"], **opts)
        return pm.run(gm, data=calib)
    if kind == "genie":
        return qpasses.PassManager("genie", seed=seed, **{"preset": "thorough", **opts}).run(gm)
    if kind == "adaround":
        return qpasses.PassManager("adaround", seed=seed, **opts).run(gm, data=calib)
    raise ValueError(kind)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny iterations and one seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--models", default="digits_cnn,strided", help="comma list: digits_cnn, strided")
    ap.add_argument("--bits", default="4,4", help="w_bits,a_bits (default 4,4)")
    ap.add_argument("--samples", type=int, default=0, help="synthetic samples for genie (default: the recipe's 256)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [0] if args.quick else list(range(args.seeds))
    x, y = load_digits_tensors("test")
    models = {}
    for name in args.models.split(","):
        m = train_digits_cnn() if name == "digits_cnn" else strided_cnn()
        models[name] = qpasses.trace(m, (x[:2],))
    w, a = (int(v) for v in args.bits.split(","))
    with torch.no_grad():
        ref = {n: gm(x) for n, gm in models.items()}
    table = {"FP32": {n: [accuracy(gm, x, y)] for n, gm in models.items()}}
    snr = {"FP32": {n: [float("inf")] for n in models}}
    times = {}
    for label, kind, opts in rows(args.quick, w, a, args.samples):
        table[label] = {}
        for n, gm in models.items():
            accs, snrs = [], []
            t = time.perf_counter()
            for s in (seeds if kind in ("genie", "adaround") else [0]):
                q = run_row(kind, opts, gm, s)
                accs.append(accuracy(q, x, y))
                with torch.no_grad():
                    snrs.append(float(sqnr(ref[n], q(x))))
            times[(label, n)] = (time.perf_counter() - t) / max(1, len(accs))
            table[label][n] = accs
            snr.setdefault(label, {})[n] = snrs
            print(f"# {label} / {n}: {accs} ({times[(label, n)]:.1f} s per run)", file=sys.stderr, flush=True)
    names = list(models)
    head = "| method | " + " | ".join(f"{n}: acc % (runs) | {n}: logit SQNR dB" for n in names) + " |"
    print(head)
    print("|" + "---|" * (2 * len(names) + 1))
    for label, per in table.items():
        cells = []
        for n in names:
            acc = per[n]
            cells.append(f"{statistics.mean(acc):.2f}" + (f" ({', '.join(f'{v:.1f}' for v in acc)})" if len(acc) > 1 else ""))
            sn = snr[label][n]
            cells.append("-" if label == "FP32" else f"{statistics.mean(sn):.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
