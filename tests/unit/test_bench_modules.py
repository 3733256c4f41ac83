"""`make bench` runs each bench script as a module of the `bench` package (on main it ran
`python bench/x.py`, and every script failed at once: No module named 'bench')."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*_bench.py"))


def test_make_bench_runs_every_script_as_a_module() -> None:
    out = subprocess.run(
        ["make", "-n", "bench"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "-m bench.$m" in out and "*_bench.py" in out


@pytest.mark.parametrize("name", BENCHES)
def test_each_bench_imports_as_a_module(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert callable(getattr(module, "main", None))
