"""Quantization-aware training (LSQ + BatchNorm folding) of the digits CNN at W4A4 / W3A3.

    python examples/04_qat.py [--w-bits 4] [--a-bits 4] [--epochs 3]

PTQ at the requested bit-width first (``ptq_int8``), then the ``qat`` recipe: conv+BN pairs
become the QAT conv + BatchNorm graph pattern (BN folded during training, frozen after 40 steps), scales are initialised
by calibration and learned with LSQ; the graph is trained with a plain PyTorch loop written out
below, converted with ``qat_convert`` and finally lowered to integer ops with ``integerize``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import qpasses
from qpasses import datasets


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = datasets.train_digits_cnn().eval()
    x_train, y_train = datasets.load_digits_tensors("train")
    x_test, y_test = datasets.load_digits_tensors("test")
    calib = datasets.calib_batches()
    acc = lambda m: datasets.accuracy(m, x_test, y_test)  # noqa: E731
    gm = qpasses.trace(model, (x_test[:2],))

    ptq = qpasses.PassManager("ptq_int8", w_bits=args.w_bits, a_bits=args.a_bits).run(gm, data=calib)
    ptq_int = qpasses.PassManager("int_only", w_bits=args.w_bits, a_bits=args.a_bits).run(gm, data=calib)
    pm = qpasses.PassManager("qat", w_bits=args.w_bits, a_bits=args.a_bits, freeze_bn_after=40,
                             observe_outputs=True)
    qgm = pm.run(gm, data=calib)
    print(pm.report.table())
    print(f"FP32 {acc(model):.1f} %   PTQ W{args.w_bits}A{args.a_bits} {acc(ptq):.1f} % "
          f"(integer-only: {acc(ptq_int):.1f} %)   QAT before training {acc(qgm):.1f} %")

    # a plain PyTorch training loop over every parameter of the graph (weights, BN affine, LSQ scales)
    opt = torch.optim.Adam(qgm.parameters(), lr=1e-3)
    steps = args.epochs * ((len(x_train) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        qgm.train()
        perm = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = F.cross_entropy(qgm(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc(qgm):.1f} %")

    fake = qpasses.PassManager("qat_convert").run(qgm)
    integer = qpasses.PassManager(["qat_convert", "integerize"]).run(qgm)
    integer_sr = qpasses.PassManager(["qat_convert", "integerize"], rounding="single").run(qgm)
    print(f"QAT converted (fixed fake quant) {acc(fake):.1f} %   integer-only {acc(integer):.1f} % "
          f"(single rounding: {acc(integer_sr):.1f} %)")


if __name__ == "__main__":
    main()
