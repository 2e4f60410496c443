"""Accuracy of ``ptq_int8`` on the digits CNN for every activation observer and a few bit-widths.

    python benchmarks/ptq_table.py

Prints one markdown table (rows: observer; columns: W8A8, W4A8, W8A4, W4A4) of top-1
accuracy on the 500-image digits test split, with the FP32 accuracy above it.
"""
from __future__ import annotations

import torch

import qpasses
from qpasses import datasets

OBSERVERS = ["minmax", "moving_average", "percentile", "mse", "entropy", "aciq"]
BITS = [(8, 8), (4, 8), (8, 4), (4, 4)]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = datasets.train_digits_cnn().eval()
    x, y = datasets.load_digits_tensors("test")
    calib = datasets.calib_batches()
    gm = qpasses.trace(model, (x[:2],))
    print(f"FP32: {datasets.accuracy(model, x, y):.1f} %\n")
    print("| observer | " + " | ".join(f"W{w}A{a}" for w, a in BITS) + " |")
    print("|---|" + "---:|" * len(BITS))
    for obs in OBSERVERS:
        cells = []
        for w, a in BITS:
            q = qpasses.PassManager("ptq_int8", observer=obs, w_bits=w, a_bits=a).run(gm, data=calib)
            cells.append(f"{datasets.accuracy(q, x, y):.1f}")
        print(f"| {obs} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
