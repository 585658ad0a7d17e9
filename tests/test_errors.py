"""End to end: the scripts run as a user runs them (subprocesses), and every mistake or accident
ends in one line and a known exit status, never a traceback or lost work."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import synthetic_arrays
from conftest import REAL_DATA, Planted  # REPRO_DATA overrides the folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("fullbatch", "vgg_sgd", "small_network", "coordinate_network", "batch_lr",
           "train_regularisers")

pytestmark = pytest.mark.slow


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(script, *args, cwd, timeout=300):
    """Runs `python <script>.py args` in cwd; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(ROOT / f"{script}.py"), "--no-progress", *args],
                          cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, status, *fragments):
    """Exit `status`, stderr one line holding every fragment, and no traceback anywhere."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_npz(path, **overrides):
    arrays = {k: np.array(v) for k, v in synthetic_arrays(10, n_train=40, n_test=20).items()}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


# -------------------------------------------------------------------------- data


@pytest.mark.parametrize("case, overrides, fragment", [
    ("empty", None, "not a readable npz archive"),
    ("short labels", dict(y_train=np.zeros(39, np.int64)), "40 images but y_train 39 labels"),
    ("channels first", dict(x_train=np.zeros((40, 3, 32, 32), np.uint8)), "channels-first"),
    ("float images", dict(x_test=np.zeros((20, 32, 32, 3), np.float64)), "expected uint8"),
    ("labels out of range", dict(y_train=np.full(40, 12)), "expected [0, 10)"),
])
def test_bad_data_file_one_line_exit_2(tmp_path, case, overrides, fragment):
    path = tmp_path / "cifar10.npz"
    if overrides is None:
        path.write_bytes(b"")
    else:
        write_npz(path, **overrides)
    result = run("small_network", "--data-root", str(tmp_path), "--out", str(tmp_path / "out"),
                 cwd=tmp_path)
    assert_one_line_error(result, 2, str(path), fragment)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("script, args", [
    ("fullbatch", ["--dataset", "cifar10"]),
    ("fullbatch", []),  # --download wins over --smoke's synthetic stand-in
    ("batch_lr", []),
])
def test_offline_download_one_line_exit_2(tmp_path, script, args):
    argv = [f"{script}.py", "--smoke", *args, "--download", "--data-root", "DATA", "--no-progress"]
    code = (
        "import sys, runpy, urllib.error, torchvision\n"
        "def offline(*a, **k):\n"
        "    raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')\n"
        "torchvision.datasets.CIFAR10 = torchvision.datasets.CIFAR100 = offline\n"
        f"sys.argv = {argv!r}\n"
        f"runpy.run_path({str(ROOT / f'{script}.py')!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, 2, "could not download cifar10: no network",
                          "place cifar10.npz in DATA (README, Data)")


def test_unwritable_out_one_line_exit_2(tmp_path):
    (tmp_path / "afile").write_text("")
    result = run("coordinate_network", "--smoke", "--out", "afile/results", cwd=tmp_path)
    assert_one_line_error(result, 2, "--out afile/results", "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only folder")
def test_read_only_out_one_line_exit_2(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    result = run("coordinate_network", "--smoke", "--out", "ro/results", cwd=tmp_path)
    assert_one_line_error(result, 2, "not writable")


# -------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("script, args, fragments", [
    ("fullbatch", ["--smoke", "--lrs", "inf"], ["--lrs", "finite"]),
    ("vgg_sgd", ["--smoke", "--lr", "nan"], ["--lr", "finite"]),
    ("train_regularisers", ["--smoke", "--sam-rhos=-inf"], ["--sam-rhos", "finite"]),
    ("coordinate_network", ["--smoke", "--sigma", "nan"], ["--sigma", "finite"]),
    ("fullbatch", ["--smoke", "--seed", str(2 ** 63)], ["--seed must lie in 0.."]),
    ("fullbatch", ["--smoke", "--width", "1e-6"], ["--width must be at least 1/64 = 0.015625"]),
    ("batch_lr", ["--smoke", "--width", "0.01"], ["1/64"]),
])
def test_bad_numbers_one_line_exit_2(tmp_path, script, args, fragments):
    assert_one_line_error(run(script, *args, cwd=tmp_path), 2, *fragments)


# -------------------------------------------------------------------------- reruns and damage


def test_rerun_skips_damage_is_named_and_restart_moves_it_aside(tmp_path):
    first = run("coordinate_network", "--smoke", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run("coordinate_network", "--smoke", cwd=tmp_path)
    assert again.returncode == 0 and "already finished, skipping" in again.stdout
    metrics = next((tmp_path / "results").rglob("metrics.json"))
    metrics.write_text(metrics.read_text()[:40])
    damaged = run("coordinate_network", "--smoke", cwd=tmp_path)
    assert_one_line_error(damaged, 2, str(metrics.relative_to(tmp_path)), "--restart")
    restarted = run("coordinate_network", "--smoke", "--restart", cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    aside = list(metrics.parent.parent.glob(f"{metrics.parent.name}.damaged-*"))
    assert len(aside) == 1 and (aside[0] / "metrics.json").exists()


def test_planted_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    assert run("coordinate_network", "--smoke", cwd=tmp_path).returncode == 0
    result = next((tmp_path / "results").rglob("result.json"))
    result.unlink()  # unfinished again: a rerun resumes that run from its checkpoint
    checkpoint, marker = result.with_name("checkpoint.pt"), tmp_path / "code-ran"
    torch.save({"state": {"phase": "train", "step": 1, "optimizer": Planted(marker)},
                "metrics": []}, checkpoint)
    refused = run("coordinate_network", "--smoke", cwd=tmp_path)
    assert_one_line_error(refused, 2, "damaged results file", "weights_only=True",
                          str(checkpoint.relative_to(tmp_path)), "--restart")
    assert not marker.exists()
    restarted = run("coordinate_network", "--smoke", "--restart", cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    assert not marker.exists()
    aside = list(checkpoint.parent.parent.glob(f"{checkpoint.parent.name}.damaged-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoint.pt").exists()  # kept aside, unread


def test_other_settings_do_not_overwrite_figures(tmp_path):
    assert run("coordinate_network", "--smoke", cwd=tmp_path).returncode == 0
    figure = tmp_path / "results" / "coordinate_network_smoke" / "plots" / "fig32_fits.png"
    before = figure.read_bytes()
    other = run("coordinate_network", "--smoke", "--lr", "2e-4", cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    assert figure.read_bytes() == before
    assert "other settings" in other.stdout
    assert len(list(figure.parent.glob("fig32_fits-*.png"))) == 1


# -------------------------------------------------------------------------- interruption


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_one_line_and_resumable(tmp_path, sig, status):
    # A run whose length is fixed (epochs), not one that stops at a target it may reach
    # between the checkpoint and the signal.
    cmd = [sys.executable, str(ROOT / "vgg_sgd.py"), "--smoke", "--no-progress",
           "--epochs", "100000", "--checkpoint-seconds", "0", "--trials", "1"]
    # SIG_DFL for SIGINT in the child: a shell starts background jobs (`pytest &`) with SIGINT
    # ignored, and an ignored signal stays ignored across exec.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    import torch

    def checkpointed_step():  # -1 until a checkpoint is on disk (written atomically)
        found = list(tmp_path.rglob("checkpoint.pt"))
        return torch.load(found[0], weights_only=True)["state"]["step"] if found else -1

    deadline = time.monotonic() + 240
    while checkpointed_step() < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert checkpointed_step() >= 1, "no checkpoint past step 0 was written"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "Traceback" not in out + err
    line, = err.strip().splitlines()
    assert "interrupted at step" in line and line.endswith("; rerun the same command to resume")
    assert checkpointed_step() >= 1  # resume point kept


# -------------------------------------------------------------------------- --smoke


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_without_data_uses_synthetic_and_says_so(tmp_path, script):
    result = run(script, "--smoke", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    if script != "coordinate_network":  # its data are the paper's 8 points, not CIFAR
        assert "synthetic stand-in" in result.stdout


@pytest.mark.skipif(not (REAL_DATA / "cifar10.npz").exists(),
                    reason=f"real CIFAR-10 not found at {REAL_DATA} (set REPRO_DATA)")
@pytest.mark.parametrize("script", ["batch_lr", "train_regularisers"])
def test_smoke_with_only_cifar10_uses_it(tmp_path, script):
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar10.npz").symlink_to(REAL_DATA / "cifar10.npz")
    result = run(script, "--smoke", "--data-root", str(data), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--smoke: using cifar10 from" in result.stdout and "cifar100" not in result.stdout
