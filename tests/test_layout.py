"""The layout: one package per method, ``qpasses/methods/<method>/``, holding its rule families
(``<family>.yaml``), its recipes (``recipes/<recipe>.yaml``), its actions, data steps and library
code, and naming its docs pages; its tests mirror it under ``tests/methods/<method>/``
(docs/architecture.md)."""
from __future__ import annotations

import importlib
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

import qpasses
from qpasses.lang.registry import ACTIONS, CONSTRAINTS, DATA_STEPS
from qpasses.lang.rules import available_names, find_named, method_dirs, _named_files

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "qpasses" / "methods"
#: the modules directly under qpasses/methods: the helpers shared by many methods
SHARED_MODULES = {"__init__.py", "_common.py", "_graphutil.py"}


def _shipped():
    """[(method, kind, name, path)] for every shipped family and recipe file."""
    out = []
    for d in sorted(p for p in METHODS.iterdir() if (p / "__init__.py").is_file() and not p.name.startswith("_")):
        out += [(d.name, "rules", p.stem, p) for p in sorted(d.glob("*.yaml"))]
        out += [(d.name, "recipe", p.stem, p) for p in sorted((d / "recipes").glob("*.yaml"))]
    return out


SHIPPED = _shipped()


def _page(kind, path):
    """The docs page of a family / recipe file: its ``docs:`` key, else the naming convention."""
    data = yaml.safe_load(path.read_text())
    if "docs" in data:
        return data["docs"]
    return f"rules/{data['family']}.md" if kind == "rules" else f"recipes/{data['recipe']}.md"


@pytest.fixture(autouse=True)
def _no_user_rules(monkeypatch):
    monkeypatch.delenv("QPASSES_RULES_PATH", raising=False)


def test_the_shipped_files_are_the_method_packages_yaml():
    assert len(SHIPPED) >= 41
    assert [d.name for d in method_dirs()] == sorted({m for m, *_ in SHIPPED})
    # nothing of the old layout is left
    for old in ("rules", "qpasses/actions", "qpasses/steps"):
        assert not (ROOT / old).exists(), f"{old}/ should be gone: its files live in qpasses/methods/<method>/"
    # no YAML elsewhere in a method package, no module directly under qpasses/methods but the shared ones
    every_yaml = {p for p in METHODS.rglob("*.yaml")}
    assert every_yaml == {p for *_, p in SHIPPED} | {METHODS / "params.yaml"}, every_yaml
    assert {p.name for p in METHODS.glob("*.py")} == SHARED_MODULES


def test_shipped_names_are_unique_and_each_resolves_to_its_file():
    names = Counter(name for _, _, name, _ in SHIPPED)
    assert not [n for n, c in names.items() if c > 1], "a family or recipe name is shipped twice"
    files, kinds = _named_files(), available_names()
    assert {n: files[n] for n in names} == {name: p for _, _, name, p in SHIPPED}
    for method, kind, name, path in SHIPPED:
        assert kinds[name] == kind, name
        obj = find_named(name)
        assert Path(obj.path) == path
        data = yaml.safe_load(path.read_text())
        if kind == "recipe":
            assert data["recipe"] == name, f"{path}: the recipe is called as its file is named"
    # the family names the files declare (report / docs names) are unique too
    declared = Counter(yaml.safe_load(p.read_text())["family"] for _, k, _, p in SHIPPED if k == "rules")
    assert not [n for n, c in declared.items() if c > 1]


@pytest.mark.parametrize("method,kind,name,path", SHIPPED, ids=[s[2] for s in SHIPPED])
def test_every_family_and_recipe_has_its_docs_page_named_by_its_package(method, kind, name, path):
    page = _page(kind, path)
    assert (ROOT / "docs" / page).is_file(), f"{path.relative_to(ROOT)}: no docs page docs/{page}"
    assert page in (ROOT / "mkdocs.yml").read_text(), f"docs/{page} is not in mkdocs.yml's nav"
    doc = importlib.import_module(f"qpasses.methods.{method}").__doc__
    line = next((ln for ln in doc.splitlines() if ln.startswith(f"* ``{name}``")), None)
    assert line is not None, f"qpasses/methods/{method}/__init__.py does not list {kind} {name!r}"
    rel = path.relative_to(path.parents[1 if kind == "recipe" else 0]).as_posix()
    assert f"``{rel}``" in line and f"docs/{page}" in line, line


def test_every_method_module_is_imported_and_registers_where_it_lives():
    for d in method_dirs():
        pkg = importlib.import_module(f"qpasses.methods.{d.name}")
        assert pkg.__doc__ and len(pkg.__doc__) > 200, f"{d.name}: its __init__ says what the method is"
        for f in d.glob("*.py"):
            if f.name != "__init__.py":
                assert f"qpasses.methods.{d.name}.{f.stem}" in sys.modules, f"{f} is not imported by its package"
    for table in (ACTIONS, CONSTRAINTS, DATA_STEPS):
        for name, reg in table.items():
            mod = reg.fn.__module__
            if mod.startswith("qpasses."):
                assert mod.startswith("qpasses.methods."), f"{name} is registered in {mod}, outside the methods"


def test_method_tests_mirror_the_methods_and_basenames_stay_unique():
    tests = ROOT / "tests"
    mirrored = {p.name for p in (tests / "methods").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert mirrored <= {d.name for d in method_dirs()}, mirrored
    base = Counter(p.name for p in tests.rglob("test_*.py"))
    assert not [n for n, c in base.items() if c > 1], "test file basenames must stay unique (rootdir imports)"


def test_user_rule_folders_come_before_the_methods(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "observe.yaml").write_text(
        "version: 1\nfamily: observe\ndoc: mine\nrules:\n  - name: keep\n    match: (relu $r ?x)\n"
        "    rewrite: bypass($r, ?x)\n")
    (tmp_path / "recipes" / "mine.yaml").write_text("version: 1\nrecipe: mine\nsteps:\n  - rules: observe\n")
    monkeypatch.setenv("QPASSES_RULES_PATH", str(tmp_path))
    files = _named_files()
    assert files["observe"] == tmp_path / "observe.yaml"
    assert files["mine"] == tmp_path / "recipes" / "mine.yaml"
    assert files["ptq_int8"] == METHODS / "ptq" / "recipes" / "ptq_int8.yaml"
    assert find_named("observe").doc == "mine"
    assert qpasses.PassManager("mine").plan is not None


@pytest.mark.slow
def test_the_wheel_ships_every_yaml_and_runs_from_outside_the_checkout(tmp_path):
    """pyproject.toml's packages and package-data: a built wheel holds every module and YAML file
    of qpasses/, and the installed copy finds its recipes (no checkout on the path)."""
    import os
    import subprocess
    import zipfile
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "-w", str(tmp_path / "whl"), "--no-deps",
                        "--no-build-isolation", "-q"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "whl").glob("qpasses-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    src = ROOT / "qpasses"
    want = {p.relative_to(ROOT).as_posix() for ext in ("*.py", "*.yaml") for p in src.rglob(ext)}
    assert not want - names, sorted(want - names)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                        str(whl)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("QPASSES_RULES_PATH", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tmp_path / "site")
    code = ("import qpasses, pathlib; assert pathlib.Path(qpasses.__file__).parent == pathlib.Path(%r); "
            "from qpasses.lang.rules import available_names; "
            "n = sum(k in ('recipe', 'rules') for k in available_names().values()); "
            "print(n, qpasses.PassManager('ptq_int8').params['skip'])" % str(tmp_path / "site" / "qpasses"))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(len(SHIPPED)), "[]"]
