"""Recipe parameters: nested recipes receive their parent's parameters and ``with:``, recipes
inherit what the families and recipes they run declare, and the effective parameters of every
shipped recipe are those of the snapshot in ``tests/data/recipe_params.json`` (generated once,
from the code before parameters were inherited)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import qpasses
from qpasses.errors import OptionError, QPassesError, RuleError
from qpasses.lang.rules import available_names
from qpasses.plan import Plan

SNAPSHOT = Path(__file__).parent / "data" / "recipe_params.json"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _setup():
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(4, 3, 8, 8)
    return m, x, qpasses.trace(m, (x,))


def _conv1_quantized(q) -> bool:
    """Whether conv1 was quantized: a left-alone conv1 is still the float module call on the input."""
    calls = [n for n in q.graph.nodes if n.op == "call_module" and n.target == "conv1"]
    return not calls or any(a.op != "placeholder" for a in calls[0].all_input_nodes) or \
        type(q.get_submodule("conv1")) is not nn.Conv2d


def test_parent_parameter_default_reaches_nested_recipe(tmp_path):
    """The issue's first repro: ``params: skip: {default: [conv1]}`` with ``steps: [recipe: ptq_int8]``."""
    m, x, gm = _setup()
    f = write(tmp_path, """\
        version: 1
        recipe: outer
        params:
          skip: {default: [conv1]}
        steps:
          - recipe: ptq_int8
        """)
    pm = qpasses.PassManager(str(f))
    assert pm.params["skip"] == ["conv1"]
    q = pm.run(gm, data=[x])
    assert not _conv1_quantized(q)
    ref = qpasses.PassManager("ptq_int8", skip=["conv1"]).run(gm, data=[x])
    assert torch.equal(q(x), ref(x))
    assert _conv1_quantized(qpasses.PassManager("ptq_int8").run(gm, data=[x]))  # the test can fail


def test_with_on_a_recipe_step_binds_the_nested_parameters(tmp_path):
    """The issue's second repro: ``- recipe: ptq_int8`` with ``with: {skip: [conv1]}``."""
    m, x, gm = _setup()
    f = write(tmp_path, """\
        version: 1
        recipe: outer
        steps:
          - recipe: ptq_int8
            with: {skip: [conv1]}
        """)
    pm = qpasses.PassManager(str(f))
    q = pm.run(gm, data=[x])
    assert not _conv1_quantized(q)
    ref = qpasses.PassManager("ptq_int8", skip=["conv1"]).run(gm, data=[x])
    assert torch.equal(q(x), ref(x))


def test_unknown_key_in_with_of_a_recipe_step_is_located(tmp_path):
    f = write(tmp_path, """\
        version: 1
        recipe: outer
        steps:
          - rules: canonicalize
          - recipe: ptq_int8
            with: {skipp: [conv1]}
        """)
    with pytest.raises(RuleError) as e:
        qpasses.PassManager(str(f))
    msg = str(e.value)
    assert msg.startswith(f"{f}:6:12: ") and "skipp" in msg and "did you mean 'skip'" in msg, msg
    from click.testing import CliRunner
    from qpasses.cli import main
    r = CliRunner().invoke(main, ["rules", "check", str(f)])
    assert r.exit_code == 1 and f"{f}:6:12:" in r.output


def test_with_values_are_checked_against_the_nested_declaration(tmp_path):
    f = write(tmp_path, """\
        version: 1
        recipe: outer
        steps:
          - recipe: ptq_int8
            with: {w_bits: 40}
        """)
    with pytest.raises(QPassesError, match=r"r.yaml:5:20: with: recipe 'ptq_int8': w_bits must be <= 16, got 40"):
        qpasses.PassManager(str(f))


def test_with_binds_only_the_nested_recipe(tmp_path):
    """A ``with:`` value holds inside the nested recipe only (its families and data steps); the
    parent's other steps keep the run's value; ``${name}`` in ``with:`` reads the parent's
    parameter, so the user's option reaches the nested recipe through it."""
    f = write(tmp_path, """\
        version: 1
        recipe: outer
        params:
          extra_skip: {default: [fc], type: list}
        steps:
          - recipe: ptq_int8
            with: {a_bits: 4, skip: "${extra_skip}", calib_batches: 3}
          - rules: observe
          - step: calibrate
        """)
    pm = qpasses.PassManager(str(f), extra_skip=["conv2"])
    assert pm.params["a_bits"] == 8 and pm.params["skip"] == []      # the run's values
    observe = [u for u in pm.units if u.kind == "stage" and u.family == "observe"]
    inner, outer = observe[0].rules[0], observe[1].rules[0]
    assert "bits=4" in str(inner.rewrite) and "bits=8" in str(outer.rewrite)
    assert "conv2" in str(inner.unless) and "conv2" not in str(outer.unless)
    steps = [u.step for u in pm.units if u.kind == "step"]
    assert steps[0].args["calib_batches"] == 3 and "calib_batches" not in steps[1].args


def test_when_on_a_recipe_step_switches_it_off(tmp_path):
    f = write(tmp_path, """\
        version: 1
        recipe: outer
        params:
          quantize: {default: false, type: bool}
        steps:
          - rules: canonicalize
          - recipe: ptq_int8
            when: ${quantize}
        """)
    assert [u.family for u in qpasses.PassManager(str(f)).units] == ["canonicalize"]
    on = qpasses.PassManager(str(f), quantize=True)
    assert [u.family for u in on.units] == ["canonicalize", "canonicalize", "ort_placement", "observe", None, "convert"]


def test_effective_parameters_of_shipped_recipes_match_the_snapshot():
    snap = json.loads(SNAPSHOT.read_text())["recipes"]
    shipped = {n for n, k in available_names().items() if k == "recipe"}
    assert set(snap) <= shipped
    for name, want in snap.items():
        specs = Plan(name, {}).specs
        got = {k: {"default": s.default, "type": s.type, "min": s.min, "max": s.max, "choices": s.choices}
               for k, s in specs.items()}
        assert sorted(got) == sorted(want), (name, set(got) ^ set(want))
        for k in want:
            assert got[k] == want[k], (name, k, got[k], want[k])


def test_type_conflict_with_a_family_is_located_at_the_family_step(tmp_path):
    f = write(tmp_path, """\
        version: 1
        recipe: r
        params:
          w_bits: {default: "8", type: str}
        steps:
          - rules: canonicalize
          - rules: convert
        """)
    qpasses.load_file(f)  # the file alone is well-formed: the conflict is with what it runs
    with pytest.raises(RuleError) as e:
        qpasses.PassManager(str(f))
    assert str(e.value).startswith(f"{f}:7:12: parameter 'w_bits' of recipe 'r' is declared as str (line 4), "
                                   f"but rule family 'convert' (run at line 7) declares it as int"), str(e.value)


def test_a_recipe_declares_only_what_it_changes(tmp_path):
    f = write(tmp_path, """\
        version: 1
        recipe: r
        params:
          a_bits: {max: 8, default: 6}   # refines observe's a_bits: int, min 2
          skip: inherit
          observer: {default: mse}
        steps:
          - rules: observe
        """)
    specs = qpasses.PassManager(str(f)).specs
    assert specs["a_bits"].summary() == {"default": 6, "type": "int", "min": 2, "max": 8, "choices": None}
    assert specs["observer"].choices == ["minmax", "moving_average", "percentile", "mse", "entropy", "histogram",
                                         "aciq"] and specs["observer"].default == "mse"
    with pytest.raises(OptionError, match="a_bits must be <= 8"):
        qpasses.PassManager(str(f), a_bits=12)
    with pytest.raises(OptionError, match="observer must be one of"):
        qpasses.PassManager(str(f), observer="mxe")
    g = write(tmp_path, """\
        version: 1
        recipe: r
        params:
          observer: {default: nope}
        steps:
          - rules: observe
        """, "g.yaml")
    with pytest.raises(RuleError, match=r"g.yaml:4:3: default of observer must be one of"):
        qpasses.PassManager(str(g))


def test_inherit_needs_a_declaration_somewhere(tmp_path):
    f = write(tmp_path, """\
        version: 1
        recipe: r
        params:
          skipp: inherit
        steps:
          - rules: observe
        """)
    with pytest.raises(RuleError) as e:
        qpasses.PassManager(str(f))
    assert str(e.value).startswith(f"{f}:4:3: parameter 'skipp' of recipe 'r' is declared 'inherit'")
    assert "did you mean 'skip'" in str(e.value)


def test_shared_declarations_are_declared_once_and_user_folders_override_them(tmp_path, monkeypatch):
    import re
    methods = Path(__file__).resolve().parents[1] / "qpasses" / "methods"
    texts = [p.read_text() for p in list(methods.glob("*/*.yaml")) + list(methods.glob("*/recipes/*.yaml"))]
    assert len(texts) > 30
    for name, pattern in [("skip", r"^\s+skip:\s*\{[^}]*default"), ("observer", r"choices: \[minmax, moving_average")]:
        assert sum(len(re.findall(pattern, t, re.M)) for t in texts) == 0, name
    shared = (methods / "params.yaml").read_text()
    assert len(re.findall(r"^  skip:", shared, re.M)) == 1
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "params.yaml").write_text("version: 1\nparams:\n  calib_batches: {default: 2, type: int, min: 1}\n")
    monkeypatch.setenv("QPASSES_RULES_PATH", str(tmp_path))
    assert qpasses.PassManager("ptq_int8").params["calib_batches"] == 2
    assert qpasses.PassManager("ptq_int8").params["skip"] == []        # the shipped declaration still counts


def test_a_full_declaration_of_a_shared_name_stands_alone(tmp_path):
    """A user family's own typed declaration is not changed by the shared one of that name."""
    f = write(tmp_path, """\
        version: 1
        family: mine
        params:
          observer: {default: my_observer, type: str}
          seed: {type: int}
          w_bits: {max: 4, default: 4}
        rules:
          - name: r
            match: (relu $r ?x)
            rewrite: bypass($r, ?x)
        """)
    fam = qpasses.load_file(f)
    assert fam.params["observer"].summary() == {"default": "my_observer", "type": "str", "min": None, "max": None,
                                                "choices": None}
    assert fam.params["seed"].default is None and fam.params["seed"].min is None
    assert fam.params["w_bits"].summary() == {"default": 4, "type": "int", "min": 2, "max": 4, "choices": None}
