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
    from qpasses.qnodes import quantizer_module
    src = n.args[0] if n.args else None
    return isinstance(quantizer_module(gm, n, None), FakeQuantize) and not (
        isinstance(src, torch.fx.Node) and src.op == "get_attr")


def duplicate_act_fake_quants(gm: torch.fx.GraphModule) -> int:
    """Put a copy of every activation FakeQuantize right after it (a redundant Q/DQ pair for the
    clean-up rules to remove); recompiles ``gm`` and returns how many were duplicated."""
    import copy
    from qpasses.context import RewriteContext
    from qpasses.qnodes import holder_target, insert_quantizer
    rc = RewriteContext(gm)
    count = 0
    for n in list(gm.graph.nodes):
        if _is_act_fake_quant(gm, n):
            t = holder_target(n)
            gm.add_submodule(t + "_dup", copy.deepcopy(gm.get_submodule(t)))
            users = list(n.users)
            d = insert_quantizer(rc, n, t + "_dup", after=n)
            for u in users:
                u.replace_input_with(n, d)
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


# ----------------------------------------------------------------------------- two gloo processes

def free_port() -> int:
    """A free TCP port on localhost, for a process group's rendezvous."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def spawn_two(worker, out_dir, what: str, timeout: float = 240) -> list:
    """Run ``worker(rank, 2, port, out_dir)`` in two spawned processes (it saves
    ``out_dir/rank{r}.pt``) and return both files' contents; fail the test after ``timeout`` s."""
    import time
    import torch.multiprocessing as mp
    ctx = mp.start_processes(worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"two-process {what} did not finish in {timeout} s")
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=False) for r in (0, 1)]
