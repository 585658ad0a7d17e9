"""Shared test fixtures: one torch thread, the command-line runner, the bad-argument check, and
the real-data folder.

Tiers: `python3 -m pytest -q` runs everything (CI, the README's command);
`python3 -m pytest -m "not slow"` skips the end-to-end tests (anything that runs a script's
main or trains, starts a fresh Python with torch, or takes over ~3 s): 46 s on 2 idle cores
(README, Quick start).
"""
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Real CIFAR data: present on the project's machines, not in CI. REPRO_DATA overrides the folder.
REAL_DATA = Path(os.environ.get("REPRO_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread: on shared, busy cores two threads spin against each other (measured:
    a smoke run took 2 min with two threads and 19 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Exit:
    """How a command ended: exit status (0 when main returned), what it printed."""
    code: int
    out: str
    err: str
    value: object = None  # what main returned (in-process runs)


class CLI:
    """Runs a script's command line in-process (`main` or `parse`) or as a subprocess."""

    def __init__(self, capsys, python_dir):
        self.capsys, self.python_dir = capsys, python_dir

    def _captured(self, call):
        self.capsys.readouterr()  # drop anything printed before
        try:
            value, code = call(), 0
        except SystemExit as exc:
            value, code = None, exc.code if isinstance(exc.code, int) else 1
        out, err = self.capsys.readouterr()
        return Exit(code, out, err, value)

    def parse(self, module, argv):
        """module.parse_args(argv): the validation step alone."""
        return self._captured(lambda: module.parse_args([str(a) for a in argv]))

    def main(self, module, argv):
        """module.main(module.parse_args(argv)), in this process."""
        argv = [str(a) for a in argv]
        return self._captured(lambda: module.main(module.parse_args(argv)))

    def run(self, command, env=None, unset=(), timeout=300):
        """Any command in the repository root, one OMP thread, `python` the interpreter running
        the tests; env adds to os.environ, unset removes names from it."""
        env = {k: v for k, v in {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}.items()
               if k not in unset}
        env["PATH"] = os.pathsep.join([str(self.python_dir), env.get("PATH", os.defpath)])
        done = subprocess.run([str(c) for c in command], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)
        return Exit(done.returncode, done.stdout, done.stderr)

    def subprocess(self, script, argv, **kwargs):
        """<this interpreter> <script> argv in the repository root, one OMP thread."""
        return self.run([sys.executable, script, *argv], **kwargs)


@pytest.fixture(scope="session")
def python_dir(tmp_path_factory):
    """A folder whose `python` runs the interpreter running the tests: first on PATH, it keeps
    commands that call `python` (the Slurm templates) off any other python, e.g. one without
    torch when the tests run outside an activated virtual environment."""
    folder = tmp_path_factory.mktemp("python")
    shim = folder / "python"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    shim.chmod(0o755)
    return folder


@pytest.fixture
def cli(capsys, python_dir):
    return CLI(capsys, python_dir)


def assert_one_line_error(result, message):
    """Exit status 2 and exactly one line `<prog>: error: ...<message>...` on stderr."""
    assert result.code == 2, result
    assert result.err.count("\n") == 1 and result.err.endswith("\n"), result.err
    assert ": error: " in result.err and message in result.err, result.err


@pytest.fixture
def bad_arguments(cli):
    """check(module, argv, message, out): parsing argv exits 2 with one line naming the
    problem, and nothing is written under out (the --out folder argv names)."""
    def check(module, argv, message, out):
        result = cli.parse(module, argv)
        assert_one_line_error(result, message)
        assert not Path(out).exists(), f"{out} was created by a rejected command line"
        return result
    return check


class Planted:
    """Unpickling this creates the file `path`: a stand-in for any code that a pickle planted as
    a checkpoint could run. `pickle.loads(pickle.dumps(Planted(p))).close()` creates p."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class Interrupt(Exception):
    """Raised by a test to stop a run at a known point (a kill, deterministically)."""


def interrupt_at_call(monkeypatch, owner, name, call):
    """Replace owner.<name> with a wrapper that raises Interrupt on its `call`-th call (1-based)
    and passes the others through. Returns the list of calls seen (for assertions)."""
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Interrupt(f"{name} call {call}")
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)
    return calls
