"""Issue 24, "qpasses rules check catches every argument error at load time": every shipped
action, constraint and data step declares its arguments, so a recipe's ``with:`` for any
step is checked when the file is loaded (``gptq`` and ``calibrate_observers`` were not)."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import qpasses
from qpasses.cli import main
from qpasses.errors import ArgumentError
from qpasses.lang.registry import ACTIONS, CONSTRAINTS, DATA_STEPS
from qpasses.lang.rules import load_file
from qpasses.plan import Plan

SRC = Path(qpasses.__file__).parent


def _shipped(reg):
    return {k: v for k, v in reg.items() if not k.startswith("test_")}


def test_every_shipped_function_declares_its_arguments():
    for what, reg in (("action", ACTIONS), ("constraint", CONSTRAINTS), ("data step", DATA_STEPS)):
        undeclared = sorted(k for k, v in _shipped(reg).items() if not v.declared)
        assert not undeclared, f"{what}s without declared arguments: {undeclared}"


def _reads(path: Path) -> set:
    return set(re.findall(r'ctx\.arg\("(\w+)"', path.read_text()))


def test_the_steps_declare_what_they_read():
    assert _reads(SRC / "methods" / "gptq" / "steps.py") | {"distributed"} <= set(DATA_STEPS["gptq"].args)
    # calibrate_observers runs calibrate's body
    assert _reads(SRC / "methods" / "ptq" / "calibrate.py") <= set(DATA_STEPS["calibrate_observers"].args)
    assert set(DATA_STEPS["calibrate_observers"].args) == set(DATA_STEPS["calibrate"].args)


def _recipe(tmp_path, step, with_):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(f"""\
        version: 1
        recipe: r
        steps:
          - rules: canonicalize
          - step: {step}
            with: {with_}
        """))
    return p


@pytest.mark.parametrize("step, with_, col, words", [
    ("gptq", "{damp: -1}", 18, "damp must be >= 0.0, got -1"),
    ("gptq", "{dammp: 0.1}", 12, "unknown argument 'dammp' (did you mean 'damp'?)"),
    ("gptq", "{blocksize: 0}", 23, "blocksize must be >= 1, got 0"),
    ("gptq", "{act_order: maybe}", 23, "act_order must be true or false"),
    ("gptq", "{w_bits: 1}", 20, "w_bits must be >= 2"),
    ("calibrate_observers", "{calib_batchez: 2}", 12, "unknown argument 'calib_batchez'"),
    ("calibrate_observers", "{no_data: maybe}", 21, "no_data must be one of"),
])
def test_with_of_every_step_is_checked_at_load(tmp_path, step, with_, col, words):
    p = _recipe(tmp_path, step, with_)
    with pytest.raises(ArgumentError) as e:
        load_file(str(p))
    assert (e.value.loc.line, e.value.loc.col) == (6, col) and words in str(e.value)
    r = CliRunner().invoke(main, ["rules", "check", str(p)])
    assert r.exit_code == 1 and f"r.yaml:6:{col}: data step {step}: " in r.output


def test_good_with_values_load_and_reach_the_step(tmp_path):
    p = _recipe(tmp_path, "gptq", "{damp: 0.5, act_order: true}")
    plan = Plan(str(p), {})
    step = [u.step for u in plan.units if u.kind == "step"][0]
    assert step.args == {"damp": 0.5, "act_order": True}
    # a with: on a nested gptq recipe reaches its step as the argument it declares
    q = tmp_path / "outer.yaml"
    q.write_text("version: 1\nrecipe: outer\nsteps:\n  - recipe: gptq\n    with: {damp: 0.25, group_size: 0}\n")
    step = [u.step for u in Plan(str(q), {}).units if u.kind == "step" and u.step.name == "gptq"][0]
    assert step.args["damp"] == 0.25 and "group_size" not in step.args   # gptq reads no group_size
