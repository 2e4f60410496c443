"""SmoothQuant and AWQ on all-MiniLM-L6-v2: quality (embedding cosine vs float) and time.

Rows: round-to-nearest w4a16 (group 128), ptq_int8 at W8A8 / W8A6 / W4A8, smoothquant at the
same settings, awq (W4 g128); with llm-compressor installed (the ``bench-llm`` extra, kept out
of CI: it pins its own transformers), also its ``SmoothQuantModifier`` and ``AWQModifier`` on the
same model and sentences, applied in float and then measured with the same quantizers as the
qpasses rows (so the columns compare the balancing itself, not two quantizer implementations).

Quality: :func:`qpasses.sentences.embedding_cosine`, the minimum over the evaluation sentences of
the cosine between float and quantized sentence embeddings; calibration uses the separate
calibration sentences.  Time: seconds of the whole recipe run (trace not included).

    python benchmarks/llm_table.py            # qpasses rows (+ llm-compressor rows if importable)
    python benchmarks/llm_table.py --quick    # fewer rows
    python benchmarks/llm_table.py --awq --no-llmcompressor   # only the W4 rows (RTN, awq)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qpasses  # noqa: E402
from qpasses.sentences import calib_batches, embedding_cosine, eval_batch, load_minilm  # noqa: E402
from _common import markdown_table  # noqa: E402

SETTINGS = {"W8A8": dict(w_bits=8, a_bits=8), "W8A6": dict(w_bits=8, a_bits=6), "W4A8": dict(w_bits=4, a_bits=8)}


def qpasses_rows(model, tok, quick=False, alpha=0.5, awq_only=False):
    data = calib_batches(tok)
    ev = eval_batch(tok)
    gm = qpasses.trace(model, data[0])
    rows = []

    def run(label, recipe, **opts):
        pm = qpasses.PassManager(recipe, quiet=True, **opts)
        t = time.perf_counter()
        q = pm.run(gm, data=data)
        dt = time.perf_counter() - t
        cos = embedding_cosine(model, q, ev)
        groups = None
        for st in pm.report.steps:
            if st.name in ("smooth_scales", "awq_scales"):
                groups = len(st.info.get("groups", []))
        rows.append((label, cos, dt, groups))
        print(f"{label:48s} cos {cos:.4f}  {dt:6.1f} s" + (f"  groups {groups}" if groups is not None else ""),
              flush=True)
        return pm

    run("w4a16 RTN g128", "w4a16", group_size=128)
    run("awq W4 g128, no clipping", "awq", group_size=128, clip=False)
    run("awq W4 g128", "awq", group_size=128)
    run("awq W4 g128, scale nodes, no clipping", "awq", group_size=128, scale_nodes=True, clip=False)
    run("awq W4 g128, scale nodes", "awq", group_size=128, scale_nodes=True)
    if awq_only:
        return rows
    for name, s in SETTINGS.items():
        if quick and name != "W8A8":
            continue
        run(f"ptq_int8 {name}", "ptq_int8", **s)
        if not quick:
            run(f"smoothquant {name} (alpha {alpha})", "smoothquant", alpha=alpha, **s)
        run(f"smoothquant {name} (alpha {alpha}), scale nodes", "smoothquant", alpha=alpha, scale_nodes=True, **s)
    run("dynamic_int8 W8A8 per-token", "dynamic_int8")
    run("smoothquant_dynamic W8A8 per-token", "smoothquant_dynamic", alpha=alpha)
    run("smoothquant_dynamic W8A8 per-token, scale nodes", "smoothquant_dynamic", alpha=alpha, scale_nodes=True)
    return rows


def llmcompressor_rows(model, tok, alpha=0.5):
    """llm-compressor's SmoothQuantModifier / AWQModifier on the same model and calibration
    sentences; the balanced float model is then quantized by qpasses' ptq_int8 / w4a16 (so the
    comparison is the balancing); its own mappings (name regexes) are what it uses for BERT."""
    try:
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    except Exception as e:  # noqa: BLE001
        print(f"llm-compressor not importable ({type(e).__name__}: {e}); its rows are left out")
        return []
    from llmcompressor import oneshot
    from datasets import Dataset
    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations, which a CPU-only torch refuses
        # ("Cannot access accelerator device when none is available"): pinning only speeds up
        # host-to-device copies, so on a CPU-only machine it is skipped
        import llmcompressor.pipelines.cache as _cache
        for _cls in vars(_cache).values():
            if isinstance(_cls, type) and hasattr(_cls, "pin_memory"):
                _cls.pin_memory = lambda self, *a, **k: None
    from qpasses.sentences import CALIB_SENTENCES

    data = calib_batches(tok)
    ev = eval_batch(tok)
    ds = Dataset.from_dict({"text": list(CALIB_SENTENCES)})

    def tokenize(ex):
        return tok(ex["text"], truncation=True, max_length=128)
    ds = ds.map(tokenize, remove_columns=["text"])
    rows = []

    def balanced(modifier, **oneshot_kw):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        oneshot(model=m.encoder, dataset=ds, recipe=[modifier], processor=tok,
                num_calibration_samples=len(CALIB_SENTENCES), max_seq_length=128, **oneshot_kw)
        dt = time.perf_counter() - t
        # llm-compressor leaves its hooks / wrappers on the model: copy the balanced weights into a
        # clean copy of the float model (the same architecture, nothing else changed)
        fresh = copy.deepcopy(model)
        state = {k: v for k, v in m.encoder.state_dict().items() if k in fresh.encoder.state_dict()}
        fresh.encoder.load_state_dict(state, strict=False)
        return fresh.eval(), dt

    # BERT's layer names: llm-compressor has no mapping for it, so give the same groups ours finds
    sq_map = [[["re:.*attention.output.dense"], "re:.*attention.self.value"]]
    try:
        m, dt = balanced(SmoothQuantModifier(smoothing_strength=alpha, mappings=sq_map, ignore=[]))
        gm = qpasses.trace(m, data[0])
        for name, s in SETTINGS.items():
            t = time.perf_counter()
            q = qpasses.PassManager("ptq_int8", quiet=True, **s).run(gm, data=data)
            rows.append((f"llm-compressor SmoothQuantModifier + ptq_int8 {name}", embedding_cosine(model, q, ev),
                         dt + time.perf_counter() - t, 6))
            print(rows[-1], flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"llm-compressor SmoothQuantModifier failed: {type(e).__name__}: {e}")
    try:
        from llmcompressor.modifiers.awq import AWQMapping
        awq_map = [AWQMapping("re:.*attention.self.value", ["re:.*attention.output.dense"])]
        m, dt = balanced(AWQModifier(mappings=awq_map, scheme="W4A16", targets=["Linear"], ignore=[]),
                         pipeline="basic")
        # the balanced float weights, then the same int4 g128 round-to-nearest as the qpasses rows
        gm = qpasses.trace(m, data[0])
        t = time.perf_counter()
        q = qpasses.PassManager("w4a16", quiet=True, group_size=128).run(gm)
        rows.append(("llm-compressor AWQModifier + w4a16 g128", embedding_cosine(model, q, ev),
                     dt + time.perf_counter() - t, 6))
        print(rows[-1], flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"llm-compressor AWQModifier failed: {type(e).__name__}: {e}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--awq", action="store_true", help="only the W4 rows: RTN and awq with / without clipping")
    ap.add_argument("--no-llmcompressor", action="store_true")
    ap.add_argument("--only-llmcompressor", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, tok = load_minilm()
    rows = [] if args.only_llmcompressor else qpasses_rows(model, tok, quick=args.quick, alpha=args.alpha,
                                                                     awq_only=args.awq)
    if not args.no_llmcompressor:
        rows += llmcompressor_rows(model, tok, alpha=args.alpha)
    print()
    print(markdown_table(["setting", "cosine (min over 12 sentences)", "time (s)", "groups"],
                         [(r[0], f"{r[1]:.4f}", f"{r[2]:.1f}", "" if r[3] is None else str(r[3])) for r in rows]))


if __name__ == "__main__":
    main()
