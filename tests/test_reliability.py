"""In-process checks of what keeps user mistakes from ending in a traceback or lost work: data
file validation, damaged run folders, number flags, run names, --smoke data choice, figure
naming, unconverged marks, and the install files."""
import argparse
import ast
import importlib
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from common import runs as runs_module
from common.data import DataError, check_data_file, load_arrays, synthetic_arrays
from conftest import Planted

ROOT = Path(__file__).resolve().parents[1]


def write_npz(path, **overrides):
    """A small valid cifar10.npz (synthetic content), with arrays replaced or removed (None)."""
    a = synthetic_arrays(10, n_train=40, n_test=20)
    arrays = {k: np.array(v) for k, v in a.items()}
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


# -------------------------------------------------------------------------- data files

BAD_FILES = {
    "missing key": (dict(y_test=None), r"missing array\(s\) y_test"),
    "short labels": (dict(y_train=np.zeros(39, np.int64)), "40 images but y_train 39 labels"),
    "labels out of range": (dict(y_test=np.full(20, 10)), r"labels in \[10, 10\]; expected \[0, 10\)"),
    "negative labels": (dict(y_test=np.full(20, -1)), r"labels in \[-1, -1\]"),
    "float labels": (dict(y_train=np.zeros(40)), "1-D integer array"),
    "28x28 images": (dict(x_train=np.zeros((40, 28, 28, 3), np.uint8)), r"shape \(40, 28, 28, 3\)"),
    "channels first": (dict(x_test=np.zeros((20, 3, 32, 32), np.uint8)), "channels-first"),
    "float images": (dict(x_train=np.zeros((40, 32, 32, 3), np.float32)), "dtype float32; expected uint8"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_files_are_refused_naming_the_file(tmp_path, case):
    overrides, message = BAD_FILES[case]
    path = write_npz(tmp_path / "cifar10.npz", **overrides)
    with pytest.raises(DataError, match=message) as e:
        load_arrays("cifar10", tmp_path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_unreadable_archives_are_refused(tmp_path, content):
    (tmp_path / "cifar10.npz").write_bytes(content)
    with pytest.raises(DataError, match="not a readable npz archive"):
        check_data_file(tmp_path / "cifar10.npz", 10)


def test_truncated_archive_is_refused(tmp_path):
    path = write_npz(tmp_path / "cifar10.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cifar10.npz"):
        load_arrays("cifar10", tmp_path)


def test_valid_file_loads_with_or_without_class_names(tmp_path):
    write_npz(tmp_path / "cifar10.npz", classes=None)
    arrays = load_arrays("cifar10", tmp_path)
    assert arrays["x_train"].shape == (40, 32, 32, 3) and "classes" not in arrays


def test_offline_download_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError) as e:
        load_arrays("cifar10", tmp_path / "data", download=True)
    assert str(e.value).startswith("could not download cifar10: no network")
    assert f"place cifar10.npz in {tmp_path / 'data'} (README, Data)" in str(e.value)
    assert not list((tmp_path / "data").iterdir())  # the temporary download folder is gone


# -------------------------------------------------------------------------- runs


KEYS = ("lr", "trial")


def finished_run(out, lr=0.1):
    run = common.Run(out, {"lr": lr, "trial": 0}, KEYS)
    run.begin()
    run.log(0, loss=1.0)
    run.finish("finished")
    return run


@pytest.mark.parametrize("name", ["metrics.json", "config.json", "result.json"])
def test_damaged_json_raises_naming_the_file(tmp_path, name, monkeypatch):
    monkeypatch.setattr(runs_module, "RESTART_DAMAGED", False)
    run = finished_run(tmp_path)
    path = run.dir / name
    path.write_text(path.read_text()[:5])
    with pytest.raises(common.DamagedRun, match=re.escape(str(path))) as e:
        common.Run(tmp_path, run.config, KEYS).done
    assert "--restart" in str(e.value)


def test_damaged_checkpoint_raises_and_restart_moves_it_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(runs_module, "RESTART_DAMAGED", False)
    run = common.Run(tmp_path, {"lr": 0.1, "trial": 0}, KEYS)
    run.begin()
    run.log(0, loss=1.0)
    run.checkpoint(lambda: {"step": 1}, force=True)
    path = run.dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(common.DamagedRun, match="checkpoint.pt"):
        common.Run(tmp_path, run.config, KEYS).begin()
    monkeypatch.setattr(runs_module, "RESTART_DAMAGED", True)
    fresh = common.Run(tmp_path, run.config, KEYS)
    assert fresh.begin() is None and fresh.metrics == []
    aside = [p for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and (aside[0] / "checkpoint.pt").exists()  # kept, not deleted


@pytest.mark.parametrize("save", ["pickle", "torch.save"])
def test_planted_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch, save):
    control, marker = tmp_path / "control", tmp_path / "code-ran"
    pickle.loads(pickle.dumps(Planted(control))).close()
    assert control.exists()  # the payload runs when unpickled without restriction
    monkeypatch.setattr(runs_module, "RESTART_DAMAGED", False)
    run = common.Run(tmp_path / "out", {"lr": 0.1, "trial": 0}, KEYS)
    run.begin()
    path = run.dir / "checkpoint.pt"
    planted = {"state": {"step": 1, "rng": Planted(marker)}, "metrics": []}
    if save == "pickle":
        path.write_bytes(pickle.dumps(planted, protocol=2))
    else:
        torch.save(planted, path)
    with pytest.raises(common.DamagedRun) as e:
        common.Run(tmp_path / "out", run.config, KEYS).begin()
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "--restart" in message
    assert "weights_only=True" in message and not marker.exists()
    monkeypatch.setattr(runs_module, "RESTART_DAMAGED", True)
    assert common.Run(tmp_path / "out", run.config, KEYS).begin() is None  # moved aside, unread
    assert not marker.exists()


@pytest.mark.parametrize("content", [
    b"",  # empty
    b"PK\x03\x04" + bytes(40),  # a broken zip archive
    pickle.dumps(3, protocol=2),  # readable, but a number
    pickle.dumps({}, protocol=2),  # readable, but no state or metrics
    pickle.dumps({"state": {}, "metrics": 3}, protocol=2),  # metrics not a list of rows
])
def test_checkpoint_of_no_use_is_damaged(tmp_path, monkeypatch, content):
    monkeypatch.setattr(runs_module, "RESTART_DAMAGED", False)
    run = common.Run(tmp_path, {"lr": 0.1, "trial": 0}, KEYS)
    run.begin()
    (run.dir / "checkpoint.pt").write_bytes(content)
    with pytest.raises(common.DamagedRun, match=re.escape(str(run.dir / "checkpoint.pt"))) as e:
        common.Run(tmp_path, run.config, KEYS).begin()
    assert "\n" not in str(e.value)


def test_pending_runs_says_already_finished(tmp_path, capsys):
    run = finished_run(tmp_path)
    assert common.pending_runs(tmp_path, [run.config, {"lr": 0.2, "trial": 0}], KEYS) == [
        {"lr": 0.2, "trial": 0}]
    assert f"{run.dir.name}: already finished, skipping" in capsys.readouterr().out


@pytest.mark.parametrize("lr, readable", [(1e6, "lr=1e+06"), (1e-6, "lr=1e-06"), (0.08, "lr=0.08"),
                                          (1e300, "lr=1e+300"), (2.5e-300, "lr=2.5e-300")])
def test_run_names_right_at_every_magnitude(lr, readable):
    assert common.run_name({"lr": lr, "trial": 0}, KEYS).startswith(f"{readable}_trial=0-")


def test_run_names_of_large_and_small_values_differ():
    assert common.run_name({"lr": 1e6}, ("lr",)) != common.run_name({"lr": 1e-6}, ("lr",))


# -------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "NaN", "1e999"])
def test_finite_float_refuses_inf_and_nan(text):
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        common.finite_float(text)


def test_finite_float_accepts_numbers():
    assert common.finite_float("1e6") == 1e6 and common.finite_float("-0.5") == -0.5


def test_every_float_flag_of_every_script_is_finite_float():
    for script in ("fullbatch", "vgg_sgd", "small_network", "coordinate_network", "batch_lr",
                   "train_regularisers"):
        source = (ROOT / f"{script}.py").read_text()
        assert "type=float" not in source, script


# -------------------------------------------------------------------------- --smoke data


def test_smoke_uses_data_present_else_synthetic(tmp_path, capsys):
    assert common.smoke_datasets(tmp_path) == ["synthetic-cifar10"]
    assert "synthetic stand-in" in capsys.readouterr().out
    write_npz(tmp_path / "cifar10.npz")
    assert common.smoke_datasets(tmp_path) == ["cifar10"]  # never cifar100 when absent
    assert "using cifar10" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["fullbatch", "batch_lr", "train_regularisers", "vgg_sgd",
                                    "small_network"])
def test_smoke_folders_are_named_for_their_data_and_an_explicit_out_is_kept(tmp_path, script):
    write_npz(tmp_path / "cifar10.npz")
    module = importlib.import_module(script)
    real = module.parse_args(["--smoke", "--data-root", str(tmp_path)])
    synthetic = module.parse_args(["--smoke", "--data-root", str(tmp_path / "none")])
    assert real.out == f"results/{script}_smoke_cifar10"
    assert synthetic.out == f"results/{script}_smoke_synthetic-cifar10"
    mine = str(tmp_path / "mine")
    assert module.parse_args(["--smoke", "--data-root", str(tmp_path), "--out", mine]).out == mine


def test_smoke_with_download_asks_for_cifar10_not_the_stand_in(tmp_path, capsys):
    assert common.smoke_datasets(tmp_path, download=True) == ["cifar10"]
    assert "cifar10 will be downloaded" in capsys.readouterr().out
    for script, name in (("fullbatch", "dataset"), ("batch_lr", "datasets")):
        module = importlib.import_module(script)
        args = module.parse_args(["--smoke", "--download", "--data-root", str(tmp_path / "none")])
        assert getattr(args, name) in ("cifar10", ["cifar10"]), script


def test_titles_name_data_and_scale():
    assert "synthetic stand-in for CIFAR-10" in common.dataset_label("synthetic-cifar10")
    assert common.dataset_label("cifar100") == "CIFAR-100"
    args = argparse.Namespace(smoke=True)
    assert common.scale_label(args) == "smoke scale"
    args.smoke = False
    assert common.scale_label(args, reduced=True) == "reduced scale"
    assert common.scale_label(args) == "paper scale"
    args.width, args.train_size = 0.0625, 1000
    assert common.scale_label(args, reduced=True) == "reduced scale (width 1/16, 1000 training images)"
    args.width, args.train_size = 1.0, None
    assert common.scale_label(args, reduced=True) == "reduced scale"


# -------------------------------------------------------------------------- plots


def test_figures_of_other_settings_are_not_overwritten(tmp_path, capsys):
    fig, _ = common.new_figure()
    stem = tmp_path / "fig01"
    first = common.save_figure(fig, stem, settings=[{"lr": 0.1}])
    data = first[0].read_bytes()
    assert common.save_figure(fig, stem, settings=[{"lr": 0.1}]) == first  # same settings: same file
    other = common.save_figure(fig, stem, settings=[{"lr": 0.2}])
    assert other != first and other[0].name.startswith("fig01-")
    assert first[0].read_bytes() == data
    assert "other settings" in capsys.readouterr().out


def fake_run(converged):
    return {"config": {"s": 0.0, "trial": 0}, "result": {"status": "finished"},
            "metrics": [{"step": 0, "sharpness": 1.0, "sharpness_converged": True},
                        {"step": 1, "sharpness": 2.0, "sharpness_converged": converged}]}


@pytest.mark.parametrize("converged", [True, False])
def test_plots_mark_unconverged_points(converged):
    _, axes = common.plot_runs([fake_run(converged)], ["sharpness"], "s")
    labels = [line.get_label() for line in axes["sharpness"].get_lines()]
    assert (common.plotting.UNCONVERGED_LABEL in labels) == (not converged)


def test_sweep_plots_mark_unconverged_cells():
    runs = [{"config": {"lr": lr, "b": 1, "trial": 0},
             "result": {"status": "finished", "sharpness": 1.0, "sharpness_converged": lr > 0.05}}
            for lr in (0.01, 0.1)]
    fig, axes = common.new_figure()
    common.plot_sweep(axes[0, 0], runs, "lr", "b", "sharpness")
    assert common.plotting.UNCONVERGED_LABEL in [l.get_label() for l in axes[0, 0].get_lines()]


# -------------------------------------------------------------------------- install


def test_requirements_cover_every_test_import():
    required = {re.split(r"[<>=\[ ]", line)[0].lower()
                for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    local = ({p.stem for p in ROOT.glob("*.py")} | {p.stem for p in ROOT.glob("benchmarks/*.py")}
             | {p.stem for p in ROOT.glob("tests/*.py")}
             | {"common", "tests", "benchmarks", "estimators"})
    imported = set()
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    import sys
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in local}
    assert third_party <= required, third_party - required


def test_readmes_name_no_folder_a_newcomer_lacks():
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in readme
    for path in (ROOT / "README.md", ROOT / "plots" / "README.md"):
        assert "../shared/data" not in path.read_text(), path
