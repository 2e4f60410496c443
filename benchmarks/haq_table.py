"""Mixed precision (HAQ search, HAWQ-style baselines) vs uniform precision on the digits CNN.

For each budget "same cost as W{b}A8 with b average weight bits" (model size, BOPs or H100
roofline latency) it quantizes the trained ``DigitsCNN`` (a) uniformly at the largest integer
width that fits (W{floor(b)}A8), (b) with the ``haq`` recipe's DDPG
search, (c) with the Hessian-trace greedy baseline, (d) with the measured loss-perturbation
greedy baseline, and prints test accuracy (500 held-out digits), the cost relative to the
budget, the average weight bits and the search time as a Markdown table.

Data: the search and the calibration use the first 640 training images (unlabelled); the
reward uses the other 657 training images with labels (``val_data``); the test split is never
seen. DDPG runs are repeated over ``--seeds`` seeds (mean and min..max reported).

    python benchmarks/haq_table.py              # ~1-2 min on 2 CPU cores
    python benchmarks/haq_table.py --quick      # fewer budgets / episodes
    python benchmarks/haq_table.py --model resnet   # zoo.ResNetLike on digits, 11 layers (~5 min)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import qpasses
from qpasses import datasets, zoo
from _common import markdown_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", choices=["digits_cnn", "resnet"], default="digits_cnn",
                    help="digits_cnn (4 weighted layers) or zoo.ResNetLike (11 weighted layers), both on digits")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.model == "digits_cnn":
        model = datasets.train_digits_cnn()
    else:
        torch.manual_seed(0)
        model = datasets.train_classifier(zoo.ResNetLike(), epochs=15, lr=0.01, seed=0, cache_key="resnet_digits")
    xtr, ytr = datasets.load_digits_tensors("train")
    xte, yte = datasets.load_digits_tensors("test")
    gm = qpasses.trace(model, (xtr[:8],))
    data = list(xtr[:640].split(64))
    val = list(zip(xtr[640:].split(128), ytr[640:].split(128)))
    print(f"float test accuracy: {datasets.accuracy(gm, xte, yte):.1f}%")
    # (constraint, average weight bits of the budget); activations stay at 8 bits. A fractional
    # budget cannot be met by a uniform precision: uniform takes the largest width that fits.
    budgets = [("size", 2.5), ("size", 3.0), ("size", 3.5), ("bops", 2.5), ("bops", 3.0), ("latency", 3.0)]
    if args.model == "resnet":
        budgets = [("size", 2.5), ("size", 3.0)]
    if args.quick:
        budgets, args.episodes, args.seeds = [("size", 2.5)], 60, 1
    rows = []
    for constraint, avg in budgets:
        w_uni = int(avg)
        q = qpasses.PassManager("mixed_ptq", bit_map={"*": [w_uni, 8]}).run(gm, data=data)
        uni = datasets.accuracy(q, xte, yte)
        label = f"W{avg:g}A8"
        opts = dict(budget_bits=[int(avg), 8]) if avg == int(avg) else dict(budget=avg / 8)
        if constraint == "latency" and avg != int(avg):
            raise SystemExit("latency budgets must be integer bit-widths (the roofline cost is not linear in bits)")
        rows.append((constraint, label, f"uniform W{w_uni}A8", f"{uni:.1f}", f"{w_uni / avg:.2f}", f"{w_uni:.2f}",
                     "-", "-"))
        for method in ("ddpg", "hessian", "perturbation"):
            accs, costs, bits, secs, maps = [], [], [], [], []
            for seed in range(args.seeds if method == "ddpg" else 1):
                t = time.perf_counter()
                pm = qpasses.PassManager("haq", method=method, constraint=constraint, episodes=args.episodes,
                                         val_data=val, seed=seed, **opts)
                q = pm.run(gm, data=data)
                secs.append(time.perf_counter() - t)
                info = pm.report.steps[0].info
                accs.append(datasets.accuracy(q, xte, yte))
                costs.append(info["cost"] / info["budget"])
                bits.append(info["avg_w_bits"])
                maps.append("/".join(str(r["w_bits"]) for r in pm.report.layers))
            acc = (f"{statistics.mean(accs):.1f} ({min(accs):.1f}..{max(accs):.1f})" if len(accs) > 1
                   else f"{accs[0]:.1f}")
            rows.append((constraint, label, method, acc, f"{max(costs):.2f}", f"{statistics.mean(bits):.2f}",
                         ", ".join(sorted(set(maps))), f"{statistics.mean(secs):.1f}"))
    head = ("constraint", "budget = cost of avg", "method", "test acc %", "cost / budget", "avg w bits",
            "w bits per layer", "seconds")
    print(markdown_table(head, rows))


if __name__ == "__main__":
    main()
