"""Save and load (quantized) graphs as ``torch.export`` archives (``.pt2``), without pickle.

    qpasses.save(qgm, "model.pt2")        # torch.export.export + torch.export.save
    gm = qpasses.load("model.pt2")         # torch.export.load(...).module(): a GraphModule

A ``.pt2`` archive is a zip of JSON (the graph, its signature, the payload configs) and raw
tensor bytes.  ``torch.export.load`` alone is *not* safe on a file from someone else: an
archive may declare pickled weights or constants (``use_pickle``), Python objects
(``opaque_obj_*`` entries go through ``pickle.loads``), AOTInductor shared libraries, its
example inputs are read with ``torch.load`` that falls back to ``weights_only=False``, and
its symbolic-shape expressions are parsed with ``sympy.sympify`` (which evaluates Python).
:func:`load` therefore checks the archive first (:func:`check_archive`) and refuses anything
but the layout :func:`save` writes: known file names only, no pickled payload, example
inputs that load with ``weights_only=True``, shape expressions made of numbers, symbols and
arithmetic only.  After loading, every called function of the graph must be an operator
(``torch.ops.*``, ``operator.*``, ``math.*``), so running the model runs no other code.
"""
from __future__ import annotations

import ast
import io as _io
import json
import os
import re
import warnings
import zipfile
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx

from .errors import QPassesError

__all__ = ["save", "load", "check_archive", "ArchiveError", "EXAMPLE_INPUTS_KEY", "save_compressed"]

#: where :func:`qpasses.trace` records the example inputs (read by :func:`save`, set by :func:`load`)
EXAMPLE_INPUTS_KEY = "qpasses.example_inputs"


class ArchiveError(QPassesError):
    """A file that is not a ``.pt2`` archive qpasses can load safely (or cannot write one)."""


# ----------------------------------------------------------------------------- save

def _example_inputs(gm: torch.nn.Module, example_inputs: Any) -> tuple:
    from .frontend import as_inputs
    if example_inputs is None:
        meta = getattr(gm, "meta", None)
        example_inputs = meta.get(EXAMPLE_INPUTS_KEY) if isinstance(meta, dict) else None
    if example_inputs is None:
        raise ArchiveError("qpasses.save needs example inputs to export the graph: pass example_inputs=(x,) "
                           f"(a graph from qpasses.trace records them in gm.meta[{EXAMPLE_INPUTS_KEY!r}])")
    return as_inputs(example_inputs)


def _export(gm: torch.nn.Module, inputs: tuple, dynamic_batch: bool):
    if dynamic_batch:
        dims = tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() > 0 else None
                     for t in inputs)
        try:
            return torch.export.export(gm, inputs, dynamic_shapes=dims, strict=False)
        except Exception:  # noqa: BLE001 - e.g. the graph specialises on the batch size: export it static
            pass
    return torch.export.export(gm, inputs, strict=False)


def save(gm: torch.nn.Module, path: "str | os.PathLike[str]", example_inputs: Any = None, *,
         dynamic_batch: bool = True) -> str:
    """Write ``gm`` (a GraphModule from :meth:`PassManager.run`, or any ``nn.Module``) as a
    ``torch.export`` archive: ``torch.export.export`` then ``torch.export.save``.  No pickle of
    Python objects: the archive holds the graph as JSON and the tensors as raw bytes.

    Args:
        gm: the module to save (left untouched).
        path: the output file; must end in ``.pt2``.
        example_inputs: the inputs to export with (a tensor or a tuple); default
            ``gm.meta["qpasses.example_inputs"]``, which :func:`qpasses.trace` records.
            They are stored in the archive (:func:`load` gives them back).
        dynamic_batch: let dimension 0 of every tensor input vary (``Dim.AUTO``: kept static
            where the graph specialises on it).

    Returns:
        ``path`` as a string.

    Raises:
        ArchiveError: no example inputs, a path not ending in ``.pt2``, or an export failure.
    """
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ArchiveError(f"qpasses.save writes a torch.export archive: give a path ending in .pt2, not {path!r}")
    if not isinstance(gm, torch.nn.Module):
        raise ArchiveError(f"qpasses.save expects an nn.Module / GraphModule, got {type(gm).__name__}")
    inputs = _example_inputs(gm, example_inputs)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # modules that cache derived tensors in __dict__ (e.g. packed int8
            # operands) refill the cache while tracing: harmless here, the cache is not state
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            gm(*inputs)  # once eagerly: checks the inputs and fills lazy caches outside the export trace
            ep = _export(gm, inputs, dynamic_batch)
    except Exception as e:  # noqa: BLE001
        raise ArchiveError(f"torch.export could not export the graph: {type(e).__name__}: {_first_line(e)}") from e
    objects = sorted(k for k, v in ep.constants.items() if not isinstance(v, torch.Tensor))
    if objects:  # torch.export.save would pickle them, and load() refuses pickled objects
        raise ArchiveError(f"the exported graph holds Python objects ({', '.join(objects[:3])}: "
                           f"{type(ep.constants[objects[0]]).__name__}), which a .pt2 archive can only store "
                           "pickled; qpasses does not write pickles")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.export.save(ep, path)
    return path


# ----------------------------------------------------------------------------- check and load

# File names (below the archive's root folder) that torch.export.save writes for a program
# without AOTInductor, ExecuTorch or TorchScript payloads.
_ALLOWED_NAME = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[A-Za-z0-9_.-]+\.json"
    r"|data/weights/(weight_\d+|[A-Za-z0-9_.-]+_weights_config\.json)"
    r"|data/constants/(tensor_\d+|[A-Za-z0-9_.-]+_constants_config\.json)"
    r"|data/sample_inputs/[A-Za-z0-9_.-]+\.pt"
    r"|extra/[A-Za-z0-9_.-]+)")

# names a shape expression may call or use (sympy classes and torch's sympy functions)
_EXPR_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_EXPR_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Constant, ast.keyword, ast.Load,
               ast.Compare, ast.BoolOp, ast.Tuple, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _safe_expr(text: str) -> bool:
    """True for a shape expression made of numbers, names, calls of names and arithmetic
    (``Symbol('s77', positive=True, integer=True)``, ``2*s0 + 1``, ``FloorDiv(s0, 2)``): nothing
    that ``sympy.sympify`` could evaluate into other Python (attribute access, subscripts,
    lambdas, dunder names)."""
    if not isinstance(text, str) or len(text) > 10_000 or "__" in text:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _EXPR_NODES):
            return False
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            return False
        if isinstance(node, ast.Name) and not _EXPR_NAME.fullmatch(node.id):
            return False
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool, type(None))):
            return False
    return True


def _walk_json(obj: Any, key: Optional[str] = None) -> Iterator[tuple]:
    stack = [(key, obj)]
    while stack:
        k, v = stack.pop()
        yield k, v
        if isinstance(v, dict):
            stack.extend(v.items())
        elif isinstance(v, list):
            stack.extend((k, x) for x in v)


def check_archive(path: "str | os.PathLike[str]") -> None:
    """Check that ``path`` is a ``.pt2`` archive that ``torch.export.load`` reads without running
    code from the file (see the module docstring); raise :class:`ArchiveError` saying why not."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArchiveError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise ArchiveError(f"{path} is not a torch.export archive (.pt2): not a zip file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            roots = {n.split("/", 1)[0] for n in names}
            if len(roots) != 1 or any("/" not in n for n in names):
                raise ArchiveError(f"{path} is not a torch.export archive (.pt2): files outside one root folder")
            root = roots.pop() + "/"
            rel = {n[len(root):]: n for n in names}
            bad = sorted(r for r in rel if not _ALLOWED_NAME.fullmatch(r))
            if bad:
                raise ArchiveError(f"{path}: refusing to load a .pt2 archive holding {bad[0]!r} (qpasses loads "
                                   "graphs, weights and tensor constants only: no pickled objects, no compiled code)")
            fmt = zf.read(rel["archive_format"]).decode("utf-8", "replace").strip() if "archive_format" in rel else ""
            if fmt != "pt2":
                raise ArchiveError(f"{path} is not a torch.export archive (.pt2): no archive_format 'pt2'")
            if not any(r.startswith("models/") for r in rel):
                raise ArchiveError(f"{path} is not a torch.export archive (.pt2): it holds no program")
            for r, n in rel.items():
                if r.endswith(("_weights_config.json", "_constants_config.json")):
                    cfg = json.loads(zf.read(n))
                    for fqn, entry in (cfg.get("config") or {}).items():
                        if not isinstance(entry, dict) or entry.get("use_pickle") \
                                or not str(entry.get("path_name", "")).startswith(("weight_", "tensor_")):
                            raise ArchiveError(f"{path}: refusing to load {fqn!r}: it is stored as a pickled "
                                               "or Python object, not as tensor bytes")
                elif r.startswith("models/"):
                    doc = json.loads(zf.read(n))
                    for k, v in _walk_json(doc):
                        if k == "expr_str" and not _safe_expr(v):
                            raise ArchiveError(f"{path}: refusing to load a shape expression that is not "
                                               f"arithmetic: {str(v)[:60]!r}")
                elif r.startswith("data/sample_inputs/"):
                    try:
                        torch.load(_io.BytesIO(zf.read(n)), weights_only=True)
                    except Exception as e:  # noqa: BLE001
                        raise ArchiveError(f"{path}: refusing to load its example inputs: they are not plain "
                                           f"tensors ({_first_line(e)[:100]})") from None
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, RuntimeError, EOFError) as e:
        raise ArchiveError(f"{path} is not a readable .pt2 archive: {type(e).__name__}: {_first_line(e)}") from None


def _check_targets(gm: fx.GraphModule, path: str) -> None:
    import math
    import operator
    for mod in gm.modules():
        if not isinstance(mod, fx.GraphModule):
            continue
        for n in mod.graph.nodes:
            if n.op == "call_function":
                t = n.target
                ok = isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator))
                ok = ok or any(getattr(m, getattr(t, "__name__", ""), None) is t for m in (operator, math))
                if not ok:
                    raise ArchiveError(f"{path}: refusing the graph: node {n.name} calls {t!r}, which is not an "
                                       "operator (torch.ops.*, operator.*, math.*)")
            elif n.op in ("call_method",) and str(n.target).startswith("_"):
                raise ArchiveError(f"{path}: refusing the graph: node {n.name} calls method {n.target!r}")


def load(path: "str | os.PathLike[str]") -> fx.GraphModule:
    """Load a ``.pt2`` archive written by :func:`save` (or ``torch.export.save``) as a GraphModule.

    The archive is checked first (:func:`check_archive`): nothing in it is unpickled or run.
    The result is the graph of ``torch.export.load(path).module()`` as a plain GraphModule
    (``train()`` / ``eval()`` work; the shape guards of the export are kept); its ``meta["qpasses.example_inputs"]``
    holds the archive's example inputs (when it has them) and ``meta["qpasses.level"]`` is
    ``"aten"``, so it can be traced again, quantized further or reported.

    Raises:
        ArchiveError: a missing, damaged or unsafe file.
    """
    import qpasses  # noqa: F401  registers the qpasses:: custom ops the graph may call
    path = os.fspath(path)
    check_archive(path)
    try:
        ep = torch.export.load(path)
    except Exception as e:  # noqa: BLE001
        raise ArchiveError(f"cannot load {path}: {type(e).__name__}: {_first_line(e)}") from None
    exported = ep.module()
    # a plain GraphModule over the same graph (pytree input handling and the shape-guard
    # submodule kept): ExportedProgram.module() replaces train()/eval() by closures that raise
    gm = fx.GraphModule(exported, exported.graph, class_name="GraphModule")
    _check_targets(gm, path)
    meta = dict(exported.meta) if isinstance(getattr(exported, "meta", None), dict) else {}
    ex = ep.example_inputs
    if ex is not None and isinstance(ex[0], tuple) and ex[0]:
        meta[EXAMPLE_INPUTS_KEY] = tuple(ex[0])
    meta["qpasses.level"] = "aten"
    gm.meta = meta
    return gm


def save_compressed(qgm, hf_model, directory, **kwargs):
    """An LLM checkpoint for serving engines (compressed-tensors): :func:`qpasses.checkpoint.save_compressed`."""
    from .checkpoint import save_compressed as _save
    return _save(qgm, hf_model, directory, **kwargs)
