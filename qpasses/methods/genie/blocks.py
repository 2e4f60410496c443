"""Single-entry / single-exit blocks of an fx graph, found with networkx dominator analysis.

The data-flow graph holds the placeholders, every node computed from them and the output node;
a virtual source feeds the placeholders.  A node that dominates the output (every path from
the inputs to the output passes through it) is a *cut point*; the cut points form a chain, and
the region between two consecutive cut points is single-entry / single-exit: the earlier one
dominates it and the later one post-dominates it.  A residual block (``x -> conv -> bn -> relu
-> conv -> add(., x)``) is such a region because its skip edge keeps the inner nodes from being
cut points -- no class names involved.

:func:`find_blocks` merges consecutive regions into reconstruction blocks with at least one
weighted op each (BRECQ granularity: a residual block, or one layer of a plain chain), and
:func:`extract_block` turns a block into a standalone GraphModule ``f(entry value) -> exit value``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import networkx as nx
import torch.fx as fx

__all__ = ["Block", "dataflow_graph", "cut_points", "find_blocks", "extract_block", "sese_regions"]

_SOURCE = "__qpasses_source__"


@dataclass
class Block:
    """A single-entry / single-exit region: ``entry`` value in, ``exit`` value out, ``nodes`` inside."""
    entry: fx.Node
    exit: fx.Node
    nodes: List[fx.Node] = field(default_factory=list)

    def weighted(self, classify) -> List[fx.Node]:
        from ...opclasses import resolve_names
        w = set(resolve_names("weighted"))
        return [n for n in self.nodes if classify(n) in w]

    def __repr__(self) -> str:
        return f"Block({self.entry.name} -> {self.exit.name}, {len(self.nodes)} nodes)"


def dataflow_graph(graph: fx.Graph) -> nx.DiGraph:
    """Nodes that depend on an input (plus the output node and a virtual source), with use-def edges."""
    g = nx.DiGraph()
    g.add_node(_SOURCE)
    live: Set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            live.add(n)
            g.add_edge(_SOURCE, n)
            continue
        ins = [a for a in n.all_input_nodes if a in live]
        if ins or n.op == "output":
            live.add(n)
            g.add_node(n)
            for a in ins:
                g.add_edge(a, n)
    return g


def cut_points(graph: fx.Graph, g: Optional[nx.DiGraph] = None) -> List[fx.Node]:
    """The dominator chain of the output node, inputs first (the virtual source excluded)."""
    g = g if g is not None else dataflow_graph(graph)
    out = [n for n in graph.nodes if n.op == "output"][0]
    idom = nx.immediate_dominators(g, _SOURCE)
    chain = []
    n = out
    while n != _SOURCE:
        chain.append(n)
        n = idom[n]
    return chain[::-1]


def sese_regions(graph: fx.Graph) -> List[Block]:
    """Regions between consecutive cut points (each single-entry / single-exit)."""
    g = dataflow_graph(graph)
    chain = cut_points(graph, g)
    order = {n: i for i, n in enumerate(graph.nodes)}
    idom = nx.immediate_dominators(g, _SOURCE)
    # dominator tree: the nodes a cut point dominates, minus those dominated by the next cut point
    tree = nx.DiGraph()
    for n, d in idom.items():
        if n != d:
            tree.add_edge(d, n)
    regions = []
    for a, b in zip(chain, chain[1:]):
        if a is _SOURCE or b.op == "output":
            continue
        inside = nx.descendants(tree, a) - nx.descendants(tree, b)
        nodes = sorted((n for n in inside if n is not _SOURCE and isinstance(n, fx.Node)), key=order.__getitem__)
        regions.append(Block(a, b, nodes))
    return regions


def find_blocks(gm: fx.GraphModule, min_weighted: int = 1) -> List[Block]:
    """Reconstruction blocks: consecutive SESE regions merged until each holds ``min_weighted`` weighted ops.

    Regions before the first weighted op join the first block, regions after the last one the
    last block.  A graph with several inputs works (the entry of the first block is then the
    first cut point after them); graphs without a cut point give no blocks.
    """
    from ...matcher import Matcher
    m = Matcher(gm)
    regions = sese_regions(gm.graph)
    blocks: List[Block] = []
    cur: Optional[Block] = None
    for r in regions:
        nw = len(r.weighted(m.classify))
        if cur is None:
            cur = Block(r.entry, r.exit, list(r.nodes))
            continue
        if nw and len(cur.weighted(m.classify)) >= min_weighted:
            blocks.append(cur)
            cur = Block(r.entry, r.exit, list(r.nodes))
        else:
            cur.exit = r.exit
            cur.nodes.extend(r.nodes)
    if cur is not None:
        if blocks and not cur.weighted(m.classify):
            blocks[-1].exit = cur.exit
            blocks[-1].nodes.extend(cur.nodes)
        else:
            blocks.append(cur)
    return [b for b in blocks if b.weighted(m.classify)]


def extract_block(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
    """A GraphModule ``f(entry) -> exit`` computing the block with ``gm``'s own modules and tensors.

    Constant inputs of the block (``get_attr`` nodes and what is computed from them alone, e.g. a
    weight fake-quantizer) are copied in; the submodules are shared with ``gm``, so training the
    extracted block trains ``gm``.
    """
    inside = set(block.nodes)
    live: Set[fx.Node] = set()  # nodes computed from the graph inputs: only the entry may be read from outside
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in live for a in n.all_input_nodes):
            live.add(n)
    g = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    x = g.placeholder("x")
    env[block.entry] = x

    def const(n: fx.Node) -> fx.Node:
        # copy a constant producer (no dependence on the graph inputs), iteratively
        stack = [n]
        while stack:
            top = stack[-1]
            if top in env:
                stack.pop()
                continue
            if top in live:
                raise ValueError(f"block {block} is not single-entry: it reads {top.name}, computed from the "
                                 f"graph inputs outside the block")
            missing = [a for a in top.all_input_nodes if a not in env]
            if missing:
                stack.extend(missing)
                continue
            env[top] = g.node_copy(top, lambda a: env[a])
            stack.pop()
        return env[n]

    for n in block.nodes:
        for a in n.all_input_nodes:
            if a not in env:
                if a in inside:
                    raise ValueError(f"block nodes are not in topological order at {a.name}")
                const(a)
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[block.exit])
    sub = fx.GraphModule(gm, g)
    return sub
