"""Banner et al. 2019 (``aciq4``) vs naive min-max PTQ on the real-data model.

Model: ``qpasses.datasets.train_digits_cnn(seed=s)`` (scikit-learn digits 8x8, test split of
500 images), calibrated on ``datasets.calib_batches()``.  For each bit-width pair prints the
test accuracy (%) of:

* naive min-max: ``ptq_int8`` with per-channel min-max weights and min-max activations;
* ACIQ activations only: the ACIQ observer on activations, per-channel min-max weights;
* ACIQ: ``aciq4`` with analytical clipping of activations and weights, uniform bits, no bias correction;
* ACIQ + bias correction; ACIQ + per-channel bit allocation;
* ACIQ + bit allocation + bias correction (the full method, ``aciq4`` defaults), and the same
  with the greedy MSE-optimal integer allocation (``alloc_rule="mse"``) instead of the paper's rule.

Accuracies are the mean over ``--seeds`` independently trained models (1 image = 0.2 %).
``--model mobilenetv2`` uses ``qpasses.zoo.MobileNetV2Like`` (inverted residuals, depthwise
convolutions, ReLU6) trained the same way (15 epochs, AdamW, cached) instead of the DigitsCNN.

    python benchmarks/aciq_table.py [--seeds 3] [--bits 4/4,4/3,3/3] [--model mobilenetv2]
"""
from __future__ import annotations

import argparse
import warnings

import torch

import qpasses
from qpasses import datasets

ROWS = [
    ("naive min-max (ptq_int8)", "ptq_int8", {}),
    ("ACIQ activations only (min-max weights)", "aciq4",
     dict(clip_weights=False, bit_allocation=False, bias_correction=False)),
    ("ACIQ", "aciq4", dict(bit_allocation=False, bias_correction=False)),
    ("ACIQ + bias correction", "aciq4", dict(bit_allocation=False, bias_correction=True)),
    ("ACIQ + bit allocation", "aciq4", dict(bit_allocation=True, bias_correction=False)),
    ("ACIQ + bit allocation + bias correction", "aciq4", {}),
    ("  same, alloc_rule=mse", "aciq4", dict(alloc_rule="mse")),
]


def load_model(name: str, seed: int) -> torch.nn.Module:
    if name == "digits_cnn":
        return datasets.train_digits_cnn(seed=seed).eval()
    from qpasses import zoo
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = zoo.MobileNetV2Like()
    return datasets.train_classifier(model, epochs=15, lr=0.01, seed=seed, cache_key="mbv2_digits_aciq",
                                     weight_decay=1e-4).eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--bits", default="4/4,4/3,3/4,3/3", help="comma-separated W/A pairs")
    p.add_argument("--model", default="digits_cnn", choices=["digits_cnn", "mobilenetv2"])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    pairs = [tuple(int(v) for v in s.split("/")) for s in a.bits.split(",")]
    x, y = datasets.load_digits_tensors("test")
    calib = datasets.calib_batches()
    acc = {(r[0], pr): [] for r in ROWS for pr in pairs}
    fp32 = []
    for seed in range(a.seeds):
        model = load_model(a.model, seed)
        gm = qpasses.trace(model, (calib[0],))
        fp32.append(datasets.accuracy(gm, x, y))
        for name, recipe, opts in ROWS:
            for wb, ab in pairs:
                q = qpasses.PassManager(recipe, w_bits=wb, a_bits=ab, **opts).run(gm, data=calib)
                acc[(name, (wb, ab))].append(datasets.accuracy(q, x, y))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"{a.model} on scikit-learn digits (test split, {x.shape[0]} images), mean of {a.seeds} trained "
          f"models; FP32 accuracy {mean(fp32):.2f} %")
    head = " | ".join(f"{f'W{wb}A{ab}':>5s}" for wb, ab in pairs)
    print(f"| {'method':40s} | {head} |")
    print(f"|{'-' * 42}|" + "|".join("-" * 7 for _ in pairs) + "|")
    for name, _, _ in ROWS:
        cells = " | ".join(f"{mean(acc[(name, pr)]):5.2f}" for pr in pairs)
        print(f"| {name:40s} | {cells} |")


if __name__ == "__main__":
    main()
