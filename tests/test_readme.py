"""The README as a first screen: what it shows in its first 40 lines, its length, that its
links resolve, that its test command is CI's, and that its estimator example runs as a copier
would run it: `common/estimators.py` alone in an empty folder."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIRST_SCREEN = 40


def lines():
    return README.read_text().splitlines()


def example():
    """The README's python block that imports the copied file."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if "from estimators import" in b]
    assert len(found) == 1, f"{len(found)} python blocks import from estimators"
    return found[0]


def test_readme_is_short_and_its_rows_are_readable():
    assert len(lines()) < 150
    rows = [line for line in lines() if line.startswith("|")]
    assert rows and max(map(len, rows)) <= 100, max(rows, key=len)


def test_first_screen_shows_a_committed_figure_the_ledger_and_the_quick_start():
    screen = "\n".join(lines()[:FIRST_SCREEN])
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", screen)
    assert figures and all((ROOT / f).is_file() for f in figures), figures
    assert "](plots/CLAIMS.md)" in screen
    assert re.search(r"Of its \d+ claims, ", screen)
    assert "## Quick start" in screen and 'pytest -q -m "not slow"' in screen


def test_quick_start_states_measured_times_and_ci_runs_its_test_command():
    screen = "\n".join(lines()[:FIRST_SCREEN])
    fast = next(line for line in screen.splitlines() if '-m "not slow"' in line)
    assert re.search(r"\d+ s\b", fast), fast
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if "pytest" in line]
    assert ci == ["python3 -m pytest -q"], ci
    assert re.search(r"^python3 -m pytest -q +#", screen, re.M)


@pytest.mark.parametrize("page", ["README.md", "docs/estimators.md", "docs/data.md",
                                  "docs/runs.md", "docs/distributed.md"])
def test_relative_links_resolve(page):
    path = ROOT / page
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" not in target:
            assert (path.parent / target).exists(), f"{page} links {target}"


def test_readme_links_every_docs_page():
    text = README.read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in text, page.name


def test_readme_has_the_data_section_the_errors_cite():
    """Missing-data errors say "(README, Data)"."""
    assert "\n## Data\n" in README.read_text()
    assert "(README, Data)" in (ROOT / "common" / "data.py").read_text()


@pytest.mark.slow  # a fresh Python importing torch: about 4 s
def test_readme_estimator_example_runs_against_the_copied_file(tmp_path):
    shutil.copy(ROOT / "common" / "estimators.py", tmp_path / "estimators.py")
    (tmp_path / "example.py").write_text(example())
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == \
        ["estimators.py", "example.py"]
    numbers = [float(v) for v in re.findall(r"\d+\.\d+(?:e-?\d+)?", done.stdout)]
    assert len(numbers) >= 6 and all(v > 0 for v in numbers[:3]), done.stdout
    assert done.stdout.rstrip().endswith("True"), done.stdout  # info.converged
