"""benchmarks/plot_results.py draws the committed results and prints the README headline table."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "plot_results.py"


def test_plots_from_committed_results(tmp_path):
    pytest.importorskip("matplotlib")
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    for name in ("latency_vs_batch", "latency_vs_context", "refresh_modes", "overhead_vs_trigger"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_headline_table_matches_the_h100_run():
    res = subprocess.run([sys.executable, str(SCRIPT), "--markdown"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    table = res.stdout
    assert "| | batch 1 | batch 16 |" in table and "h100_2026-11-23_b120f69" in table
    assert "64.8 (ours 6.5x faster)" in table and "27.5x slower" in table  # the README's figures
