"""Zero-shot W4A4 quantization with GENIE: no calibration data, only the model's BatchNorm statistics.

    python examples/08_genie.py

Trains (or loads from the cache) the digits CNN, quantizes it to W4A4 (first/last layer 8-bit)
with the ``genie`` recipe -- ``PassManager("genie").run(gm)``, no data -- and compares it with
min-max W4A4 calibrated on 256 real images.  Smaller iteration counts than the recipe defaults,
so it finishes in well under a minute; see benchmarks/genie_table.py for the full table.

Prints (2-core CPU, 2026-11-24)::

    FP32                          : 99.4 %
    min-max W4A4 (256 real images): 98.4 %
    GENIE W4A4 (zero-shot)        : 99.2 %
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import qpasses  # noqa: E402
from qpasses.datasets import accuracy, calib_batches, load_digits_tensors, train_digits_cnn  # noqa: E402

torch.set_num_threads(1)
model = train_digits_cnn()
x_test, y_test = load_digits_tensors("test")
gm = qpasses.trace(model, (x_test[:2],))

minmax = qpasses.PassManager("ptq_int8", w_bits=4, a_bits=4).run(gm, data=calib_batches())

pm = qpasses.PassManager("genie", preset="thorough", samples=128, distill_iters=150, recon_iters=150, progress=True)
genie = pm.run(gm)  # zero-shot: no data argument

print(f"FP32                          : {accuracy(gm, x_test, y_test):.1f} %")
print(f"min-max W4A4 (256 real images): {accuracy(minmax, x_test, y_test):.1f} %")
print(f"GENIE W4A4 (zero-shot)        : {accuracy(genie, x_test, y_test):.1f} %")
for step in pm.report.steps:
    print(f"  step {step.name:20s} {step.seconds:6.1f} s  {step.info}")
