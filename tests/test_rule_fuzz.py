"""Fuzzing the rule-file reader (issue 24): grammar-built files and YAML / byte mutations.

Every input must end in one of two ways, within a time bound:

* success: the file loads, a PassManager binds it and (rule families) runs it on a small
  model, leaving the input graph unchanged; or
* a :class:`QPassesError`; while loading and binding it must be a located ``RuleError``
  (``file:line``), at run time any ``QPassesError`` (the graph is still unchanged).

Bounded: a few hundred examples, derandomized (the same ones every run), a deadline per
example.  ``pytest -s`` prints the outcome counts.
"""
from __future__ import annotations

import collections
import copy
import time
from datetime import timedelta

import pytest
import torch
import torch.nn as nn
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import qpasses  # noqa: E402
from qpasses.errors import QPassesError, RuleError  # noqa: E402
from qpasses.lang.registry import ACTIONS, CONSTRAINTS  # noqa: E402
from qpasses.lang.rules import Recipe, decode_text, parse_text  # noqa: E402
from qpasses.lang.syntax import format_value  # noqa: E402
from qpasses.opclasses import all_class_names  # noqa: E402

FILE = "fuzz.yaml"
#: load + bind must finish within this many seconds of CPU time (a bomb or a super-linear parse
#: burns CPU; CPU time, not wall time, so that a loaded machine does not fail the bound)
LOAD_BOUND_S = 2.0
FUZZ = settings(max_examples=150, deadline=timedelta(seconds=5), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# ----------------------------------------------------------------------------- the model


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(y, 1)) + 1.0


_GM = {}


def _graph():
    if "gm" not in _GM:
        torch.manual_seed(0)
        m = _Net().eval()
        x = torch.randn(2, 3, 8, 8)
        _GM["gm"] = qpasses.trace(m, (x,))
        _GM["x"] = x
    return _GM["gm"], _GM["x"]


def _snapshot(gm):
    return (gm.code, [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes],
            sorted(dict(gm.named_modules())), {k: v.clone() for k, v in gm.state_dict().items()})


def _same(a, b) -> bool:
    return a[:3] == b[:3] and a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


# ----------------------------------------------------------------------------- the check

def outcome(data: bytes) -> str:
    """'ok' / 'load error' / 'run error' for one input; fails the test on anything else."""
    t0 = time.process_time()
    try:
        obj = parse_text(decode_text(data, FILE), FILE)
        pm = qpasses.PassManager(obj)
    except RuleError as e:
        # located: in the fuzzed file, or (a recipe's parameter value reaching a shipped rule
        # family's call) at that call
        assert e.loc.file and e.loc.line is not None and str(e).startswith(f"{e.loc.file}:{e.loc.line}"), \
            f"error without a location: {e!r}\n--- input ---\n{data!r}"
        return "load error"
    except QPassesError as e:
        raise AssertionError(f"unlocated {type(e).__name__}: {e}\n--- input ---\n{data!r}") from None
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{type(e).__name__} escaped: {e}\n--- input ---\n{data!r}") from e
    finally:
        took = time.process_time() - t0
        assert took < LOAD_BOUND_S, f"loading took {took:.2f} s of CPU\n--- input ---\n{data[:500]!r}"
    if isinstance(obj, Recipe):
        return "ok"  # recipes need data (calibration); binding them is the check
    gm, x = _graph()
    before = _snapshot(gm)
    try:
        out = pm.run(gm, data=[x])
        assert out is not gm
    except QPassesError:
        return "run error"
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{type(e).__name__} escaped from run: {e}\n--- input ---\n{data!r}") from e
    finally:
        assert _same(before, _snapshot(gm)), f"the input graph changed\n--- input ---\n{data!r}"
    return "ok"


# ----------------------------------------------------------------------------- grammar

_OPS = sorted(all_class_names())
_WEIRD = [0, -1, 1, 2, 8, 16, 17, 1000, 2.5, -0.0, True, False, None, "8", "", "nonsense", "minmax",
          "per_token", "gemmlowp", "laplace", "first", [], [1, 2], ["a"], 1e308, 10 ** 30]


def _value_for(draw, spec, broken):
    """A value for an argument: allowed ones, or (``broken``) sometimes not."""
    good = []
    if spec.choices is not None:
        good += list(spec.choices)
    if spec.type in ("int", "float"):
        lo = spec.min if spec.min is not None else 0
        hi = spec.max if spec.max is not None else lo + 16
        good += [lo, hi] if not spec.multiple_of else [spec.min or spec.multiple_of]
    if spec.type == "bool":
        good += [True, False]
    if not spec.required and spec.default is not None:
        good.append(spec.default)
    if good and not (broken and draw(st.booleans())):
        return draw(st.sampled_from(good))
    return draw(st.sampled_from(_WEIRD))


@st.composite
def _call(draw, table, nodes, params, broken):
    names = sorted(table)
    name = draw(st.sampled_from(names))
    reg = table[name]
    parts = []
    for spec in reg.args.values():
        if spec.type == "node":
            parts.append(draw(st.sampled_from(nodes + (["$zz"] if broken else []))))
            continue
        if not spec.required and draw(st.booleans()):
            continue
        if params and draw(st.sampled_from([False, False, True])):
            v = "${" + draw(st.sampled_from(params + (["undeclared"] if broken else []))) + "}"
        else:
            v = format_value(_value_for(draw, spec, broken))
        parts.append(f"{spec.name}={v}")
    if broken and draw(st.booleans()):
        parts.append("bogus_arg=1")
    return f"{name}({', '.join(parts)})"


@st.composite
def _pattern(draw, broken):
    ops = draw(st.lists(st.sampled_from(_OPS + ["*"] + (["nonexistent_op"] if broken else [])), min_size=1,
                        max_size=2))
    head = "|".join(ops) if "*" not in ops else "*"
    nodes = ["$a"]
    if draw(st.booleans()):
        cop = draw(st.sampled_from(_OPS + ["*"]))
        child = f" ({cop} $b ?x ...)"
        nodes.append("$b")
    else:
        child = draw(st.sampled_from([" ?x", " _", " $b", ""]))
        if child == " $b":
            nodes.append("$b")
    rest = draw(st.sampled_from([" ...", "", " :groups 1", " :bias None ..."]))
    return f"({head} $a{child}{rest})", nodes


@st.composite
def _param(draw, broken):
    if not broken:
        return draw(st.sampled_from([8, 4, True, "minmax", {"default": 8, "type": "int", "min": 2, "max": 16},
                                     {"default": "minmax", "choices": ["minmax", "mse"]},
                                     {"default": 1, "type": "int", "min": 1, "max": 8}]))
    kind = draw(st.sampled_from(["plain", "spec", "bad"]))
    if kind == "plain":
        return draw(st.sampled_from(_WEIRD))
    spec = {"default": draw(st.sampled_from(_WEIRD))}
    if draw(st.booleans()):
        spec["type"] = draw(st.sampled_from(["int", "float", "bool", "str", "list", "any", "integer"]))
    if draw(st.booleans()):
        spec["min"] = draw(st.sampled_from([0, 2, 5, "a", None]))
    if draw(st.booleans()):
        spec["max"] = draw(st.sampled_from([1, 8, 16, [1], None]))
    if draw(st.booleans()):
        spec["choices"] = draw(st.sampled_from([[1, 2], ["minmax", "mse"], 5, [], [None]]))
    if kind == "bad":
        spec[draw(st.sampled_from(["defualt", "doc"]))] = draw(st.sampled_from([1, "x", [1]]))
    return spec


@st.composite
def family_files(draw) -> bytes:
    """A rule-family file from the grammar: well-formed (argument values from their declared
    ranges) or, for one example in four, ``broken`` anywhere (structure, types, values)."""
    broken = draw(st.sampled_from([False, False, False, True]))
    params = draw(st.dictionaries(st.sampled_from(["a_bits", "w_bits", "kind", "p", "q"]), _param(broken),
                                  max_size=3))
    pnames = sorted(params)
    doc = {"version": draw(st.sampled_from([1, 2, 1.0, True, "1"])) if broken else 1}
    if draw(st.booleans()):
        doc["family"] = draw(st.sampled_from(["fz", ["x"]])) if broken else "fz"
    if params:
        doc["params"] = params
    stages = draw(st.lists(st.sampled_from(["s1", "s2", "s3"]), max_size=3, unique=not broken))
    if stages:
        doc["stages"] = [s if draw(st.booleans()) else
                         {"name": s, "mode": draw(st.sampled_from(["once", "fixpoint"] + (["twice"] if broken else []))),
                          "max_iterations": draw(st.sampled_from([1, 4] + ([0, 2000, True, 2.5] if broken else [])))}
                         for s in stages]
    rules = []
    for i in range(draw(st.integers(1, 3))):
        pat, nodes = draw(_pattern(broken))
        rule = {"name": draw(st.sampled_from([f"r{i}", "r0", "bad name"])) if broken else f"r{i}", "match": pat,
                "rewrite": draw(_call(ACTIONS, nodes, pnames, broken))}
        if draw(st.booleans()):
            rule["where"] = draw(st.lists(_call(CONSTRAINTS, nodes, pnames, broken), max_size=2))
        if draw(st.booleans()):
            rule["unless"] = draw(_call(CONSTRAINTS, nodes, pnames, broken))
        if stages and draw(st.booleans()):
            rule["stage"] = draw(st.sampled_from(stages + (["other"] if broken else [])))
        if broken and draw(st.booleans()):
            rule[draw(st.sampled_from(["when", "keeps", "doc", "rewrit"]))] = draw(
                st.sampled_from([True, 5, "$a", ["$b"], "${p}", None]))
        rules.append(rule)
    doc["rules"] = rules
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()


@st.composite
def recipe_files(draw) -> bytes:
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["rules", "rules", "step", "recipe"]))
        name = draw(st.sampled_from({"rules": ["canonicalize", "observe", "convert", "nope"],
                                     "step": ["calibrate", "check_integer", "calibrat"],
                                     "recipe": ["ptq_int8", "fz_self"]}[kind]))
        s = {kind: name}
        if kind == "step" and draw(st.booleans()):
            s["with"] = {draw(st.sampled_from(["strict", "calib_batches", "stric"])): draw(st.sampled_from(_WEIRD))}
        if draw(st.integers(0, 4)) == 0:
            s["when"] = draw(st.sampled_from([True, False, "${use}", 3]))
        steps.append(s)
    doc = {"version": 1, "recipe": "fz_self", "params": {"use": draw(st.sampled_from([True, 1, "x"]))},
           "steps": steps}
    return yaml.safe_dump(doc, sort_keys=False).encode()


# ----------------------------------------------------------------------------- mutations

_BASE = [b"""\
version: 1
family: fz
params:
  a_bits: {default: 8, type: int, min: 2, max: 16}
  kind: {default: minmax, choices: [minmax, mse]}
stages:
  - {name: prep, mode: once}
rules:
  - name: fold
    match: (batch_norm $bn (conv2d $conv ?x))
    where: [eval_mode($bn)]
    rewrite: fold_bn($conv, $bn)
  - name: obs
    stage: prep
    match: (linear $op ?x ...)
    unless:
      - input_quantized($op)
    rewrite: observe_input($op, index=0, kind=${kind}, bits=${a_bits})
""", b"""\
version: 1
recipe: fz_recipe
params: {a_bits: 6}
steps:
  - rules: canonicalize
  - rules: observe
  - step: calibrate
    with: {calib_batches: 2}
  - rules: convert
"""]

_SNIPPETS = [b"!!python/object:os.system ", b"!!python/tuple ", b"!!bool maybe", b"!!int abc", b"!!set ",
             b"&a ", b"*a", b"<<: *a\n", b"---\n", b"%TAG ! tag:x,2000:\n", b"[[[[[[[[[[[[", b"]]]", b"{", b"}",
             b": ", b"- ", b"\n  ", b"\t", b"\"\\x", b"'\\u12'", b"${", b"${p}", b"$", b"(", b")", b"((((((((",
             b"...", b":groups", b"\xff", b"\xc3", b"\xe2\x82", b"\x00", "é".encode(), b"#", b"|\n", b">\n",
             b"?", b"!", b"%", b"@", b"`", b"1e999", b"0x", b"-1", b"true", b"null", b"~", b",", b"=", b"|",
             b"bits=0", b"bits=\"8\"", b"kind=nonsense", b"group_size=3", b"jitter=-1", b"max_iterations: true\n"]


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(_BASE)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "insert", "delete", "duplicate", "replace_byte", "swap_lines",
                                   "nest", "bomb"]))
        n = len(data)
        i = draw(st.integers(0, max(n - 1, 0)))
        if op == "insert":
            data[i:i] = draw(st.sampled_from(_SNIPPETS))
        elif op == "delete":
            data[i:i + draw(st.integers(1, 20))] = b""
        elif op == "duplicate":
            j = min(n, i + draw(st.integers(1, 40)))
            data[j:j] = data[i:j]
        elif op == "replace_byte" and n:
            data[i] = draw(st.integers(0, 255))
        elif op == "swap_lines":
            lines = bytes(data).split(b"\n")
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[a], lines[b] = lines[b], lines[a]
            data = bytearray(b"\n".join(lines))
        elif op == "nest":
            d = draw(st.sampled_from([10, 40, 200, 1500]))
            data[i:i] = draw(st.sampled_from([b"[" * d + b"]" * d, b"(relu $r " * d + b"?x" + b")" * d,
                                              b"{a: " * d + b"1" + b"}" * d]))
        elif op == "bomb":
            lines = [b"x0: &x0 [a, a, a, a, a, a, a, a, a]"]
            for k in range(1, draw(st.integers(2, 9))):
                lines.append(b"x%d: &x%d [" % (k, k) + b", ".join([b"*x%d" % (k - 1)] * 9) + b"]")
            data = bytearray(b"version: 1\nparams:\n" + b"\n".join(b"  " + ln for ln in lines) +
                             b"\nrules: [{name: r, match: '(relu $r ?x)', rewrite: 'bypass($r, $r)'}]\n")
    return bytes(data)


@st.composite
def text_insertions(draw) -> str:
    """Arbitrary Unicode (control characters and lone surrogates included) inserted into a base
    file handed over as a Python ``str`` (the :func:`parse_text` path)."""
    text = draw(st.sampled_from(_BASE)).decode()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        piece = draw(st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()),
                             min_size=1, max_size=12))
        text = text[:i] + piece + text[i:]
    return text


def _text_outcome(text: str) -> str:
    t0 = time.process_time()
    try:
        qpasses.PassManager(parse_text(text, FILE))
    except RuleError as e:
        assert e.loc.file and e.loc.line is not None, f"error without a location: {e!r}\n{text!r}"
        return "load error"
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{type(e).__name__} escaped: {e}\n--- input ---\n{text!r}") from e
    finally:
        assert time.process_time() - t0 < LOAD_BOUND_S
    return "ok"


# ----------------------------------------------------------------------------- the tests

def _run(strategy, examples, check=outcome):
    stats = collections.Counter()

    @settings(FUZZ, max_examples=examples)
    @given(strategy)
    def inner(data):
        stats[check(data)] += 1

    inner()
    print(f"\n{strategy}: {dict(stats)}")
    return stats


def test_fuzz_grammar_built_rule_families():
    stats = _run(family_files(), 250)
    assert stats["ok"] > 0 and stats["load error"] > 0


def test_fuzz_grammar_built_recipes():
    stats = _run(recipe_files(), 80)
    assert stats["ok"] > 0 and stats["load error"] > 0


def test_fuzz_yaml_and_byte_mutations():
    stats = _run(mutated_files(), 300)
    assert stats["load error"] > 0


def test_fuzz_unicode_text_insertions():
    stats = _run(text_insertions(), 100, _text_outcome)
    assert stats["load error"] > 0


def test_base_files_are_valid():
    for data in _BASE:
        assert outcome(data) == "ok"
