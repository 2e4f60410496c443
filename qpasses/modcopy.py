"""Copying module trees: ``copy.deepcopy``'s result, several times faster on traced models.

A traced model holds thousands of small torch.nn modules; ``copy.deepcopy`` walks each one
through ``__reduce_ex__`` and copies every attribute generically.  :func:`copy_module_tree`
copies torch.nn / qpasses modules directly:

* a new module object whose ``__dict__`` is written in one go (``nn.Module.__setattr__`` is slow);
* parameters and buffers cloned (a parameter shared by two modules stays shared, as one clone);
* every mutable attribute its own: the hook tables (``_forward_hooks`` & co.), the
  non-persistent-buffer set, lists such as ``_reversed_padding_repeated_twice``, tensors kept
  as plain attributes.  Registering a hook on the copy never reaches the original;
* children copied the same way, iteratively (arbitrarily deep trees are fine).

Any other module class (one that may keep state this cannot know about) and any attribute
value that is not a plain immutable or a container of them goes through ``copy.deepcopy``
with the same memo, so identities are kept across the whole tree.
"""
from __future__ import annotations

import copy
import operator
from itertools import chain
import types
from collections import OrderedDict
from typing import Any, Dict, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as _pytree

__all__ = ["copy_module_tree", "own_containers"]

#: attribute values that are immutable: shared by the copy (as ``copy.deepcopy`` shares them).
#: Pytree specs (an exported module's ``_in_spec`` / ``_out_spec``) are frozen dataclasses;
#: deep-copying one rebuilds its leaves through the deprecated ``LeafSpec``, and torch warns.
_ATOMIC = frozenset({type(None), bool, int, float, complex, str, bytes, type, torch.dtype, torch.device,
                     torch.layout, torch.memory_format, types.FunctionType, types.BuiltinFunctionType,
                     _pytree.TreeSpec, getattr(_pytree, "LeafSpec", _pytree.TreeSpec)})
#: containers copied as new containers when their keys and items are atomic (hook tables,
#: empty or holding plain functions; anything else in them goes through copy.deepcopy)
_CONTAINERS = frozenset({dict, OrderedDict, list, set})
#: attributes the caller sets itself
_SKIP = frozenset({"_parameters", "_buffers", "_modules"})
_PLAIN: Dict[type, bool] = {}  # per class: copied directly (True) or through copy.deepcopy


class _Layout:
    """A module's attribute names and value types, and which attributes need a copy."""

    def __init__(self, d: Dict[str, Any], kinds: tuple, keep: frozenset):
        self.keys, self.kinds = tuple(d), kinds
        mutable = [(k, t) for k, t in zip(self.keys, kinds) if t not in _ATOMIC and k not in _SKIP and k not in keep]
        self.containers = tuple(k for k, t in mutable if t in _CONTAINERS)
        self.container_types = tuple(t for k, t in mutable if t in _CONTAINERS)
        self.tuples = tuple(k for k, t in mutable if t is tuple)  # kept when their items are atomic
        self.others = tuple(k for k, t in mutable if t not in _CONTAINERS and t is not tuple)
        self.get_containers, self.get_tuples = _getter(self.containers), _getter(self.tuples)


def _getter(keys: tuple):
    """``d -> tuple(d[k] for k in keys)``, at C speed (itemgetter of one key returns the value)."""
    if len(keys) > 1:
        return operator.itemgetter(*keys)
    if keys:
        one = operator.itemgetter(keys[0])
        return lambda d: (one(d),)
    return lambda d: ()


#: per class: the layout last seen
_LAYOUT: Dict[type, _Layout] = {}


def library_class(t: type) -> bool:
    """A module class of torch.nn or qpasses (or ``nn.Module`` itself): one whose state and
    behaviour qpasses knows."""
    name = t.__module__
    return name.startswith("torch.nn.") or name.startswith("qpasses.") or t is torch.nn.Module


def _is_plain_module(mod: torch.nn.Module) -> bool:
    t = type(mod)
    hit = _PLAIN.get(t)
    if hit is None:
        # nested graph modules own a graph and a per-instance class: deep copy them
        hit = _PLAIN[t] = not issubclass(t, fx.GraphModule) and library_class(t) and not hasattr(t, "__deepcopy__")
    return hit


def _fresh(v: Any, memo: Dict[int, Any]) -> Any:
    """An attribute value for the copy: ``copy.deepcopy(v, memo)``, cheaply for the usual kinds."""
    t = type(v)
    if t in _CONTAINERS:
        if not v:
            return t()
        items = v.values() if t is dict or t is OrderedDict else v
        if all(type(x) in _ATOMIC for x in items) and (t is list or t is set or all(type(k) in _ATOMIC for k in v)):
            return t(v)
    elif t is tuple and all(type(x) in _ATOMIC for x in v):
        return v
    return copy.deepcopy(v, memo)


def _layout(mod: torch.nn.Module, d: Dict[str, Any], keep: frozenset = frozenset()) -> _Layout:
    """The layout of ``d`` (``mod``'s attributes): the attributes that need a copy of their own
    (hook tables, lists, tensors, ...) are found once per class and attribute layout."""
    kinds = tuple(map(type, d.values()))
    lay = _LAYOUT.get(type(mod))
    if lay is None or lay.kinds != kinds or lay.keys != tuple(d) or keep:
        lay = _Layout(d, kinds, keep)
        if _is_plain_module(mod) and not keep:
            _LAYOUT[type(mod)] = lay
    return lay


def own_containers(mod: torch.nn.Module, d: Dict[str, Any]) -> Dict[str, Any]:
    """Give ``d``, a copy of ``mod.__dict__`` for a module built from ``mod``, containers of its
    own: the hook tables, the non-persistent-buffer set and any other dict / list / set
    attribute become shallow copies (same hooks, same items), so registering a hook on one
    module never reaches the other.  Returns ``d``."""
    _renew_containers(d, _layout(mod, d), lambda v: type(v)(v))
    return d


def _renew_containers(d: Dict[str, Any], lay: _Layout, copy_one) -> None:
    """Put new containers in ``d`` for its container attributes: ``copy_one(old)`` each, or,
    in the usual case where all are empty, new empty ones made in a few C-level calls."""
    if not lay.containers:
        return
    if any(map(len, lay.get_containers(d))):
        d.update(zip(lay.containers, map(copy_one, lay.get_containers(d))))
    else:
        d.update(zip(lay.containers, map(type.__call__, lay.container_types)))


@torch.no_grad()
def copy_module_tree(root: torch.nn.Module, skip: frozenset = frozenset(),
                     memo: Optional[Dict[int, Any]] = None) -> torch.nn.Module:
    """A copy of ``root`` and everything below it that shares nothing mutable with it.

    ``skip`` names attributes of ``root`` itself that are copied by reference (the caller
    replaces them: a GraphModule's graph, say).  The result equals ``copy.deepcopy(root)``
    module by module (tested), without its cost.
    """
    memo = {} if memo is None else memo
    atomic = _ATOMIC

    def fresh(v):
        return _fresh(v, memo)
    Parameter = torch.nn.Parameter
    make_subclass = torch.Tensor._make_subclass
    set_dict = object.__setattr__  # nn.Module.__setattr__ is slow, even for "__dict__"

    def clone_tensor(t):
        if t is None:
            return None
        hit = memo.get(id(t))
        if hit is None:
            c = t.clone()  # under no_grad: as detach().clone(), one op less
            # what Parameter(c, requires_grad) does for a plain tensor, without its Python __new__
            # (issubclass on the type: Parameter's isinstance check is a slow Python metaclass hook)
            hit = make_subclass(Parameter, c, t.requires_grad) if type(t) is Parameter else \
                copy.deepcopy(t, memo) if issubclass(type(t), Parameter) else c
            memo[id(t)] = hit
        return hit

    def new_dict(mod, keep):
        d = mod.__dict__.copy()
        lay = _layout(mod, d, keep)
        _renew_containers(d, lay, fresh)
        if lay.tuples and not all(map(atomic.__contains__, map(type, chain(*lay.get_tuples(d))))):
            for k in lay.tuples:
                d[k] = fresh(d[k])
        for k in lay.others:
            d[k] = fresh(d[k])
        d["_parameters"] = {k: clone_tensor(v) for k, v in mod._parameters.items()}
        d["_buffers"] = {k: clone_tensor(v) for k, v in mod._buffers.items()}
        d["_modules"] = dict(mod._modules)
        return d

    def shallow(mod, keep=frozenset()):
        hit = memo.get(id(mod))
        if hit is not None:
            return hit, False
        if not _is_plain_module(mod):
            new = copy.deepcopy(mod, memo)
            memo[id(mod)] = new
            return new, False
        new = object.__new__(type(mod))
        memo[id(mod)] = new  # before the attributes: one that refers back to the module finds it
        set_dict(new, "__dict__", new_dict(mod, keep))
        return new, True

    if isinstance(root, fx.GraphModule):
        # GraphModule.__new__ gives the copy its own per-instance class, so recompile() on the
        # copy never touches the original's forward
        new_root = fx.GraphModule.__new__(type(root))
        memo[id(root)] = new_root
        set_dict(new_root, "__dict__", new_dict(root, skip))
        expand = True
    else:
        new_root, expand = shallow(root, skip)
    stack = [new_root] if expand else []
    while stack:
        mod = stack.pop()
        for k, child in mod._modules.items():
            if child is None:
                continue
            new_child, expand = shallow(child)
            mod._modules[k] = new_child
            if expand:
                stack.append(new_child)
    return new_root
