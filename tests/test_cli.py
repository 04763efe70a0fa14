"""The `svgt-fast` command line."""
import subprocess
import sys

from svgt_fast.cli import main


def test_demo_runs_and_shows_both_continuations(capsys):
    assert main(["demo", "--max-new-tokens", "6", "--prompts", "How do I"]) == 0
    out = capsys.readouterr().out
    assert "unsteered" in out and "SVGT" in out and "prompt: 'How do I'" in out
    assert "tokens equal at" in out


def test_console_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "svgt_fast.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout and "convert" in res.stdout


def test_convert_error_is_reported_not_raised(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text("{}")
    rc = main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "error" in capsys.readouterr().err
