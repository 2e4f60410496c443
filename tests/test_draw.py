"""``qpasses.draw``: the picture of a ResNet-18-sized graph stays readable (narrow, top-down,
weights inside their ops, blocks grouped, residuals visible)."""
from __future__ import annotations

import re

import pytest
import torch

import qpasses
from qpasses.draw import draw_graph, module_group, svg_of, to_networkx

transformers = pytest.importorskip("transformers")


class _Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(pixel_values=x).logits


@pytest.fixture(scope="module")
def resnet18_q():
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                    embedding_size=64, num_labels=10)
    m = _Logits(transformers.ResNetForImageClassification(cfg).eval())
    x = torch.randn(2, 3, 32, 32)
    gm = qpasses.trace(m, (x,))
    return qpasses.PassManager("ptq_int8", progress=False).run(gm, data=[(x,)])


def test_resnet18_picture_is_narrow_and_grouped(resnet18_q, tmp_path):
    q = resnet18_q
    n_nodes = len(q.graph.nodes)
    g = to_networkx(q)
    # weights and weight quantizers are drawn inside their op: far fewer boxes than nodes
    assert g.number_of_nodes() < 0.6 * n_nodes
    convs = [d for _, d in g.nodes(data=True) if d["opclass"] == "conv2d"]
    assert len(convs) == 20 and all(d["detail"] == "w int8/ch" and d["kind"] == "quant_op" for d in convs)
    # one band per residual block (4 stages x 2 blocks), plus the stem and the pooler
    groups = {d["group"] for _, d in g.nodes(data=True) if d["group"]}
    blocks = {grp for grp in groups if re.search(r"stages\.\d\.layers\.\d$", grp)}
    assert len(blocks) == 8, groups
    # activation quantizers sit in the block of the op they feed
    act = [d for _, d in g.nodes(data=True) if d["kind"] == "fake_quant"]
    assert act and all(d["group"] for d in act)
    path = tmp_path / "r18.svg"
    boxes = draw_graph(q, str(path))
    svg = path.read_text()
    width = float(re.search(r'width="(\d+)"', svg).group(1))
    height = float(re.search(r'height="(\d+)"', svg).group(1))
    assert boxes == g.number_of_nodes()
    assert width <= 800 and height > 4 * width          # reads top to bottom, a few columns wide
    # every residual add has an edge that skips rows, drawn as a curve beside the boxes
    adds = [n for n, d in g.nodes(data=True) if d["opclass"] == "add"]
    assert len(adds) == 8 and svg.count('<path d="M') >= 8


def test_collapse_weights_off_draws_every_node(resnet18_q):
    assert to_networkx(resnet18_q, collapse_weights=False).number_of_nodes() == len(resnet18_q.graph.nodes)
    assert "<svg" in svg_of(to_networkx(resnet18_q, collapse_weights=False))


@pytest.mark.parametrize("path,prefix,group", [
    ("layer1.0.conv1", 0, "layer1.0"),
    ("m.resnet.encoder.stages.2.layers.1.layer.0.convolution", 1, "resnet.encoder.stages.2.layers.1"),
    ("encoder.layer", 0, "encoder.layer"),
    ("fc", 0, "fc"),
])
def test_module_group(path, prefix, group):
    assert module_group(path, prefix) == group
