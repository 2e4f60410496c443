"""Shared fixtures: small models, both graph levels, randomised BatchNorm statistics."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("TRITON_INTERPRET", "1")
torch.manual_seed(0)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _is_act_fake_quant(gm, n) -> bool:
    from qpasses.numerics import FakeQuantize
    src = n.args[0] if n.args else None
    return isinstance(gm.get_submodule(n.target), FakeQuantize) and not (
        isinstance(src, torch.fx.Node) and src.op == "get_attr")


def duplicate_act_fake_quants(gm: torch.fx.GraphModule) -> int:
    """Put a copy of every activation FakeQuantize right after it (a redundant Q/DQ pair for the
    clean-up rules to remove); recompiles ``gm`` and returns how many were duplicated."""
    import copy
    count = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and _is_act_fake_quant(gm, n):
            gm.add_submodule(n.target + "_dup", copy.deepcopy(gm.get_submodule(n.target)))
            with gm.graph.inserting_after(n):
                d = gm.graph.call_module(n.target + "_dup", (n,))
            n.replace_all_uses_with(d)
            d.args = (n,)
            count += 1
    gm.recompile()
    return count


@pytest.fixture(params=["fx", "export"])
def level(request):
    """Run a test on both graph levels: symbolic-traced (module calls) and torch.export (aten)."""
    return request.param


def pytest_collection_modifyitems(config, items):
    if os.environ.get("QPASSES_FAST"):
        skip = pytest.mark.skip(reason="QPASSES_FAST=1 skips slow tests")
        for it in items:
            if "slow" in it.keywords:
                it.add_marker(skip)
