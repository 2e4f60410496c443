"""Integer-arithmetic-only inference (Jacob et al., CVPR 2018) of the digits CNN and ResNetLike.

    python examples/03_int_only.py

Runs the ``int_only`` recipe twice on each model -- once stopping at the fake-quant graph
(``integerize=False``), once lowering it to integer ops -- and prints the accuracy of both (digits),
the share of outputs on which they agree within one output quantization step, the integer graph
of the digits CNN, and what ``check_integer`` counted.
"""
from __future__ import annotations

import torch

import qpasses
from qpasses import datasets, zoo


def out_step(iq):
    out = [n for n in iq.graph.nodes if n.op == "output"][0].args[0]
    return float(out.args[1])


def compare(name, model, example, calib, x_eval):
    gm = qpasses.trace(model.eval(), (example,))
    fq = qpasses.PassManager("int_only", integerize=False).run(gm, data=calib)
    pm = qpasses.PassManager("int_only", strict=True)
    iq = pm.run(gm, data=calib)
    a, b = fq(x_eval), iq(x_eval)
    step = out_step(iq)
    within = float(((a - b).abs() <= step * 1.0001).float().mean()) * 100
    exact = float((a == b).float().mean()) * 100
    print(f"{name}: outputs within one step {within:.2f} %, bit-identical {exact:.1f} %, "
          f"check_integer {pm.report.to_dict()['steps'][-1]['info']}")
    return fq, iq, pm


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = datasets.train_digits_cnn().eval()
    x_test, y_test = datasets.load_digits_tensors("test")
    calib = datasets.calib_batches()
    fq, iq, pm = compare("digits CNN", model, x_test[:2], calib, x_test)
    print(f"  accuracy: FP32 {datasets.accuracy(model, x_test, y_test):.1f} %, fake-quant "
          f"{datasets.accuracy(fq, x_test, y_test):.1f} %, integer-only {datasets.accuracy(iq, x_test, y_test):.1f} %")
    print(iq.code)

    r = zoo.ResNetLike().eval()
    x = zoo.example_input("resnet")
    data = [torch.randn(8, *x.shape[1:]) for _ in range(8)]
    _, _, pm = compare("ResNetLike (random weights)", r, x, data, torch.randn(64, *x.shape[1:]))
    print(pm.report.table())


if __name__ == "__main__":
    main()
