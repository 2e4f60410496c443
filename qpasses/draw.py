"""Draw an fx graph as SVG (or HTML with inline SVG) through networkx -- no graphviz needed.

Nodes are placed in layers by longest path from the inputs (constants just above their
first consumer), one row per layer, in graph order; quantized nodes are coloured: fake quantization /
observers orange, weighted ops reading quantized weights green, other ops grey.  Every
quantizer is a node of the graph, so it is a node of the picture.
"""
from __future__ import annotations

import html
from typing import Dict, Optional

import networkx as nx
import torch.fx as fx

from .ops import classify

__all__ = ["to_networkx", "draw_graph", "svg_of"]

COLOURS = {"fake_quant": "#f6a04d", "observer": "#f9d38a", "quant_op": "#6cc070", "input": "#8ab6f9",
           "output": "#8ab6f9", "op": "#e4e4e4", "const": "#f4f4f4"}


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph of the nodes of ``gm`` with ``label``, ``opclass`` and ``kind`` (colour key) attributes."""
    mods = dict(gm.named_modules())
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        cls = classify(n, mods)
        if n.op == "placeholder":
            kind = "input"
        elif n.op == "output":
            kind = "output"
        elif n.op == "get_attr":
            kind = "const"
        elif cls in ("fake_quant", "observer"):
            kind = cls
        elif n.meta.get("qpasses.quant") or any(
                a.op == "call_module" and classify(a, mods) == "fake_quant" for a in n.all_input_nodes):
            kind = "quant_op"
        else:
            kind = "op"
        label = cls or (n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
        g.add_node(n.name, label=str(label), opclass=cls, kind=kind)
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g


def svg_of(g: nx.DiGraph, title: str = "") -> str:
    """SVG text of a DiGraph from :func:`to_networkx` (layered top-down layout)."""
    layer: Dict[str, int] = {}
    order = list(nx.topological_sort(g))
    for name in order:  # longest path from the inputs
        preds = list(g.predecessors(name))
        layer[name] = 1 + max((layer[p] for p in preds), default=-1)
    for name in reversed(order):  # constants sit just above their first consumer
        if g.in_degree(name) == 0 and g.nodes[name].get("kind") != "input" and g.out_degree(name):
            layer[name] = max(0, min(layer[s] for s in g.successors(name)) - 1)
    rank = {n: i for i, n in enumerate(g.nodes)}
    n_layers = 1 + max(layer.values(), default=0)
    layers = [sorted([n for n in g.nodes if layer[n] == li], key=rank.get) for li in range(n_layers)]
    bw, bh, gx, gy = 150, 34, 18, 46
    pos: Dict[str, tuple] = {}
    width = max((len(l) for l in layers), default=1) * (bw + gx) + gx
    for li, row in enumerate(layers):
        row_w = len(row) * (bw + gx) - gx
        x0 = (width - row_w) / 2
        for i, name in enumerate(row):
            pos[name] = (x0 + i * (bw + gx), 40 + li * (bh + gy))
    height = 40 + len(layers) * (bh + gy) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'font-family="sans-serif" font-size="11">',
           '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="7" refY="3" orient="auto">'
           '<path d="M0,0 L7,3 L0,6 z" fill="#666"/></marker></defs>',
           f'<text x="10" y="20" font-size="14">{html.escape(title)}</text>']
    for u, v in g.edges:
        (x1, y1), (x2, y2) = pos[u], pos[v]
        out.append(f'<line x1="{x1 + bw / 2:.0f}" y1="{y1 + bh:.0f}" x2="{x2 + bw / 2:.0f}" y2="{y2:.0f}" '
                   f'stroke="#888" marker-end="url(#a)"/>')
    for name, (x, y) in pos.items():
        d = g.nodes[name]
        fill = COLOURS.get(d.get("kind", "op"), COLOURS["op"])
        out.append(f'<g><title>{html.escape(name)} ({html.escape(str(d.get("label")))})</title>'
                   f'<rect x="{x:.0f}" y="{y:.0f}" width="{bw}" height="{bh}" rx="6" fill="{fill}" stroke="#555"/>'
                   f'<text x="{x + bw / 2:.0f}" y="{y + 14:.0f}" text-anchor="middle">{html.escape(name[:22])}</text>'
                   f'<text x="{x + bw / 2:.0f}" y="{y + 27:.0f}" text-anchor="middle" fill="#333">'
                   f'{html.escape(str(d.get("label"))[:22])}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


def draw_graph(gm: fx.GraphModule, path: Optional[str] = None, title: str = "") -> int:
    """Write ``gm`` as ``.svg`` or ``.html`` (inline SVG with a legend); returns the number of nodes."""
    g = to_networkx(gm)
    svg = svg_of(g, title)
    if path is not None:
        if str(path).endswith(".html"):
            legend = "".join(f'<span style="background:{c};padding:2px 8px;margin:4px;border:1px solid #555">'
                             f'{k}</span>' for k, c in COLOURS.items())
            text = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
                    f"<body><p>{legend}</p>{svg}</body></html>")
        else:
            text = svg
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return g.number_of_nodes()
