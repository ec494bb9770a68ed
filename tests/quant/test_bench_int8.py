"""Smoke run of benchmarks/bench_int8.py (slow: builds and converts torchvision's resnet18)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_int8_quick_runs_and_prints_ratios():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_int8.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("SmallCNN", "torchvision"))]
    assert rows and all(line.split()[-4].endswith("x") for line in rows)
