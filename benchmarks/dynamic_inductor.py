"""Dynamic int8 on an x86 CPU through Inductor: qpasses ``dynamic_int8`` (per token and per
tensor, eager and ``qpasses.compile``) against FP32 and torchao PT2E's dynamic quantization, side
by side in one run.

    python benchmarks/dynamic_inductor.py [--threads 2] [--repeats 20] [--layers 2] [--d-model 256]

Model: ``--layers`` ``qpasses.zoo.TransformerEncoderBlock`` in a row (d_model 256, 8 heads, FFN
1024 by default; fx cannot trace it, so both qpasses and PT2E work on the ``torch.export`` graph),
input ``--batch`` x ``--seq`` tokens.  Columns:

* FP32 eager and FP32 compiled (``torch.compile`` with Inductor freezing);
* qpasses ``dynamic_int8`` per token / per tensor: the fake-quant graph run eagerly, and
  ``qpasses.compile`` of it (the ``qdq`` family, freezing, ``torch.compile``).  Per tensor, the
  ``qdq`` family writes PT2E's dynamic form (``choose_qparams.tensor`` ->
  ``quantize_per_tensor.tensor`` -> ``dequantize_per_tensor.tensor``), which Inductor's x86
  ``qlinear`` patterns take; per token stays ``qpasses::fake_quant_per_token`` (no Inductor pattern);
* per tensor with the activation x activation matmuls left in float (``quantize_matmul=false``, the
  scope of PT2E's x86 dynamic config, which annotates linears only), and the same with ``w_bits=7``:
  on CPUs without VNNI oneDNN's u8 x s8 kernels add pairs of products in saturating int16
  (``2 * 255 * 127 > 32767``), 7-bit weights keep them exact;
* torchao PT2E: ``torch.export`` -> ``prepare_pt2e(X86InductorQuantizer`` with
  ``get_default_x86_inductor_quantization_config(is_dynamic=True))`` -> ``convert_pt2e`` ->
  ``torch.compile`` with freezing (eager: the converted graph run as it is).

Each column is timed as the best of ``--repeats`` calls after warm-up, interleaved round by round
(a load spike on a shared machine hits every column alike).  The table gives ms per batch, the
ratio to FP32 compiled (``> 1``: faster), the number of int8 linear patterns Inductor applied
(``qlinear_weight_prepack_matcher_count``, counted around each column's first compiled call) and
the output cosine to FP32.  The per-tensor qpasses and the PT2E columns must fire one pattern per
linear (asserted).
"""
from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from _common import markdown_table

import qpasses
from qpasses import zoo
from qpasses.deploy import has_vnni

COUNTER = "qlinear_weight_prepack_matcher_count"


def _count() -> int:
    from torch._dynamo.utils import counters
    return int(counters["inductor"][COUNTER])


def _frozen_compile(model):
    """``torch.compile`` with Inductor freezing; inputs passed as copies, as ``qpasses.compile``
    does (Inductor's qlinear + add fusion writes into a graph input in place: see
    :class:`qpasses.deploy.CompiledQuantized`), so every column pays the same copy."""
    import torch._inductor.config as cfg
    compiled = torch.compile(model)

    def run(*args):
        with torch.no_grad(), cfg.patch(freezing=True):
            return compiled(*(a.clone() for a in args))
    return run


def _no_grad(fn):
    def run(*args):
        with torch.no_grad():
            return fn(*args)
    return run


def pt2e_dynamic(model, example):
    """torchao PT2E with X86InductorQuantizer's dynamic config (no calibration: qparams per call)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    ep = torch.export.export(model, example).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=True))
    prepared = prepare_pt2e(ep, quantizer)
    with torch.no_grad():
        prepared(*example)
    return convert_pt2e(prepared)


def bench(fns: Dict[str, Callable], example, repeats: int) -> Dict[str, float]:
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(*example)
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main(argv=None) -> Dict[str, Dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--nhead", type=int, default=8)
    ap.add_argument("--dim-ff", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[zoo.TransformerEncoderBlock(args.d_model, args.nhead, args.dim_ff, args.seq)
                                  for _ in range(args.layers)]).eval()
    x = torch.randn(args.batch, args.seq, args.d_model, generator=torch.Generator().manual_seed(1))
    example = (x,)
    n_linear = 6 * args.layers
    with torch.no_grad():
        ref = model(x)
    t0 = time.perf_counter()
    gm = qpasses.trace(model, example)
    fns: Dict[str, Callable] = {"FP32 eager": _no_grad(model)}
    fired: Dict[str, object] = {"FP32 eager": "-"}
    ops: Dict[str, str] = {"FP32 eager": "-"}

    def compiled(name: str, make: Callable[[], Callable], what: str) -> None:
        c0 = _count()
        fn = make()
        fn(*example)                              # compiles now
        fns[name], fired[name], ops[name] = fn, _count() - c0, what

    compiled("FP32 compiled", lambda: _frozen_compile(model), "-")
    reports = {}
    for label, opts in (("per_token", {"granularity": "per_token"}), ("per_tensor", {"granularity": "per_tensor"}),
                        ("per_tensor, linear only", {"granularity": "per_tensor", "quantize_matmul": False}),
                        ("per_tensor, linear only, w_bits=7", {"granularity": "per_tensor", "quantize_matmul": False,
                                                               "w_bits": 7})):
        q = qpasses.PassManager("dynamic_int8", progress=False, **opts).run(gm)
        if "w_bits" not in opts and "quantize_matmul" not in opts:
            fns[f"qpasses {label} eager"], fired[f"qpasses {label} eager"] = _no_grad(q), "-"
            ops[f"qpasses {label} eager"] = "fake quant"
        name = f"qpasses {label} + compile"
        compiled(name, lambda: qpasses.compile(q, example), "")
        reports[label] = fns[name].report
        ops[name] = f"{len(fns[name].report.lowered)} linear to Inductor"
    pt = pt2e_dynamic(model, example)
    fns["PT2E dynamic eager"], fired["PT2E dynamic eager"], ops["PT2E dynamic eager"] = _no_grad(pt), "-", "Q/DQ"
    compiled("PT2E dynamic + compile", lambda: _frozen_compile(pt), "Q/DQ")
    setup = time.perf_counter() - t0
    assert fired["qpasses per_tensor + compile"] == fired["qpasses per_tensor, linear only + compile"] == n_linear, fired
    assert fired["PT2E dynamic + compile"] == n_linear, fired
    outs = {k: fn(*example) for k, fn in fns.items()}           # warm-up, and the outputs compared
    assert torch.equal(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(1))), "an input was overwritten"
    t = bench(fns, example, args.repeats)
    base = t["FP32 compiled"]
    rows = []
    for k in fns:
        cos = F.cosine_similarity(outs[k].flatten().double(), ref.flatten().double(), dim=0).item()
        rows.append([k, f"{t[k] * 1e3:.1f}", f"{base / t[k]:.2f}x", str(fired[k]), ops[k], f"{cos:.6f}"])
    for label, rep in reports.items():
        print(f"qpasses.compile report ({label}):\n  " + str(rep).split("\n")[0]
              + (f"\n  {rep.refused[0][0]}: {rep.refused[0][1]}" if rep.refused else ""))
    print(f"\n{args.layers} x TransformerEncoderBlock(d_model {args.d_model}, {args.nhead} heads, FFN {args.dim_ff}), "
          f"input [{args.batch}, {args.seq}, {args.d_model}], threads={args.threads}, best of {args.repeats}, "
          f"VNNI: {has_vnni()}, torch {torch.__version__}; setup {setup:.0f} s")
    print(markdown_table(["method", "ms / batch", "speed vs FP32 compiled", "int8 linear patterns", "form",
                          "cosine vs FP32"], rows))
    return {k: {"ms": t[k] * 1e3, "ratio": base / t[k]} for k in fns}


if __name__ == "__main__":
    main()
