"""Integer-only graphs (``int_only``) against their fake-quant graphs on the zoo models.

    python benchmarks/int_only_table.py

For each model: integer ops / float ops left (``check_integer``), share of outputs within one
output quantization step of the fake-quant graph and bit-identical, on fresh inputs (the digits
CNN: the 500 test images, with FP32 / fake-quant / integer accuracy), and the forward time of the
integer graph (CPU reference ops, one thread, batch 64). ``rounding``: gemmlowp (the paper's
double rounding, int8 kernels) or single (one int64 rounding, CPU reference ops).
"""
from __future__ import annotations

import time

import torch

import qpasses
from qpasses import datasets, zoo
from qpasses.zoo import CatNet



def row(name, model, example, calib, x_eval, labels=None, w_bits=8, a_bits=8, rounding="gemmlowp"):
    gm = qpasses.trace(model.eval(), (example,))
    fq = qpasses.PassManager("int_only", integerize=False, w_bits=w_bits, a_bits=a_bits).run(gm, data=calib)
    pm = qpasses.PassManager("int_only", w_bits=w_bits, a_bits=a_bits, rounding=rounding)
    iq = pm.run(gm, data=calib)
    info = pm.report.to_dict()["steps"][-1]["info"]
    with torch.no_grad():
        a, b = fq(x_eval), iq(x_eval)
        out = [n for n in iq.graph.nodes if n.op == "output"][0].args[0]
        step = float(out.args[1])
        within = float(((a - b).abs() <= step * 1.0001).float().mean()) * 100
        exact = float((a == b).float().mean()) * 100
        t = time.perf_counter()
        for _ in range(3):
            iq(x_eval[:64])
        ms = (time.perf_counter() - t) / 3 * 1000
    accs = ""
    if labels is not None:
        accs = " / ".join(f"{datasets.accuracy(m, x_eval, labels):.1f}" for m in (model, fq, iq))
    print(f"| {name} | W{w_bits}A{a_bits} | {rounding} | {info['integer_ops']} / {info['float_ops']} | {within:.2f} | {exact:.1f} "
          f"| {accs or '–'} | {ms:.1f} |")


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print("| model | bits | rounding | integer ops / float ops | within 1 step (%) | bit-identical (%) "
          "| accuracy FP32 / fake / int (%) | int forward (ms, batch 64) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    model = datasets.train_digits_cnn().eval()
    x, y = datasets.load_digits_tensors("test")
    calib = datasets.calib_batches()
    for wb, ab, r in ((8, 8, "gemmlowp"), (4, 8, "gemmlowp"), (4, 4, "gemmlowp"), (4, 4, "single"),
                      (3, 3, "gemmlowp"), (3, 3, "single")):
        row("DigitsCNN (trained)", model, x[:2], calib, x, y, wb, ab, r)
    for name, key, cls in (("ResNetLike", "resnet", zoo.ResNetLike), ("MobileNetV2Like", "mobilenetv2",
                                                                         zoo.MobileNetV2Like), ("MLP", "mlp", zoo.MLP)):
        ex = zoo.example_input(key)
        data = [torch.randn(8, *ex.shape[1:]) for _ in range(8)]
        row(name + " (random)", cls(), ex, data, torch.randn(64, *ex.shape[1:]))
    data = [torch.randn(8, 3, 8, 8) for _ in range(8)]
    row("CatNet (random)", CatNet(), data[0], data, torch.randn(64, 3, 8, 8))
    for r in ("gemmlowp", "single"):
        row("CatNet (random)", CatNet(), data[0], data, torch.randn(64, 3, 8, 8), w_bits=4, a_bits=6, rounding=r)


if __name__ == "__main__":
    main()
