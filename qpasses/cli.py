"""The ``qpasses`` command line (also ``python -m qpasses``).

Exit codes (stable, for scripts):

* ``0`` -- success;
* ``1`` -- a qpasses error (bad rule file, unknown recipe or option, a model or data file that
  cannot be read or is refused, a step or export that failed); one line on stderr as
  ``error: ...`` (rule files as ``file:line:col: message``);
* ``2`` -- usage error (unknown command or flag, missing argument, missing file, wrong suffix);
* ``3`` -- an unexpected internal error (a bug): one line, ``--debug`` prints the traceback.

Files are data: no model, data or output file is unpickled into Python objects (``.pt`` data
uses ``torch.load(weights_only=True)``, tensors and plain values only; see ``docs/security.md``).
Models come from a ``module:factory`` spec (your own code, imported and called by design),
a ``torch.export`` archive (``.pt2``, checked by :func:`qpasses.io.check_archive`) or an ONNX
file; calibration data from ``.pt`` tensors (``torch.load(weights_only=True)``) or NumPy
``.npy`` / ``.npz`` files (``allow_pickle=False``).
"""
from __future__ import annotations

import importlib
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click

from . import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)

#: model files the CLI reads, by suffix
MODEL_SUFFIXES = (".pt2", ".onnx")
#: suffixes of pickle-based files the CLI refuses to read as models
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug")) or os.environ.get("QPASSES_DEBUG", "") not in ("", "0")


def _one_line(text: Any, limit: int = 200) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters (error messages stay one line)."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit - 3].rstrip() + "..."


class _Group(click.Group):
    def invoke(self, ctx):
        from .errors import QPassesError
        try:
            return super().invoke(ctx)
        except QPassesError as e:
            if _debug(ctx):
                import traceback
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            ctx.exit(EXIT_ERROR)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except BrokenPipeError:  # output piped into `head`: not an error
            ctx.exit(EXIT_OK)
        except Exception as e:  # noqa: BLE001
            if _debug(ctx):
                import traceback
                traceback.print_exc()
                click.echo(f"internal error: {type(e).__name__}: {_one_line(e)}", err=True)
            else:
                click.echo(f"internal error: {type(e).__name__}: {_one_line(e)} "
                           "(a bug: run again with --debug for the traceback and report it)", err=True)
            ctx.exit(EXIT_INTERNAL)


# ----------------------------------------------------------------------------- loading

def parse_options(items: Tuple[str, ...]) -> Dict[str, Any]:
    """``k=v`` strings to a dict; values read as YAML scalars/lists (``4``, ``true``, ``[a, b]``)."""
    import yaml
    out: Dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise click.BadParameter(f"{it!r} is not of the form key=value", param_hint="--option")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def _need_file(path: str, hint: str) -> None:
    if not os.path.isfile(path):
        raise click.BadParameter(f"no such file: {path}", param_hint=hint)


def load_tensors(path: str, what: str = "file") -> Any:
    """Tensors from ``path`` without unpickling objects: ``.pt`` / ``.pth`` through
    ``torch.load(weights_only=True)`` (tensors, and lists / tuples / dicts of them), ``.npy`` /
    ``.npz`` through ``numpy.load(allow_pickle=False)`` (an ``.npz`` gives a dict of tensors).
    Anything else -- a pickled object, a damaged or truncated file -- raises a one-line
    :class:`~qpasses.errors.OptionError`."""
    import torch
    from .errors import OptionError
    if path.endswith((".npy", ".npz")):
        import numpy as np
        try:
            if path.endswith(".npy"):
                return torch.from_numpy(np.array(np.load(path, allow_pickle=False)))
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        except Exception as e:  # noqa: BLE001
            if "allow_pickle" in str(e):
                raise OptionError(f"{path} holds pickled objects; refused (qpasses reads numeric arrays only: "
                                  "save them with allow_pickle=False)") from None
            raise OptionError(f"cannot read {what} {path} (not a NumPy file, or truncated): "
                              f"{type(e).__name__}: {_one_line(e)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        import pickle
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
            raise OptionError(f"{path} holds pickled Python objects, not only tensors; refused (qpasses never "
                              "unpickles files: save plain tensors with torch.save(tensor, path), or use .npy)") from None
        raise OptionError(f"cannot read {what} {path} (not a torch.save tensor file, or truncated): "
                          f"{type(e).__name__}: {_one_line(e)}") from None


def _check_onnx(path: str) -> None:
    from .errors import OptionError
    try:
        import onnx
        model = onnx.load(path, load_external_data=False)
        onnx.checker.check_model(model)
        if not len(model.graph.node):
            raise ValueError("the graph has no node")
    except Exception as e:  # noqa: BLE001  protobuf DecodeError, ValidationError, ...
        raise OptionError(f"{path} is not a valid ONNX model (damaged, truncated or another format): "
                          f"{type(e).__name__}: {_one_line(e, 160)}") from None


def _from_factory(spec: str):
    """Import ``module`` of a ``module:factory`` spec and call ``factory()`` (or take the module
    object it names).  This runs the user's own code by design: the spec names code the user
    installed, unlike a data file."""
    import torch
    from .errors import OptionError, nearest
    mod_name, attr = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise OptionError(f"cannot import module {mod_name!r}: {_one_line(e)}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            hint = nearest(part, [n for n in dir(obj) if not n.startswith("_")])
            raise OptionError(f"{mod_name} has no attribute {attr!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, torch.nn.Module):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # deterministic initialisation: same model, same cache entry, same numbers
            try:
                model = obj()
            except Exception as e:  # noqa: BLE001  the user's own code failed
                raise OptionError(f"calling {spec}() failed: {type(e).__name__}: {_one_line(e)}") from e
    else:
        model = obj
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"{spec} gave a {type(model).__name__}, not an nn.Module")
    return model


def load_model(spec: str, weights: Optional[str] = None):
    """MODEL argument -> ``nn.Module`` (``module:factory``, a ``.pt2`` archive) or an ``.onnx`` path.

    Pickle-based files (``.pt``, ``.pth``, ...) are refused without being opened.  ``weights``:
    a ``state_dict`` file loaded safely (:func:`load_tensors`) into a ``module:factory`` model.
    """
    from .errors import OptionError
    if spec.endswith(".onnx"):
        _need_file(spec, "MODEL")
        _check_onnx(spec)
        model = spec
    elif spec.endswith(".pt2"):
        _need_file(spec, "MODEL")
        from .io import load
        model = load(spec)
    elif spec.endswith(PICKLE_SUFFIXES):
        raise OptionError(f"{spec}: qpasses does not load pickled models (unpickling runs code from the file); "
                          "save the model as a torch.export archive, qpasses.save(model, 'model.pt2', "
                          "example_inputs=(x,)), or give MODEL as module:factory (with --weights state_dict.pt)")
    elif ":" in spec:
        model = _from_factory(spec)
    else:
        raise click.BadParameter("give MODEL as module:factory (e.g. qpasses.zoo:DigitsCNN), a .pt2 archive "
                                 "(qpasses.save / torch.export.save) or an .onnx file", param_hint="MODEL")
    if weights:
        if isinstance(model, str) or spec.endswith(".pt2"):
            raise click.BadParameter("--weights applies to a module:factory MODEL", param_hint="--weights")
        _need_file(weights, "--weights")
        state = load_tensors(weights, "weights")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise OptionError(f"{weights} holds a {type(state).__name__}, not a state_dict")
        try:
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001  missing / unexpected keys, shape mismatch
            raise OptionError(f"{weights} does not fit {spec}: {_one_line(e)}") from None
    return model if isinstance(model, str) else model.eval()


DATA_SUFFIXES = (".pt", ".pth", ".npy", ".npz")


def load_data(spec: Optional[str], batch_size: int = 32):
    """``digits`` -> (calibration batches, (x_test, y_test)); a tensor file -> (batches, test or None).

    A file (read by :func:`load_tensors`: tensors only, no Python objects) holds a tensor ``[N, ...]`` (cut into
    batches of ``batch_size``), a list of batches, a pair ``(x, labels)``, or (``.npz``, or a
    dict in a ``.pt``) the arrays ``x`` and optionally ``y``.
    """
    import torch
    from .errors import OptionError
    if spec is None:
        return None, None
    if spec == "digits":
        from .datasets import calib_batches, load_digits_tensors
        return calib_batches(batch_size), load_digits_tensors("test")
    if not spec.endswith(DATA_SUFFIXES):
        raise click.BadParameter(f"{spec}: give 'digits' or a tensor file ({', '.join(DATA_SUFFIXES)})",
                                 param_hint="--data")
    if not os.path.isfile(spec):
        raise click.BadParameter(f"no such file: {spec} (give a tensor file or 'digits')", param_hint="--data")
    obj = load_tensors(spec, "data file")
    if isinstance(obj, dict):
        if "x" in obj:
            obj = (obj["x"], obj["y"]) if "y" in obj else obj["x"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise OptionError(f"{spec} holds arrays {sorted(obj)[:5]}; name them x (inputs) and y (labels)")
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            raise OptionError(f"{spec} holds a scalar, not a batch of inputs [N, ...]")
        return list(obj.split(batch_size)), None
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        if len(obj) == 2 and obj[1].dtype in (torch.int64, torch.int32) and obj[0].dim() and \
                obj[1].dim() == 1 and obj[0].shape[0] == obj[1].shape[0]:
            return list(obj[0].split(batch_size)), (obj[0], obj[1].long())  # (x, labels)
        return list(obj), None
    raise OptionError(f"{spec} holds a {type(obj).__name__}; expected a tensor [N, ...], a list of batches, or (x, y)")


def _accuracy_torch(model, x, y) -> float:
    import torch
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _accuracy_onnx(model, x, y) -> float:
    from .onnx import run_onnx
    return float((run_onnx(model, x)[0].argmax(1) == y.numpy()).mean())


def _prepare(model_spec: str, data: Optional[str], train: Optional[bool], progress: bool,
             weights: Optional[str] = None):
    model = load_model(model_spec, weights)
    batches, test = load_data(data)
    if isinstance(model, str):
        return model, batches, test
    factory = ":" in model_spec and not model_spec.endswith(MODEL_SUFFIXES)
    auto = train is None and data == "digits" and factory and not weights
    if train or auto:
        from .datasets import train_digits_cnn

        def announce() -> None:  # called only when training runs (not when the weights come from the cache)
            click.echo("training on the scikit-learn digits (cached after the first run) ...", err=True)
        try:
            model = train_digits_cnn(model=model, on_train=announce)
        except Exception as e:  # noqa: BLE001  e.g. a model that does not take [N, 1, 8, 8] images
            from .errors import OptionError
            raise OptionError(f"--data digits trains {model_spec} on [N, 1, 8, 8] digit images with 10 classes "
                              f"and that failed ({type(e).__name__}: {_one_line(e)}); pass --no-train or your "
                              "own --data") from None
    return model.eval(), batches, test


def save_model(qgm, path: str, example) -> None:
    """``--out`` of a PyTorch graph: a ``torch.export`` archive (:func:`qpasses.save`), no pickle."""
    from .io import save
    save(qgm, path, example_inputs=example)


def parse_shape(text: Optional[str]):
    """``"1,16,64"`` (or ``"1x16x64"``) -> ``(1, 16, 64)`` (None stays None)."""
    if text is None:
        return None
    try:
        shape = tuple(int(d) for d in re.split(r"[,x]", str(text).strip()))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise click.BadParameter(f"{text!r} is not a shape: give positive sizes separated by commas, e.g. 1,16,64",
                                 param_hint="--shape")
    return shape


def parse_recipe(text: str):
    """``--recipe`` value: one name / file, or several separated by commas (applied in order)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


def _zoo_example(factory) -> Any:
    """qpasses.zoo's deterministic example input for one of its models (None for others)."""
    from . import zoo
    names = {cls: name for name, cls in zoo.MODELS.items()}
    names.update({zoo.TransformerClassifier: "transformer_classifier", zoo.conv_bn_chain: "conv_bn_chain",
                  zoo.ConvBNChain: "conv_bn_chain"})
    try:
        name = names.get(factory)
    except TypeError:  # unhashable
        return None
    return (zoo.example_input(name),) if name else None


def model_example(model, spec: Optional[str] = None):
    """The example inputs MODEL carries, or None: a ``.pt2`` archive's (:func:`qpasses.load` puts
    them in ``meta["qpasses.example_inputs"]``), else the ``example_inputs`` attribute of the
    model or of its ``module:factory`` (a tensor, a tuple, or a callable returning one), else
    the example of a :mod:`qpasses.zoo` model."""
    import torch
    from .frontend import as_inputs
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and meta.get("qpasses.example_inputs") is not None:
        return as_inputs(meta["qpasses.example_inputs"])
    factory = None
    if spec and ":" in spec and not spec.endswith(MODEL_SUFFIXES):
        mod_name, attr = spec.split(":", 1)
        factory = importlib.import_module(mod_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    for owner in (model, factory):
        ex = getattr(owner, "example_inputs", None) if owner is not None else None
        if callable(ex) and not isinstance(ex, torch.Tensor):
            ex = ex()
        if ex is not None:
            return as_inputs(ex)
    return _zoo_example(factory) if factory is not None else None


def _shape_hint(model) -> str:
    """``-s`` to suggest for MODEL, from its first convolution or linear layer."""
    import torch.nn as nn
    for mod in model.modules() if hasattr(model, "modules") else ():
        if isinstance(mod, nn.Conv2d):
            return f"-s 1,{mod.in_channels},H,W (its first layer, {type(mod).__name__}, takes {mod.in_channels} channels)"
        if isinstance(mod, nn.Conv1d):
            return f"-s 1,{mod.in_channels},L (its first layer, {type(mod).__name__}, takes {mod.in_channels} channels)"
        if isinstance(mod, nn.Linear):
            return f"-s 1,{mod.in_features} or -s N,T,{mod.in_features} (its first layer, Linear, takes " \
                   f"{mod.in_features} features)"
    return "-s N,C,... (the shape of one batch of its input)"


def _example(batches, model, input_shape=None, spec: Optional[str] = None):
    """The example inputs to trace with: the first batch of ``--data``, else a standard-normal
    tensor of ``--shape``, else the model's own example (:func:`model_example`)."""
    from .frontend import as_inputs
    if batches:
        return as_inputs(batches[0])
    if input_shape is not None:
        import torch
        return (torch.randn(input_shape, generator=torch.Generator().manual_seed(0)),)
    ex = model_example(model, spec)
    if ex is not None:
        return ex
    from .errors import OptionError
    raise OptionError(f"cannot tell the input shape of {spec or 'MODEL'}: pass --data (calibration batches, "
                      f"also the example inputs) or {_shape_hint(model)}")


def data_free_recipes() -> List[str]:
    """The recipes that run without calibration data, read from the recipes themselves: none of
    their data steps needs the run's data with the default parameters
    (:meth:`qpasses.plan.Plan.needs_data`; e.g. ``calibrate`` with ``no_data: first_batch``)."""
    from . import methods  # noqa: F401  (registers the data steps)
    from .lang.rules import available_names
    from .plan import Plan
    out = []
    for name, kind in sorted(available_names().items()):
        if kind != "recipe":
            continue
        try:
            if not Plan(name, {}).needs_data():
                out.append(name)
        except Exception:  # noqa: BLE001  a broken user recipe is reported by `rules check`, not by --help
            continue
    return out


class _LazyHelpOption(click.Option):
    """An option whose help text ends with text computed only when help is shown."""

    def __init__(self, *args, help_tail=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._help_tail = help_tail

    def get_help_record(self, ctx):
        if self._help_tail is not None and not getattr(self, "_tail_added", False):
            self.help = f"{self.help} {self._help_tail()}"
            self._tail_added = True
        return super().get_help_record(ctx)


def _data_free_help() -> str:
    return f"Recipes that run without --data: {', '.join(data_free_recipes()) or 'none'}."


# ----------------------------------------------------------------------------- commands

@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(version=__version__, prog_name="qpasses", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="On an error, print the traceback too (also QPASSES_DEBUG=1).")
def main(debug=False):
    """qpasses: a declarative graph-rewriting compiler for neural-network quantization.

    Exit codes: 0 ok, 1 qpasses error (message on stderr), 2 usage error, 3 internal error.
    MODEL is module:factory (your code, imported and called), a torch.export archive (.pt2)
    or an .onnx file. Files are data: .pt data goes through torch.load(weights_only=True),
    nothing is unpickled into Python objects.
    Start with:  qpasses quantize qpasses.zoo:DigitsCNN --data digits --out out/digits_int8.onnx
    """


_DATA_HELP = "Calibration data: 'digits', or a tensor file: .pt (torch.save of a tensor [N,...], a list of " \
             "batches or (x, y); read with weights_only=True), .npy / .npz (allow_pickle=False)."
_WEIGHTS_HELP = "A state_dict file (.pt read with weights_only=True, or .npz) to load into a module:factory MODEL."


@main.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--recipe", "-r", default="ptq_int8", show_default=True,
              help="Recipe, rule family or rule file; several separated by commas are applied in order "
                   "(e.g. dynamic_int8,lower).")
@click.option("--option", "-o", "options", multiple=True, metavar="K=V", help="Recipe parameter (repeatable), e.g. -o w_bits=4.")
@click.option("--data", "-d", metavar="FILE|digits", help=_DATA_HELP)
@click.option("--shape", "--input-shape", "-s", "input_shape", metavar="N,C,...", cls=_LazyHelpOption,
              help_tail=_data_free_help,
              help="Without --data: trace from a random input of this shape (default: the model's own example).")
@click.option("--weights", "-w", metavar="FILE", help=_WEIGHTS_HELP)
@click.option("--out", "-O", "out", type=click.Path(dir_okay=False),
              help="Output: .pt2 (torch.export archive, qpasses.load reads it) or .onnx (QDQ).")
@click.option("--opset", default=None, type=int, help="ONNX opset for .onnx output (default 21).")
@click.option("--train/--no-train", default=None, help="Train on the digits first (default: when --data digits and MODEL is module:factory).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
@click.option("--report/--no-report", "show_report", default=True, show_default=True, help="Print the per-rule report.")
def quantize(model, recipe, options, data, out, opset, train, progress, show_report, input_shape=None, weights=None):
    """Quantize MODEL (module:factory, a .pt2 archive or an .onnx file) with a recipe.

    \b
    Examples:
      qpasses quantize qpasses.zoo:DigitsCNN --data digits --out out/digits_int8.onnx
      qpasses quantize model.pt2 --data calib.pt -o w_bits=4 -o observer=percentile --out q.pt2
      qpasses quantize mypkg.models:build --weights state.pt --data calib.npy --out q.onnx
      qpasses quantize fp32.onnx --data digits --out int8.onnx
      qpasses quantize qpasses.zoo:TransformerEncoderBlock -r dynamic_int8,lower -s 1,16,64 --out t.pt2
    """
    import torch
    import qpasses
    from .onnx import DEFAULT_OPSET
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    opts = parse_options(options)
    shape = parse_shape(input_shape)
    recipe = parse_recipe(recipe)
    if out and out.endswith(PICKLE_SUFFIXES):
        raise click.BadParameter(f"{out}: qpasses writes no pickles; give a .pt2 path (a torch.export archive "
                                 "that qpasses.load / torch.export.load read) or .onnx", param_hint="--out")
    if out and not out.endswith((".pt2", ".onnx")):
        raise click.BadParameter("--out must end in .pt2 or .onnx", param_hint="--out")
    if model.endswith(".onnx") and out and not out.endswith(".onnx"):
        raise click.BadParameter("an .onnx model quantizes to an .onnx file", param_hint="--out")
    if not model.endswith(".onnx"):
        qpasses.PassManager(recipe, **opts)  # unknown recipe / option: fail before any training
    m, batches, test = _prepare(model, data, train, progress, weights)
    t0 = time.perf_counter()
    if isinstance(m, str):  # ONNX in
        from .onnx import quantize_onnx
        from .report import Report
        if batches is None:
            raise click.UsageError("quantizing an .onnx model needs --data")
        rep = Report()
        qm = quantize_onnx(m, batches, recipe=recipe, path=out, progress=progress, report=rep, **opts)
        if show_report:
            click.echo(rep.table())
        if test is not None:
            click.echo(f"accuracy (onnxruntime): fp32 {_accuracy_onnx(m, *test):.4f}  int8 {_accuracy_onnx(qm, *test):.4f}")
        click.echo(f"done in {time.perf_counter() - t0:.1f}s" + (f": wrote {out}" if out else ""))
        return
    ex = _example(batches, m, shape, model)
    gm = qpasses.trace(m, ex)
    pm = qpasses.PassManager(recipe, progress=progress, **opts)
    qgm = pm.run(gm, data=batches)
    if show_report:
        click.echo(pm.report)
    lines = []
    if test is not None:
        label = recipe if isinstance(recipe, str) else "+".join(recipe)
        lines.append(f"accuracy: fp32 {_accuracy_torch(m, *test):.4f}  {label} (fake-quant) {_accuracy_torch(qgm, *test):.4f}")
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        if out.endswith(".onnx"):
            qpasses.export_onnx(qgm, ex, out, opset=opset or DEFAULT_OPSET)
            if test is not None:
                lines.append(f"accuracy (onnxruntime, {out}): {_accuracy_onnx(out, *test):.4f}")
        else:
            save_model(qgm, out, ex)
    for ln in lines:
        click.echo(ln)
    click.echo(f"done in {time.perf_counter() - t0:.1f}s" + (f": wrote {out}" if out else ""))


@main.command(context_settings=CONTEXT)
@click.option("--out", "-O", default="out/digits_int8.onnx", show_default=True, type=click.Path(dir_okay=False))
@click.pass_context
def demo(ctx, out):
    """Exactly `qpasses quantize qpasses.zoo:DigitsCNN --data digits --out OUT`: train (or load
    cached) the digits CNN, quantize it with ptq_int8, print the per-rule report, export QDQ
    ONNX, compare accuracy."""
    ctx.invoke(quantize, model="qpasses.zoo:DigitsCNN", recipe="ptq_int8", options=(), data="digits", out=out,
               opset=None, train=None, progress=True, show_report=True)


# ----------------------------------------------------------------------------- rules

@main.group(cls=_Group, context_settings=CONTEXT)
def rules():
    """List, show and check rule files and recipes."""


_LIST_KINDS = ("all", "recipes", "rules", "steps", "actions", "constraints")


@rules.command("list", context_settings=CONTEXT)
@click.argument("what", required=False, default="all", type=click.Choice(_LIST_KINDS))
def rules_list(what):
    """List what rule files can name: recipes, rule families, data steps, actions and
    constraints (WHAT: one of them, default all).  Data steps, actions and constraints show
    the arguments they declare (types, ranges, choices, defaults), as rule files may pass them."""
    from . import methods  # noqa: F401  (registers the actions, constraints and data steps)
    from .lang.registry import ACTIONS, CONSTRAINTS, DATA_STEPS, describe_args
    from .lang.rules import _named_files, find_named
    rows = []
    for name, path in sorted(_named_files().items()):
        try:
            obj = find_named(name)
            doc = " ".join(str(obj.doc).split())
            kind = "recipe" if path.parent.name == "recipes" else "rules"
        except Exception as e:  # noqa: BLE001
            kind, doc = "broken", str(e)
        if what in ("all", kind + "s", kind):
            rows.append((kind, name, doc))
    if rows:
        w = max(len(r[1]) for r in rows)
        for kind, name, doc in sorted(rows, key=lambda r: ({"recipe": 0, "rules": 1}.get(r[0], 2), r[1])):
            click.echo(f"{kind:7} {name:{w}}  {doc[:90]}")
    for kind, table in (("step", DATA_STEPS), ("action", ACTIONS), ("constraint", CONSTRAINTS)):
        if what not in ("all", kind + "s"):
            continue
        for name, reg in sorted(table.items()):
            sig = describe_args(name, kind)
            if len(sig) <= 100:
                click.echo(f"{kind:10} {sig}")
            else:  # one declared argument a line
                parts = [a.describe() for a in reg.args.values()] + (["**options"] if reg.extra_kwargs else [])
                click.echo(f"{kind:10} {name}(\n" + ",\n".join(f"{'':14}{p}" for p in parts) + ")")
            first = reg.doc.strip().split("\n")[0] if reg.doc else ""
            if first:
                click.echo(f"{'':10}   {first[:100]}")


@rules.command("show", context_settings=CONTEXT)
@click.argument("name")
def rules_show(name):
    """Print the file of a recipe or rule family (by NAME or path)."""
    from .errors import Location
    from .lang.rules import find_named, load_file
    obj = (load_file(name) if (name.endswith((".yaml", ".yml")) and os.path.isfile(name))
           else find_named(name, Location("qpasses rules show")))
    click.echo(f"# {obj.path}")
    click.echo(Path(obj.path).read_text(encoding="utf-8"))


def _is_shared_declarations(path: str) -> bool:
    """Whether ``path`` is a shared-declarations file (a top-level ``shared:`` key)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.startswith("shared:") for line in text.splitlines())


@rules.command("check", context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def rules_check(files):
    """Validate rule / recipe FILES; errors print as file:line:col: message (exit 1 if any)."""
    from .errors import RuleError
    from .lang.rules import Recipe, load_file
    from .manager import PassManager
    bad = 0
    for f in files:
        try:
            if _is_shared_declarations(f):
                from .lang.rules import decode_text, parse_shared_text
                n = len(parse_shared_text(decode_text(Path(f).read_bytes(), f), f))
                click.echo(f"{f}: ok (shared declarations: {n} parameters)")
                continue
            obj = load_file(f)
            PassManager(obj)  # binds parameters: undefined ${params}, unknown steps
            what = (f"recipe {obj.name}: {len(obj.steps)} steps" if isinstance(obj, Recipe)
                    else f"rule family {obj.name}: {len(obj.rules)} rules")
            click.echo(f"{f}: ok ({what})")
        except RuleError as e:
            bad += 1
            click.echo(str(e), err=True)
    if bad:
        sys.exit(EXIT_ERROR)


# ----------------------------------------------------------------------------- explain

@main.command(context_settings=CONTEXT)
@click.argument("model")
@click.argument("rule")
@click.argument("node", required=False)
@click.option("--recipe", "-r", default="ptq_int8", show_default=True, help="Recipe or rule family holding RULE.")
@click.option("--option", "-o", "options", multiple=True, metavar="K=V", help="Recipe parameter (repeatable).")
@click.option("--shape", "--input-shape", "-s", "shape", metavar="N,C,...",
              help="Example input shape for tracing (default: the model's own example: a .pt2 archive's, "
                   "the factory's example_inputs, a qpasses.zoo model's).")
@click.option("--weights", "-w", metavar="FILE", help=_WEIGHTS_HELP)
def explain(model, rule, node, recipe, options, shape, weights=None):
    """Why RULE does (not) match NODE of MODEL (all candidate nodes when NODE is omitted).

    The rule is tried on the traced (input) graph.  For an .onnx MODEL, RULE runs on the ONNX
    graph through the onnx-graphsurgeon adapter (canonicalize / qdq_cleanup rules).
    """
    import qpasses
    m = load_model(model, weights)
    if isinstance(m, str):
        import onnx
        import onnx_graphsurgeon as gs
        from .onnx.rewrite import explain as onnx_explain
        g = gs.import_onnx(onnx.load(m))
        names = [node] if node else [n.name for n in g.nodes]
        bound = qpasses.PassManager(recipe, **parse_options(options)).rules  # the recipe's rules, bound
        for nm in names:
            click.echo(onnx_explain(g, rule, nm, family=bound))
        return
    gm = qpasses.trace(m, _example(None, m, parse_shape(shape), model))
    pm = qpasses.PassManager(recipe, **parse_options(options))
    if node:
        nodes = [node]
    else:                                   # the rule's candidate anchors: nodes of its root op classes
        from .matcher import Matcher
        bound = [r for r in pm.rules if r.name == rule]
        anchors = bound[0].anchor_classes() if bound else None
        mt = Matcher(gm)
        nodes = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")
                 and (anchors is None or mt.classify(n) in anchors)]
        if bound and not nodes:
            click.echo(f"rule {rule!r} anchors on {'|'.join(anchors)}; the traced graph has no such node")
            return
    for nm in nodes:
        click.echo(str(pm.explain(rule, nm, gm)))


# ----------------------------------------------------------------------------- report

def layer_table(qgm, example) -> List[Dict[str, Any]]:
    """Per weighted layer: op, bits, scales, output SQNR, size (:func:`qpasses.layer_report.layer_table`)."""
    from .layer_report import layer_table as table
    return table(qgm, example)


def format_layers(rows: List[Dict[str, Any]]) -> str:
    head = ("layer", "op", "w_bits", "a_bits", "w_scale", "a_scale", "SQNR dB", "KiB", "fp32 KiB")
    body = [(r["layer"], r["op"], str(r["w_bits"]), str(r["a_bits"]), r["w_scale"], r["a_scale"],
             "inf" if math.isinf(r["sqnr_db"]) else "-" if math.isnan(r["sqnr_db"]) else f"{r['sqnr_db']:.1f}",
             f"{r['size_kib']:.2f}",
             f"{r['fp32_kib']:.2f}") for r in rows]
    tot_q = sum(r["size_kib"] for r in rows)
    tot_f = sum(r["fp32_kib"] for r in rows)
    body.append(("total", "", "", "", "", "", "", f"{tot_q:.2f}", f"{tot_f:.2f}"))
    allrows = [head] + body
    w = [max(len(r[i]) for r in allrows) for i in range(len(head))]
    out = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in allrows]
    out.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(out)


@main.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--recipe", "-r", default="ptq_int8", show_default=True, help="Recipe to apply first (not with --as-is).")
@click.option("--option", "-o", "options", multiple=True, metavar="K=V", help="Recipe parameter (repeatable).")
@click.option("--data", "-d", metavar="FILE|digits", help="Calibration data (as for quantize).")
@click.option("--shape", "--input-shape", "-s", "input_shape", metavar="N,C,...",
              help="Without --data: a random input of this shape (as for quantize).")
@click.option("--weights", "-w", metavar="FILE", help=_WEIGHTS_HELP)
@click.option("--as-is", is_flag=True, help="MODEL is already quantized (a .pt2 archive written by quantize --out): "
                                           "report it without running a recipe.")
@click.option("--train/--no-train", default=None, help="Train on the digits first (as for quantize).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def report(model, recipe, options, data, as_is, train, as_json, input_shape=None, weights=None):
    """Per-layer table of a quantized model: op, bits, scales, SQNR against float, size.

    MODEL is a PyTorch model (the recipe is applied first, unless --as-is; SQNR against the same
    graph with fake quantization off) or a QDQ .onnx file (SQNR against the same graph with its
    activation Q/DQ pairs removed: the file has no float weights, so only activation error counts).
    """
    import json
    import qpasses
    m, batches, test = _prepare(model, data, train, False, weights)
    if isinstance(m, str):  # a QDQ .onnx file: report it as is
        from .onnx.inspect import onnx_layer_table
        if batches is None:
            raise click.UsageError("report on an .onnx model needs --data (for the SQNR column)")
        rows = onnx_layer_table(m, batches)
        click.echo(json.dumps(rows, indent=1) if as_json else format_layers(rows))
        return
    ex = _example(batches, m, parse_shape(input_shape), model)
    if as_is:
        qgm = m
    else:
        qgm = qpasses.PassManager(parse_recipe(recipe), quiet=True, **parse_options(options)).run(qpasses.trace(m, ex),
                                                                                      data=batches)
    rows = layer_table(qgm, ex)
    if not rows:
        from .errors import OptionError
        raise OptionError("no weighted layer (conv / linear, or an integer kernel op) found in the graph")
    click.echo(json.dumps(rows, indent=1) if as_json else format_layers(rows))


# ----------------------------------------------------------------------------- draw

@main.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--out", "-O", required=True, type=click.Path(dir_okay=False), help="Output .svg or .html.")
@click.option("--recipe", "-r", default=None, help="Apply this recipe first (needs --data); default: draw the traced graph.")
@click.option("--option", "-o", "options", multiple=True, metavar="K=V", help="Recipe parameter (repeatable).")
@click.option("--data", "-d", metavar="FILE|digits", help="Calibration data.")
@click.option("--shape", "--input-shape", "-s", "shape", metavar="N,C,...",
              help="Example input shape when no --data is given (default: the model's own example, as for "
                   "explain).")
@click.option("--weights", "-w", metavar="FILE", help=_WEIGHTS_HELP)
@click.option("--train/--no-train", default=None, help="Train on the digits first (as for quantize).")
def draw(model, out, recipe, options, data, shape, train, weights=None):
    """Draw the graph of MODEL as SVG (or HTML with inline SVG); quantized nodes are coloured."""
    import qpasses
    from .draw import draw_graph
    if not out.endswith((".svg", ".html")):
        raise click.BadParameter("--out must end in .svg or .html", param_hint="--out")
    m, batches, _ = _prepare(model, data, train, False, weights)
    if isinstance(m, str):
        raise click.UsageError("draw works on PyTorch models (module:factory or .pt2)")
    ex = _example(batches, m, parse_shape(shape), model)
    gm = qpasses.trace(m, ex)
    if recipe:
        gm = qpasses.PassManager(recipe, quiet=True, **parse_options(options)).run(gm, data=batches)
    n = draw_graph(gm, out, title=f"{model}" + (f" ({recipe})" if recipe else ""))
    click.echo(f"wrote {out} ({n} nodes)")


def run() -> None:  # pragma: no cover - console entry with stable exit codes
    main(prog_name="qpasses")


if __name__ == "__main__":  # pragma: no cover
    run()
