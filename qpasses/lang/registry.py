"""Name registries: the only way Python enters a rule file.

A rule file can call a constraint, an action or a data step only by a name that
Python code registered with one of these decorators.  Nothing a rule file says is
imported, ``eval``-ed or ``exec``-ed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple


@dataclass
class Registered:
    name: str
    fn: Callable
    doc: str = ""
    #: for actions: True when the action replaces the matched nodes (interior-use guard applies)
    replaces: bool = False
    #: for actions: names of bindings whose node may keep outside users
    keeps: tuple = ()


CONSTRAINTS: Dict[str, Registered] = {}
ACTIONS: Dict[str, Registered] = {}
DATA_STEPS: Dict[str, Registered] = {}


def _origin(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _register(table: Dict[str, Registered], name: Optional[str], **kw):
    def deco(fn: Callable) -> Callable:
        key = name or fn.__name__
        old = table.get(key)
        if old is not None and _origin(old.fn) != _origin(fn):
            # two modules claiming one name would make rule files mean different things
            # depending on import order: refuse loudly (re-registering the same function,
            # e.g. on a module reload, is fine)
            raise ValueError(f"the name {key!r} is registered twice: by {_origin(old.fn)} and by {_origin(fn)}")
        table[key] = Registered(key, fn, (fn.__doc__ or "").strip(), **kw)
        return fn
    return deco


def constraint_result(res) -> Tuple[bool, str]:
    """A constraint's return value (``bool`` or ``(bool, reason)``) as ``(ok, reason)``."""
    if isinstance(res, tuple):
        return bool(res[0]), str(res[1]) if len(res) > 1 and res[1] else ""
    return bool(res), ""


def constraint(name: Optional[str] = None):
    """Register ``fn(ctx, *args, **kwargs) -> bool | (bool, reason)`` as a constraint.

    ``ctx`` is the :class:`qpasses.matcher.MatchContext` of the match being checked.
    """
    return _register(CONSTRAINTS, name)


def action(name: Optional[str] = None, replaces: bool = False, keeps: tuple = ()):
    """Register ``fn(ctx, *args, **kwargs)`` as a rewrite action.

    ``replaces=True`` declares that the action replaces the matched nodes by new ones,
    so the soundness guard "interior nodes have no users outside the match" applies.
    The action changes the graph through ``ctx``'s verbs (:class:`qpasses.context.RewriteContext`).
    The action may raise :class:`qpasses.actions.Refuse` to decline a match with a reason.
    """
    return _register(ACTIONS, name, replaces=replaces, keeps=tuple(keeps))


def data_step(name: Optional[str] = None):
    """Register ``fn(ctx, **kwargs) -> GraphModule | None`` as a data step of recipes."""
    return _register(DATA_STEPS, name)
