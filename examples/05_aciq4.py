"""Banner et al. 2019 4-bit post-training quantization (``aciq4``) on the digits CNN.

    python examples/05_aciq4.py

Compares naive min-max W4A4 PTQ with the full method (ACIQ clipping + per-channel bit
allocation + bias correction) and prints the per-layer bit allocation, e.g. (2-core CPU,
2026-11-24, seed-0 model, 500 test images):

    FP32 99.40 %   naive W4A4 98.40 %   aciq4 W4A4 99.40 %
    naive W3A3 87.80 %   aciq4 W3A3 97.20 %
"""
import torch

import qpasses
from qpasses import datasets

torch.set_num_threads(1)
model = datasets.train_digits_cnn().eval()          # ~99 % on the test split, cached after the first run
x_test, y_test = datasets.load_digits_tensors("test")
calib = datasets.calib_batches()                    # 256 held-out images in batches of 32
gm = qpasses.trace(model, (calib[0],))

fp32 = datasets.accuracy(gm, x_test, y_test)
res = {}
for wb, ab in [(4, 4), (3, 3)]:
    naive = qpasses.PassManager("ptq_int8", w_bits=wb, a_bits=ab).run(gm, data=calib)
    pm = qpasses.PassManager("aciq4", w_bits=wb, a_bits=ab)     # alloc + clipping + bias correction
    q = pm.run(gm, data=calib)
    res[wb, ab] = (datasets.accuracy(naive, x_test, y_test), datasets.accuracy(q, x_test, y_test))
    if (wb, ab) == (4, 4):
        print(pm.report.table())
        for n in q.graph.nodes:
            info = n.meta.get("qpasses.quant", {}).get("weight", {}).get("aciq")
            if info:
                print(f"  {n.name:10s} bits per channel {info['bits']} (used {info['used']} of {info['budget']}), "
                      f"clipped {100 * info['clipped_fraction']:.1f} % of weights")
print(f"FP32 {fp32:.2f} %   naive W4A4 {res[4, 4][0]:.2f} %   aciq4 W4A4 {res[4, 4][1]:.2f} %")
print(f"naive W3A3 {res[3, 3][0]:.2f} %   aciq4 W3A3 {res[3, 3][1]:.2f} %")
