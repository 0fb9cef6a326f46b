"""The README's main jobs run for real: ``python -m percpu`` and ``python -m arena``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, check=False)


def test_percpu_demo_totals_are_exact_after_a_sigkill(tmp_path: Path) -> None:
    r = _run("-m", "percpu", "demo", "--workers", "3", "--requests", "20000",
             "--dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "SIGKILLed after" in out
    assert "replacement worker" in out
    assert out.count("  exact\n") == 4 and "WRONG" not in out
    assert "reclaimed from the dead 1" in out
    assert "all totals exact" in out
    assert list(tmp_path.iterdir()) == []  # the domain file is removed at exit


def test_arena_demo_reports_health_and_frees_everything() -> None:
    r = _run("-m", "arena", "--size", str(8 << 20), "--operations", "200000")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 failed" in r.stdout
    assert "used 0 B" in r.stdout and "(== free: True)" in r.stdout
    assert "check: ok=True" in r.stdout
