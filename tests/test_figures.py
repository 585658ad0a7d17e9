"""Every figure of the seven scripts' --smoke runs keeps all its text on the canvas, with no
legend over a panel: each script runs in a subprocess, and every PNG it writes carries the
verdict of `common.figure_check.layout_problems` on the very draw saved (save_figure stores
it), which must be "ok", with no layout line on stderr. Real CIFAR-10 with REPRO_DATA set
(the folder holding cifar10.npz), else the synthetic stand-in."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.plotting import png_layout_check

ROOT = Path(__file__).resolve().parents[1]

# script -> the figures its smoke run writes
FIGURES = {"fullbatch": ["fig01_fig06_vgg11_lr0.08"],
           "batch_lr": ["fig14_vgg11_{data}_vs_lr", "fig18_vgg11_{data}_vs_batch"],
           "train_regularisers": ["fig21_{data}_vgg11_bn"],
           "vgg_sgd": ["fig28_first_epoch", "fig29_all_epochs"],
           "small_network": ["fig30_relu", "fig31_tanh"],
           "coordinate_network": ["fig32_fits"],
           "theory": ["thm45", "thm46", "ansatz"]}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(FIGURES))
def test_smoke_figures_keep_their_text_on_the_canvas(script, tmp_path):
    real = os.environ.get("REPRO_DATA")
    data = ["--data-root", real] if real else ["--data-root", str(tmp_path / "no-data")]
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, f"{script}.py", "--smoke", "--no-progress",
                           "--out", str(out), *data], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    written = sorted(p.stem for p in (out / "plots").glob("*.png"))
    expected = sorted(f.format(data="cifar10" if real else "synthetic-cifar10")
                      for f in FIGURES[script])
    assert written == expected
    verdicts = {stem: png_layout_check(out / "plots" / f"{stem}.png") for stem in written}
    assert all(v == "ok" for v in verdicts.values()), verdicts
    assert "layout:" not in done.stderr, done.stderr[-2000:]


def test_figure_files_carry_every_paper_figure_number_they_show():
    import batch_lr
    import fullbatch
    import train_regularisers
    assert fullbatch.PAPER_FIGURES[("vgg11", 0.08)] == "fig01_fig06"  # Figure 1 is Figure 6
    assert [batch_lr.figure_prefix(n) for n in (12, 16, 13, 14)] == [
        "fig03_fig12_", "fig04_fig16_", "fig13_", "fig14_"]
    prefix = train_regularisers.figure_prefix
    assert prefix(23, train_regularisers.PAPER_SWEEPS) == "fig02_fig05_fig23_"
    assert prefix(23, ["sam"]) == "fig05_fig23_" and prefix(23, ["weight_decay"]) == "fig02_fig23_"
    assert prefix(23, ["jacobian"]) == "fig23_" and prefix(21, ["weight_decay"]) == "fig21_"


# Committed figures the issue named, redrawn from their committed runs with the flags of the
# commands in plots/README.md (the data are not read: --plot-from only plots).
REDRAWN = {
    "fullbatch": ["--trials", "3", "--train-size", "250", "--ghost-batch-size", "125",
                  "--measure-size", "125", "--measure-every", "10", "--eig-tol", "1e-2",
                  "--max-iterations", "1500", "--models", "vgg11", "--width", "0.125",
                  "--lrs", "0.08", "--bn-check-batch-sizes", "8", "32", "125",
                  "--plot-from", "plots/fullbatch/fig01_fig06_figA1_runs.json"],
    "vgg_sgd": ["--epochs", "1", "--width", "0.125", "--measure-every", "20",
                "--measure-size", "250", "--eig-tol", "1e-2", "--trials", "3",
                "--plot-from", "plots/vgg_sgd/fig28_runs.json"],
    "train_regularisers": [
        "--datasets", "cifar10", "--models", "vgg11", "--batch-norm", "with", "--lrs", "0.1",
        "0.05", "--trials", "3", "--epochs", "12", "--milestones", "7", "10",
        "--weight-decays", "0", "1e-4", "5e-4", "2e-3", "--smoothings", "0", "0.1", "0.3", "0.6",
        "--mixup-betas", "0", "0.2", "0.5", "1", "--augment-ps", "0", "0.33", "0.67", "1",
        "--sam-rhos", "0", "0.02", "0.05", "0.1", "--train-size", "2000", "--test-size", "2000",
        "--width", "0.125", "--measure-size", "256", "--eig-tol", "1e-3",
        "--plot-from", "plots/train_regularisers/fig21_runs.json"]}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(REDRAWN))
def test_committed_figures_redraw_with_their_text_on_the_canvas(script, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, f"{script}.py", *REDRAWN[script], "--out", str(out),
                           "--data-root", str(tmp_path / "no-data")], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    pngs = sorted((out / "plots").glob("*.png"))
    assert pngs and all(png_layout_check(p) == "ok" for p in pngs), \
        {p.name: png_layout_check(p) for p in pngs}
