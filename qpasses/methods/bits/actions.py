"""The ``assign_bits`` family: per-layer bit-widths as graph annotations.

A *bit map* names layers and gives each a weight and an activation bit-width::

    {"features.0": [8, 8], "features.*": [4, 8], "fc": {"w_bits": 6, "a_bits": 8}, "conv2d_1": 3}

Keys are fx node names, module paths (``features.3``; also the source module path of a
``torch.export`` graph) or globs over them. Values: ``[w, a]``, ``{"w_bits": w, "a_bits": a}``
(either may be missing or null) or a single int (weights only). An exact key wins over a glob;
globs are tried in the order given. The result is node meta ``qpasses.bits = {"w_bits", "a_bits"}``,
honoured by the ``observe`` (activation observers) and ``convert`` (weight fake quant) families
through ``qpasses.methods.ptq.actions.bits_for`` -- so ``assign_bits`` must run before them.

Files: JSON or YAML (``.json`` / ``.yaml`` / ``.yml``), either the bare map or
``{"layers": {...}, ...}`` (what the ``search_bits`` step of the ``haq`` recipe writes).
"""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Any, Dict, Iterable, Optional, Tuple

import torch.fx as fx

from ...errors import OptionError
from ...lang.registry import action
from ...context import Refuse
from ...matcher import MatchContext
from .._graphutil import node_paths

__all__ = ["normalize_bit_map", "load_bit_map", "save_bit_map", "layer_name", "apply_bit_map", "lookup_bits"]

BITS_KEY = "qpasses.bits"
_MIN_BITS, _MAX_BITS = 1, 16
_WEIGHTED = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear")


def _bits(v: Any, key: str, what: str) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise OptionError(f"bit map entry {key!r}: {what} must be an integer, got {v!r}")
    v = int(v)
    if not _MIN_BITS <= v <= _MAX_BITS:
        raise OptionError(f"bit map entry {key!r}: {what}={v} is outside [{_MIN_BITS}, {_MAX_BITS}]")
    return v


def normalize_bit_map(raw: Any, source: str = "bit_map") -> Dict[str, Dict[str, Optional[int]]]:
    """Validate a bit map and return ``{key: {"w_bits": int|None, "a_bits": int|None}}`` (order kept)."""
    if raw is None:
        return {}
    if isinstance(raw, dict) and "layers" in raw and isinstance(raw["layers"], dict):
        raw = raw["layers"]
    if not isinstance(raw, dict):
        raise OptionError(f"{source} must be a mapping of layer name/glob -> [w_bits, a_bits], got "
                          f"{type(raw).__name__}")
    out: Dict[str, Dict[str, Optional[int]]] = {}
    for k, v in raw.items():
        k = str(k)
        if isinstance(v, dict):
            extra = set(v) - {"w_bits", "a_bits", "op", "cost", "sensitivity", "params", "macs"}
            if extra:
                raise OptionError(f"bit map entry {k!r} has unknown keys {sorted(extra)}; use w_bits / a_bits")
            w, a = v.get("w_bits"), v.get("a_bits")
        elif isinstance(v, (list, tuple)):
            if len(v) != 2:
                raise OptionError(f"bit map entry {k!r} must be [w_bits, a_bits], got {list(v)!r}")
            w, a = v
        else:
            w, a = v, None
        ent = {"w_bits": _bits(w, k, "w_bits"), "a_bits": _bits(a, k, "a_bits")}
        if ent["w_bits"] is None and ent["a_bits"] is None:
            raise OptionError(f"bit map entry {k!r} sets neither w_bits nor a_bits")
        out[k] = ent
    return out


def load_bit_map(path: str) -> Dict[str, Dict[str, Optional[int]]]:
    """Read a JSON / YAML bit-map file (see the module doc) and validate it."""
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise OptionError(f"cannot read bit map file {p!r}: {e.strerror}") from None
    try:
        if p.endswith((".yaml", ".yml")):
            import yaml
            # aliases are refused before anything is built: a few hundred bytes of nested
            # aliases (an "alias bomb") would expand to gigabytes
            for ev in yaml.parse(text, Loader=yaml.SafeLoader):
                if isinstance(ev, yaml.AliasEvent):
                    m = ev.start_mark
                    raise OptionError(f"bit map file {p!r}, line {m.line + 1}: YAML aliases (*{ev.anchor}) are not "
                                      f"supported in bit maps; write the values out")
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except OptionError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise OptionError(f"bit map file {p!r} is not valid {'YAML' if p.endswith(('yaml', 'yml')) else 'JSON'}: "
                          f"{e}") from None
    return normalize_bit_map(raw, f"bit map file {p!r}")


def save_bit_map(path: str, layers: Dict[str, Dict[str, Any]], meta: Optional[Dict[str, Any]] = None) -> str:
    """Write ``{"version": 1, "layers": layers, "meta": meta}`` as JSON (or YAML for .yaml/.yml)."""
    p = os.fspath(path)
    doc = {"version": 1, "layers": layers, "meta": meta or {}}
    d = os.path.dirname(os.path.abspath(p))
    os.makedirs(d, exist_ok=True)
    tmp = f"{p}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if p.endswith((".yaml", ".yml")):
            import yaml
            yaml.safe_dump(doc, f, sort_keys=False)
        else:
            json.dump(doc, f, indent=2)
    os.replace(tmp, p)
    return p


def layer_name(node: fx.Node) -> str:
    """A stable layer name: the module path (fx ``call_module`` target or the export module stack),
    else the fx node name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return str(path).replace("L['self'].", "").replace("L__self___", "")
    if node.op == "call_module":
        return str(node.target)
    return node.name


def _is_glob(k: str) -> bool:
    return any(c in k for c in "*?[")


def lookup_bits(node: fx.Node, bit_map: Dict[str, Dict[str, Optional[int]]]) -> Optional[Tuple[str, Dict]]:
    """``(key, entry)`` of the bit-map entry for ``node``: exact names first, then globs in order."""
    names = list(dict.fromkeys(node_paths(node)))
    for nm in names:
        if nm in bit_map and not _is_glob(nm):
            return nm, bit_map[nm]
    for k, ent in bit_map.items():
        if _is_glob(k) and any(fnmatch.fnmatchcase(nm, k) for nm in names):
            return k, ent
    return None


def _check_keys(nodes: Iterable[fx.Node], bit_map: Dict[str, Any]) -> None:
    known = set()
    for n in nodes:
        known.update(node_paths(n))
    missing = [k for k in bit_map if not _is_glob(k) and k not in known]
    if missing:
        from ...errors import nearest
        hint = nearest(missing[0], sorted(known))
        raise OptionError(f"bit map names {missing} but no weighted op is called that; weighted ops: "
                          f"{sorted(known)[:20]}" + (f" (did you mean {hint!r}?)" if hint else ""))


def _set(node: fx.Node, ent: Dict[str, Optional[int]]) -> None:
    ann = dict(node.meta.get(BITS_KEY) or {})
    for k in ("w_bits", "a_bits"):
        if ent.get(k) is not None:
            ann[k] = int(ent[k])
    node.meta[BITS_KEY] = ann


def apply_bit_map(gm: fx.GraphModule, bit_map: Any, check: bool = True) -> Dict[str, Dict[str, int]]:
    """Annotate the weighted ops of ``gm`` in place from ``bit_map`` (a map or a file path).

    Returns ``{layer_name: annotation}`` for the annotated ops. Prefer the ``assign_bits`` rule
    family (``PassManager("assign_bits", bit_map=...)``), which works on a copy and reports.
    """
    from ...opclasses import classify
    bm = load_bit_map(bit_map) if isinstance(bit_map, (str, os.PathLike)) else normalize_bit_map(bit_map)
    mods = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if classify(n, mods) in _WEIGHTED]
    if check:
        _check_keys(nodes, bm)
    done = {}
    for n in nodes:
        hit = lookup_bits(n, bm)
        if hit is not None:
            _set(n, hit[1])
            done[layer_name(n)] = dict(n.meta[BITS_KEY])
    return done


def _merged_map(ctx: MatchContext, bit_map: Any, bit_map_file: Any) -> Dict[str, Dict[str, Optional[int]]]:
    key = (id(ctx.graph), repr(bit_map), str(bit_map_file))
    cached = ctx.state.get("assign_bits.map")
    if cached is not None and cached[0] == key:
        return cached[1]
    merged: Dict[str, Dict[str, Optional[int]]] = {}
    if bit_map_file:
        merged.update(load_bit_map(str(bit_map_file)))
    if bit_map:
        merged.update(normalize_bit_map(bit_map, "bit_map"))
    nodes = [n for n in ctx.graph.nodes if ctx.classify(n) in _WEIGHTED]
    _check_keys(nodes, merged)
    ctx.state["assign_bits.map"] = (key, merged)
    return merged


@action("assign_bits", args={"w_bits": {"min": 1, "max": 32}, "a_bits": {"min": 1, "max": 32}, "bit_map_file": {"type": str}})
def assign_bits(ctx: MatchContext, op: fx.Node, bit_map: Any = None, bit_map_file: Any = None,
                w_bits: Optional[int] = None, a_bits: Optional[int] = None):
    """Annotate ``op`` with ``qpasses.bits`` from the bit map (file first, inline map overrides it),
    or with the given ``w_bits``/``a_bits`` when no map is given."""
    if not bit_map and not bit_map_file:
        if w_bits is None and a_bits is None:
            raise Refuse("no bit_map, bit_map_file, w_bits or a_bits given")
        _set(op, {"w_bits": _bits(w_bits, op.name, "w_bits"), "a_bits": _bits(a_bits, op.name, "a_bits")})
        return
    bm = _merged_map(ctx, bit_map, bit_map_file)
    hit = lookup_bits(op, bm)
    if hit is None:
        raise Refuse(f"{layer_name(op)} ({op.name}) has no entry in the bit map (keeps the recipe default)")
    _set(op, hit[1])
