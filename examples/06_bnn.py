"""Binarize a CNN with the ``bnn`` recipe, train it, pack it to 1-bit weights.

Run: ``python examples/06_bnn.py`` (about 10-20 s on 2 CPU cores).

Prints the recipe's report, the test accuracy of the FP32 twin and of the BNN (same
initialisation, same training loop), and checks that the 1-bit packed graph
(``torch.ops.qpasses.binary_linear``) gives the same predictions as the trained BNN.
"""
import copy

import torch

import qpasses
from qpasses import datasets, zoo
from qpasses.methods.binary.lib import clip_latent_weights, make_optimizer, pack_binary

torch.set_num_threads(1)
torch.manual_seed(0)
xtr, ytr = datasets.load_digits_tensors("train")
xte, yte = datasets.load_digits_tensors("test")

model = zoo.DigitsCNN(width=16).eval()
twin = copy.deepcopy(model)                              # the FP32 twin: same init, same training

gm = qpasses.trace(model, (xtr[:8],))
pm = qpasses.PassManager("bnn")                          # keep_first_last=True, edge_bits=8, bin_scale=True
bnn = pm.run(gm, data=list(xtr[:256].split(64)))         # calibration data for the 8-bit first/last layers
print(pm.report)

# a plain PyTorch training loop (qpasses.datasets.fit): latent float weights, STE gradients,
# latent weights clipped to [-1, 1] after each step, LSQ scales on a smaller learning rate
datasets.fit(bnn, xtr, ytr, epochs=20, lr=0.01, step_hook=clip_latent_weights, optimizer=make_optimizer(bnn, 0.01))
datasets.fit(twin, xtr, ytr, epochs=20, lr=0.01)
print(f"FP32 twin test accuracy: {datasets.accuracy(twin, xte, yte):.1f}%")
print(f"BNN       test accuracy: {datasets.accuracy(bnn, xte, yte):.1f}%")

packed = pack_binary(bnn)                                # inference graph on 1-bit packed weights
with torch.no_grad():
    same = (packed(xte).argmax(1) == bnn(xte).argmax(1)).float().mean().item()
print(f"packed 1-bit graph: {len(packed.meta['qpasses.pack_report']['pack_binary_layer'].rewritten)} layers, "
      f"same prediction on {100 * same:.1f}% of the test images, "
      f"accuracy {datasets.accuracy(packed, xte, yte):.1f}%")
