"""Lower quantized graphs onto the integer kernel ops (runs on the CPU).

    python examples/09_lower_triton.py

1. ptq_int8 + lower on the digits CNN: convs/linear become torch.ops.qpasses.int8_conv2d /
   int8_linear (int8 x int8 -> int32, fused float epilogue).  The lowered graph runs the CPU
   integer reference here (the Triton kernels on a CUDA GPU) and agrees with the fake-quant graph.
2. The same lowered graph with the Triton kernels, run by the Triton interpreter on the CPU.
3. w4a16 + lower on the MLP: group-wise int4 weights -> int4_weight_only_linear.
4. What stays float is listed in pm.report ("no kernel for ...").
"""
import os
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))   # run from a checkout (an installed qpasses wins)
os.environ.setdefault("TRITON_INTERPRET", "1")       # lets step 2 run the Triton kernels on the CPU

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import qpasses  # noqa: E402
from qpasses import datasets, zoo  # noqa: E402
from qpasses.kernels import triton_policy  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)


def kernel_ops(gm):
    return sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                   and str(n.target).startswith("qpasses.")})


x_test, y_test = datasets.load_digits_tensors("test")
calib = datasets.calib_batches()

# 1. ptq_int8 + lower -------------------------------------------------------------------------
cnn = datasets.train_digits_cnn().eval()
gm = qpasses.trace(cnn, (x_test[:2],))
fq = qpasses.PassManager("ptq_int8").run(gm, data=calib)      # fake-quant graph
pm = qpasses.PassManager("lower", device="cpu")   # lower targets CUDA: opt in on the CPU
low = pm.run(fq)                                               # integer kernel ops
print("lowered digits CNN calls:", kernel_ops(low))
with torch.no_grad():
    y_fp, y_fq, y_low = cnn(x_test), fq(x_test), low(x_test)
rel = float((y_low - y_fq).abs().max() / y_fq.abs().max())
print(f"accuracy  float {datasets.accuracy(cnn, x_test, y_test):.1f}%  fake-quant "
      f"{datasets.accuracy(fq, x_test, y_test):.1f}%  lowered {datasets.accuracy(low, x_test, y_test):.1f}%")
print(f"max |lowered - fake-quant| / max |fake-quant| = {rel:.1e}; "
      f"same predictions on {int((y_low.argmax(1) == y_fq.argmax(1)).sum())}/{len(x_test)} test images")

# 2. the Triton kernels (interpreted on the CPU; compiled on a GPU) ------------------------------
with torch.no_grad(), triton_policy("always"):
    y_tri = low(x_test[:8])
print(f"Triton (interpreter) vs CPU reference, 8 images: max abs diff "
      f"{float((y_tri - y_low[:8]).abs().max()):.1e}")

# 3. w4a16 + lower ---------------------------------------------------------------------------
mlp = datasets.train_classifier(zoo.MLP(), epochs=10, lr=3e-3, cache_key="mlp-digits-ex09").eval()
gm = qpasses.trace(mlp, (x_test[:2],))
fq4 = qpasses.PassManager("w4a16", group_size=32).run(gm)
low4 = qpasses.PassManager("lower", device="cpu").run(fq4)
with torch.no_grad():
    a, b, c = mlp(x_test), fq4(x_test), low4(x_test)
print("lowered MLP (w4a16, group 32) calls:", kernel_ops(low4))
print(f"int4 lowered vs fake-quant: {float((c - b).abs().max() / b.abs().max()):.1e} relative; "
      f"vs float model: {float((c - a).abs().max() / a.abs().max()):.1e} relative")
print(f"accuracy  float {datasets.accuracy(mlp, x_test, y_test):.1f}%  w4a16 lowered "
      f"{datasets.accuracy(low4, x_test, y_test):.1f}%")

# 4. what stays float ------------------------------------------------------------------------
model = nn.Sequential(nn.Conv1d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5)).eval()
xs = torch.randn(16, 4, 8)
gm = qpasses.trace(model, (xs[:2],))
pm = qpasses.PassManager(["ptq_int8", "lower"], device="cpu")
pm.run(gm, data=[xs])
print(pm.report.table())
