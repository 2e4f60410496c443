"""Static int8 post-training quantization of a CNN trained on the scikit-learn digits.

    python examples/01_ptq_int8.py [--observer minmax|percentile|mse|entropy|...] [--w-bits 8] [--a-bits 8]

Trains (or loads from the cache) the bundled DigitsCNN, traces it, runs the ``ptq_int8``
recipe with 8 calibration batches, and prints FP32 vs quantized accuracy on the 500-image
test split, the per-rule report and the stage timings.
"""
from __future__ import annotations

import argparse
import time

import torch

import qpasses
from qpasses import datasets


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--observer", default="minmax")
    ap.add_argument("--w-bits", type=int, default=8)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--mode", default="auto", choices=["auto", "fx", "export"], help="graph level")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = datasets.train_digits_cnn().eval()          # ~2 s the first time, then cached
    x_test, y_test = datasets.load_digits_tensors("test")
    calib = datasets.calib_batches()                    # 8 batches of 32 training images

    gm = qpasses.trace(model, (x_test[:2],), mode=args.mode)
    pm = qpasses.PassManager("ptq_int8", observer=args.observer, w_bits=args.w_bits, a_bits=args.a_bits)
    t = time.perf_counter()
    qgm = pm.run(gm, data=calib)
    seconds = time.perf_counter() - t

    print(pm.report.table())
    print()
    fp32 = datasets.accuracy(model, x_test, y_test)
    q = datasets.accuracy(qgm, x_test, y_test)
    print(f"graph level: {gm.meta['qpasses.level']}   recipe time: {seconds:.2f} s")
    print(f"accuracy on the digits test split (500 images): FP32 {fp32:.1f} %   "
          f"ptq_int8 W{args.w_bits}A{args.a_bits} ({args.observer}) {q:.1f} %")
    return fp32, q


if __name__ == "__main__":
    main()
