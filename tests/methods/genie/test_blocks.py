"""Single-entry / single-exit blocks from dominator analysis (qpasses.methods.genie.blocks)."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import qpasses
from qpasses.matcher import Matcher
from qpasses.methods.genie.blocks import cut_points, extract_block, find_blocks, sese_regions
from qpasses.zoo import DigitsCNN, ResNetLike, example_input
from qpasses.qnodes import quantizer_module

torch.set_num_threads(1)


class _Record(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        r = super().run_node(n)
        self.values[n] = r
        return r


def _values(gm, x):
    rec = _Record(gm)
    with torch.no_grad():
        rec.run(x)
    return rec.values


def test_residual_blocks_found_without_names():
    torch.manual_seed(0)
    m = ResNetLike().eval()
    x = example_input("resnet")
    gm = qpasses.trace(m, (x,))
    blocks = find_blocks(gm)
    mt = Matcher(gm)
    adds = [b for b in blocks if any(mt.classify(n) == "add" for n in b.nodes)]
    n_adds = sum(1 for n in gm.graph.nodes if mt.classify(n) == "add")
    assert n_adds >= 2 and len(adds) == n_adds       # every residual add closes its own block
    for b in adds:
        add = [n for n in b.nodes if mt.classify(n) == "add"][0]
        after = b.nodes[b.nodes.index(add) + 1:]
        assert not any(mt.classify(n) in ("conv2d", "linear") for n in after)  # the add ends its block's compute
        assert len(b.weighted(mt.classify)) >= 2     # the convs of the residual branch stay together
    # every weighted op is in exactly one block
    w_all = [n for n in gm.graph.nodes if mt.classify(n) in ("conv2d", "linear")]
    w_blocks = [n for b in blocks for n in b.weighted(mt.classify)]
    assert sorted(n.name for n in w_all) == sorted(n.name for n in w_blocks)


@pytest.mark.parametrize("name", ["resnet", "digits_cnn"])
def test_extracted_blocks_compute_the_same(name):
    torch.manual_seed(0)
    m = (ResNetLike() if name == "resnet" else DigitsCNN()).eval()
    x = example_input(name)
    gm = qpasses.trace(m, (x,))
    vals = _values(gm, x)
    for b in find_blocks(gm):
        sub = extract_block(gm, b)
        with torch.no_grad():
            assert torch.allclose(sub(vals[b.entry]), vals[b.exit], atol=1e-6)
        # the block shares gm's modules (training it trains gm)
        for n in sub.graph.nodes:
            if n.op == "call_module":
                assert quantizer_module(sub, n, None) is quantizer_module(gm, n, None)


def test_plain_chain_one_weighted_op_per_block():
    gm = qpasses.trace(DigitsCNN().eval(), (torch.randn(2, 1, 8, 8),))
    mt = Matcher(gm)
    blocks = find_blocks(gm)
    assert [len(b.weighted(mt.classify)) for b in blocks] == [1, 1, 1, 1]


def test_cut_points_and_sese_property():
    class Diamond(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(4, 4)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.c(self.b(h) + h * 2)

    gm = qpasses.trace(Diamond(), (torch.randn(2, 4),))
    names = [n.name for n in cut_points(gm.graph)]
    assert names[0] == "x" and "relu" in names and "add" in names and "b" not in names and "mul" not in names
    regions = sese_regions(gm.graph)
    inner = [r for r in regions if r.entry.name == "relu"][0]
    assert {n.name for n in inner.nodes} == {"b", "mul", "add"}
    # single exit: nothing inside except the exit is used outside
    inside = set(inner.nodes)
    for n in inner.nodes:
        if n is not inner.exit:
            assert all(u in inside for u in n.users)


def test_extract_rejects_non_sese():
    gm = qpasses.trace(DigitsCNN().eval(), (torch.randn(2, 1, 8, 8),))
    blocks = find_blocks(gm)
    from qpasses.methods.genie.blocks import Block
    bad = Block(blocks[1].entry, blocks[1].exit, blocks[1].nodes[1:])  # entry no longer feeds the first node
    with pytest.raises(ValueError):
        extract_block(gm, bad)
