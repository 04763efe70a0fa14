"""The README's two opening commands are the ones CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2, "the README opens with exactly two commands"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for cmd in block:
        assert cmd in ci, f"{cmd!r} is not run by .ci/run"
