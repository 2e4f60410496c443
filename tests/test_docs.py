"""The documentation site builds strictly (mkdocs + material + mkdocstrings) and its nav is complete."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _nav_pages(nav):
    out = []
    for item in nav:
        for v in (item.values() if isinstance(item, dict) else [item]):
            out += _nav_pages(v) if isinstance(v, list) else [v]
    return out


def test_every_nav_page_exists():
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = _nav_pages(cfg["nav"])
    missing = [p for p in pages if not (ROOT / "docs" / p).is_file()]
    assert not missing, f"nav lists missing pages: {missing}"
    for p in ("index.md", "getting-started.md", "tutorial-write-a-rule.md", "onnx.md", "cli.md", "api.md"):
        assert p in pages


def test_cli_page_covers_every_command():
    from qpasses.cli import main
    text = (ROOT / "docs" / "cli.md").read_text()
    for name in main.commands:
        assert f"qpasses {name}" in text, name


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    exe = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NO_MKDOCS_2_WARNING="1")
    r = subprocess.run([exe, "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "onnx" / "index.html").is_file()
    assert "PassManager" in (tmp_path / "site" / "api" / "index.html").read_text()
