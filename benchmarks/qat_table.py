"""PTQ vs QAT (LSQ + BatchNorm folding) on the digits CNN at low bit-widths.

    python benchmarks/qat_table.py [--epochs 3]

For each bit-width it prints top-1 accuracy on the 500-image digits test split of:
PTQ (``ptq_int8`` with w_bits/a_bits, min-max calibration), the QAT graph right after
calibration (before training), QAT after ``--epochs`` epochs of a plain training loop
(``datasets.fit``: Adam, cosine decay, one thread), the QAT graph after ``qat_convert``
(fixed fake quantization, BN folded with its running statistics), and -- for a second QAT run
with ``observe_outputs=True`` (every conv / add / ReLU output quantized too, as integer-only
inference needs) -- its converted fake-quant graph (``["qat_convert", "int_bias"]``: biases on
the int32 grid, as the integer kernels use them) and the integer-only graph from
``["qat_convert", "integerize"]`` (gemmlowp rounding, and ``rounding="single"``), next to PTQ
lowered the same way (``int_only``).
Seconds = training time of the first QAT run.
"""
from __future__ import annotations

import argparse
import time

import torch

import qpasses
from qpasses import datasets

BITS = [(8, 8), (4, 4), (3, 3), (2, 4)]


def qat_run(gm, calib, xtr, ytr, w, a, epochs, **opts):
    q = qpasses.PassManager("qat", w_bits=w, a_bits=a, freeze_bn_after=40, **opts).run(gm, data=calib)
    t = time.perf_counter()
    datasets.fit(q, xtr, ytr, epochs=epochs, lr=1e-3)
    return q, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = datasets.train_digits_cnn().eval()
    xtr, ytr = datasets.load_digits_tensors("train")
    x, y = datasets.load_digits_tensors("test")
    calib = datasets.calib_batches()
    gm = qpasses.trace(model, (x[:2],))
    acc = lambda m: datasets.accuracy(m, x, y)  # noqa: E731
    print(f"FP32: {acc(model):.1f} %   (QAT: {args.epochs} epochs, freeze_bn_after=40 steps)\n")
    print("| bits | PTQ (`ptq_int8`) | QAT before training | QAT trained | QAT converted "
          "| PTQ `int_only` → integer | QAT+outputs converted | QAT+outputs → integer | "
          "QAT+outputs → integer (single rounding) | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w, a in BITS:
        ptq = acc(qpasses.PassManager("ptq_int8", w_bits=w, a_bits=a).run(gm, data=calib))
        init = acc(qpasses.PassManager("qat", w_bits=w, a_bits=a).run(gm, data=calib))
        q, secs = qat_run(gm, calib, xtr, ytr, w, a, args.epochs)
        trained = acc(q)
        conv = acc(qpasses.PassManager("qat_convert").run(q))
        qi, _ = qat_run(gm, calib, xtr, ytr, w, a, args.epochs, observe_outputs=True)
        ptq_int = acc(qpasses.PassManager("int_only", w_bits=w, a_bits=a).run(gm, data=calib))
        conv_o = acc(qpasses.PassManager(["qat_convert", "int_bias"]).run(qi))
        integer = acc(qpasses.PassManager(["qat_convert", "integerize"]).run(qi))
        integer_sr = acc(qpasses.PassManager(["qat_convert", "integerize"], rounding="single").run(qi))
        print(f"| W{w}A{a} | {ptq:.1f} | {init:.1f} | {trained:.1f} | {conv:.1f} | {ptq_int:.1f} | {conv_o:.1f} "
              f"| {integer:.1f} | {integer_sr:.1f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
