"""Dynamic int8 quantization of a transformer encoder block that only torch.export can trace.

    python examples/02_dynamic_int8.py

Prints the per-rule report and the cosine similarity of the encoder output with FP32 for
both activation granularities, e.g. (2-core CPU, 2026-11-24):

    per_tensor: 6 linear + 2 matmul quantized, cosine 0.999996
    per_token:  6 linear + 2 matmul quantized, cosine 0.999998
"""
import torch
import torch.nn.functional as F

import qpasses
from qpasses import zoo

torch.manual_seed(0)
model = zoo.TransformerEncoderBlock(d_model=64, nhead=4, dim_ff=128, seq_len=16).eval()
x = torch.randn(8, 16, 64)
gm = qpasses.trace(model, (x,))            # symbolic tracing fails -> torch.export (aten level)
print("graph level:", gm.meta["qpasses.level"])

for granularity in ("per_tensor", "per_token"):
    pm = qpasses.PassManager("dynamic_int8", granularity=granularity)
    qgm = pm.run(gm)                       # no calibration data: ranges are taken per batch
    if granularity == "per_tensor":
        print(pm.report.table())
    with torch.no_grad():
        cos = F.cosine_similarity(model(x).flatten(), qgm(x).flatten(), dim=0).item()
    n_lin = pm.report["dynamic.dynamic_linear"].rewrites
    n_mm = pm.report["dynamic.dynamic_matmul"].rewrites
    print(f"{granularity + ':':11s} {n_lin} linear + {n_mm} matmul quantized, cosine {cos:.6f}")
