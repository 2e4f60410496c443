"""Side by side: qpasses ``dynamic_int8`` vs ``torch.ao.quantization.quantize_dynamic``.

Model: ``qpasses.zoo.TransformerEncoderBlock`` (symbolic tracing fails on it; ``qpasses.trace``
falls back to ``torch.export``, so the recipe runs on the aten-level graph).  torch.ao quantizes
the eager model's ``nn.Linear`` layers (fbgemm int8 kernels, per-tensor dynamic activations).
Prints cosine similarity of the encoder outputs with FP32 and the median wall time per batch.

    python benchmarks/dynamic_vs_torchao.py [--d-model 64] [--batch 32] [--repeats 30]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import qpasses
from qpasses import zoo


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def wall_ms(fn, x, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--nhead", type=int, default=4)
    p.add_argument("--dim-ff", type=int, default=128)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    model = zoo.TransformerEncoderBlock(a.d_model, a.nhead, a.dim_ff, a.seq).eval()
    x = torch.randn(a.batch, a.seq, a.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    gm = qpasses.trace(model, (x[:2],))
    rows = [("FP32 eager", model, "-")]
    rows.append((f"FP32 traced ({gm.meta.get('qpasses.level')})", gm, "-"))
    for gran in ("per_tensor", "per_token"):
        pm = qpasses.PassManager("dynamic_int8", granularity=gran)
        q = pm.run(gm)
        n_lin = pm.report.rule("dynamic_linear", "dynamic", "dynamic").rewrites
        n_mm = pm.report.rule("dynamic_matmul", "dynamic", "dynamic").rewrites
        rows.append((f"qpasses dynamic_int8 {gran}", q, f"{n_lin} linear + {n_mm} matmul"))
        pm = qpasses.PassManager("dynamic_int8", granularity=gran, quantize_matmul=False)
        rows.append((f"qpasses dynamic_int8 {gran}, linear only", pm.run(gm), f"{n_lin} linear"))
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    tq = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    rows.append(("torch.ao quantize_dynamic (per-tensor W)", tq, "6 linear"))
    tqc = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear: per_channel_dynamic_qconfig})
    rows.append(("torch.ao quantize_dynamic (per-channel W)", tqc, "6 linear"))
    print(f"TransformerEncoderBlock(d_model={a.d_model}, nhead={a.nhead}, dim_ff={a.dim_ff}), "
          f"input [{a.batch}, {a.seq}, {a.d_model}], 1 thread, median of {a.repeats}")
    print(f"| {'method':44s} | {'quantized ops':20s} | {'cosine vs FP32':>14s} | {'ms / batch':>10s} |")
    print(f"|{'-' * 46}|{'-' * 22}|{'-' * 16}|{'-' * 12}|")
    for name, fn, what in rows:
        with torch.no_grad():
            y = fn(x)
        print(f"| {name:44s} | {what:20s} | {cosine(ref, y):14.6f} | {wall_ms(fn, x, a.repeats):10.3f} |")


if __name__ == "__main__":
    main()
