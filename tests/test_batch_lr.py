"""End-to-end tests of batch_lr.py on synthetic data (tiny configs, seconds each)."""
import json

import itertools
import math

import pytest

import batch_lr
import common
from conftest import REPO


def tiny(out, *extra):
    """A few-second sweep: 2 lr x 1 batch size x 1 trial of a width-1/8 VGG11 on 64 images."""
    return ["--datasets", "synthetic-cifar10", "--models", "vgg11", "--lrs", "0.1", "0.01",
            "--batch-sizes", "16", "--trials", "1", "--train-size", "64", "--test-size", "64",
            "--width", "0.125", "--eval-every", "2", "--window", "2", "--max-iterations", "4",
            "--measure-size", "16", "--eig-tol", "1e-2", "--out", str(out), "--no-progress", *extra]


def results(out):
    return sorted((json.loads(p.read_text()) for p in out.glob("*/result.json")),
                  key=lambda r: r["finished"])


@pytest.mark.slow
def test_smoke_run_writes_cells_figures_and_correlations(tmp_path, capsys):
    batch_lr.main(batch_lr.parse_args(["--smoke", "--datasets", "synthetic-cifar10",
                                       "--out", str(tmp_path), "--no-progress"]))
    printed = capsys.readouterr().out
    assert "4 of 4 cells finished" in printed and "Kendall tau(gap, Jacobian)" in printed
    for r in results(tmp_path):
        assert r["status"] == "finished"
        assert r["gap"] == pytest.approx(abs(r["test_loss"] - r["train_loss"]))
        assert r["sharpness"] > 0 and r["jacobian"] > 0
        assert r["gauss_newton"] > 0 and r["gauss_newton_converged"] in (True, False)
        assert r["jacobian_lipschitz"] > 0 and r["jacobian_lipschitz_pairs"] == 64
    plots = tmp_path / "plots"
    assert (plots / "fig14_vgg11_synthetic-cifar10_vs_lr.png").exists()
    assert (plots / "fig18_vgg11_synthetic-cifar10_vs_batch.png").exists()
    tau = json.loads((plots / "correlations.json").read_text())["vgg11_synthetic-cifar10"]
    cells = results(tmp_path)
    assert tau["n"] == 4
    for measure in ("jacobian", "sharpness", "gauss_newton", "jacobian_lipschitz"):
        expected = tau_b([r["gap"] for r in cells], [r[measure] for r in cells])
        assert tau[f"tau_gap_{measure}"] == pytest.approx(expected, abs=1e-12), measure
    # and within each learning rate (the paper contrasts the networks at the largest one)
    runs = json.loads((plots / "runs.json").read_text())
    lrs = sorted({r["config"]["lr"] for r in runs})
    assert list(tau["per_lr"]) == [str(lr) for lr in lrs]
    for lr in lrs:
        mine = [r["result"] for r in runs if r["config"]["lr"] == lr]
        assert tau["per_lr"][str(lr)]["n"] == len(mine) > 0
        expected = tau_b([r["gap"] for r in mine], [r["jacobian"] for r in mine])
        assert tau["per_lr"][str(lr)]["tau_gap_jacobian"] == pytest.approx(expected, abs=1e-12, nan_ok=True)
    # cells saved before jacobian_lipschitz was measured still plot, their tau is NaN
    for path in tmp_path.glob("*/result.json"):
        saved = json.loads(path.read_text())
        del saved["jacobian_lipschitz"]
        path.write_text(json.dumps(saved))
    (plots / "fig14_vgg11_synthetic-cifar10_vs_lr.png").unlink()
    batch_lr.main(batch_lr.parse_args(["--smoke", "--datasets", "synthetic-cifar10",
                                       "--out", str(tmp_path), "--no-progress", "--plot-only"]))
    assert (plots / "fig14_vgg11_synthetic-cifar10_vs_lr.png").exists()
    tau = json.loads((plots / "correlations.json").read_text())["vgg11_synthetic-cifar10"]
    assert tau["tau_gap_jacobian_lipschitz"] is None  # NaN, stored as null
    assert tau["tau_gap_jacobian"] is not None


def tau_b(x, y):
    """Kendall's tau-b from its definition, pair by pair (independent of common.kendall_tau)."""
    concordant = discordant = tied_x = tied_y = 0
    for (a, b), (c, d) in itertools.combinations(zip(x, y), 2):
        s = (a > c) - (a < c)
        t = (b > d) - (b < d)
        concordant += s * t > 0
        discordant += s * t < 0
        tied_x += s == 0
        tied_y += t == 0
    n0 = len(x) * (len(x) - 1) // 2
    return (concordant - discordant) / math.sqrt((n0 - tied_x) * (n0 - tied_y))


def test_tau_b_reference_matches_scipy_and_hand_values():
    assert tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # one discordant pair in six
    assert tau_b([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)  # 4 / sqrt(5 * 5)
    stats = pytest.importorskip("scipy.stats")
    x, y = [0.3, 0.1, 0.4, 0.1, 0.5, 0.9], [2.0, 7.0, 1.0, 8.0, 2.0, 8.0]
    assert tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


@pytest.mark.slow
def test_list_grid_is_the_papers_300_cells(capsys):
    batch_lr.main(batch_lr.parse_args(["--list-grid"]))  # needs no data
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "# 300 cells" and len(lines) == 301
    assert lines[0].startswith("0\tmodel=resnet18_dataset=cifar10_lr=0.1_batch_size=64_trial=0-")


@pytest.mark.slow
def test_grid_index_runs_one_cell_and_plot_only_merges(tmp_path, capsys):
    batch_lr.main(batch_lr.parse_args(tiny(tmp_path, "--grid-index", "1")))
    (cell,) = [p.parent for p in tmp_path.glob("*/result.json")]
    assert "lr=0.01" in cell.name
    assert not (tmp_path / "plots").exists()  # array tasks do not plot
    batch_lr.main(batch_lr.parse_args(tiny(tmp_path, "--grid-index", "0")))
    batch_lr.main(batch_lr.parse_args(tiny(tmp_path, "--plot-only")))
    assert "2 of 2 cells finished" in capsys.readouterr().out
    assert (tmp_path / "plots" / "correlations.json").exists()


@pytest.mark.slow
def test_killed_cell_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    args = tiny(tmp_path / "straight", "--grid-index", "0", "--max-iterations", "6")
    batch_lr.main(batch_lr.parse_args(args))
    real_checkpoint, saves = common.Run.checkpoint, []

    def checkpoint_then_die(self, state, force=False):
        saved = real_checkpoint(self, state, force)
        saves.append(saved)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint
        return saved

    monkeypatch.setattr(common.Run, "checkpoint", checkpoint_then_die)
    args = tiny(tmp_path / "killed", "--grid-index", "0", "--max-iterations", "6",
                "--checkpoint-seconds", "1e-9")
    with pytest.raises(KeyboardInterrupt):
        batch_lr.main(batch_lr.parse_args(args))
    monkeypatch.setattr(common.Run, "checkpoint", real_checkpoint)
    (cell,) = (tmp_path / "killed").iterdir()
    assert (cell / "checkpoint.pt").exists() and not (cell / "result.json").exists()
    batch_lr.main(batch_lr.parse_args(args))
    assert json.loads((cell / "config.json").read_text())["resumed"]
    (straight,) = results(tmp_path / "straight")
    (resumed,) = results(tmp_path / "killed")
    for key in ("iterations", "train_loss", "test_loss", "sharpness", "jacobian"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6), key
    steps = [m["step"] for m in json.loads((cell / "metrics.json").read_text())]
    assert steps == sorted(set(steps))  # no step logged twice


@pytest.mark.slow
def test_diverged_cell_is_recorded_and_plotted(tmp_path, capsys):
    batch_lr.main(batch_lr.parse_args(tiny(tmp_path, "--lrs", "1e30", "0.01")))
    statuses = sorted(r["status"] for r in results(tmp_path))
    assert statuses == ["diverged", "finished"]
    assert "diverged (non-finite loss)" in capsys.readouterr().out
    assert (tmp_path / "plots" / "fig14_vgg11_synthetic-cifar10_vs_lr.png").exists()


@pytest.mark.slow
def test_cifar100_code_path_on_synthetic_data(tmp_path):
    args = tiny(tmp_path, "--datasets", "synthetic-cifar100", "--grid-index", "0")
    batch_lr.main(batch_lr.parse_args(args))
    (r,) = results(tmp_path)
    assert r["status"] == "finished" and r["jacobian"] > 0
    config = json.loads(next(tmp_path.glob("*/config.json")).read_text())["config"]
    assert config["target_loss"] == 0.02  # CIFAR-100's stopping loss


@pytest.mark.parametrize("flags,message", [
    (["--lrs", "-0.1"], "--lrs must be positive"),
    (["--batch-sizes", "128"], "--batch-sizes must not exceed --train-size"),
    (["--grid-index", "7"], "--grid-index must lie in [0, 1]"),
    (["--models", "alexnet"], "invalid choice"),
    (["--datasets", "cifar10", "--data-root", "nowhere"], "data set cifar10 not found"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, bad_arguments, flags, message):
    bad_arguments(batch_lr, tiny(tmp_path / "out", *flags), message, tmp_path / "out")


@pytest.mark.slow
def test_slurm_template_runs_the_array_task_cell(cli):
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_SUBMIT_DIR": str(REPO)}
    done = cli.run(["bash", "slurm/batch_lr.sbatch", "--device", "cpu", "--list-grid"], env=env)
    assert done.code == 0, done.err
    assert done.out.strip().splitlines()[-1] == "# 300 cells"
    missing = cli.run(["bash", "slurm/batch_lr.sbatch"], env=env, unset=["SLURM_ARRAY_TASK_ID"])
    assert missing.code != 0 and "array job" in missing.err


def test_smoke_settings_are_defaults_that_explicit_flags_override():
    args = batch_lr.parse_args(["--smoke", "--datasets", "synthetic-cifar10", "--trials", "2"])
    assert args.trials == 2 and args.max_iterations == 8
    assert args.out == "results/batch_lr_smoke_synthetic-cifar10"
