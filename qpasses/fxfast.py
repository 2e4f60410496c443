"""Faster equivalents of torch.fx / torch.nn operations the engine performs thousands of times.

* :func:`new_node` is ``Graph.create_node`` without its pytree walk over the arguments.
  In torch 2.13 ``create_node`` flattens ``(args, kwargs)`` with ``torch.utils._pytree``
  only to warn about raw ``SymInt``/``SymFloat``/``SymBool`` arguments; that walk is about
  two thirds of its cost (~10 of ~17 us a node).  For the flat arguments actions build
  (nodes, numbers, strings, tuples of them) a type check does the same job; anything else
  goes through ``create_node`` itself, so the warning is still given where it applies.
* :func:`copy_graph` is ``copy.deepcopy(graph)`` (``Graph.__deepcopy__``) with its nodes
  made by :func:`new_node`.
* :func:`module_table` is ``dict(root.named_modules())`` without a generator frame per module.
* :func:`graph_shape` / :func:`same_shape` tell whether a graph's generated code would
  change (nodes, names, ops, targets, arguments, annotations), so a stage that only swapped
  modules skips ``recompile()`` and ``lint()``.
* :func:`lint` is ``Graph.lint()`` with each module path resolved once.
* :func:`recompile` is ``GraphModule.recompile()`` without fx re-filing every node in the
  graph's ``find_nodes`` table twice.
* :func:`set_submodule` is ``root.set_submodule(path, module)`` for an existing submodule name,
  finding the parent in a module table when one is given.
* :func:`delete_unused_submodules` is ``GraphModule.delete_all_unused_submodules()`` in
  linear time.

:func:`new_node` and :func:`copy_graph` keep every invariant ``create_node`` keeps (unique names, insert point, the
``find_nodes`` side table, node count, create-node hooks of the owning module); when the
private attributes they rely on are missing (another torch version) they fall back to
the public API.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.nn.modules import module as _nn_module
from torch.utils._pytree import TreeSpec as _TreeSpec

__all__ = ["new_node", "copy_graph", "module_table", "note_module", "delete_unused_submodules", "graph_shape", "same_shape",
           "lint", "recompile", "set_submodule"]

# argument types create_node's check can never warn about (exact types: SymInt and friends
# are not subclasses of these, and a subclass of one of them goes the slow way)
_PLAIN = frozenset({fx.Node, int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                    torch.memory_format, type(Ellipsis), slice})
_SEQ = frozenset({tuple, list, immutable_list})

_set = object.__setattr__

_GRAPH_ATTRS = ("_graph_namespace", "_insert", "_find_nodes_lookup_table", "_len")


def _plain(values) -> bool:
    """True when ``values`` holds only plain leaves or flat tuples/lists of them."""
    for a in values:
        t = type(a)
        if t in _PLAIN:
            continue
        if t in _SEQ:
            for b in a:
                if type(b) not in _PLAIN:
                    return False
            continue
        return False
    return True


def _fast_ok(graph: fx.Graph) -> bool:
    d = graph.__dict__
    return all(k in d for k in _GRAPH_ATTRS)


_TARGET_TO_STR = fx.Graph._target_to_str
_FN_NAMES: Dict[str, str] = {}


def _candidate_name(graph: fx.Graph, target: Any) -> str:
    """``graph._target_to_str(target)``, the default node name, without its regexes where they are no-ops.

    For a module path or attribute name (``"blocks.0.conv1.weight"``) with no upper-case
    letter and no ``__magic__`` form that name is the string itself; function names are
    few and memoised.
    """
    if type(graph)._target_to_str is not _TARGET_TO_STR:  # a Graph subclass names nodes its own way
        return graph._target_to_str(target)
    if type(target) is str:
        if target.isascii() and target.lower() == target and not (target.startswith("__") and target.endswith("__")):
            return target
        return graph._target_to_str(target)
    name = _FN_NAMES.get(target.__name__)
    if name is None:
        name = graph._target_to_str(target)
        if len(_FN_NAMES) < 4096:
            _FN_NAMES[target.__name__] = name
    return name


def new_node(graph: fx.Graph, op: str, target: Any, args: Optional[Tuple[Any, ...]] = None,
             kwargs: Optional[Dict[str, Any]] = None, name: Optional[str] = None,
             type_expr: Any = None) -> fx.Node:
    """``graph.create_node(op, target, args, kwargs, name, type_expr)``, faster for flat arguments.

    The node is inserted at the graph's current insert point (``inserting_before`` /
    ``inserting_after`` apply) and the owning module's create-node hooks run, exactly as
    with ``create_node``.
    """
    if not args:
        args = ()
    if not (type(args) is tuple and _plain(args) and (not kwargs or (type(kwargs) in (dict, immutable_dict)
                                                                    and _plain(kwargs.values())))
            and _fast_ok(graph) and (type(target) is str or callable(target))):
        return graph.create_node(op, target, args, kwargs, name, type_expr)
    if not kwargs:
        kwargs = immutable_dict()
    ns = graph._graph_namespace
    name = ns.create_name(name if name is not None else _candidate_name(graph, target), None)
    n = fx.Node(graph, name, op, target, args, kwargs, type_expr)
    owner = graph.owning_module
    if owner is not None:
        for f in getattr(owner, "_create_node_hooks", None) or ():
            f(n)
    ns.associate_name_with_obj(name, n)
    graph._insert(n)
    graph._find_nodes_lookup_table.insert(n)
    graph._len += 1
    return n


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` as ``copy.deepcopy(graph)`` makes it: same names, targets, types, meta
    (copied one level deep), code generator; new nodes, not owned by any module."""
    if not _fast_ok(graph):
        return copy.deepcopy(graph)
    g = fx.Graph(tracer_cls=graph._tracer_cls)
    env: Dict[fx.Node, fx.Node] = {}
    remap = env.__getitem__
    map_arg = fx.node.map_arg
    out = None
    for node in graph.nodes:
        if node.op == "output":
            out = node
            break
        args = map_arg(node.args, remap) if node._input_nodes else node.args
        kwargs = map_arg(node.kwargs, remap) if node._input_nodes and node.kwargs else node.kwargs
        n = new_node(g, node.op, node.target, args, kwargs, node.name, node.type)
        # Node.__setattr__ re-files the node in the find_nodes table on every assignment;
        # meta is not part of that table's key
        meta = node.meta
        _set(n, "meta", meta.copy() if type(meta) is dict else copy.copy(meta))
        env[node] = n
    g._codegen = copy_codegen(graph._codegen)
    if out is not None:
        new_out = g.output(map_arg(out.args[0], remap), type_expr=getattr(out, "type", None))
        new_out.meta = copy.copy(out.meta)
    return g


def copy_codegen(codegen: Any) -> Any:
    """``copy.deepcopy(codegen)`` that shares the pytree specs of an exported graph's code
    generator (immutable: frozen dataclasses).  Deep-copying them rebuilds their leaf specs
    through the deprecated ``LeafSpec`` class, which makes torch warn (a FutureWarning) on
    every copy of an exported graph."""
    memo: Dict[int, Any] = {}
    info = getattr(codegen, "pytree_info", None)
    for spec in (getattr(info, "in_spec", None), getattr(info, "out_spec", None)):
        if isinstance(spec, _TreeSpec):
            memo[id(spec)] = spec
    return copy.deepcopy(codegen, memo)


def module_table(root: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """``dict(root.named_modules())``: same names, same order, a module reachable twice listed once
    (under its first name in depth-first pre-order)."""
    if type(root).named_modules is not torch.nn.Module.named_modules:
        return dict(root.named_modules())
    out: Dict[str, torch.nn.Module] = {}
    seen = set()
    stack = [("", root)]
    while stack:
        prefix, mod = stack.pop()
        if id(mod) in seen:
            continue
        if type(mod).named_modules is not torch.nn.Module.named_modules:
            for k, m in mod.named_modules(prefix=prefix):  # a class with its own traversal
                if id(m) not in seen:
                    seen.add(id(m))
                    out[k] = m
            continue
        seen.add(id(mod))
        out[prefix] = mod
        children = [(f"{prefix}.{k}" if prefix else k, m) for k, m in mod._modules.items() if m is not None]
        stack.extend(reversed(children))
    return out


def delete_unused_submodules(gm: fx.GraphModule) -> int:
    """``gm.delete_all_unused_submodules()`` in one pass over the graph and the module tree.

    A submodule is kept when a ``call_module`` / ``get_attr`` node names it, something below
    it, or something above it (a called module keeps its whole subtree: its ``forward`` may use
    it). torch.fx's version checks every module against every node's target and takes seconds
    on a 10k-node graph. Returns how many submodules were removed from their parents.
    """
    keep_subtree = set()
    on_path = set()
    for n in gm.graph.nodes:
        if n.op == "call_module" or n.op == "get_attr":
            t = n.target
            keep_subtree.add(t)
            while True:
                on_path.add(t)
                i = t.rfind(".")
                if i < 0:
                    break
                t = t[:i]
    removed = 0
    stack = [("", gm)]
    while stack:
        path, mod = stack.pop()
        for name, child in list(mod._modules.items()):
            p = f"{path}.{name}" if path else name
            if p in keep_subtree or child is None:
                continue
            if p not in on_path:
                del mod._modules[name]
                removed += 1
                continue
            stack.append((p, child))
    return removed


def graph_shape(graph: fx.Graph) -> list:
    """What ``graph.python_code()`` reads of each node, by reference (cheap: no copies).

    Node arguments are immutable (fx replaces the tuple on every change), so holding the
    objects is a snapshot."""
    return [(n, n.name, n.op, n.target, n._args, n._kwargs, n.type) for n in graph.nodes]


def same_shape(before: list, after: list) -> bool:
    """Whether two :func:`graph_shape` snapshots generate the same code."""
    if len(before) != len(after) or len(before) == 0:
        return len(before) == len(after)
    for a, b in zip(before, after):
        if a is b:
            continue
        for x, y in zip(a, b):
            if x is y:
                continue
            try:
                if not bool(x == y):
                    return False
            except Exception:  # noqa: BLE001 - e.g. a tensor argument: count it as changed
                return False
    return True


def lint(graph: fx.Graph) -> None:
    """``graph.lint()``: the same checks and errors, with each module path resolved once.

    torch.fx walks every ``call_module`` / ``get_attr`` target from the root with one
    ``getattr`` per atom (``blocks.0.conv1``: three), through ``nn.Module.__getattr__``; here
    a target's parent path is looked up in a table of the paths already resolved, so a graph
    of thousands of module calls costs one attribute lookup per node.  Graphs not owned by
    a module, or with private attributes this relies on missing, get ``graph.lint()``.
    """
    if not _fast_ok(graph) or graph.owning_module is None:
        return graph.lint()
    legal = fx.graph._legal_ops
    side = graph._find_nodes_lookup_table
    seen_names = set()
    seen_values = set()
    for node in graph.nodes:
        if node.op not in legal:
            raise RuntimeError(f"Node {node} had unknown opcode {node.op}!")
        if node.graph is not graph:
            raise RuntimeError(f"Node '{node}' does not belong to this Graph!")
        if node not in side:
            raise RuntimeError(f"Node '{node}' is not added to the side table")
        for arg in node._input_nodes:
            if arg.graph is not graph or arg not in seen_values:
                return graph.lint()  # the error, worded by torch.fx
        seen_values.add(node)
        if node.name in seen_names:
            raise RuntimeError(f"Node redefined name {node.name}!")
        seen_names.add(node.name)
    root = graph.owning_module
    resolved: Dict[str, Any] = {"": root}
    for node in graph.nodes:
        op, target = node.op, node.target
        if op == "call_function":
            if not callable(target):
                return graph.lint()
            continue
        if not isinstance(target, str):
            return graph.lint()
        if op != "get_attr" and op != "call_module":
            continue
        parent, _, atom = target.rpartition(".")
        owner = resolved.get(parent)
        if owner is None:
            owner = root
            path = ""
            for part in parent.split(".") if parent else ():
                path = f"{path}.{part}" if path else part
                nxt = resolved.get(path)
                if nxt is None:
                    nxt = getattr(owner, part, None)
                    if nxt is None or not isinstance(nxt, torch.nn.Module):
                        return graph.lint()  # a missing attribute / a non-module on the way: torch.fx says which
                    resolved[path] = nxt
                owner = nxt
        value = getattr(owner, atom, None)
        if value is None or (op == "call_module" and not isinstance(value, torch.nn.Module)):
            return graph.lint()


def recompile(gm: fx.GraphModule):
    """``gm.recompile()``, without re-filing every node in the graph's find-nodes table twice.

    torch.fx's code generation sets ``node._repr_fn`` on every node, then back, and
    ``Node.__setattr__`` takes the node out of the graph's ``find_nodes`` side table and puts
    it back on every assignment, although ``_repr_fn`` is not part of that table's key: a
    third of ``python_code()`` on large graphs.  The table is set aside while the code is
    generated (nothing there looks nodes up in it) and put back unchanged.
    """
    graph = gm.graph
    table = graph.__dict__.get("_find_nodes_lookup_table")
    if table is None or not _fast_ok(graph):
        return gm.recompile()
    del graph.__dict__["_find_nodes_lookup_table"]
    try:
        return gm.recompile()
    finally:
        graph.__dict__["_find_nodes_lookup_table"] = table


def set_submodule(root: torch.nn.Module, path: str, mod: torch.nn.Module,
                  table: Optional[Dict[str, torch.nn.Module]] = None) -> None:
    """``root.set_submodule(path, mod)``: put ``mod`` at dotted ``path`` (its parent must exist).

    ``table``, if given, is ``dict(root.named_modules())`` to find the parent in; it is
    updated (:func:`note_module`).  Replacing an existing submodule without global
    module-registration hooks is one dict update, which is what ``nn.Module.__setattr__``
    ends in; otherwise it goes through ``setattr``.
    """
    parent_path, _, name = path.rpartition(".")
    parent = (table.get(parent_path) if table is not None else None) if parent_path else root
    if parent is None:
        parent = root.get_submodule(parent_path)
    if name in parent._modules and not getattr(_nn_module, "_global_module_registration_hooks", True):
        parent._modules[name] = mod
    else:
        setattr(parent, name, mod)
    if table is not None:
        note_module(table, path, mod)


def note_module(table: Dict[str, torch.nn.Module], path: str, mod: torch.nn.Module) -> None:
    """Record in a module table (:func:`module_table`) that ``mod`` is now at ``path``: its
    entry and its descendants' are added, and those of the module it replaced dropped."""
    old = table.get(path)
    if old is not None and old is not mod and old._modules:
        for k, m in _descendants(old):
            if table.get(f"{path}.{k}") is m:
                del table[f"{path}.{k}"]
    table[path] = mod
    if mod._modules:
        for k, m in _descendants(mod):
            table[f"{path}.{k}"] = m


_NAMED_MODULES = torch.nn.Module.named_modules


def _descendants(mod: torch.nn.Module):
    """``module_table(mod)`` without its root entry, as (relative path, module) pairs; directly
    from ``_modules`` when the children are leaves (a compact module's weight quantizer)."""
    kids = mod._modules
    if type(mod).named_modules is _NAMED_MODULES and all(
            c is None or (not c._modules and type(c).named_modules is _NAMED_MODULES) for c in kids.values()):
        seen = {id(mod)}
        out = []
        for k, c in kids.items():
            if c is not None and id(c) not in seen:
                seen.add(id(c))
                out.append((k, c))
        return out
    return [(k, m) for k, m in module_table(mod).items() if k]
