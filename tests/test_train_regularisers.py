"""End-to-end tests of train_regularisers.py on synthetic data (tiny configs, seconds each)."""
import json

import math
from pathlib import Path

import pytest
import torch

import common
from conftest import REPO
import train_regularisers as tr


def tiny(out, *extra):
    """One or two cells of a width-1/8 VGG11 on 48 images for 2 epochs."""
    return ["--datasets", "synthetic-cifar10", "--models", "vgg11", "--batch-norm", "with",
            "--sweeps", "sam", "--sam-rhos", "0.05", "--lrs", "0.05", "--trials", "1",
            "--epochs", "2", "--milestones", "1", "--train-size", "48", "--test-size", "48",
            "--batch-size", "16", "--width", "0.125", "--measure-size", "16", "--eig-tol", "1e-2",
            "--out", str(out), "--no-progress", *extra]


def results(out):
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}


@pytest.mark.slow
def test_smoke_run_covers_every_sweep_with_shared_baselines(tmp_path, capsys):
    tr.main(tr.parse_args(["--smoke", "--datasets", "synthetic-cifar10", "--out", str(tmp_path),
                           "--no-progress"]))
    printed = capsys.readouterr().out
    assert "8 of 8 cells finished" in printed  # 12 sweep points, the baseline shared by 5 sweeps
    cells = results(tmp_path)
    assert len(cells) == 8
    for r in cells.values():
        assert r["status"] == "finished"
        assert r["gap"] == pytest.approx(abs(r["test_loss"] - r["train_loss"]), abs=1e-12)
        assert r["train_loss"] > 0 and r["test_loss"] > 0
        for key in ("sharpness", "gauss_newton", "jacobian", "weight_norm"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        # Gauss-Newton norm and sharpness are both top eigenvalues of (close) curvature
        # matrices on the same examples: the same order of magnitude
        assert 0.1 < r["gauss_newton"] / r["sharpness"] < 10
        for split in ("train", "test"):  # smoke: 64 images per split, eval mode, whole split
            correct = r[f"{split}_accuracy"] * 64
            assert 0 <= correct <= 64 and correct == pytest.approx(round(correct), abs=1e-9)
    tau = json.loads((tmp_path / "plots" / "correlations.json").read_text())
    assert set(tau) == {f"synthetic-cifar10_vgg11_bn_{s}" for s in tr.SWEEPS}
    assert all(t["n"] == 2 for t in tau.values())
    assert all(sum(w["n"] for w in t["per_lr"].values()) == t["n"] for t in tau.values())
    assert (tmp_path / "plots" / "fig21_synthetic-cifar10_vgg11_bn.png").exists()


@pytest.mark.slow
def test_list_grid_counts_distinct_cells(capsys):
    tr.main(tr.parse_args(["--list-grid"]))  # needs no data
    lines = capsys.readouterr().out.strip().splitlines()
    # per (data set, model, BN): 4 + 5 + 5 + 5 + 5 sweep points, the baseline counted once
    # (it is in the weight-decay, smoothing, augmentation and SAM sweeps): 21 settings,
    # x 2 learning rates x 5 trials x 8 = 1680.
    assert lines[-1] == "# 1680 cells" and len(lines) == 1681
    names = [line.split("\t")[1] for line in lines[:-1]]
    assert len(set(names)) == len(names)


@pytest.mark.slow
def test_list_grid_lists_the_jacobian_penalty_axis_with_the_shared_baseline(capsys):
    tr.main(tr.parse_args(["--list-grid", "--datasets", "cifar10", "--models", "vgg11",
                           "--batch-norm", "with", "--lrs", "0.1", "--trials", "1",
                           "--sweeps", "weight_decay", "jacobian",
                           "--jacobian-penalties", "0", "0.1", "1"]))
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split("\t")[1] for line in lines[:-1]]
    # 4 weight decays + 3 penalties, lambda = 0 being the weight-decay sweep's 5e-4 cell
    assert lines[-1] == "# 6 cells" and len(names) == 6
    penalised = [n for n in names if "jacobian_penalty=" in n]
    assert [n.split("jacobian_penalty=")[1].split("_")[0] for n in penalised] == ["0.1", "1"]
    assert all("weight_decay=0.0005_" in n and "sam_rho=0_jacobian" in n for n in penalised)
    # the paper's grid does not change: the axis is swept only when named
    assert "jacobian" not in tr.parse_args(["--list-grid"]).sweeps


@pytest.mark.slow
def test_jacobian_penalty_sweep_records_the_metrics_and_is_the_baseline_at_zero(tmp_path, capsys):
    args = tr.parse_args(tiny(tmp_path, "--sweeps", "jacobian", "--jacobian-penalties", "0", "1"))
    tr.main(args)
    assert "2 of 2 cells finished" in capsys.readouterr().out
    cells = results(tmp_path)
    (baseline,) = [r for name, r in cells.items() if "jacobian_penalty" not in name]
    (penalised,) = [r for name, r in cells.items() if "jacobian_penalty=1_" in name]
    for r in (baseline, penalised):
        assert r["status"] == "finished"
        for key in ("gap", "jacobian", "sharpness", "gauss_newton", "weight_norm", "train_loss"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert 0 <= r["train_accuracy"] <= 1
    assert penalised["train_loss"] != baseline["train_loss"]  # the penalty was applied
    summary = json.loads((tmp_path / "plots" / "runs.json").read_text())
    assert sorted(r["config"]["jacobian_penalty"] for r in summary) == [0.0, 1.0]  # 0 recorded too
    tau = json.loads((tmp_path / "plots" / "correlations.json").read_text())
    assert set(tau) == {"synthetic-cifar10_vgg11_bn_jacobian"} and tau["synthetic-cifar10_vgg11_bn_jacobian"]["n"] == 2
    assert (tmp_path / "plots" / "fig21_synthetic-cifar10_vgg11_bn.png").exists()
    # lambda = 0 written out trains exactly as the cell without the penalty (its own run folder)
    (config,) = [c for c in tr.grid_cells(args) if "jacobian_penalty" not in c]
    data = tr.load_cell_data(config, args, torch.device("cpu"))
    zero = tr.train({**config, "jacobian_penalty": 0.0}, args, data, torch.device("cpu"))
    assert Path(zero["dir"]).name not in cells
    for key, value in baseline.items():
        if not key.endswith("seconds") and key != "finished":
            assert zero["result"][key] == value, key
    (base_dir,) = [name for name in cells if "jacobian_penalty" not in name]
    logged = json.loads((tmp_path / base_dir / "metrics.json").read_text())
    assert [m["batch_loss"] for m in zero["metrics"]] == [m["batch_loss"] for m in logged]


@pytest.mark.slow
def test_matched_cells_train_on_to_the_unpenalised_training_loss(tmp_path, cli):
    from conftest import assert_one_line_error
    argv = tiny(tmp_path, "--sweeps", "jacobian", "--jacobian-penalties", "0", "1",
                "--match-train-loss", "--match-max-epochs", "3")
    early = cli.main(tr, [*argv, "--grid-index", "1"])  # the penalised cell before its baseline
    assert_one_line_error(early, "must finish before")
    assert not results(tmp_path)
    assert cli.main(tr, argv).code == 0
    cells = results(tmp_path)
    (baseline,) = [r for name, r in cells.items() if "jacobian_penalty" not in name]
    (matched,) = [r for name, r in cells.items() if "jacobian_penalty=1_" in name]
    assert "matched" not in baseline
    assert matched["match_target"] == baseline["train_loss"]
    assert 2 <= matched["epochs_trained"] <= 2 + 3
    assert matched["matched"] == (matched["train_loss"] <= baseline["train_loss"])
    # stopped as soon as it matched, or at the cap
    assert matched["matched"] or matched["epochs_trained"] == 5
    for key in ("train_loss", "gap", "sharpness", "jacobian", "test_accuracy"):
        assert math.isfinite(matched[f"scheduled_{key}"]), key
    (name,) = [name for name in cells if "jacobian_penalty=1_" in name]
    logged = json.loads((tmp_path / name / "metrics.json").read_text())
    clean = [m["clean_train_loss"] for m in logged if "clean_train_loss" in m]
    assert clean[0] == matched["scheduled_train_loss"] and len(clean) == matched["epochs_trained"] - 1
    assert all(c > matched["match_target"] for c in clean[:-1])
    if matched["epochs_trained"] > 2:
        assert clean[-1] == pytest.approx(matched["train_loss"], rel=1e-6)


def test_measure_each_epoch_logs_a_trajectory_and_leaves_training_alone(tmp_path, cli):
    # The unpenalised side of a matched comparison: the same cell, measured after every epoch.
    argv = tiny(tmp_path / "plain", "--sweeps", "jacobian", "--jacobian-penalties", "0", "--epochs", "3")
    assert cli.main(tr, argv).code == 0
    argv = tiny(tmp_path / "each", "--sweeps", "jacobian", "--jacobian-penalties", "0", "--epochs", "3",
                "--measure-each-epoch")
    assert cli.main(tr, argv).code == 0
    (plain,), ((name, each),) = results(tmp_path / "plain").values(), results(tmp_path / "each").items()
    config = json.loads((tmp_path / "each" / name / "config.json").read_text())["config"]
    assert config["measure_each_epoch"] is True
    assert "measure_each_epoch" not in json.loads(next((tmp_path / "plain").glob("*/config.json")).read_text())["config"]
    # Measuring is pure: the trajectory's run ends where the plain run does, to the bit.
    for key in ("train_loss", "test_loss", "gap", "jacobian", "sharpness", "weight_norm"):
        assert each[key] == plain[key], key
    logged = json.loads((tmp_path / "each" / name / "metrics.json").read_text())
    trajectory = [m for m in logged if "epoch_gap" in m]
    assert [m["step"] for m in trajectory] == [1, 2, 3]
    assert trajectory[-1]["epoch_train_loss"] == each["train_loss"]
    assert trajectory[-1]["epoch_sharpness"] == each["sharpness"]
    assert len({m["epoch_train_loss"] for m in trajectory}) == 3


def test_learning_rate_schedule_divides_by_ten_at_milestones():
    config = {"lr": 0.1, "milestones": [50, 80]}
    assert [tr.learning_rate(config, e) for e in (0, 49, 50, 79, 80, 89)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.slow
def test_grid_index_runs_one_cell_and_plot_only_merges(tmp_path, capsys):
    args = tiny(tmp_path, "--sweeps", "augmentation", "--augment-ps", "0", "1")
    tr.main(tr.parse_args([*args, "--grid-index", "1"]))
    (name,) = results(tmp_path)
    assert "augment_p=1" in name and not (tmp_path / "plots").exists()
    tr.main(tr.parse_args([*args, "--grid-index", "0"]))
    tr.main(tr.parse_args([*args, "--plot-only"]))
    assert "2 of 2 cells finished" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [["--sweeps", "sam"], ["--sweeps", "jacobian", "--jacobian-penalties", "0.5"]])
def test_killed_cell_resumes_from_its_checkpoint(tmp_path, monkeypatch, sweep):
    tr.main(tr.parse_args(tiny(tmp_path / "straight", "--epochs", "3", "--milestones", "2", *sweep)))
    real_checkpoint = common.Run.checkpoint

    def checkpoint_then_die(self, state, force=False):
        real_checkpoint(self, state, force)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(common.Run, "checkpoint", checkpoint_then_die)
    args = tiny(tmp_path / "killed", "--epochs", "3", "--milestones", "2", "--checkpoint-seconds", "1e-9",
                *sweep)
    with pytest.raises(KeyboardInterrupt):
        tr.main(tr.parse_args(args))
    monkeypatch.setattr(common.Run, "checkpoint", real_checkpoint)
    (cell,) = (tmp_path / "killed").iterdir()
    assert (cell / "checkpoint.pt").exists() and not (cell / "result.json").exists()
    tr.main(tr.parse_args(args))
    assert json.loads((cell / "config.json").read_text())["resumed"]
    (straight,) = results(tmp_path / "straight").values()
    (resumed,) = results(tmp_path / "killed").values()
    for key in ("train_loss", "test_loss", "sharpness", "gauss_newton", "jacobian"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6), key
    epochs = [m["step"] for m in json.loads((cell / "metrics.json").read_text())]
    assert epochs == [1, 2, 3]


@pytest.mark.slow
def test_diverged_cell_is_recorded_and_plotted(tmp_path, capsys):
    tr.main(tr.parse_args(tiny(tmp_path, "--lrs", "1e30", "0.05")))
    assert sorted(r["status"] for r in results(tmp_path).values()) == ["diverged", "finished"]
    assert "diverged (non-finite loss)" in capsys.readouterr().out
    assert (tmp_path / "plots" / "fig21_synthetic-cifar10_vgg11_bn.png").exists()


@pytest.mark.slow
def test_cifar100_mixup_and_augmentation_on_synthetic_data(tmp_path):
    args = tiny(tmp_path, "--datasets", "synthetic-cifar100", "--batch-norm", "without",
                "--sweeps", "mixup", "augmentation",
                "--mixup-betas", "0.5", "--augment-ps", "0.5", "--epochs", "1", "--milestones", "1",
                "--measure-size", "8")
    tr.main(tr.parse_args(args))
    found = results(tmp_path)
    assert len(found) == 2 and all(r["status"] == "finished" for r in found.values())
    tau = json.loads((tmp_path / "plots" / "correlations.json").read_text())
    assert set(tau) == {"synthetic-cifar100_vgg11_no-bn_mixup",
                        "synthetic-cifar100_vgg11_no-bn_augmentation"}
    assert (tmp_path / "plots" / "fig24_synthetic-cifar100_vgg11_no-bn.png").exists()


@pytest.mark.parametrize("flags,message", [
    (["--smoothings", "1.5"], "--smoothings must lie in [0, 1]"),
    (["--augment-ps", "-0.1"], "--augment-ps must lie in [0, 1]"),
    (["--sam-rhos", "-1"], "--sam-rhos must be non-negative"),
    (["--jacobian-penalties", "-1"], "--jacobian-penalties must be non-negative"),
    (["--milestones", "5"], "--milestones must lie in [1, --epochs]"),
    (["--grid-index", "-1"], "--grid-index must lie in [0, 0]"),
    (["--sweeps", "dropout"], "invalid choice"),
    (["--datasets", "cifar100", "--data-root", "nowhere"], "data set cifar100 not found"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, bad_arguments, flags, message):
    bad_arguments(tr, tiny(tmp_path / "out", *flags), message, tmp_path / "out")


@pytest.mark.slow
def test_slurm_template_passes_the_array_task_index(tmp_path, cli):
    env = {"SLURM_ARRAY_TASK_ID": "5000", "SLURM_SUBMIT_DIR": str(REPO)}
    done = cli.run(["bash", "slurm/train_regularisers.sbatch", "--device", "cpu",
                    "--out", tmp_path / "out"], env=env)
    assert done.code == 2  # index 5000 is outside the 1680-cell grid: one-line error
    assert "--grid-index must lie in [0, 1679]" in done.err


def test_smoke_settings_are_defaults_that_explicit_flags_override():
    args = tr.parse_args(["--smoke", "--datasets", "synthetic-cifar10", "--epochs", "3"])
    assert args.epochs == 3 and args.width == 0.125
    assert args.out == "results/train_regularisers_smoke_synthetic-cifar10"


def test_mixup_controls_resample_with_labels_or_keep_the_batch():
    import torch
    x, labels = torch.randn(64, 3, 4, 4), torch.arange(64) % 10
    config = dict(augment_p=0.0, mixup_beta=0.0)
    mixed, targets = tr.regularised_batch(config, x, labels, 10, torch.Generator().manual_seed(0))
    hard_x, hard_y = tr.regularised_batch({**config, "mixup_control": "resample_hard"}, x, labels, 10,
                                          torch.Generator().manual_seed(0))
    assert torch.equal(hard_x, mixed) and torch.equal(hard_y, targets.argmax(1)) and hard_y.dtype == torch.long
    assert not torch.equal(hard_y, labels)  # beta = 0 resamples: some examples replaced by partners
    g = torch.Generator().manual_seed(0)
    soft_x, soft_y = tr.regularised_batch({**config, "mixup_control": "theta0_soft"}, x, labels, 10, g)
    assert torch.equal(soft_x, x) and torch.equal(soft_y.argmax(1), labels) and soft_y.sum().item() == 64
    reference = torch.Generator().manual_seed(0)
    common.mixup(x, labels, 0.0, 10, reference)
    assert torch.equal(g.get_state(), reference.get_state())  # the same random draws as mixup


@pytest.mark.slow
def test_plot_from_redraws_a_saved_runs_json(tmp_path, capsys):
    tr.main(tr.parse_args(tiny(tmp_path / "a")))
    summary = tmp_path / "a" / "plots" / "runs.json"
    tr.main(tr.parse_args(tiny(tmp_path / "b", "--plot-from", str(summary))))
    assert json.loads((tmp_path / "b" / "plots" / "runs.json").read_text()) == json.loads(summary.read_text())
    assert "1 runs unpacked" in capsys.readouterr().out
    assert (tmp_path / "b" / "plots" / "fig21_synthetic-cifar10_vgg11_bn.png").exists()
