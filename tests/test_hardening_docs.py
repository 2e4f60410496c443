"""docs/functions.md -- the declared arguments of every data step, action and constraint --
is the output of ``qpasses rules list steps|actions|constraints``: the declarations made at
registration feed the CLI listing and the docs alike (issue 24), and the page cannot drift
from them.  ``python tests/test_hardening_docs.py`` rewrites the page from the registry."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "functions.md"
KINDS = ("steps", "actions", "constraints")
TITLES = {"steps": "Data steps", "actions": "Actions", "constraints": "Constraints"}

HEAD = """# Actions, constraints and data steps

What a rule file can call, with the arguments each one declares when it is registered
(type, range or choices, default): `rewrite:` names an action, `where:` / `unless:` name
constraints, a recipe's `step:` names a data step and its `with:` gives the step's arguments.
Rule files are checked against these declarations when they are loaded, so `qpasses rules
check FILE` reports a wrong argument with its file, line and column (see
[the rule language](rule-language.md#limits-and-errors)); a data-step argument that is not
given is read from the run's parameter of the same name.

This page is the output of `qpasses rules list steps`, `qpasses rules list actions` and
`qpasses rules list constraints` (`tests/test_hardening_docs.py` checks that it still is).
`in [a, b]` is an inclusive range, `in {...}` the choices, `= v` the default, `| null`: may be
`null`; `node` is a `$binding` of the pattern.
"""


def _listing(kind: str) -> str:
    env = dict(os.environ, COLUMNS="200")
    env.pop("QPASSES_RULES_PATH", None)
    out = subprocess.run([sys.executable, "-m", "qpasses", "rules", "list", kind], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.rstrip("\n")


def _sections(text: str) -> dict:
    return {k: m.group(1).rstrip("\n") for k in KINDS
            for m in [re.search(rf"## {TITLES[k]}\n\n```text\n(.*?)```", text, re.S)] if m}


def render() -> str:
    body = "".join(f"\n## {TITLES[k]}\n\n```text\n{_listing(k)}\n```\n" for k in KINDS)
    return HEAD + body


def test_functions_page_is_the_registry_listing():
    page = _sections(PAGE.read_text())
    assert set(page) == set(KINDS), "docs/functions.md lacks a section"
    for k in KINDS:
        got = _listing(k)
        assert got, k
        assert page[k] == got, (f"docs/functions.md, {TITLES[k]}: differs from `qpasses rules list {k}`; "
                                f"regenerate it with `python tests/test_hardening_docs.py`")


def test_every_registered_function_is_on_the_page():
    """Also in-process: what this interpreter registered (no subprocess quirk hides a name)."""
    import qpasses  # noqa: F401  (registers the built-ins)
    from qpasses.lang.registry import ACTIONS, CONSTRAINTS, DATA_STEPS
    text = PAGE.read_text()
    sections = _sections(text)
    for kind, reg in (("steps", DATA_STEPS), ("actions", ACTIONS), ("constraints", CONSTRAINTS)):
        for name, entry in reg.items():
            fn = getattr(entry, "fn", entry)
            if not str(getattr(fn, "__module__", "")).startswith("qpasses"):
                continue                        # registered by a test run earlier in this process
            assert re.search(rf"\b{re.escape(name)}\(", sections[kind]), (kind, name)


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
