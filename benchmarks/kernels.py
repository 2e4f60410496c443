"""Kernel benchmarks for ``qpasses.kernels`` (needs a CUDA GPU; CI never has one).

    python benchmarks/kernels.py                       # all micro-benchmarks, markdown tables on stdout
    python benchmarks/kernels.py --write-docs docs/kernels.md   # ... and fill the tables in the docs
    python benchmarks/kernels.py --only int8 --quick   # a subset (int8, int4, binary, conv, e2e)
    python benchmarks/kernels.py --compile-check       # no GPU needed: compile every kernel x autotune
                                                       # config for sm_90 and check shared memory

Method (same run, same process, same GPU for every ratio):
* time = median over ``--rep`` launches of CUDA-event elapsed time, after ``--warmup`` launches
  (which also run Triton's autotuner, so tuning is never timed); before *every* timed launch
  the L2 cache is flushed by zeroing a 256 MiB buffer outside the timed region;
* baselines: ``torch.matmul`` in bf16 (cuBLAS), ``torch._int_mm`` (int8 cuBLASLt, int32 out;
  needs M > 16) and ``torch._int_mm`` followed by a separate dequantize (what an unfused int8
  graph runs); convolutions against cuDNN bf16 channels-last ``F.conv2d``;
* ratios are baseline_time / qpasses_time (> 1 means qpasses is faster).

The end-to-end part (``bench_end_to_end``) times a ResNet-50-like network in bf16 eager and
under ``torch.compile``, and its int8 version lowered by ``PassManager(["ptq_int8", "lower"])``
(:func:`lower_for_benchmark`: quantized and lowered on the CPU, then moved to the GPU).

Without a GPU the script exits with status 2 and says so; ``--cpu-check`` instead runs the
lowering pipeline of the end-to-end model on the CPU (reference kernels, small input) and prints
how closely the lowered graph agrees with its fake-quant graph.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))        # an installed qpasses (or PYTHONPATH) wins over the checkout

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

M_VALUES = [1, 16, 64, 256, 1024, 4096]
LINEAR_SHAPES = {            # name: (N, K)  -- out_features x in_features, y = x @ W^T
    "llama7b-qkvo 4096x4096": (4096, 4096),
    "llama7b-up 11008x4096": (11008, 4096),
    "llama7b-down 4096x11008": (4096, 11008),
    "bert-base-attn 768x768": (768, 768),
    "bert-base-ffn1 3072x768": (3072, 768),
    "bert-base-ffn2 768x3072": (768, 3072),
}
# ResNet-50 (224x224 input) convolutions: (name, Cin, Cout, k, stride, H_in)
RESNET50_CONVS = [
    ("conv1 7x7/2", 3, 64, 7, 2, 224),
    ("l1 1x1 64-64", 64, 64, 1, 1, 56), ("l1 3x3 64-64", 64, 64, 3, 1, 56), ("l1 1x1 64-256", 64, 256, 1, 1, 56),
    ("l1 1x1 256-64", 256, 64, 1, 1, 56),
    ("l2 3x3/2 128", 128, 128, 3, 2, 56), ("l2 3x3 128", 128, 128, 3, 1, 28), ("l2 1x1 128-512", 128, 512, 1, 1, 28),
    ("l2 1x1 512-128", 512, 128, 1, 1, 28),
    ("l3 3x3/2 256", 256, 256, 3, 2, 28), ("l3 3x3 256", 256, 256, 3, 1, 14), ("l3 1x1 256-1024", 256, 1024, 1, 1, 14),
    ("l3 1x1 1024-256", 1024, 256, 1, 1, 14),
    ("l4 3x3/2 512", 512, 512, 3, 2, 14), ("l4 3x3 512", 512, 512, 3, 1, 7), ("l4 1x1 512-2048", 512, 2048, 1, 1, 7),
    ("l4 1x1 2048-512", 2048, 512, 1, 1, 7),
]
CONV_BATCHES = [1, 8, 32]
H100_SMEM = 232448          # max dynamic shared memory per block on sm_90 (227 KiB)

NO_GPU_NOTE = "docs/kernels.md holds the numbers of an H100 run"


# ================================================================================ timing
class Timer:
    """Median CUDA-event time with an L2 flush before every timed launch.

    ``timer(fn)`` is the GPU time of ``fn``: it is captured once as a CUDA graph and the graph
    replay is timed, so host work (Python, op dispatch, Triton's launcher) is not counted -- the
    number a graph-replayed or compiled deployment sees. ``timer.eager(fn)`` times plain eager
    calls: when the host needs longer to issue ``fn`` than the GPU needs to run it, the GPU idles
    and that shows. ``timer.host(fn)`` is the host time to issue one call (no synchronisation)."""

    def __init__(self, warmup: int = 10, rep: int = 50, flush_mib: int = 256):
        self.warmup, self.rep = warmup, rep
        self.cache = torch.empty(flush_mib * (1 << 20) // 4, dtype=torch.int32, device="cuda")

    def _events(self, run: Callable[[], object]) -> float:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.rep)]
        for i in range(self.rep):
            self.cache.zero_()
            starts[i].record()
            run()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3   # microseconds

    def eager(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        return self._events(fn)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):                     # autotuning happens here, outside the capture
            fn()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        t = self._events(graph.replay)
        del graph
        return t

    def host(self, fn: Callable[[], object], n: int = 200) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / n * 1e6


class _CompileOnly:
    """Stands in for :class:`Timer` in :func:`prewarm`: one call, which runs the autotuner."""

    def __call__(self, fn):
        fn()
        return 1.0

    eager = host = __call__


def _prewarm_shard(job):
    shard, which, quick, e2e_batch = job
    os.environ["QPASSES_AUTOTUNE_SHARD"] = shard            # before the kernel modules load
    import qpasses.kernels  # noqa: F401  registers the ops
    t = _CompileOnly()
    m_values, shapes, convs, batches = _sizes(quick)
    with torch.inference_mode():
        if "int8" in which:
            bench_int8(t, m_values, shapes)
        if "conv" in which:
            bench_conv(t, batches, convs)
        if "dynamic" in which:
            bench_dynamic(t, m_values, shapes)
        if "int4" in which:
            bench_int4(t, m_values, shapes)
        if "binary" in which:
            bench_binary(t, m_values, shapes)
        if "e2e" in which:
            torch.manual_seed(0)
            model = ResNet50Like().eval().cuda().to(memory_format=torch.channels_last)
            x = torch.randn(e2e_batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
            lower_for_benchmark(model, x)(x)
    torch.cuda.synchronize()
    return shard


def prewarm(which, quick: bool, e2e_batch: int, jobs: int) -> float:
    """Compile every kernel variant the benchmark will autotune, in ``jobs`` processes.

    Triton's autotuner compiles its candidate configurations one after another, seconds each,
    which dominates a run on a fresh machine. Process i of J runs the benchmark's calls untimed
    with ``QPASSES_AUTOTUNE_SHARD=i/J`` (every J-th candidate), so between them they compile all
    candidates into Triton's on-disk cache; the timed run then loads them from there and its
    autotuning only benchmarks."""
    import multiprocessing as mp
    t0 = time.time()
    jobs_ = [(f"{i}/{jobs}", which, quick, e2e_batch) for i in range(jobs)]
    with mp.get_context("spawn").Pool(jobs) as pool:
        pool.map(_prewarm_shard, jobs_)
    return time.time() - t0


def _sizes(quick: bool):
    """(M values, linear shapes, convs, conv batches) of a full or ``--quick`` run."""
    if quick:
        return [1, 16, 1024, 4096], dict(list(LINEAR_SHAPES.items())[:2]), RESNET50_CONVS[:4], CONV_BATCHES[:2]
    return M_VALUES, LINEAR_SHAPES, RESNET50_CONVS, CONV_BATCHES


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _table(headers: List[str], rows: List[List[str]]) -> str:
    from _common import markdown_table           # benchmarks/ is on sys.path when run as a script
    return markdown_table(headers, rows)


# ================================================================================ micro-benchmarks
def bench_int8(timer: Timer, m_values, shapes) -> Dict:
    from qpasses.kernels import packing
    rows, records = [], []
    for name, (N, K) in shapes.items():
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        wp = packing.pack_int8_weight(w)
        w_t = w.t()                                            # [K, N] column-major view for _int_mm
        w_bf = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        ws = torch.rand(N, device="cuda") * 1e-2
        b = torch.randn(N, device="cuda")
        M0 = torch.full((N,), 1 << 30, dtype=torch.int64, device="cuda")
        sh = torch.full((N,), 12, dtype=torch.int64, device="cuda")
        for M in m_values:
            x = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
            xs = torch.rand(M, device="cuda") * 1e-2
            x_bf = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_bf = timer(lambda: torch.matmul(x_bf, w_bf.t()))
            ours = lambda: torch.ops.qpasses.int8_linear(x, xs, wp, ws, b, "none", torch.bfloat16)  # noqa: E731
            t_ours, e_ours, h_ours = timer(ours), timer.eager(ours), timer.host(ours)
            t_rq = timer(lambda: torch.ops.qpasses.int8_linear_requant(x, 3, wp, None, M0, sh, 0, -128, 127))
            t_int = t_deq = None
            if M > 16:
                t_int = timer(lambda: torch._int_mm(x, w_t))
                t_deq = timer(lambda: (torch._int_mm(x, w_t).float() * xs[:, None] * ws + b).to(torch.bfloat16))
            rec = dict(shape=name, M=M, bf16_us=t_bf, int_mm_us=t_int, int_mm_deq_us=t_deq, ours_us=t_ours,
                       ours_eager_us=e_ours, ours_host_us=h_ours, ours_requant_us=t_rq, vs_bf16=t_bf / t_ours, vs_int_mm=(t_int / t_ours) if t_int else None,
                       vs_int_mm_deq=(t_deq / t_ours) if t_deq else None)
            records.append(rec)
            rows.append([name, str(M), _fmt(t_bf, 1), _fmt(t_int, 1), _fmt(t_deq, 1), _fmt(t_ours, 1), _fmt(t_rq, 1),
                         _fmt(rec["vs_bf16"]), _fmt(rec["vs_int_mm"]), _fmt(rec["vs_int_mm_deq"]), _fmt(e_ours, 1),
                         _fmt(h_ours, 1)])
    md = _table(["shape (N x K)", "M", "bf16 us", "_int_mm us", "_int_mm+deq us", "int8_linear us",
                 "int8_linear_requant us", "x bf16", "x _int_mm", "x _int_mm+deq", "int8_linear eager us",
                 "host us/call"], rows)
    return dict(markdown=md, records=records)


def bench_dynamic(timer: Timer, m_values, shapes) -> Dict:
    """``dynamic_int8_linear`` (per-token activation quantization in torch + the Triton int8 GEMM
    with per-row zero points) against a bf16 ``torch.matmul`` and against the eager ``DynamicQuantLinear``
    module (the exact-integer reference; not a graph form any more: same quantization, ``torch._int_mm`` where cuBLASLt takes the shape, else
    an exact fp32 GEMM), bf16 activations in and out."""
    from qpasses.kernels import packing
    from qpasses.methods.dynamic.lib import DynamicQuantLinear
    rows, records = [], []
    for name, (N, K) in shapes.items():
        w = torch.randn(N, K, device="cuda") * 0.05
        mod = DynamicQuantLinear(w, torch.randn(N, device="cuda"), granularity="per_token").cuda()
        wp = packing.pack_int8_weight(mod.weight_q)
        w_bf = w.to(torch.bfloat16)
        for M in m_values:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_bf = timer(lambda: torch.matmul(x, w_bf.t()))
            ours = lambda: torch.ops.qpasses.dynamic_int8_linear(x, wp, mod.weight_scale, mod.bias, 8, False, True)  # noqa: E731
            t_ours, e_ours = timer(ours), timer.eager(ours)
            t_mod = timer(lambda: mod(x))
            rec = dict(shape=name, M=M, bf16_us=t_bf, module_us=t_mod, ours_us=t_ours, ours_eager_us=e_ours,
                       vs_bf16=t_bf / t_ours, vs_module=t_mod / t_ours)
            records.append(rec)
            rows.append([name, str(M), _fmt(t_bf, 1), _fmt(t_mod, 1), _fmt(t_ours, 1), _fmt(rec["vs_bf16"]),
                         _fmt(rec["vs_module"]), _fmt(e_ours, 1)])
    md = _table(["shape (N x K)", "M", "bf16 us", "DynamicQuantLinear us", "dynamic_int8_linear us", "x bf16",
                 "x module", "dynamic_int8_linear eager us"], rows)
    return dict(markdown=md, records=records)


def bench_int4(timer: Timer, m_values, shapes, group: int = 128) -> Dict:
    from qpasses.kernels import packing
    rows, records = [], []
    for name, (N, K) in shapes.items():
        w = torch.randn(N, K, device="cuda")
        wp, s, z = packing.quantize_int4(w, group, symmetric=False)
        s, z = s.to(torch.bfloat16), z.to(torch.bfloat16)
        w_bf = w.to(torch.bfloat16)
        for M in m_values:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_bf = timer(lambda: torch.matmul(x, w_bf.t()))
            ours = lambda: torch.ops.qpasses.int4_weight_only_linear(x, wp, s, z, group, None)  # noqa: E731
            t_ours, e_ours = timer(ours), timer.eager(ours)
            rec = dict(shape=name, M=M, group=group, bf16_us=t_bf, ours_us=t_ours, ours_eager_us=e_ours,
                       vs_bf16=t_bf / t_ours)
            records.append(rec)
            rows.append([name, str(M), _fmt(t_bf, 1), _fmt(t_ours, 1), _fmt(rec["vs_bf16"]), _fmt(e_ours, 1)])
    md = _table(["shape (N x K)", "M", "bf16 us", "int4_weight_only_linear us (g=%d)" % group, "x bf16",
                 "eager us"], rows)
    return dict(markdown=md, records=records)


# LLM shapes and the targets of issue 27 (ratio = bf16 cuBLAS time / qpasses time)
LLM_W4A16 = dict(m_values=[1, 4, 16], shapes={"4096x4096": (4096, 4096), "14336x4096": (14336, 4096)})
LLM_W8A8 = dict(m_values=[2048, 4096, 8192], shapes={"4096x4096": (4096, 4096)})
LLM_TARGETS = {"w4a16": (2.5, "M = 1"), "int8": (1.5, "all M"), "fp8": (1.6, "all M")}


def _llm_row(kernel, name, M, t_bf, t_ours, target, applies, extra=None):
    ratio = t_bf / t_ours
    rec = dict(kernel=kernel, shape=name, M=M, bf16_us=t_bf, ours_us=t_ours, vs_bf16=ratio, target=target,
               target_applies=applies, met=(ratio >= target) if applies else None)
    rec.update(extra or {})
    return rec


def bench_llm(timer: Timer) -> Dict:
    """The LLM rows: W4A16 at decoding M, W8A8 int8 and fp8 at prefill M, each against a bf16
    ``torch.matmul`` (cuBLAS) of the same shape, with the issue's target and whether it is met.

    * W4A16: ``int4_weight_only_linear`` (group 128, bf16 activations and scales);
    * W8A8 int8: ``int8_linear`` on pre-quantized int8 activations (the GEMM with its fused
      epilogue) and ``dynamic_int8_linear`` (per-token quantization of bf16 activations included);
    * fp8: ``fp8_linear`` on pre-quantized e4m3 activations and ``dynamic_fp8_linear`` (per-token
      quantization included); ``torch._scaled_mm`` (cuBLASLt fp8) as a second baseline where it runs.
      Needs an sm_89+ GPU (else the fp8 rows are skipped and say so)."""
    from qpasses.kernels import library as ops, packing
    import qpasses.numerics.fp8  # noqa: F401  registers quantize_fp8_per_token
    records, rows = [], []

    def row(r):
        records.append(r)
        met = "n/a" if r["met"] is None else ("yes" if r["met"] else "no")
        rows.append([r["kernel"], r["shape"], str(r["M"]), _fmt(r["bf16_us"], 1), _fmt(r["ours_us"], 1),
                     _fmt(r["vs_bf16"]), f">= {r['target']}x ({LLM_TARGETS[r['family']][1]})", met])

    for name, (N, K) in LLM_W4A16["shapes"].items():
        w = torch.randn(N, K, device="cuda")
        wp, s, z = packing.quantize_int4(w, 128, symmetric=True)
        s = s.to(torch.bfloat16)
        w_bf = w.to(torch.bfloat16)
        for M in LLM_W4A16["m_values"]:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_bf = timer(lambda: torch.matmul(x, w_bf.t()))
            t = timer(lambda: torch.ops.qpasses.int4_weight_only_linear(x, wp, s, None, 128, None))
            row(_llm_row("int4_weight_only_linear", name, M, t_bf, t, 2.5, M == 1, dict(family="w4a16")))
    fp8_ok = torch.cuda.get_device_capability() >= ops.FP8_MIN_CAPABILITY
    for name, (N, K) in LLM_W8A8["shapes"].items():
        w = torch.randn(N, K, device="cuda") * 0.05
        w_bf = w.to(torch.bfloat16)
        w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        wp = packing.pack_int8_weight(w8)
        ws = torch.rand(N, device="cuda") * 1e-2
        if fp8_ok:
            w_scale = w.abs().amax(1) / 448
            wf8 = (w / w_scale[:, None]).to(torch.float8_e4m3fn)
        for M in LLM_W8A8["m_values"]:
            x_bf = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_bf = timer(lambda: torch.matmul(x_bf, w_bf.t()))
            x8 = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
            xs = torch.rand(M, device="cuda") * 1e-2
            t = timer(lambda: torch.ops.qpasses.int8_linear(x8, xs, wp, ws, None, "none", torch.bfloat16))
            row(_llm_row("int8_linear", name, M, t_bf, t, 1.5, True, dict(family="int8")))
            t = timer(lambda: torch.ops.qpasses.dynamic_int8_linear(x_bf, wp, ws, None, 8, True, True))
            row(_llm_row("dynamic_int8_linear", name, M, t_bf, t, 1.5, True, dict(family="int8")))
            if not fp8_ok:
                continue
            xq, xsf = torch.ops.qpasses.quantize_fp8_per_token(x_bf)
            t = timer(lambda: torch.ops.qpasses.fp8_linear(xq, xsf, wf8, w_scale, None, torch.bfloat16))
            extra = dict(family="fp8")
            try:
                wt = wf8.t()
                t_sc = timer(lambda: torch._scaled_mm(xq, wt, scale_a=xsf.reshape(M, 1), scale_b=w_scale.reshape(1, N),
                                                      out_dtype=torch.bfloat16))
                extra["scaled_mm_us"] = t_sc
            except Exception as e:  # noqa: BLE001  a baseline only: say why it is missing
                extra["scaled_mm_error"] = str(e).splitlines()[0][:120]
            row(_llm_row("fp8_linear", name, M, t_bf, t, 1.6, True, extra))
            t = timer(lambda: torch.ops.qpasses.dynamic_fp8_linear(x_bf, wf8, w_scale, None, None))
            row(_llm_row("dynamic_fp8_linear", name, M, t_bf, t, 1.6, True, dict(family="fp8")))
    md = _table(["kernel", "shape (N x K)", "M", "bf16 us", "qpasses us", "x bf16", "target", "met"], rows)
    if not fp8_ok:
        md += ("\n\nfp8 rows skipped: %s is sm_%d%d, the fp8 tensor cores need sm_89+.\n"
               % ((torch.cuda.get_device_name(),) + torch.cuda.get_device_capability()))
    sc = [r for r in records if r.get("scaled_mm_us")]
    if sc:
        md += "\n\n" + _table(["shape", "M", "torch._scaled_mm us", "fp8_linear us", "x _scaled_mm"],
                               [[r["shape"], str(r["M"]), _fmt(r["scaled_mm_us"], 1), _fmt(r["ours_us"], 1),
                                 _fmt(r["scaled_mm_us"] / r["ours_us"])] for r in sc])
    return dict(markdown=md, records=records)


def bench_binary(timer: Timer, m_values, shapes) -> Dict:
    from qpasses.kernels import packing
    rows, records = [], []
    for name, (N, K) in shapes.items():
        wp = packing.pack_bits(torch.randn(N, K, device="cuda"))
        alpha = torch.rand(N, device="cuda")
        w_bf = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        for M in m_values:
            xs = torch.randn(M, K, device="cuda")
            xp = packing.pack_bits(xs)
            x8 = torch.where(xs < 0, -1, 1).to(torch.int8)
            x_bf = xs.to(torch.bfloat16)
            t_bf = timer(lambda: torch.matmul(x_bf, w_bf.t()))
            t_packed = timer(lambda: torch.ops.qpasses.binary_linear(xp, wp, K, alpha, None, True))
            t_int8 = timer(lambda: torch.ops.qpasses.binary_linear(x8, wp, K, alpha, None, False))
            rec = dict(shape=name, M=M, bf16_us=t_bf, packed_us=t_packed, int8_act_us=t_int8,
                       vs_bf16_packed=t_bf / t_packed, vs_bf16_int8=t_bf / t_int8)
            records.append(rec)
            rows.append([name, str(M), _fmt(t_bf, 1), _fmt(t_packed, 1), _fmt(t_int8, 1), _fmt(rec["vs_bf16_packed"]),
                         _fmt(rec["vs_bf16_int8"])])
    md = _table(["shape (N x K)", "M", "bf16 us", "W1A1 packed us", "W1A8 us", "x bf16 (W1A1)", "x bf16 (W1A8)"], rows)
    return dict(markdown=md, records=records)


def bench_conv(timer: Timer, batches, convs) -> Dict:
    from qpasses.kernels import packing
    rows, records = [], []
    for name, cin, cout, k, stride, h in convs:
        pad = k // 2
        w = torch.randint(-127, 128, (cout, cin, k, k), dtype=torch.int8, device="cuda")
        wp = packing.pack_int8_conv_weight(w)
        w_bf = torch.randn(cout, cin, k, k, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        ws = torch.rand(cout, device="cuda") * 1e-2
        b = torch.randn(cout, device="cuda")
        xs = torch.tensor([0.02], device="cuda")
        M0 = torch.full((cout,), 1 << 30, dtype=torch.int64, device="cuda")
        sh = torch.full((cout,), 12, dtype=torch.int64, device="cuda")
        for nb in batches:
            x = torch.randint(-127, 128, (nb, cin, h, h), dtype=torch.int8, device="cuda").contiguous(
                memory_format=torch.channels_last)
            x_bf = torch.randn(nb, cin, h, h, device="cuda", dtype=torch.bfloat16).contiguous(
                memory_format=torch.channels_last)
            t_bf = timer(lambda: F.conv2d(x_bf, w_bf, None, stride, pad))
            ours = lambda: torch.ops.qpasses.int8_conv2d(x, xs, wp, ws, b, [stride] * 2, [pad] * 2,  # noqa: E731
                                                         [1, 1], 1, "relu", torch.bfloat16)
            t_ours, e_ours = timer(ours), timer.eager(ours)
            t_rq = timer(lambda: torch.ops.qpasses.int8_conv2d_requant(x, 0, wp, None, M0, sh, 0, 0, 127, [stride] * 2,
                                                                        [pad] * 2, [1, 1], 1))
            rec = dict(conv=name, batch=nb, bf16_us=t_bf, ours_us=t_ours, ours_eager_us=e_ours, ours_requant_us=t_rq,
                       vs_bf16=t_bf / t_ours)
            records.append(rec)
            rows.append([name, str(nb), _fmt(t_bf, 1), _fmt(t_ours, 1), _fmt(t_rq, 1), _fmt(rec["vs_bf16"]),
                         _fmt(e_ours, 1)])
    md = _table(["ResNet-50 conv", "batch", "cuDNN bf16 us", "int8_conv2d us", "int8_conv2d_requant us", "x bf16",
                 "int8_conv2d eager us"], rows)
    return dict(markdown=md, records=records)


# ================================================================================ end to end
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.down(x) if self.down is not None else x))


class ResNet50Like(nn.Module):
    """ResNet-50 topology ([3, 4, 6, 3] bottlenecks, 224x224 input, 1000 classes)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def quantize_for_benchmark(model: nn.Module, x: torch.Tensor, lower: bool = True, out_dtype: str = "bfloat16"):
    """``ptq_int8`` (+ ``lower``) of ``model`` on the CPU, calibrated on ``x[:2]``; returns the
    GraphModule (on the CPU) and the PassManager."""
    import qpasses
    cpu_model = copy.deepcopy(model).float().cpu().eval()
    xc = x[:2].detach().float().cpu().contiguous()
    gm = qpasses.trace(cpu_model, (xc,))
    pm = qpasses.PassManager(["ptq_int8", "lower"] if lower else ["ptq_int8"], out_dtype=out_dtype) if lower else \
        qpasses.PassManager("ptq_int8")
    return pm.run(gm, data=[xc]), pm


def lower_for_benchmark(model: nn.Module, x: torch.Tensor) -> Callable:
    """The int8 model of the end-to-end benchmark: ``ptq_int8`` + ``lower`` (bf16 kernel outputs),
    moved to ``x``'s device, where the ops run their Triton kernels."""
    low, _ = quantize_for_benchmark(model, x, lower=True, out_dtype="bfloat16")
    return low.to(x.device)


def cpu_check(size: int = 32, batch: int = 2) -> Dict:
    """No-GPU check of the end-to-end path: the ResNet-50-like model quantized and lowered on the
    CPU (reference kernels); agreement of the lowered graph with its fake-quant graph."""
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model = ResNet50Like().eval()
    x = torch.randn(batch, 3, size, size)
    t0 = time.time()
    fq, _ = quantize_for_benchmark(model, x, lower=False)
    low, pm = quantize_for_benchmark(model, x, lower=True, out_dtype="float32")
    t_lower = time.time() - t0
    targets = [str(n.target) for n in low.graph.nodes
               if n.op == "call_function" and str(n.target).startswith("qpasses")]
    with torch.no_grad():
        a, b = fq(x), low(x)
    err = float((a - b).abs().max() / a.abs().max())
    return dict(int8_conv2d=targets.count("qpasses.int8_conv2d.default"),
                int8_linear=targets.count("qpasses.int8_linear.default"),
                quantize_int8=targets.count("qpasses.quantize_int8.default"), rel_max_err=err,
                same_argmax=bool(torch.equal(a.argmax(1), b.argmax(1))), seconds=t_lower)


def bench_end_to_end(lowered_model_fn: Optional[Callable[[nn.Module, torch.Tensor], Callable]] = None,
                     batch: int = 32, timer: Optional[Timer] = None) -> Dict:
    """ResNet-50-like model: bf16 eager, bf16 ``torch.compile`` and -- if given -- the lowered int8
    model ``lowered_model_fn(fp32_eval_model_on_cuda, example_fp32_input)``, which must return a
    callable taking the fp32 input. All three timed in this run; ratios vs bf16 eager."""
    timer = timer or Timer(warmup=5, rep=20)
    torch.manual_seed(0)
    model = ResNet50Like().eval().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    m_bf = ResNet50Like().eval().cuda().to(memory_format=torch.channels_last)
    m_bf.load_state_dict(model.state_dict())
    m_bf = m_bf.to(torch.bfloat16)
    x_bf = x.to(torch.bfloat16)
    res = {}
    with torch.inference_mode():
        res["bf16 eager"] = timer.eager(lambda: m_bf(x_bf))
        res["bf16 CUDA graph"] = timer(lambda: m_bf(x_bf))
        compiled = torch.compile(m_bf)
        res["bf16 torch.compile"] = timer.eager(lambda: compiled(x_bf))
        if lowered_model_fn is not None:
            lowered = lowered_model_fn(model, x)
            res["qpasses int8 (lowered), eager"] = timer.eager(lambda: lowered(x))
            res["qpasses int8 (lowered), CUDA graph"] = timer(lambda: lowered(x))
    rows = [[k, _fmt(v / 1e3, 3), _fmt(res["bf16 eager"] / v)] for k, v in res.items()]
    md = _table([f"ResNet-50-like, batch {batch}", "ms", "x bf16 eager"], rows)
    return dict(markdown=md, records=[dict(variant=k, us=v) for k, v in res.items()])


# ================================================================================ targets
def check_targets(results: Dict) -> List[str]:
    lines = []
    if "int8" in results:
        recs = [r for r in results["int8"]["records"] if r["M"] >= 2048]
        if recs:
            v = min(r["vs_bf16"] for r in recs)
            lines.append(f"int8 >= 1.5x bf16 at M >= 2048: min {v:.2f}x -> {'PASS' if v >= 1.5 else 'FAIL'}")
            vi = [r["vs_int_mm"] for r in recs if r["vs_int_mm"]]
            if vi:
                lines.append(f"int8 >= 0.9x _int_mm at M >= 2048: min {min(vi):.2f}x -> "
                             f"{'PASS' if min(vi) >= 0.9 else 'FAIL'}")
    if "int4" in results:
        recs = [r for r in results["int4"]["records"] if r["M"] == 1]
        if recs:
            v = min(r["vs_bf16"] for r in recs)
            lines.append(f"W4A16 >= 2.5x bf16 at M = 1: min {v:.2f}x -> {'PASS' if v >= 2.5 else 'FAIL'}")
    if "llm" in results:
        for fam, (target, where) in LLM_TARGETS.items():
            for kernel in sorted({r["kernel"] for r in results["llm"]["records"] if r["family"] == fam}):
                recs = [r for r in results["llm"]["records"] if r["kernel"] == kernel and r["target_applies"]]
                if recs:
                    v = min(r["vs_bf16"] for r in recs)
                    lines.append(f"LLM {kernel} >= {target}x bf16 ({where}): min {v:.2f}x -> "
                                 f"{'PASS' if v >= target else 'FAIL'}")
    if "binary" in results:
        recs = [r for r in results["binary"]["records"] if r["M"] <= 16]
        if recs:
            v = min(r["vs_bf16_packed"] for r in recs)
            lines.append(f"binary W1 >= 3x bf16 at M <= 16: min {v:.2f}x -> {'PASS' if v >= 3 else 'FAIL'}")
    return lines


def write_docs(path: Path, results: Dict, device: str) -> None:
    text = path.read_text()
    for key, res in results.items():
        block = f"Measured on {device}, {time.strftime('%Y-%m-%d')}.\n\n{res['markdown']}\n"
        text = re.sub(rf"(<!-- begin:{key} -->\n).*?(<!-- end:{key} -->)", lambda m: m.group(1) + block + m.group(2),
                      text, flags=re.S)
    targets = check_targets(results)
    if targets:
        block = "\n".join(f"- {t}" for t in targets) + "\n"
        text = re.sub(r"(<!-- begin:targets -->\n).*?(<!-- end:targets -->)", lambda m: m.group(1) + block + m.group(2),
                      text, flags=re.S)
    path.write_text(text)


# ================================================================================ compile check
def _compile_variants():
    """(kernel, pointer types, constexprs, config) for every kernel x autotune config x epilogue."""
    from qpasses.kernels.library import _kmod            # (re)builds the modules for the current TRITON_INTERPRET
    T8, T4, TB = _kmod("triton_int8"), _kmod("triton_int4"), _kmod("triton_binary")
    TF8 = _kmod("triton_fp8")
    out = []
    def int8_ptrs(requant):
        return dict(x_ptr="*i8", w_ptr="*i8", out_ptr="*i8" if requant else "*bf16", xs_ptr="*fp32",
                    ws_ptr="*fp32", bias_ptr="*i32" if requant else "*fp32", m0_ptr="*i64", sh_ptr="*i64")

    for cfg in T8.GEMM_CONFIGS:
        for requant in (False, True):
            # the float epilogue with per-row zero points (dynamic activations), requant with a scalar one
            const = dict(HAS_BIAS=True, ACTIVATION=0 if requant else 1, REQUANT=requant, HAS_XZP=requant,
                         XZP_ROWS=not requant)
            out.append((T8._int8_gemm_kernel, dict(int8_ptrs(requant), xzp_ptr="*i32"), const, cfg))
    for cfg in T8.CONV_CONFIGS:
        for requant in (False, True):
            const = dict(HAS_BIAS=True, ACTIVATION=0 if requant else 1, REQUANT=requant, HAS_XZP=True,
                         FLAT_K=requant)                  # both reduction paths, each with one epilogue
            out.append((T8._int8_conv_kernel, int8_ptrs(requant), const, cfg))
    for cfg in T8.DW_CONFIGS:
        for requant in (False, True):
            ptrs = dict(x_ptr="*i8", w_ptr="*i8", out_ptr="*i8" if requant else "*fp16", xs_ptr="*fp32",
                        ws_ptr="*fp32", bias_ptr="*i32" if requant else "*fp32", m0_ptr="*i64", sh_ptr="*i64")
            out.append((T8._int8_dwconv_kernel, ptrs, dict(HAS_BIAS=True, ACTIVATION=2, REQUANT=requant), cfg))
    for cfg in T4.GEMM_CONFIGS:
        for dt in ("bf16", "fp16"):
            ptrs = dict(x_ptr=f"*{dt}", w_ptr="*u8", s_ptr=f"*{dt}", z_ptr=f"*{dt}", bias_ptr="*fp32", out_ptr=f"*{dt}")
            out.append((T4._int4_gemm_kernel, ptrs, dict(GROUP=128, HAS_ZEROS=dt == "bf16", HAS_BIAS=True,
                                                         DOT_F32=False), cfg))
    for cfg in T4.GEMV_CONFIGS:
        for split in (1, 4):
            ptrs = dict(x_ptr="*bf16", w_ptr="*u8", s_ptr="*bf16", z_ptr="*bf16", bias_ptr="*fp32",
                        out_ptr="*bf16" if split == 1 else "*fp32")
            out.append((T4._int4_gemv_kernel, ptrs, dict(GROUP=32 if split == 1 else 128, HAS_ZEROS=True,
                                                         HAS_BIAS=True, SPLIT_K=split), cfg))
    for cfg in TB.DOT_CONFIGS:
        for xp in (False, True):
            ptrs = dict(x_ptr="*i32" if xp else "*i8", w_ptr="*i32", alpha_ptr="*fp32", bias_ptr="*fp32",
                        out_ptr="*fp32")
            out.append((TB._binary_dot_kernel, ptrs, dict(X_PACKED=xp, HAS_ALPHA=True, HAS_BIAS=True, OUT_FLOAT=True),
                        cfg))
    for cfg in TB.XNOR_CONFIGS:
        for bm in (1, 16):
            ptrs = dict(x_ptr="*i32", w_ptr="*i32", alpha_ptr="*fp32", bias_ptr="*fp32", out_ptr="*fp32")
            out.append((TB._binary_xnor_kernel, ptrs, dict(HAS_ALPHA=True, HAS_BIAS=False, OUT_FLOAT=True,
                                                           USE_HW_POPC=True, BLOCK_M=bm), cfg))
    for cfg in TF8.FP8_GEMM_CONFIGS:
        ptrs = dict(x_ptr="*fp8e4nv", w_ptr="*fp8e4nv", out_ptr="*bf16", xs_ptr="*fp32", ws_ptr="*fp32",
                    bias_ptr="*fp32")
        out.append((TF8._fp8_gemm_kernel, ptrs, dict(HAS_BIAS=True), cfg))
    return out


_ALIGNED_INTS = re.compile(r"^(stride_\w+|K|N|C|COUT|CIN_G|COUT_G|K_PER_SPLIT|KW)$")


def _compile_one(args):
    idx, arch = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn, ptrs, const, cfg = _compile_variants()[idx]
    consts = dict(const)
    consts.update(cfg.kwargs)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]          # what the launcher sees for aligned tensors
        else:
            sig[name] = "i32"
            if _ALIGNED_INTS.match(name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.time()
    label = f"{fn.__name__} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages} {const}"
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    except Exception as e:  # noqa: BLE001
        return dict(label=label, ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
    ttgir = k.asm["ttgir"]
    return dict(label=label, ok=k.metadata.shared <= H100_SMEM, shared=k.metadata.shared, seconds=time.time() - t0,
                mma=("warp_group_dot" in ttgir) or ("mma" in ttgir), pipelined="async_copy" in ttgir or
                "async_tma" in ttgir)


def compile_check(arch: int = 90, jobs: int = 2, quick: bool = False) -> List[Dict]:
    """Compile every kernel x autotune configuration for ``sm_<arch>`` (no GPU needed) and
    return one record per variant: ok (compiled, shared memory within the sm_90 limit), shared
    bytes, whether a tensor-core op and a software-pipelined load were emitted. ``quick``: only
    the first variant of each kernel."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    variants = _compile_variants()
    idx, seen = [], set()
    for i, (fn, _, _, _) in enumerate(variants):
        if quick and fn.__name__ in seen:
            continue
        seen.add(fn.__name__)
        idx.append(i)
    if jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(jobs) as pool:
            return pool.map(_compile_one, [(i, arch) for i in idx])
    return [_compile_one((i, arch)) for i in idx]


# ================================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="int8,dynamic,int4,binary,conv,llm,e2e",
                    help="comma list of int8,dynamic,int4,binary,conv,llm,e2e (llm: the LLM-shape rows of "
                         "W4A16, W8A8 int8 and fp8 with their targets)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (compile check: one "
                    "variant per kernel)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--json", type=Path, help="also write the raw records here")
    ap.add_argument("--write-docs", type=Path, help="fill the tables of docs/kernels.md")
    ap.add_argument("--compile-check", action="store_true", help="compile all kernels/configs for --arch, no GPU")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--prewarm", type=int, default=0, metavar="J",
                    help="compile the autotuning candidates in J processes before timing (cold machines)")
    ap.add_argument("--cpu-check", action="store_true", help="no GPU needed: lower the end-to-end model on the "
                    "CPU and report its agreement with the fake-quant graph")
    args = ap.parse_args(argv)

    if args.cpu_check:
        res = cpu_check()
        print("ResNet-50-like (32x32 input, batch 2), ptq_int8 + lower on the CPU (reference kernels): "
              f"{res['int8_conv2d']} int8_conv2d, {res['int8_linear']} int8_linear, {res['quantize_int8']} "
              f"quantize_int8 nodes; max |lowered - fake-quant| / max |fake-quant| = {res['rel_max_err']:.2e}; "
              f"same argmax: {res['same_argmax']}; quantize+lower took {res['seconds']:.1f} s")
        # per layer the lowered graph equals the fake-quant one up to fp32 rounding; over ~50 layers an
        # occasional activation code flipped at a rounding boundary propagates, hence the loose bound
        return 0 if res["rel_max_err"] < 5e-2 and res["same_argmax"] else 1

    if args.compile_check:
        recs = compile_check(args.arch, args.jobs, args.quick)
        bad = [r for r in recs if not r["ok"]]
        for r in recs:
            status = "ok  " if r["ok"] else "FAIL"
            extra = r.get("error") or f"smem={r['shared']} mma={r['mma']} pipelined={r['pipelined']}"
            print(f"{status} {r['label']}  {extra}")
        print(f"{len(recs) - len(bad)}/{len(recs)} variants compiled for sm_{args.arch}")
        return 1 if bad else 0

    if not torch.cuda.is_available():
        print("No CUDA device: the kernel benchmarks need a GPU (" + NO_GPU_NOTE + "). Without a GPU, "
              "`--compile-check` compiles every kernel for sm_90 and `--cpu-check` checks the lowering of the "
              "end-to-end model on the CPU. Skipped: every timed row, including the LLM rows (W4A16 at M = 1, 4, "
              "16; W8A8 int8 and fp8 at M = 2048-8192) and their targets.", file=sys.stderr)
        return 2
    import qpasses.kernels  # noqa: F401  registers the ops
    torch.backends.cuda.matmul.allow_tf32 = False
    which = set(args.only.split(","))
    m_values, shapes, convs, conv_batches = _sizes(args.quick)
    e2e_batch = 8 if args.quick else 32
    timer = Timer(args.warmup, 20 if args.quick else args.rep)
    device = torch.cuda.get_device_name()
    print(f"# qpasses kernel benchmarks on {device} (torch {torch.__version__})\n", flush=True)
    if args.prewarm > 1:
        secs = prewarm(which, args.quick, e2e_batch, args.prewarm)
        print(f"(autotuning candidates compiled in {secs:.0f} s by {args.prewarm} processes)\n", flush=True)
    results = {}
    torch.manual_seed(0)

    def done(key, res):
        results[key] = res
        print(f"## {key}\n\n{res['markdown']}\n", flush=True)
        if args.json:
            args.json.write_text(json.dumps({k: v["records"] for k, v in results.items()}, indent=1))

    with torch.inference_mode():
        if "int8" in which:
            done("int8", bench_int8(timer, m_values, shapes))
        if "conv" in which:
            done("conv", bench_conv(timer, conv_batches, convs))
        if "dynamic" in which:
            done("dynamic", bench_dynamic(timer, m_values, shapes))
        if "int4" in which:
            done("int4", bench_int4(timer, m_values, shapes))
        if "binary" in which:
            done("binary", bench_binary(timer, m_values, shapes))
        if "llm" in which:
            done("llm", bench_llm(timer))
    if "e2e" in which:
        done("e2e", bench_end_to_end(lower_for_benchmark, batch=e2e_batch))
    for line in check_targets(results):
        print(line)
    if args.write_docs:
        write_docs(args.write_docs, results, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
