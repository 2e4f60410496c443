"""Hardware-aware mixed precision (``haq`` recipe) on the digits CNN, and reuse of the bit map.

Run: ``python examples/07_haq.py`` (about 20-40 s on 2 CPU cores).

1. DDPG search of per-layer weight bits for a model-size budget of 2.5 bits per weight on
   average (activations 8 bits); reward = accuracy on labelled held-out training images.
2. The same budget with the fast Hessian-trace (HAWQ-style) and loss-perturbation baselines.
3. Uniform precision at the widest width that fits the budget (W2A8).
4. The saved bit map applied again through ``assign_bits`` (``mixed_ptq`` recipe).
"""
import os
import tempfile

import torch

import qpasses
from qpasses import datasets

torch.set_num_threads(1)
model = datasets.train_digits_cnn()                      # ~99.4% test accuracy, cached
xtr, ytr = datasets.load_digits_tensors("train")
xte, yte = datasets.load_digits_tensors("test")
gm = qpasses.trace(model, (xtr[:8],))
data = list(xtr[:640].split(64))                         # calibration (unlabelled)
val = list(zip(xtr[640:].split(128), ytr[640:].split(128)))   # reward data (labelled, not the test set)
bits_file = os.path.join(tempfile.mkdtemp(), "haq_bits.json")

pm = qpasses.PassManager("haq", constraint="size", budget=2.5 / 8, episodes=100, val_data=val,
                         save_map=bits_file, progress=True)
q = pm.run(gm, data=data)
info = pm.report.steps[0].info
print(info["table"])
print(f"haq/ddpg: cost {info['cost']:.0f} of {info['budget']:.0f} {info['cost_unit']}, "
      f"avg {info['avg_w_bits']:.2f} weight bits, test accuracy {datasets.accuracy(q, xte, yte):.1f}%")

for method in ("hessian", "perturbation"):
    pm2 = qpasses.PassManager("haq", method=method, constraint="size", budget=2.5 / 8, val_data=val)
    q2 = pm2.run(gm, data=data)
    bits = "/".join(str(r["w_bits"]) for r in pm2.report.layers)
    print(f"{method:12s}: bits {bits}, test accuracy {datasets.accuracy(q2, xte, yte):.1f}%")

uni = qpasses.PassManager("mixed_ptq", bit_map={"*": [2, 8]}).run(gm, data=data)
print(f"uniform W2A8: test accuracy {datasets.accuracy(uni, xte, yte):.1f}%")

again = qpasses.PassManager("mixed_ptq", bit_map_file=bits_file).run(gm, data=data)
print(f"bit map reloaded from {bits_file}: test accuracy {datasets.accuracy(again, xte, yte):.1f}%")
