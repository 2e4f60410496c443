"""Every script in examples/ runs to completion from a clean working directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.strip(), "the example printed nothing"
    assert not list(tmp_path.iterdir()), "examples write their files to temporary folders, not the cwd"
    if name == "01_ptq_int8.py":  # the README's first command: FP32 and int8 accuracy on digits
        line = [s for s in r.stdout.splitlines() if s.startswith("accuracy on the digits")][0]
        fp32 = float(line.split("FP32")[1].split("%")[0])
        int8 = float(line.split("(minmax)")[1].split("%")[0])
        assert fp32 > 95 and abs(fp32 - int8) <= 1.0
