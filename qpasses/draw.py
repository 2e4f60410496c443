"""Draw an fx graph as SVG (or HTML with inline SVG) through networkx -- no graphviz needed.

The picture reads top to bottom, in the direction data flows:

* nodes are placed in layers by longest path from the inputs, one row per layer, in graph
  order, each row centred;
* a weight (a ``get_attr`` constant) and its weight quantizer are drawn *inside* the op that
  reads them (``conv2d`` with a line ``w int8/ch``), not as separate boxes: on a ResNet-18 that
  removes two thirds of the boxes, and the row of weights that once spread the picture wide;
  ``collapse_weights=False`` draws them as nodes;
* nodes are grouped by the block they were traced in (``layer1.0``,
  ``encoder.stages.0.layers.1``: :func:`module_group`; quantizers join the op they feed), each
  group a shaded band with its name in the margin, so blocks read as blocks;
* an edge that skips rows (a residual) bows out to the right of the boxes it passes, in blue;
* colours: activation quantizers / observers orange, ops with quantized weights green, graph
  inputs / outputs blue, other ops grey.

Every quantizer is a node of the graph; an activation quantizer is a box of the picture.
"""
from __future__ import annotations

import html
from typing import Dict, List, Optional

import networkx as nx
import torch.fx as fx

from .opclasses import classify
from .qnodes import quantizer_module

__all__ = ["to_networkx", "draw_graph", "svg_of", "module_path", "module_group"]

COLOURS = {"fake_quant": "#f6a04d", "observer": "#f9d38a", "quant_op": "#6cc070", "input": "#8ab6f9",
           "output": "#8ab6f9", "op": "#e4e4e4", "const": "#f4f4f4"}


_GREY = ' fill="#333"'


def module_path(node: fx.Node) -> str:
    """The module a node was traced in: fx graphs: the called module, or the module owning a
    ``get_attr``; export graphs: the innermost recorded source module (``nn_module_stack``)."""
    if node.op in ("call_module", "get_attr") and isinstance(node.target, str):
        return node.target if node.op == "call_module" else node.target.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    entry = list(stack.values())[-1]
    path = str(entry[0] if isinstance(entry, (tuple, list)) else entry)
    return path.replace("L['self'].", "").replace("L__self___", "")


def module_group(path: str, prefix: int = 0) -> str:
    """A block-level group of a module path, after dropping its first ``prefix`` components (the
    wrapper modules every node shares): up to the second numbered component when there is one
    early (``encoder.stages.0.layers.1``, ``layer1.0``), else two components."""
    parts = [p for p in path.split(".") if p][prefix:]
    numbered = [i for i, p in enumerate(parts[:6]) if p.isdigit()]
    if numbered:
        cut = numbered[1] + 1 if len(numbered) > 1 else numbered[0] + 1
        return ".".join(parts[:cut])
    return ".".join(parts[:2])


def _groups(gm: fx.GraphModule, quantizers) -> Dict[fx.Node, str]:
    """The group of every node; quantizers and observers (inserted at the graph's root) take the
    group of the op they feed."""
    # export's own helper modules (``_guards_fn``) belong to no block
    paths = {n: ("" if n in quantizers or module_path(n).startswith("_") else module_path(n)) for n in gm.graph.nodes}
    split = [p.split(".") for p in paths.values() if p]
    prefix = 0
    if split:
        while all(len(p) > prefix + 1 and p[prefix] == split[0][prefix] for p in split):
            prefix += 1
    groups = {n: module_group(p, prefix) if p else "" for n, p in paths.items()}
    for n in reversed(list(gm.graph.nodes)):
        if not groups[n]:
            groups[n] = next((groups[u] for u in n.users if groups.get(u)), "")
    return groups


def _quantizer_label(mod) -> str:
    bits = getattr(mod, "bits", None)
    if bits is None:
        return "w q"
    per = "/ch" if getattr(mod, "axis", None) is not None else ""
    group = getattr(mod, "group_size", None)
    if group:
        per = f"/g{group}"
    return f"w int{bits}{per}"


def to_networkx(gm: fx.GraphModule, collapse_weights: bool = True) -> nx.DiGraph:
    """A DiGraph of the nodes of ``gm`` with ``label``, ``opclass``, ``kind`` (colour key),
    ``group`` (:func:`module_group`) and ``detail`` attributes.  With ``collapse_weights``,
    constants and the weight quantizers reading them become a ``detail`` line of their consumer."""
    mods = dict(gm.named_modules())
    cls_of = {n: classify(n, mods) for n in gm.graph.nodes}

    def weight_chain(n: fx.Node) -> bool:
        """A constant, or a quantizer of a constant: folded into its consumer."""
        if n.op == "get_attr":
            return all(u.op != "output" for u in n.users)
        if cls_of[n] in ("fake_quant", "observer") and n.all_input_nodes:
            return all(a.op == "get_attr" for a in n.all_input_nodes)
        return False

    hidden = {n for n in gm.graph.nodes if collapse_weights and weight_chain(n)}
    quantizers = {n for n in gm.graph.nodes if cls_of[n] in ("fake_quant", "observer")}
    # with their scale / zero-point reads (attributes of the root-level holder module)
    quantizers |= {a for n in quantizers for a in n.all_input_nodes[1:] if a.op == "get_attr"}
    groups = _groups(gm, quantizers)
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        if n in hidden:
            continue
        cls = cls_of[n]
        wq = [a for a in n.all_input_nodes if a in hidden and cls_of[a] in ("fake_quant", "observer")]
        if n.op == "placeholder":
            kind = "input"
        elif n.op == "output":
            kind = "output"
        elif n.op == "get_attr":
            kind = "const"
        elif cls in ("fake_quant", "observer") and n not in hidden:
            kind = cls
        elif n.meta.get("qpasses.quant") or wq or any(
                cls_of[a] == "fake_quant" and a.all_input_nodes
                and a.all_input_nodes[0].op == "get_attr" for a in n.all_input_nodes):
            kind = "quant_op"
        else:
            kind = "op"
        label = cls or (n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
        detail = ""
        if wq:
            detail = _quantizer_label(quantizer_module(mods, wq[0], None))
        elif collapse_weights and any(a in hidden for a in n.all_input_nodes):
            detail = "w float"
        g.add_node(n.name, label=str(label), opclass=cls, kind=kind, group=groups[n], detail=detail)
        for a in n.all_input_nodes:
            if a not in hidden:
                g.add_edge(a.name, n.name)
    return g


def _layers(g: nx.DiGraph) -> List[List[str]]:
    layer: Dict[str, int] = {}
    order = list(nx.topological_sort(g))
    for name in order:  # longest path from the inputs
        layer[name] = 1 + max((layer[p] for p in g.predecessors(name)), default=-1)
    for name in reversed(order):  # constants sit just above their first consumer
        if g.in_degree(name) == 0 and g.nodes[name].get("kind") != "input" and g.out_degree(name):
            layer[name] = max(0, min(layer[s] for s in g.successors(name)) - 1)
    rank = {n: i for i, n in enumerate(g.nodes)}
    n_layers = 1 + max(layer.values(), default=0)
    return [sorted([n for n in g.nodes if layer[n] == li], key=rank.get) for li in range(n_layers)]


def _tail(text: str, n: int) -> str:
    """``text``, or its last ``n`` characters behind an ellipsis (the end of a path says most)."""
    return text if len(text) <= n else "…" + text[-(n - 1):]


def svg_of(g: nx.DiGraph, title: str = "") -> str:
    """SVG text of a DiGraph from :func:`to_networkx` (layered top-down layout, module bands)."""
    layers = _layers(g)
    bw, bh, gx, gy, left = 150, 40, 18, 34, 130
    pos: Dict[str, tuple] = {}
    width = max((len(row) for row in layers), default=1) * (bw + gx) + gx + left + 60  # room for skip edges
    for li, row in enumerate(layers):
        row_w = len(row) * (bw + gx) - gx
        x0 = left + (width - left - 60 - row_w) / 2
        for i, name in enumerate(row):
            pos[name] = (x0 + i * (bw + gx), 40 + li * (bh + gy))
    height = 40 + len(layers) * (bh + gy) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'font-family="sans-serif" font-size="11">',
           '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="7" refY="3" orient="auto">'
           '<path d="M0,0 L7,3 L0,6 z" fill="#666"/></marker></defs>',
           f'<text x="10" y="20" font-size="14">{html.escape(title)}</text>']
    # module bands: the rows a group's nodes span, across the picture, named in the left margin
    spans: Dict[str, List[float]] = {}
    for name, (_, y) in pos.items():
        grp = g.nodes[name].get("group") or ""
        if grp:
            lo, hi = spans.get(grp, (y, y))
            spans[grp] = [min(lo, y), max(hi, y)]
    for i, (grp, (y0, y1)) in enumerate(sorted(spans.items(), key=lambda kv: kv[1][0])):
        fill = "#f3f6fb" if i % 2 == 0 else "#fbf7f0"
        out.append(f'<g><rect x="4" y="{y0 - gy / 2 + 2:.0f}" width="{width - 8:.0f}" height="{y1 - y0 + bh + gy - 4:.0f}" '
                   f'fill="{fill}" stroke="#c8cdd6" stroke-dasharray="4 3"/>'
                   f'<text x="10" y="{y0 + bh / 2 + 4:.0f}" fill="#556" font-size="12">{html.escape(_tail(grp, 18))}</text></g>')
    row_of = {name: li for li, row in enumerate(layers) for name in row}
    for k, (u, v) in enumerate(g.edges):
        (x1, y1), (x2, y2) = pos[u], pos[v]
        if row_of[v] - row_of[u] <= 1:
            out.append(f'<line x1="{x1 + bw / 2:.0f}" y1="{y1 + bh:.0f}" x2="{x2 + bw / 2:.0f}" y2="{y2:.0f}" '
                       f'stroke="#888" marker-end="url(#a)"/>')
            continue
        # a skip connection (a residual) bows out to the right of the boxes it passes, so it is
        # never hidden behind them
        bulge = max(x1, x2) + bw + 24 + 6 * (k % 4)
        out.append(f'<path d="M{x1 + bw:.0f},{y1 + bh / 2:.0f} C{bulge:.0f},{y1 + bh / 2:.0f} '
                   f'{bulge:.0f},{y2 + bh / 2:.0f} {x2 + bw:.0f},{y2 + bh / 2:.0f}" fill="none" '
                   f'stroke="#5b7fb8" stroke-width="1.5" marker-end="url(#a)"/>')
    for name, (x, y) in pos.items():
        d = g.nodes[name]
        fill = COLOURS.get(d.get("kind", "op"), COLOURS["op"])
        lines = [name[:22], str(d.get("label"))[:22]] + ([d["detail"][:22]] if d.get("detail") else [])
        tip = f'{name} ({d.get("label")})' + (f' [{d.get("group")}]' if d.get("group") else "")
        text = "".join(f'<text x="{x + bw / 2:.0f}" y="{y + 12 + 12 * i:.0f}" text-anchor="middle"'
                       f'{_GREY if i else ""}>{html.escape(t)}</text>' for i, t in enumerate(lines))
        out.append(f'<g><title>{html.escape(tip)}</title>'
                   f'<rect x="{x:.0f}" y="{y:.0f}" width="{bw}" height="{bh}" rx="6" fill="{fill}" stroke="#555"/>'
                   f'{text}</g>')
    out.append("</svg>")
    return "\n".join(out)


def draw_graph(gm: fx.GraphModule, path: Optional[str] = None, title: str = "",
               collapse_weights: bool = True) -> int:
    """Write ``gm`` as ``.svg`` or ``.html`` (inline SVG with a legend); returns the number of
    boxes drawn (every graph node, less the weights and weight quantizers drawn inside their op)."""
    g = to_networkx(gm, collapse_weights)
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
