"""Rule language: parsing, locations in errors, suggestions, Python API parity, no eval."""
import textwrap

import pytest

import qpasses
from qpasses import (MissingParameterError, OptionError, PassManager, Rule, RuleSyntaxError, UnknownNameError)
from qpasses.lang.syntax import parse_call, parse_pattern


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_pattern_round_trip_and_bindings():
    p = parse_pattern("(batch_norm $bn (conv2d|linear $c ?x) :eps 1e-5)")
    assert p.classes == ("batch_norm",) and p.binding == "bn"
    child = p.children[0]
    assert child.classes == ("conv2d", "linear") and child.binding == "c"
    assert p.attrs == {"eps": 1e-5}
    assert "conv2d|linear" in str(p)


def test_alias_expands_to_classes():
    p = parse_pattern("(weighted $op ...)")
    assert set(p.classes) >= {"conv2d", "linear", "conv_transpose2d"} and p.rest


def test_unknown_op_class_names_line_column_and_suggestion(tmp_path):
    f = write(tmp_path, """\
        version: 1
        rules:
          - name: r
            match: (batch_norm $bn (conv2dd $c ?x))
            rewrite: fold_bn($c, $bn)
        """)
    with pytest.raises(UnknownNameError) as e:
        qpasses.load_file(f)
    msg = str(e.value)
    assert f"{f}:4:" in msg and "conv2dd" in msg and "did you mean 'conv2d'" in msg
    assert e.value.loc.line == 4 and e.value.loc.col == 29


def test_unknown_action_and_constraint(tmp_path):
    f = write(tmp_path, """\
        version: 1
        rules:
          - name: r
            match: (batch_norm $bn (conv2d $c ?x))
            where: [eval_mod($bn)]
            rewrite: fold_bn($c, $bn)
        """)
    with pytest.raises(UnknownNameError, match=r"r.yaml:5:.*eval_mod.*did you mean 'eval_mode'"):
        qpasses.load_file(f)
    g = write(tmp_path, """\
        version: 1
        rules:
          - name: r
            match: (batch_norm $bn (conv2d $c ?x))
            rewrite: fold_bm($c, $bn)
        """, "g.yaml")
    with pytest.raises(UnknownNameError, match=r"g.yaml:5:.*fold_bm.*did you mean 'fold_bn'"):
        qpasses.load_file(g)


def test_bad_syntax_names_position(tmp_path):
    f = write(tmp_path, """\
        version: 1
        rules:
          - name: r
            match: (batch_norm $bn (conv2d $c ?x)
            rewrite: fold_bn($c, $bn)
        """)
    with pytest.raises(RuleSyntaxError, match=r"r.yaml:4:\d+: unclosed"):
        qpasses.load_file(f)
    g = write(tmp_path, "version: 1\nrules: [\n", "g.yaml")
    with pytest.raises(RuleSyntaxError, match=r"g.yaml:\d+:\d+: YAML"):
        qpasses.load_file(g)


def test_unknown_rule_key_suggests(tmp_path):
    f = write(tmp_path, """\
        version: 1
        rules:
          - name: r
            match: (batch_norm $bn (conv2d $c ?x))
            rewrit: fold_bn($c, $bn)
        """)
    with pytest.raises(RuleSyntaxError, match=r"r.yaml:5:\d+: unknown key 'rewrit'.*did you mean 'rewrite'"):
        qpasses.load_file(f)


def test_unbound_binding_is_an_error():
    with pytest.raises(RuleSyntaxError, match=r"\$conv is used"):
        Rule(name="r", match="(batch_norm $bn (conv2d $c ?x))", rewrite="fold_bn($conv, $bn)")


def test_missing_parameter_names_location(tmp_path):
    f = write(tmp_path, """\
        version: 1
        rules:
          - name: obs
            match: (linear $op ?x)
            rewrite: observe_input($op, bits=${a_bitz})
        """)
    with pytest.raises(MissingParameterError) as e:
        PassManager(str(f))
    assert "a_bitz" in str(e.value) and e.value.loc.line == 5 and e.value.loc.file == str(f)


def test_parameter_from_options(tmp_path):
    f = write(tmp_path, """\
        version: 1
        params: {a_bits: 8}
        rules:
          - name: obs
            match: (linear $op ?x)
            rewrite: observe_input($op, bits=${a_bits})
        """)
    pm = PassManager(str(f), a_bits=4)
    assert pm.rules[0].rewrite.kwargs["bits"] == 4
    with pytest.raises(OptionError, match="did you mean 'a_bits'"):
        PassManager(str(f), a_bit=4)
    with pytest.raises(OptionError, match="a_bits must be >= 2"):
        PassManager("ptq_int8", a_bits=0)
    with pytest.raises(OptionError, match="a_bits must be <= 16"):
        PassManager("ptq_int8", a_bits=17)


def test_no_eval_or_import_from_rule_files(tmp_path):
    # a rule file can only name registered functions: Python names are just unknown names
    for action in ["os.system('echo hi')", "__import__('os')", "eval('1')"]:
        f = write(tmp_path, f"""\
            version: 1
            rules:
              - name: r
                match: (relu $r ?x)
                rewrite: "{action}"
            """)
        with pytest.raises((UnknownNameError, RuleSyntaxError)):
            qpasses.load_file(f)


def test_python_api_builds_the_same_rule_as_a_file(tmp_path):
    f = write(tmp_path, """\
        version: 1
        family: mine
        rules:
          - name: fold
            match: (batch_norm $bn (conv2d $c ?x))
            where: [eval_mode($bn)]
            rewrite: fold_bn($c, $bn)
        """)
    from_file = qpasses.load_file(f).rules[0]
    from_py = Rule(name="fold", match="(batch_norm $bn (conv2d $c ?x))", where=["eval_mode($bn)"],
                   rewrite="fold_bn($c, $bn)")
    assert str(from_file.match[0]) == str(from_py.match[0])
    assert str(from_file.rewrite) == str(from_py.rewrite)
    assert [str(c) for c in from_file.where] == [str(c) for c in from_py.where]


def test_shipped_names_are_addressable():
    names = qpasses.available_names()
    for n in ("canonicalize", "observe", "convert", "ptq_int8"):
        assert n in names
    with pytest.raises(UnknownNameError, match="did you mean 'ptq_int8'") as e:
        PassManager("ptq_int9")
    assert str(e.value).startswith("<rules argument>: no recipe or rule family named 'ptq_int9'")


def test_recipe_file_and_steps(tmp_path):
    f = write(tmp_path, """\
        version: 1
        recipe: mine
        params: {a_bits: 6}
        steps:
          - rules: canonicalize
          - rules: observe
          - step: calibrate
          - rules: convert
        """)
    pm = PassManager(str(f))
    assert pm.params["a_bits"] == 6
    kinds = [u.kind for u in pm.units]
    assert kinds.count("step") == 1 and kinds[0] == "stage"
    g = write(tmp_path, """\
        version: 1
        recipe: bad
        steps:
          - step: calibrat
        """, "g.yaml")
    with pytest.raises(UnknownNameError, match=r"g.yaml:4:\d+: unknown data step 'calibrat'.*'calibrate'"):
        PassManager(str(g))


def test_call_syntax_values():
    c = parse_call("act(1, 2.5, 'x y', [1, 2], k=true, n=null, b=$n, v=?v, p=${p})")
    assert c.args[:4] == [1, 2.5, "x y", [1, 2]]
    assert c.kwargs["k"] is True and c.kwargs["n"] is None
    assert str(c.kwargs["b"]) == "$n" and str(c.kwargs["v"]) == "?v" and str(c.kwargs["p"]) == "${p}"
