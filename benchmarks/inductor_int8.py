"""int8 on an x86 CPU through Inductor: fp32 eager, fp32 compiled, torchao PT2E + compile and
qpasses + compile, side by side in one run.

    python benchmarks/inductor_int8.py [--threads 2] [--repeats 20] [--models resnet18,bert]
                                       [--recipe ptq_int8|int_only]

Models (random weights, nothing downloaded):

* ``resnet18`` -- a ResNet-18-sized CNN from ``transformers.ResNetConfig`` (basic layers, depths
  [2, 2, 2, 2], hidden sizes [64, 128, 256, 512]), input 8 x 3 x 224 x 224;
* ``bert`` -- a small BERT encoder from ``transformers.BertConfig`` (MiniLM-sized: 6 layers,
  hidden 384, 12 heads, FFN 1536), input 8 x 128 tokens.

PT2E: ``torch.export`` -> ``prepare_pt2e`` with ``X86InductorQuantizer`` (its default static
config) -> calibration -> ``convert_pt2e`` -> ``torch.compile`` with freezing.  qpasses:
``ptq_int8`` -> ``qpasses.compile`` (the ``qdq`` family, freezing, ``torch.compile``).  Both are
calibrated on the same batches.  On CPUs without VNNI qpasses quantizes weights to 7 bits
(oneDNN's u8 x s8 products saturate in int16 there; see docs/performance.md); the int8
kernels Inductor calls are the same.

Each configuration is timed as the best of ``--repeats`` calls after warm-up, all in the same
process, interleaved round by round so that a load spike on a shared machine hits every column
alike.  The script asserts that Inductor applied its int8 patterns for both int8 columns
(``qconv_weight_prepack_matcher_count`` for the CNN, ``qlinear_weight_prepack_matcher_count``
for the transformer) and prints a markdown table with the ratios to fp32 compiled.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from _common import markdown_table

import qpasses
from qpasses.deploy import has_vnni


def _counters() -> Dict[str, int]:
    from torch._dynamo.utils import counters
    return {k: int(counters["inductor"][k]) for k in ("qconv_weight_prepack_matcher_count",
                                                        "qlinear_weight_prepack_matcher_count")}


def resnet18(batch: int):
    import transformers
    cfg = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                    embedding_size=64, num_labels=1000)
    torch.manual_seed(0)
    m = transformers.ResNetForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=g)
    calib = [torch.randn(batch, 3, 224, 224, generator=g) for _ in range(2)]

    class Logits(torch.nn.Module):           # a plain tensor out (HF returns a ModelOutput)
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, pixel_values):
            return self.net(pixel_values).logits

    return Logits(m).eval(), (x,), [(c,) for c in calib], "qconv_weight_prepack_matcher_count"


def bert(batch: int, seq: int = 128):
    import transformers
    cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, vocab_size=30522, max_position_embeddings=512)
    torch.manual_seed(0)
    m = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(1)

    class Hidden(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, input_ids):
            return self.net(input_ids=input_ids).last_hidden_state

    ids = torch.randint(0, 30522, (batch, seq), generator=g)
    calib = [(torch.randint(0, 30522, (batch, seq), generator=g),) for _ in range(2)]
    return Hidden(m).eval(), (ids,), calib, "qlinear_weight_prepack_matcher_count"


MODELS = {"resnet18": resnet18, "bert": bert}


def _frozen_compile(model):
    import torch._inductor.config as cfg
    compiled = torch.compile(model)

    def run(*args):
        with torch.no_grad(), cfg.patch(freezing=True):
            return compiled(*args)
    return run


def pt2e(model, example, calib):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    ep = torch.export.export(model, example).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(ep, quantizer)
    with torch.no_grad():
        for c in calib:
            prepared(*c)
    return convert_pt2e(prepared)


def bench(fns: Dict[str, Callable], example, repeats: int) -> Dict[str, float]:
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():                 # interleaved: a load spike hits every column
            t = time.perf_counter()
            fn(*example)
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main(argv=None) -> List[Dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--models", default="resnet18,bert")
    ap.add_argument("--recipe", default="ptq_int8", choices=["ptq_int8", "int_only"],
                    help="qpasses recipe: ptq_int8 (inputs of weighted ops quantized) or int_only with "
                         "integerize=false (outputs of conv / add / relu observed too, as PT2E places them)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w_bits = 8 if has_vnni() else 7
    rows, results = [], []
    for name in args.models.split(","):
        model, example, calib, counter = MODELS[name](args.batch)
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = model(*example)
        fp32c = _frozen_compile(model)
        fp32c(*example)
        c0 = _counters()
        pt = _frozen_compile(pt2e(model, example, calib))
        out_pt = pt(*example)
        c1 = _counters()
        gm = qpasses.trace(model, example)
        extra = {"integerize": False} if args.recipe == "int_only" else {}
        qgm = qpasses.PassManager(args.recipe, w_bits=w_bits, **extra).run(gm, data=calib)
        fast = qpasses.compile(qgm, example)
        out_q = fast(*example)
        c2 = _counters()
        fired_pt, fired_q = c1[counter] - c0[counter], c2[counter] - c1[counter]
        assert fired_pt > 0, f"{name}: Inductor applied no int8 pattern to the PT2E model ({counter})"
        assert fired_q > 0, f"{name}: Inductor applied no int8 pattern to the qpasses model ({counter})"
        setup = time.perf_counter() - t0

        def eager(*a):
            with torch.no_grad():
                return model(*a)
        fns = {"fp32 eager": eager, "fp32 compiled": fp32c, "PT2E + compile": pt, "qpasses + compile": fast}
        for fn in fns.values():                   # warm-up
            fn(*example)
        t = bench(fns, example, args.repeats)
        cos = {k: float(F.cosine_similarity(o.flatten().float(), ref.flatten().float(), dim=0))
               for k, o in (("PT2E", out_pt), ("qpasses", out_q))}
        r = {k: t["fp32 compiled"] / v for k, v in t.items()}
        results.append({"model": name, **{f"{k} ms": v * 1e3 for k, v in t.items()},
                        "pt2e_speedup": r["PT2E + compile"], "qpasses_speedup": r["qpasses + compile"]})
        rows.append([name, *(f"{t[k] * 1e3:.1f}" for k in fns), f"{r['PT2E + compile']:.2f}x",
                     f"{r['qpasses + compile']:.2f}x", f"{fired_pt} / {fired_q}",
                     f"{cos['PT2E']:.4f} / {cos['qpasses']:.4f}"])
        print(f"{name}: setup (3 compiles, calibration) {setup:.0f} s; qpasses report:\n{fast.report}", flush=True)
    print()
    print(f"threads={args.threads}, batch={args.batch}, best of {args.repeats}, qpasses {args.recipe} w_bits={w_bits} "
          f"(VNNI: {has_vnni()}), torch {torch.__version__}")
    print(markdown_table(["model", "fp32 eager ms", "fp32 compiled ms", "PT2E + compile ms", "qpasses + compile ms",
                          "PT2E speed-up", "qpasses speed-up", "int8 patterns PT2E / qpasses",
                          "cosine to fp32 PT2E / qpasses"], rows))
    return results


if __name__ == "__main__":
    main()
