"""BNN (``bnn`` recipe) vs its FP32 twin on the scikit-learn digits.

For each width of ``DigitsCNN``: the FP32 model and the BNN start from the *same* random
initialisation and are trained the same way (``qpasses.datasets.fit``: Adam, cosine schedule,
same epochs, learning rate, batch size and seed). The BNN is the ``bnn`` recipe applied to the
untrained traced model (inner convs binary: sign weights times per-channel mean |w|, sign
activations with a hardtanh STE; first conv and the classifier at 8 bits with LSQ scales), trained
with latent-weight clipping. A third column fine-tunes a BNN from the trained FP32 weights. The
last column checks the 1-bit packed graph (``pack_binary``, ``torch.ops.qpasses.binary_linear``)
gives the same test accuracy as the float-simulated BNN.

    python benchmarks/bnn_table.py                 # widths 16 and 64, ~1-2 min on 2 cores
    python benchmarks/bnn_table.py --widths 16 --epochs 10
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import qpasses
from qpasses import datasets, zoo
from qpasses.methods.binary.lib import clip_latent_weights, make_optimizer, pack_binary
from _common import markdown_table


def _bnn(model, xtr, epochs, lr, seed):
    gm = qpasses.trace(model, (xtr[:8],))
    q = qpasses.PassManager("bnn").run(gm, data=list(xtr[:256].split(64)))
    datasets.fit(q, xtr, datasets.load_digits_tensors("train")[1], epochs=epochs, lr=lr, seed=seed,
                 step_hook=clip_latent_weights, optimizer=make_optimizer(q, lr))
    return q


def _weight_counts(q):
    """(binary weight elements, all weight elements) of a ``bnn`` graph: weights read through a
    ``qpasses.binary_weight`` node (binary) or a FakeQuantize quantizer node (the kept edge layers)."""
    import torch
    from qpasses.numerics import FakeQuantize
    from qpasses.qnodes import quantizer_module
    binary = total = 0
    for n in q.graph.nodes:
        if not n.args or getattr(n.args[0], "op", None) != "get_attr":
            continue
        is_binary = n.op == "call_function" and n.target is torch.ops.qpasses.binary_weight.default
        if is_binary or isinstance(quantizer_module(q, n, (FakeQuantize,)), FakeQuantize):
            numel = q.get_parameter(n.args[0].target).numel()
            total += numel
            binary += numel if is_binary else 0
    return binary, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    xtr, ytr = datasets.load_digits_tensors("train")
    xte, yte = datasets.load_digits_tensors("test")
    rows = []
    for width in args.widths:
        torch.manual_seed(args.seed)
        init = zoo.DigitsCNN(width).eval()
        fp = copy.deepcopy(init)
        t = time.perf_counter()
        datasets.fit(fp, xtr, ytr, epochs=args.epochs, lr=args.lr, seed=args.seed)
        t_fp = time.perf_counter() - t
        acc_fp = datasets.accuracy(fp, xte, yte)
        t = time.perf_counter()
        q = _bnn(copy.deepcopy(init), xtr, args.epochs, args.lr, args.seed)
        t_bnn = time.perf_counter() - t
        acc_bnn = datasets.accuracy(q, xte, yte)
        q_ft = _bnn(copy.deepcopy(fp), xtr, args.epochs, args.lr, args.seed)
        acc_ft = datasets.accuracy(q_ft, xte, yte)
        packed = pack_binary(q)
        acc_packed = datasets.accuracy(packed, xte, yte)
        bin_params, all_params = _weight_counts(q)
        rows.append((str(width), f"{acc_fp:.1f}", f"{acc_bnn:.1f}", f"{acc_ft:.1f}", f"{acc_packed:.1f}",
                     f"{100 * bin_params / max(all_params, 1):.0f}%", f"{t_fp:.1f} / {t_bnn:.1f}"))
    head = ("width", "FP32 %", "BNN (same init) %", "BNN (from FP32) %", "BNN packed 1-bit %",
            "binary share of weights", "train s FP32 / BNN")
    print(f"digits test accuracy (500 images), {args.epochs} epochs, Adam lr {args.lr}, seed {args.seed}")
    print(markdown_table(head, rows))


if __name__ == "__main__":
    main()
