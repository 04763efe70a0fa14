"""benchmarks/plot_results.py draws the committed results and prints the README headline table."""
import json
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
    for name in ("latency_vs_batch", "latency_vs_context", "refresh_modes"):  # committed runs feed these
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    # no sparse_* run is committed yet (it needs a GPU): the plot is written and says so
    assert (tmp_path / "overhead_vs_trigger.png").exists()


def test_overhead_vs_trigger_draws_a_sparse_run(tmp_path):
    """The plot of bench_sparse.py's rows (fire_<p>pct per batch), from a results folder holding
    one such run: it draws curves, so it is well above the size of the empty placeholder."""
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    results.mkdir()
    rows = [dict(what=w, batch=b, rep=1, ms_per_token=r, ratio_vs_unsteered=r)
            for b in (1, 16) for w, r in (("unsteered", 1.0), ("fire_0pct", 1.01), ("fire_12pct", 1.03),
                                         ("fire_100pct", 1.2))]
    (results / "sparse_llama3-8b.json").write_text(json.dumps({"environment": {"device": "NVIDIA H100"}, "rows": rows}))
    sizes = {}
    for name, folder in (("empty", tmp_path / "none"), ("drawn", results)):
        folder.mkdir(exist_ok=True)
        res = subprocess.run([sys.executable, str(SCRIPT), "--results", str(folder), "--out", str(tmp_path / name)],
                             capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        sizes[name] = (tmp_path / name / "overhead_vs_trigger.png").stat().st_size
    assert sizes["drawn"] > 2 * sizes["empty"], sizes


def test_headline_table_matches_the_h100_run():
    res = subprocess.run([sys.executable, str(SCRIPT), "--markdown"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    table = res.stdout
    assert "| | batch 1 | batch 16 |" in table and "h100_2026-11-23_b120f69" in table
    assert "64.8 (ours 6.5x faster)" in table and "27.5x slower" in table  # the README's figures


def test_partial_results_keep_rows_until_the_complete_result(tmp_path):
    """A benchmark step stopped by its time limit keeps the rows it measured: PartialResults
    rewrites <name>.partial.json with every row (marked partial, environment and extra kept), and
    write_results of the same name replaces it."""
    from svgt_fast.bench import PartialResults, write_results

    ckpt = PartialResults("g", {"shape": "tiny"}, out_dir=str(tmp_path))
    rows = []
    for i in range(3):
        rows.append(dict(batch=1, rep=i, ms_per_token=1.0 + i))
        ckpt(rows)
        data = json.loads((tmp_path / "g.partial.json").read_text())
        assert data["partial"] is True and data["shape"] == "tiny" and data["rows"] == rows
        assert "torch" in data["environment"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.partial.json"]  # no temp file left
    write_results("g", rows, {"shape": "tiny"}, out_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]
    assert "partial" not in json.loads((tmp_path / "g.json").read_text())


def test_write_results_json_and_png(tmp_path, monkeypatch):
    """`svgt-fast bench` and benchmarks/ write <name>.json (environment + rows) and, with
    matplotlib, <name>.png; without matplotlib the JSON is still written and the PNG is not."""
    pytest.importorskip("matplotlib")
    from svgt_fast.bench import write_results

    rows = [dict(batch=1, ms_per_token=1.5), dict(batch=16, ms_per_token=2.0)]
    path = write_results("t", rows, extra={"note": "x"}, plot=lambda ax: ax.plot([1, 16], [1.5, 2.0]),
                         out_dir=str(tmp_path / "with"))
    data = json.loads(pathlib.Path(path).read_text())
    assert data["rows"] == rows and data["note"] == "x" and "torch" in json.dumps(data["environment"])
    assert (tmp_path / "with" / "t.png").stat().st_size > 5_000

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = write_results("t", rows, plot=lambda ax: None, out_dir=str(tmp_path / "without"))
    assert json.loads(pathlib.Path(path).read_text())["rows"] == rows
    assert not (tmp_path / "without" / "t.png").exists()
