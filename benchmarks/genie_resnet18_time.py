"""Wall time of the ``genie`` recipe on a ResNet-18-sized model (224x224 RGB, 11.7 M parameters).

The model is the ResNet-18 layout (7x7/2 stem, max-pool, four stages of two BasicBlocks,
64-512 channels, 1000 classes), defined here; its BatchNorm statistics come from a few
training-mode passes over smoothed noise (no weights are downloaded: the timing does not
depend on them).  Prints the time of each data step and the total.

    python benchmarks/genie_resnet18_time.py                 # recipe defaults (preset=fast)
    python benchmarks/genie_resnet18_time.py samples=16 distill_iters=10 recon_iters=10
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import qpasses


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        chans, layers, cin = [64, 128, 256, 512], [], 64
        for i, c in enumerate(chans):
            layers += [Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1)]
            cin = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(self.layers(x).mean((2, 3)))


def model_with_bn_stats(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = ResNet18()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None            # cumulative average over the passes
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(F.avg_pool2d(torch.randn(8, 3, 228, 228), 5, 1) * 2)
    return m.eval()


def main(argv) -> None:
    opts = {}
    for a in argv:
        k, v = a.split("=", 1)
        opts[k] = v if k in ("preset", "distill_mode") else float(v) if "." in v else int(v)
    model = model_with_bn_stats()
    gm = qpasses.trace(model, (torch.randn(1, 3, 224, 224),))
    print(f"torch threads: {torch.get_num_threads()}, options: {opts or 'recipe defaults'}", flush=True)
    pm = qpasses.PassManager("genie", **opts)
    t = time.perf_counter()
    q = pm.run(gm)
    total = time.perf_counter() - t
    for s in pm.report.steps:
        keep = {k: v for k, v in s.info.items() if k in ("samples", "iterations", "blocks", "batches")}
        print(f"  {s.name:22s} {s.seconds:8.1f} s  {keep}")
    print(f"total genie run: {total:.1f} s", flush=True)
    with torch.no_grad():
        x = torch.randn(2, 3, 224, 224)
        print("finite output:", bool(torch.isfinite(q(x)).all()))


if __name__ == "__main__":
    main(sys.argv[1:])
