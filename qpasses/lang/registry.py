"""Name registries: the only way Python enters a rule file.

A rule file can call a constraint, an action or a data step only by a name that
Python code registered with one of these decorators.  Nothing a rule file says is
imported, ``eval``-ed or ``exec``-ed.

Registered functions declare their arguments, so that a rule file is fully checked when it
is loaded (``qpasses rules check``): the *types* come from the function's signature
(annotations ``int``, ``float``, ``bool``, ``str``, ``fx.Node``, ``Optional[...]`` and
defaults), the *ranges and choices* from the decorator's ``args=`` mapping::

    @action("observe_input", args={"bits": {"min": 2, "max": 16},
                                   "kind": {"choices": ("minmax", "mse")}})
    def observe_input(ctx, op: fx.Node, index: int = 0, kind: str = "minmax", bits: int = 8): ...

Each entry of ``args=`` may set ``type`` (a Python type or one of the names in
:data:`ARG_TYPES`), ``min``, ``max``, ``choices``, ``multiple_of``, ``default`` and ``doc``.
Data steps take no Python parameters, so their ``args=`` entries name the type
(``args={"strict": {"type": bool, "default": False}}``).  :func:`describe_args` lists them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..errors import nearest

#: argument types a declaration may name; ``node`` is a ``$binding`` of the match
ARG_TYPES = ("int", "float", "bool", "str", "list", "map", "node", "any")
_PY_TYPES = {int: "int", float: "float", bool: "bool", str: "str", list: "list", tuple: "list", dict: "map",
             object: "any"}


class _Required:
    def __repr__(self) -> str:
        return "<required>"


#: the ``default`` of an argument that has none (the call must give it)
REQUIRED: Any = _Required()


@dataclass(frozen=True)
class ArgSpec:
    """What one argument of an action / constraint / data step accepts."""
    name: str
    type: str = "any"
    default: Any = REQUIRED
    optional: bool = False          # null (None) is accepted
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Optional[Tuple[Any, ...]] = None
    multiple_of: Optional[int] = None
    doc: str = ""
    keyword_only: bool = False       # declared after ``*`` (cannot be given by position)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any) -> Optional[str]:
        """Why ``value`` is not allowed for this argument, or None.

        ``$name`` / ``?name`` references (anything with a ``sigil``) are judged by kind only:
        a node argument needs one; a ``?value`` may hold anything until the match binds it.
        """
        sigil = getattr(value, "sigil", None)
        if self.type == "node":
            if sigil is None:
                return f"{self.name} takes a matched node ($name), got {_show(value)}"
            return None
        if sigil is not None:
            if sigil == "$" and self.type not in ("any",):
                return f"{self.name} takes {self.type_text()}, not the node {value}"
            return None
        if value is None:
            return None if (self.optional or self.type == "any") else f"{self.name} must be {self.type_text()}, got null"
        ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, str),
              "list": lambda v: isinstance(v, (list, tuple)),
              "map": lambda v: isinstance(v, dict)}.get(self.type, lambda v: True)(value)
        if not ok:
            return f"{self.name} must be {self.type_text()}, got {_show(value)}"
        if self.choices is not None:
            try:
                allowed = value in self.choices
            except TypeError:
                allowed = False
            if not allowed:
                return f"{self.name} must be one of {', '.join(map(_show, self.choices))}, got {_show(value)}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:
                return f"{self.name} must be a number, got nan"
            if self.min is not None and value < self.min:
                return f"{self.name} must be >= {self.min}, got {_show(value)}"
            if self.max is not None and value > self.max:
                return f"{self.name} must be <= {self.max}, got {_show(value)}"
            if self.multiple_of and (value % self.multiple_of):
                return f"{self.name} must be a multiple of {self.multiple_of}, got {_show(value)}"
        return None

    def type_text(self) -> str:
        return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "list": "a list", "map": "a mapping", "node": "a $node", "any": "a value"}[self.type]

    def describe(self) -> str:
        """One line: ``bits: int in [2, 16] = 8``."""
        text = f"{self.name}: {self.type}"
        if self.optional and self.type != "any":
            text += " | null"
        if self.min is not None and self.max is not None:
            text += f" in [{self.min}, {self.max}]"
        elif self.min is not None:
            text += f" >= {self.min}"
        elif self.max is not None:
            text += f" <= {self.max}"
        if self.multiple_of:
            text += f", multiple of {self.multiple_of}"
        if self.choices is not None:
            text += " in {" + ", ".join(map(_show, self.choices)) + "}"
        if not self.required:
            text += f" = {_show(self.default)}"
        if self.doc:
            text += f"  ({self.doc})"
        return text


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v)
    text = str(v)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Registered:
    name: str
    fn: Callable
    doc: str = ""
    #: for actions: True when the action replaces the matched nodes (interior-use guard applies)
    replaces: bool = False
    #: for actions: names of bindings whose node may keep outside users
    keeps: tuple = ()
    #: the declared arguments, in call order (after ``ctx``); see :class:`ArgSpec`
    args: Dict[str, ArgSpec] = field(default_factory=dict)
    #: True when the function also takes ``**kwargs`` (keywords beyond ``args`` are passed on)
    extra_kwargs: bool = False
    #: True when the argument list is known (a signature was read or a data step declared
    #: its arguments); calls of undeclared data steps are not checked
    declared: bool = True
    #: the implementation on ONNX graphs (onnx-graphsurgeon), when there is one; see
    #: :func:`qpasses.onnx.rewrite.onnx_action`
    onnx: Optional[Callable] = None
    #: for data steps: whether the step reads the run's ``data`` -- True, False, or
    #: ``fn(arg, before) -> bool`` of the step's arguments (``arg(name, default)``: its ``with:``
    #: value, else the run's parameter) and the names of the data steps that run before it
    needs_data: Any = True


CONSTRAINTS: Dict[str, Registered] = {}
ACTIONS: Dict[str, Registered] = {}
DATA_STEPS: Dict[str, Registered] = {}


def _origin(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _annotation_type(ann: Any) -> Tuple[str, bool]:
    """(type name, None allowed) of a parameter annotation (a type or, under
    ``from __future__ import annotations``, its text)."""
    if ann is inspect.Parameter.empty:
        return "any", False
    if not isinstance(ann, str):
        if ann in _PY_TYPES:
            return _PY_TYPES[ann], False
        ann = getattr(ann, "__name__", None) or str(ann)
    text = ann.replace(" ", "").replace("typing.", "")
    optional = False
    if text.startswith("Optional[") and text.endswith("]"):
        text, optional = text[len("Optional["):-1], True
    parts = text.split("|")
    if "None" in parts:
        parts = [p for p in parts if p != "None"]
        optional = True
        text = "|".join(parts)
    if text in ("fx.Node", "Node", "torch.fx.Node", "torch.fx.node.Node"):
        return "node", optional
    simple = {"int": "int", "float": "float", "bool": "bool", "str": "str", "list": "list", "dict": "map"}
    if text in simple:
        return simple[text], optional
    if text.split("[")[0] in ("List", "list", "Sequence", "Tuple", "tuple"):
        return "list", optional
    if text.split("[")[0] in ("Dict", "dict", "Mapping"):
        return "map", optional
    return "any", optional


def _type_name(t: Any) -> str:
    name = _PY_TYPES.get(t, t) if not isinstance(t, str) else t
    if name not in ARG_TYPES:
        raise ValueError(f"argument type must be one of {ARG_TYPES} (or int, float, bool, str, list, dict), got {t!r}")
    return name


_DECL_KEYS = ("type", "min", "max", "choices", "multiple_of", "default", "doc")


def _spec(name: str, base: ArgSpec, decl: Mapping[str, Any], who: str) -> ArgSpec:
    bad = [k for k in decl if k not in _DECL_KEYS]
    if bad:
        raise ValueError(f"{who}: argument {name!r} declares unknown key(s) {bad}; use {', '.join(_DECL_KEYS)}")
    kw: Dict[str, Any] = {}
    if "type" in decl:
        kw["type"] = _type_name(decl["type"])
    for k in ("min", "max", "multiple_of", "doc"):
        if k in decl:
            kw[k] = decl[k]
    if "choices" in decl:
        kw["choices"] = tuple(decl["choices"])
    if "default" in decl:
        kw["default"] = decl["default"]
        if decl["default"] is None:
            kw["optional"] = True
    spec = replace(base, **kw)
    if not spec.required and spec.default is not None:
        why = spec.check(spec.default)
        if why:
            raise ValueError(f"{who}: the default of {why}")
    return spec


def _read_args(fn: Callable, decls: Mapping[str, Any], signature: bool, who: str) -> Tuple[Dict[str, ArgSpec], bool, bool]:
    """(arguments, takes **kwargs, known) of a registered function."""
    specs: Dict[str, ArgSpec] = {}
    extra = False
    known = True
    if signature:
        try:
            params = list(inspect.signature(fn).parameters.values())[1:]  # after ctx
        except (TypeError, ValueError):
            params, known = [], False
        for p in params:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                extra = True
                continue
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                known = False  # *args: any number of positional arguments
                continue
            typ, optional = _annotation_type(p.annotation)
            default = REQUIRED if p.default is inspect.Parameter.empty else p.default
            specs[p.name] = ArgSpec(p.name, typ, default, optional or default is None,
                                    keyword_only=p.kind is inspect.Parameter.KEYWORD_ONLY)
    else:
        known = bool(decls)
        extra = False
    for name, decl in decls.items():
        if isinstance(decl, (type, str)):
            decl = {"type": decl}
        if not isinstance(decl, Mapping):
            raise ValueError(f"{who}: the declaration of argument {name!r} must be a mapping such as "
                             f"{{'min': 2, 'max': 16}}, got {decl!r}")
        base = specs.get(name)
        if base is None:
            if signature and not extra:
                raise ValueError(f"{who}: declares argument {name!r} that the function does not take")
            base = ArgSpec(name, default=None, optional=True)
        specs[name] = _spec(name, base, decl, who)
    return specs, extra, known


def _register(table: Dict[str, Registered], name: Optional[str], args: Optional[Mapping[str, Any]] = None,
              signature: bool = True, **kw):
    def deco(fn: Callable) -> Callable:
        key = name or fn.__name__
        old = table.get(key)
        if old is not None and _origin(old.fn) != _origin(fn):
            # two modules claiming one name would make rule files mean different things
            # depending on import order: refuse loudly (re-registering the same function,
            # e.g. on a module reload, is fine)
            raise ValueError(f"the name {key!r} is registered twice: by {_origin(old.fn)} and by {_origin(fn)}")
        specs, extra, known = _read_args(fn, dict(args or {}), signature, f"registering {key!r}")
        if not signature:  # a data step: args={} declares that it takes no argument
            known = args is not None
        table[key] = Registered(key, fn, (fn.__doc__ or "").strip(), args=specs, extra_kwargs=extra,
                                declared=known, **kw)
        return fn
    return deco


def constraint_result(res) -> Tuple[bool, str]:
    """A constraint's return value (``bool`` or ``(bool, reason)``) as ``(ok, reason)``."""
    if isinstance(res, tuple):
        return bool(res[0]), str(res[1]) if len(res) > 1 and res[1] else ""
    return bool(res), ""


def constraint(name: Optional[str] = None, args: Optional[Mapping[str, Any]] = None):
    """Register ``fn(ctx, *args, **kwargs) -> bool | (bool, reason)`` as a constraint.

    ``ctx`` is the :class:`qpasses.matcher.MatchContext` of the match being checked.
    ``args`` declares ranges / choices of its arguments
    (module docstring); their types come from the signature.
    """
    return _register(CONSTRAINTS, name, args)


def action(name: Optional[str] = None, replaces: bool = False, keeps: tuple = (),
           args: Optional[Mapping[str, Any]] = None):
    """Register ``fn(ctx, *args, **kwargs)`` as a rewrite action.

    ``replaces=True`` declares that the action replaces the matched nodes by new ones,
    so the soundness guard "interior nodes have no users outside the match" applies.
    The action changes the graph through ``ctx``'s verbs (:class:`qpasses.context.RewriteContext`).
    ``args`` declares ranges / choices of its arguments (module docstring); their types come
    from the signature.
    The action may raise :class:`qpasses.Refuse` to decline a match with a reason.
    """
    return _register(ACTIONS, name, args, replaces=replaces, keeps=tuple(keeps))


def data_step(name: Optional[str] = None, args: Optional[Mapping[str, Any]] = None, needs_data: Any = True):
    """Register ``fn(ctx, **kwargs) -> GraphModule | None`` as a data step of recipes.

    ``args`` declares the arguments a recipe may give it under ``with:`` (type, range, choices,
    default: ``{"strict": {"type": bool, "default": False}}``); a step that declares them is
    checked when its recipe is loaded, one that does not accepts any ``with:`` values.
    ``needs_data`` says whether it reads the run's data (see :class:`Registered`); recipes
    whose steps need none are listed as data-free (``qpasses quantize --help``).
    """
    return _register(DATA_STEPS, name, args, signature=False, needs_data=needs_data)


# ----------------------------------------------------------------------------- checking and listing

_TABLES = {"action": ACTIONS, "constraint": CONSTRAINTS, "step": DATA_STEPS}


def lookup(name: str, kind: Optional[str] = None) -> Tuple[str, Registered]:
    """(kind, registration) of a registered name; ``kind`` is ``action``, ``constraint`` or ``step``
    (None: the first table holding the name).  Raises KeyError (with the nearest name)."""
    kinds = [kind] if kind else list(_TABLES)
    for k in kinds:
        if k not in _TABLES:
            raise KeyError(f"kind must be one of {', '.join(_TABLES)}, got {k!r}")
        if name in _TABLES[k]:
            return k, _TABLES[k][name]
    names = [n for k in kinds for n in _TABLES[k]]
    hint = nearest(name, names)
    raise KeyError(f"no {' or '.join(kinds)} named {name!r}" + (f" (did you mean {hint!r}?)" if hint else ""))


def arg_specs(name: str, kind: Optional[str] = None) -> List[ArgSpec]:
    """The declared arguments of the action / constraint / data step ``name``, in call order."""
    return list(lookup(name, kind)[1].args.values())


def describe_args(name: str, kind: Optional[str] = None) -> str:
    """A signature-like description of what ``name`` accepts, for listings
    (``qpasses rules list``)::

        observe_input(op: node, index: int >= 0 = 0, kind: str in {'minmax', ...} = 'minmax', ...)
    """
    k, reg = lookup(name, kind)
    parts = [a.describe() for a in reg.args.values()]
    if reg.extra_kwargs:
        parts.append("**options")
    if not reg.declared:
        parts.append("... (arguments not declared)")
    return f"{reg.name}({', '.join(parts)})"


def check_arguments(reg: Registered, args: List[Any], kwargs: Mapping[str, Any],
                    resolve: Optional[Callable[[Any], Tuple[bool, Any, str]]] = None) -> Optional[str]:
    """Why a call ``reg.name(*args, **kwargs)`` does not fit the declaration, or None.

    ``resolve(value) -> (known, value, note)`` replaces values that are not known yet (a
    ``${param}``): ``known=False`` skips the value's check, ``note`` (e.g. " (from ${w_bits})")
    is added to the reason.
    """
    if not reg.declared:
        return None
    specs = list(reg.args.values())
    positional = [a for a in specs if not a.keyword_only]
    if len(args) > len(positional):
        return f"takes at most {len(positional)} positional argument(s), got {len(args)}"
    given: Dict[str, Any] = {}
    for spec, v in zip(positional, args):
        given[spec.name] = v
    for k, v in kwargs.items():
        if k in given:
            return f"argument {k!r} given twice"
        if k not in reg.args and not reg.extra_kwargs:
            hint = nearest(k, reg.args)
            return (f"unknown argument {k!r}" + (f" (did you mean {hint!r}?)" if hint else "") +
                    f"; it takes: {', '.join(reg.args) or 'no arguments'}")
        given[k] = v
    for spec in specs:
        if spec.required and spec.name not in given:
            return f"missing argument {spec.name!r}"
    for k, v in given.items():
        spec = reg.args.get(k)
        if spec is None:
            continue
        note = ""
        if resolve is not None:
            known, v, note = resolve(v)
            if not known:
                continue
        why = spec.check(v)
        if why:
            return why + note
    return None
