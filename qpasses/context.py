"""The rewrite context: the one way actions change a graph, and the vocabulary they share.

This module sits below the matcher, the manager and every action (it imports only torch
and :mod:`qpasses.opclasses`).  A :class:`RewriteContext` lives for one ``PassManager.run``; it

* looks modules up by target (:class:`ModuleLookup`: always the module the graph module
  holds *now*, so a module swapped by any code, a user's action included, is seen at once);
* classifies nodes, with a memo that checks itself: a ``call_module`` node's entry holds
  the module it was computed for and is recomputed when another module is found at the
  target, so there is nothing to invalidate by hand;
* counts the calls of each module, kept current through torch.fx's node-creation and
  erasure hooks and the :meth:`retarget` verb;
* tags the nodes created while a rule runs with that rule's name (provenance);
* holds the run's scratch state (shared observers, name counters): nothing of the engine
  is kept in ``gm.meta``, which holds only the user-facing records of :data:`USER_RECORDS`.

Its verbs (:meth:`add_module`, :meth:`replace_module`, :meth:`insert`, :meth:`get_attr`,
:meth:`add_param`, :meth:`replace_uses`, :meth:`replace_input`, :meth:`retarget`,
:meth:`erase`) are what actions use to change the graph; built-in and user actions get
the same guarantees and the same speed.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import RewriteError
from .frontend import make_exported_trainable
from .opclasses import OpView, _module_of, classify as _classify, holder_of, mutated_inputs

__all__ = ["PROVENANCE_KEY", "Refuse", "ModuleLookup", "RewriteContext", "copy_meta", "copy_graph_module",
           "delete_unused_submodules"]

#: node-meta entry naming the rule that created the node (a user-facing record)
PROVENANCE_KEY = "qpasses.rule"

#: the ``gm.meta`` entries qpasses writes, all records for the user (none is engine state):
#: the graph level and example inputs from ``trace``, GENIE's synthetic data set, the report of
#: the binary-packing run
USER_RECORDS = frozenset({"qpasses.level", "qpasses.example_inputs", "qpasses.synthetic_data",
                          "qpasses.pack_report"})

#: node-meta entries a node made in place of another inherits from it
_COPIED_META = ("qpasses.shape", "qpasses.dtype", "tensor_meta", "val", "nn_module_stack", "stack_trace")


class Refuse(Exception):
    """Raised by an action to decline a match; the reason goes to ``pm.report``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_ABSENT = object()


class ModuleLookup:
    """The submodules of a module by dotted path, read from the module tree on every lookup
    (``get_submodule``: a few attribute reads), so it is never stale.  Behaves as a read-only
    mapping for the lookups actions make (``get``, ``[]``, ``in``, ``values``, ``items``)."""

    def __init__(self, root: nn.Module):
        self.root = root

    def get(self, target: Any, default: Any = None) -> Any:
        if type(target) is not str and not isinstance(target, str):
            return default
        mod = self.root
        if not target:
            return mod
        for part in target.split("."):
            mod = mod._modules.get(part)   # a module's children are modules (or None)
            if mod is None:
                return default
        return mod

    def __getitem__(self, target: str) -> nn.Module:
        mod = self.get(target, _ABSENT)
        if mod is _ABSENT:
            raise KeyError(target)
        return mod

    def __contains__(self, target: Any) -> bool:
        return self.get(target, _ABSENT) is not _ABSENT

    def items(self) -> Iterator[Tuple[str, nn.Module]]:
        return iter(self.root.named_modules())

    def values(self) -> Iterator[nn.Module]:
        return (m for _, m in self.root.named_modules())

    def keys(self) -> Iterator[str]:
        return (k for k, _ in self.root.named_modules())

    def __iter__(self) -> Iterator[str]:
        return self.keys()


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    """Give ``dst`` the shape / dtype / source records of ``src`` it does not have."""
    for k in _COPIED_META:
        if k in src.meta and k not in dst.meta:
            dst.meta[k] = src.meta[k]


_ATOMS = (int, float, bool, str, type(None))
_EMPTY_CONTAINERS = (dict, OrderedDict, set)
_STATE_TABLES = ("_parameters", "_buffers", "_modules")


def _deepcopy_memo(root: nn.Module) -> Dict[int, Any]:
    """A ``copy.deepcopy`` memo that holds, up front, the copies of ``root``'s submodules, made
    by :func:`_copy_module` (what ``copy.deepcopy`` makes, with the generic machinery skipped
    where it does no work): deep-copying ``root`` with it copies only the root itself.  The
    copy is what ``copy.deepcopy(root)`` makes (``tests/test_engine.py`` pins it)."""
    memo: Dict[int, Any] = {}
    storages: Dict[Tuple[str, int], int] = {}
    for m in root.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor):
                _count_storage(v, storages)
        for table in (m._parameters, m._buffers):
            for t in table.values():
                if t is not None:
                    _count_storage(t, storages)
    for child in root.children():
        _copy_module(child, memo, storages)
    return memo


def _count_storage(t: torch.Tensor, storages: Dict[Tuple[str, int], int]) -> None:
    try:
        key = (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # a tensor without storage (subclass, meta)
        return
    storages[key] = storages.get(key, 0) + 1


_MODULE_PROTOCOL = (nn.Module.__getstate__, nn.Module.__reduce_ex__, nn.Module.__reduce__)


def _copy_module(m: nn.Module, memo: Dict[int, Any], storages: Dict[Tuple[str, int], int]) -> nn.Module:
    """``copy.deepcopy(m, memo)``, with the generic protocol's work done directly for the common
    case: a module class using ``nn.Module``'s pickling protocol (else ``copy.deepcopy``).  Like
    deepcopy it builds ``cls.__new__(cls)``, copies the state ``__getstate__`` gives and hands it
    to ``__setstate__``; tensors it can clone exactly (:func:`_copy_tensor`) are cloned, and
    everything else in the state goes through ``copy.deepcopy`` with the same memo (so what is
    shared stays shared)."""
    hit = memo.get(id(m))
    if hit is not None:
        return hit
    cls = type(m)
    if (getattr(cls, "__deepcopy__", None) is not None or isinstance(m, torch.jit.ScriptModule)
            or (cls.__getstate__, cls.__reduce_ex__, cls.__reduce__) != _MODULE_PROTOCOL):
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    state = m.__getstate__()
    out: Dict[str, Any] = {}
    for k, v in state.items():
        t = type(v)
        if t in _ATOMS:
            out[k] = v
        elif k in _STATE_TABLES and t in (dict, OrderedDict) and id(v) not in memo:
            table = t()
            memo[id(v)] = table
            for name, item in v.items():
                if item is None:
                    table[name] = None
                elif k == "_modules":
                    table[name] = _copy_module(item, memo, storages)
                else:
                    table[name] = _copy_tensor(item, memo, storages)
            out[k] = table
        elif t in _EMPTY_CONTAINERS and not v:
            c = memo.get(id(v))
            if c is None:
                c = memo[id(v)] = t()
            out[k] = c
        elif t is tuple and all(type(i) in _ATOMS for i in v):
            out[k] = v
        else:
            out[k] = copy.deepcopy(v, memo)
    new.__setstate__(out)
    return new


def _copy_tensor(t: torch.Tensor, memo: Dict[int, Any], storages: Dict[Tuple[str, int], int]) -> torch.Tensor:
    """``copy.deepcopy(t, memo)`` for a parameter or buffer: a clone where that is exactly what
    deepcopy gives (a plain ``nn.Parameter``: deepcopy clones its data; a plain dense tensor that
    is the only one on its storage and spans it, with no grad or attributes), else deepcopy."""
    hit = memo.get(id(t))
    if hit is not None:
        return hit
    cls = type(t)
    if cls is nn.Parameter:
        c = nn.Parameter(t.data.clone(memory_format=torch.preserve_format), t.requires_grad)
    elif (cls is torch.Tensor and t.is_leaf and t.layout == torch.strided and t.device.type in ("cpu", "cuda")
          and not t.is_quantized and not t.is_conj() and not t.is_neg() and t.grad is None and not t.__dict__
          and t.storage_offset() == 0 and t.is_contiguous()
          and t.untyped_storage().nbytes() == t.numel() * t.element_size()
          and storages.get((str(t.device), t.untyped_storage().data_ptr()), 0) == 1):
        with torch.no_grad():
            c = t.clone()
        if t.requires_grad:
            c.requires_grad_()
    else:
        return copy.deepcopy(t, memo)
    memo[id(t)] = c
    return c


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` that shares nothing mutable with it (graph, modules, parameters, hook
    tables, meta): ``copy.deepcopy``, given a memo that already holds the copies of its
    submodules (:func:`_deepcopy_memo`: about a quarter of the time deepcopy's generic protocol
    takes on them, measured in ``benchmarks/engine.py``).  A graph from ``torch.export`` keeps
    working ``train()`` / ``eval()`` methods on the copy."""
    with warnings.catch_warnings():
        # deep-copying an exported graph's pytree specs makes torch warn about a deprecated
        # spec class it builds itself; nothing the caller can act on
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
        new = copy.deepcopy(gm, _deepcopy_memo(gm))
    make_exported_trainable(new, source=gm)
    return new


def delete_unused_submodules(gm: fx.GraphModule) -> int:
    """``gm.delete_all_unused_submodules()`` in linear time; returns how many were deleted.

    The same rule as torch.fx's (a module is used when a ``call_module`` / ``get_attr`` node
    names it, a descendant of it, or an ancestor it is called through; the descendants of a
    called module are used), but fx collects the used names in a list and tests each module
    against it: quadratic, minutes on a 100k-node graph.  ``tests/test_engine.py`` pins
    that both keep the same modules."""
    used = {""}
    lookup = ModuleLookup(gm)
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr") and isinstance(n.target, str):
            parts = n.target.split(".")
            used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            if n.op == "call_module":
                sub = lookup.get(n.target)
                if sub is not None:
                    used.update(f"{n.target}.{name}" for name, _ in sub.named_modules() if name)
    doomed = [name for name, _ in gm.named_modules() if name not in used]
    for name in doomed:
        gm.delete_submodule(name)
    return len(doomed)


class RewriteContext:
    """Everything a stage's rules read and change the graph module ``gm`` through.

    Use it as a context manager (``with RewriteContext(gm, state) as rc:``): while it is
    open it follows the nodes created and erased in ``gm``'s graph (fx's node hooks), by
    whatever code.  ``state`` is the run's scratch space, shared by the stages of a run.
    """

    def __init__(self, gm: fx.GraphModule, state: Optional[Dict[str, Any]] = None):
        self.gm = gm
        self.modules = ModuleLookup(gm)
        #: the run's scratch space shared by all actions (e.g. observer sharing tables)
        self.state: Dict[str, Any] = {} if state is None else state
        self._cls: Dict[fx.Node, Tuple[Any, Optional[str]]] = {}
        self._counters: Dict[str, int] = self.state.setdefault("name_counters", {})
        self._calls: Optional[Dict[str, int]] = None
        self._mutators: Optional[Dict[fx.Node, List[fx.Node]]] = None
        self.rule: Optional[str] = None
        self._open = False

    def __enter__(self) -> "RewriteContext":
        self.gm._register_create_node_hook(self._created)
        self.gm._register_erase_node_hook(self._erased)
        self._open = True
        return self

    def __exit__(self, *exc) -> None:
        self._open = False
        self.gm._unregister_create_node_hook(self._created)
        self.gm._unregister_erase_node_hook(self._erased)

    def _created(self, node: fx.Node) -> None:
        if self.rule is not None:
            node.meta[PROVENANCE_KEY] = self.rule
        if self._calls is not None and node.op == "call_module":
            self._calls[node.target] = self._calls.get(node.target, 0) + 1
        if self._mutators is not None:
            self._note_mutator(node)

    def _erased(self, node: fx.Node) -> None:
        self._cls.pop(node, None)
        if self._calls is not None and node.op == "call_module":
            self._calls[node.target] = self._calls.get(node.target, 1) - 1

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    # ------------------------------------------------------------------ reading
    def module(self, node_or_target: Any) -> Optional[nn.Module]:
        """The module a ``call_module`` node calls, the holder module a quantizer op node reads
        (:func:`qpasses.opclasses.holder_of`), or the module at a dotted target; else None."""
        if isinstance(node_or_target, fx.Node):
            return _module_of(node_or_target, self.modules)
        return self.modules.get(node_or_target)

    def classify(self, node: fx.Node) -> Optional[str]:
        """The op class of ``node``, memoised: an entry holds the node's target (and, for a
        module call, the module found there) and is recomputed when either has changed."""
        t = holder_of(node) if node.op in ("call_module", "call_function") else None
        key = node.target if t is None else self.modules.get(t)
        hit = self._cls.get(node)
        if hit is not None and (hit[0] is key or hit[0] == key):
            return hit[1]
        c = _classify(node, self.modules)
        self._cls[node] = (key, c)
        return c

    def view(self, node: fx.Node) -> OpView:
        return OpView(node, self.gm, self.classify(node), self.modules)

    def call_count(self, target: str) -> int:
        """How many ``call_module`` nodes call ``target`` (counted once, then kept current)."""
        if self._calls is None or not self._open:
            counts: Dict[str, int] = {}
            for n in self.graph.find_nodes(op="call_module", sort=False):
                counts[n.target] = counts.get(n.target, 0) + 1
            if not self._open:
                return counts.get(target, 0)
            self._calls = counts
        return self._calls.get(target, 0)

    def mutators(self, value: fx.Node) -> List[fx.Node]:
        """The in-place ops that write ``value`` (:func:`qpasses.opclasses.mutated_inputs`).

        Indexed with one scan the first time it is asked, then kept current as nodes are
        created, so the soundness guard costs O(match size) even where a value has thousands
        of readers."""
        if self._mutators is None or not self._open:
            self._mutators = {}
            for n in self.graph.nodes:
                self._note_mutator(n)
        return [u for u in self._mutators.get(value, ()) if u.graph is not None and not getattr(u, "_erased", False)
                and value in mutated_inputs(u, self.modules)]

    def _note_mutator(self, node: fx.Node) -> None:
        if node.op in ("call_function", "call_method", "call_module"):
            for inp in mutated_inputs(node, self.modules):
                self._mutators.setdefault(inp, []).append(node)

    def is_shared_module(self, node: fx.Node) -> bool:
        """True when the module ``node`` calls is called by another node too."""
        return node.op == "call_module" and self.call_count(node.target) > 1

    def index(self, classes) -> List[fx.Node]:
        """The nodes of the given op classes (every node for None), in graph order."""
        if classes is None:
            return list(self.graph.nodes)
        wanted = set(classes)
        return [n for n in self.graph.nodes if self.classify(n) in wanted]

    # ------------------------------------------------------------------ verbs
    def fresh_name(self, prefix: str) -> str:
        """A top-level attribute name ``prefix_N`` free on the graph module."""
        i = self._counters.get(prefix, 0)
        while True:
            name = f"{prefix}_{i}"
            i += 1
            if not hasattr(self.gm, name):
                self._counters[prefix] = i
                return name

    def add_module(self, prefix: str, module: nn.Module) -> str:
        """Register ``module`` under a fresh top-level name; returns the target."""
        name = self.fresh_name(prefix)
        self.gm.add_module(name, module)
        return name

    def replace_module(self, target: str, module: nn.Module) -> None:
        """Put ``module`` at ``target`` (every node calling ``target`` now calls it)."""
        self.gm.set_submodule(str(target), module)

    def add_param(self, prefix: str, value: torch.Tensor, before: fx.Node, requires_grad: bool = True) -> fx.Node:
        """Register ``value`` (a copy) as a parameter (a buffer when not floating point) under a
        fresh name and return a ``get_attr`` node reading it, placed before ``before``."""
        name = self.fresh_name(prefix)
        if value.is_floating_point():
            self.gm.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=requires_grad))
        else:
            self.gm.register_buffer(name, value.detach().clone())
        n = self.get_attr(name, before=before)
        n.meta["qpasses.shape"] = tuple(value.shape)
        n.meta["qpasses.dtype"] = value.dtype
        return n

    def get_attr(self, target: str, *, before: Optional[fx.Node] = None,
                 after: Optional[fx.Node] = None) -> fx.Node:
        """A ``get_attr`` node reading ``target``, which must name an attribute of the graph
        module (a submodule, parameter, buffer or constant; a ``RewriteError`` names it otherwise)."""
        path, _, name = str(target).rpartition(".")
        owner = self.modules.get(path)
        if owner is None or not (name in owner._parameters or name in owner._buffers or name in owner._modules
                                 or hasattr(owner, name)):
            raise RewriteError(f"get_attr {target!r}: the graph module has no attribute there")
        with self._at(before, after):
            # create_node, not Graph.get_attr: the reference was checked above, through the module
            # lookup, rather than again by fx with a get_submodule walk per node
            return self.graph.create_node("get_attr", target)

    def insert(self, op: str, target: Any, args: tuple = (), kwargs: Optional[Dict[str, Any]] = None, *,
               before: Optional[fx.Node] = None, after: Optional[fx.Node] = None,
               like: Optional[fx.Node] = None, name: Optional[str] = None) -> fx.Node:
        """A new node (``op``: call_function / call_module / call_method / get_attr) placed
        before or after the given node (else at the current insert point), with ``like``'s
        shape and source records; ``name`` is a wish (fx makes it unique)."""
        with self._at(before, after):
            n = self.graph.create_node(op, target, tuple(args), dict(kwargs or {}), name=name)
        if like is not None:
            copy_meta(like, n)
        return n

    def replace_uses(self, old: fx.Node, new: fx.Node, keep: Optional[fx.Node] = None) -> None:
        """Every user of ``old`` (but ``keep``, e.g. ``new`` itself reading ``old``) reads ``new``."""
        if keep is None:
            old.replace_all_uses_with(new)
        else:
            old.replace_all_uses_with(new, delete_user_cb=lambda u: u is not keep)

    def replace_input(self, node: fx.Node, old: fx.Node, new: fx.Node) -> None:
        """``node`` reads ``new`` where it read ``old``."""
        node.replace_input_with(old, new)

    def retarget(self, node: fx.Node, target: str) -> None:
        """Point a ``call_module`` node at another module."""
        if self._calls is not None:
            self._calls[node.target] = self._calls.get(node.target, 1) - 1
            self._calls[target] = self._calls.get(target, 0) + 1
        node.target = target

    def rewrite_call(self, node: fx.Node, op: str, target: Any, args: tuple,
                     kwargs: Optional[Dict[str, Any]] = None) -> None:
        """Make ``node`` another call in place (same name, place and users): ``op``
        (call_function / call_module / call_method), ``target``, ``args``, ``kwargs``."""
        if self._calls is not None:
            if node.op == "call_module":
                self._calls[node.target] = self._calls.get(node.target, 1) - 1
            if op == "call_module":
                self._calls[target] = self._calls.get(target, 0) + 1
        node.op, node.target = op, target
        node.args, node.kwargs = tuple(args), dict(kwargs or {})
        self._cls.pop(node, None)
        if self._mutators is not None:
            self._note_mutator(node)

    def erase(self, node: fx.Node) -> None:
        """Remove ``node`` (it must have no users)."""
        self.graph.erase_node(node)
        if not self._open:
            self._cls.pop(node, None)

    def erase_if_unused(self, node: Any) -> None:
        """Remove ``node`` if it is an unused op or attribute read (never a placeholder or output)."""
        if isinstance(node, fx.Node) and not node.users and node.op in (
                "get_attr", "call_module", "call_function", "call_method"):
            self.erase(node)

    @contextlib.contextmanager
    def _at(self, before: Optional[fx.Node], after: Optional[fx.Node]):
        if before is not None:
            with self.graph.inserting_before(before):
                yield
        elif after is not None:
            with self.graph.inserting_after(after):
                yield
        else:
            yield

    # ------------------------------------------------------------------ provenance
    @contextlib.contextmanager
    def tagging(self, rule_name: str):
        """While the body runs, nodes created in the graph (by whatever code, while the
        context is open) are tagged with ``rule_name`` (``node.meta[PROVENANCE_KEY]``)."""
        prev, self.rule = self.rule, rule_name
        try:
            yield
        finally:
            self.rule = prev
