"""fullbatch.py end to end on synthetic data: smoke run, the unsmoothed run's iteration count
reused by the smoothed ones, resume of a killed run, bad arguments, --plot-only. The
measurements themselves are tested against dense references in test_measurements.py."""
import json
import math
from pathlib import Path

import pytest
import torch

import common
import fullbatch
from conftest import Interrupt, assert_one_line_error, interrupt_at_call

TINY = ["--smoke", "--no-progress", "--trials", "1"]


def run_main(argv):
    fullbatch.main(fullbatch.parse_args(argv))


def results(out):
    """{(smoothing, trial): (config, metrics, result)} of the saved runs under out."""
    found = {}
    for d in Path(out).iterdir():
        if (d / "result.json").exists():
            run = common.load_run(d)
            found[run["config"]["smoothing"], run["config"]["trial"]] = run
    return found


@pytest.mark.slow
def test_smoke_run_reuses_the_unsmoothed_iteration_count_and_plots(tmp_path):
    out = tmp_path / "out"
    argv = TINY + ["--out", str(out), "--models", "resnet18", "--target-accuracy", "0.5",
                   "--max-iterations", "8", "--smoothings", "0", "0.75", "--measure-every", "3"]
    run_main(argv)
    runs = results(out)
    assert sorted(runs) == [(0.0, 0), (0.75, 0)]
    first = runs[0.0, 0]
    n = first["result"]["iterations"]
    # the unsmoothed run stops at the first iteration whose accuracy reaches the target
    accuracies = [m["accuracy"] for m in first["metrics"]]
    assert accuracies[-1] >= 0.5 and all(a < 0.5 for a in accuracies[:-1])
    assert first["result"]["reached_target"] is True and n == len(accuracies) - 1
    for s in (0.75,):
        run = runs[s, 0]
        assert run["config"]["iterations"] == n
        assert [m["step"] for m in run["metrics"]] == list(range(n + 1))
        measured = [m["step"] for m in run["metrics"] if "sharpness" in m]
        assert measured == sorted({*range(0, n + 1, 3), n})
        # loss is cross entropy minus label entropy, so it is a KL divergence: >= 0
        assert all(m["loss"] >= -1e-6 for m in run["metrics"])
        assert all(m["jacobian"] > 0 for m in run["metrics"] if "jacobian" in m)
        # the step-scale curvature along the top eigenvector: at every measurement, and the
        # curvature the update realised wherever an update followed (not at the last step)
        for m in run["metrics"]:
            if "sharpness" in m:
                assert m["secant_curvature"] is not None and m["secant_step"] > 0
                assert ("realised_curvature" in m) == (m["step"] < n)
                if m["step"] < n:
                    assert m["step_along_top"] != 0 and math.isfinite(m["realised_curvature"])
    assert 0 < n < 8 and (out / "plots" / "fig09_resnet18_lr0.08.png").stat().st_size > 0
    # a rerun redoes nothing
    stamp = (out / first["dir"].name / "result.json").stat().st_mtime_ns
    run_main(argv)
    assert (out / first["dir"].name / "result.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_smoothed_runs_alone_need_the_saved_unsmoothed_run(tmp_path, cli):
    out = tmp_path / "out"
    assert_one_line_error(cli.main(fullbatch, TINY + ["--out", out, "--smoothings", "0.5"]),
                          "include 0 in --smoothings")
    assert not out.exists()
    # once the unsmoothed run is saved, a task with only a smoothed run uses its count
    run_main(TINY + ["--out", str(out), "--smoothings", "0"])
    run_main(TINY + ["--out", str(out), "--smoothings", "0.5"])
    runs = results(out)
    assert sorted(runs) == [(0.0, 0), (0.5, 0)]
    assert runs[0.5, 0]["config"]["iterations"] == runs[0.0, 0]["result"]["iterations"] == 4


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    argv = TINY + ["--smoothings", "0", "--max-iterations", "6", "--target-accuracy", "1",
                   "--measure-every", "3", "--checkpoint-seconds", "0"]
    reference = tmp_path / "reference"
    run_main(argv + ["--out", str(reference)])
    killed = tmp_path / "killed"
    # killed in the gradient pass of iteration 5: the last checkpoint followed iteration 3's
    # measurement and update, so it resumes at 4
    calls = interrupt_at_call(monkeypatch, common, "ghost_batch_gradient", 6)
    with pytest.raises(Interrupt):
        run_main(argv + ["--out", str(killed)])
    (run_dir,) = killed.iterdir()
    assert not (run_dir / "result.json").exists() and (run_dir / "checkpoint.pt").exists()
    partial = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert partial["state"]["step"] == 4
    run_main(argv + ["--out", str(killed)])
    assert len(calls) == 6 + 3  # the resumed run computed iterations 4, 5 and 6 only
    got, want = results(killed)[0.0, 0], results(reference)[0.0, 0]
    assert [m["step"] for m in got["metrics"]] == list(range(7))
    assert len(got["meta"]["resumed"]) == 1
    for a, b in zip(got["metrics"], want["metrics"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("argv,message", [
    (["--models", "vgg12"], "invalid choice"),
    (["--lrs", "-0.1"], "--lrs must be positive"),
    (["--smoothings", "1.5"], "--smoothings must lie in [0, 1]"),
    (["--train-size", "100", "--measure-size", "200"], "exceeds the training set"),
    (["--trial-index", "5"], "--trial-index must lie in 0..4"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent"], "not found"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, bad_arguments, argv, message):
    bad_arguments(fullbatch, argv + ["--out", tmp_path / "out"], message, tmp_path / "out")


@pytest.mark.slow
def test_plot_only_redraws_from_saved_results(tmp_path, cli):
    out = tmp_path / "out"
    nothing_saved = cli.main(fullbatch, TINY + ["--out", out, "--plot-only"])
    assert_one_line_error(nothing_saved, "no saved results")
    run_main(TINY + ["--out", str(out), "--smoothings", "0"])
    png = out / "plots" / "fig01_fig06_vgg11_lr0.08.png"
    png.unlink()
    saved = {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")
             if p.parent.name != "plots"}  # the runs; plots/runs.json is redrawn
    run_main(TINY + ["--out", str(out), "--smoothings", "0", "--plot-only"])
    assert png.stat().st_size > 0
    # runs saved without the step-scale curvatures still plot
    for path in out.glob("*/metrics.json"):
        rows = json.loads(path.read_text())
        assert any("realised_curvature" in m for m in rows)
        path.write_text(json.dumps([{k: v for k, v in m.items()
                                     if "curvature" not in k and "along_top" not in k}
                                    for m in rows]))
    png.unlink()
    run_main(TINY + ["--out", str(out), "--smoothings", "0", "--plot-only"])
    assert png.stat().st_size > 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")
             if p.parent.name != "plots"}  # the runs; plots/runs.json is redrawn == saved


def test_an_unreached_target_is_said_to_be_expected_at_smoke_scale():
    runs = [{"config": {"model": "vgg11", "lr": 0.08, "smoothing": 0.0, "trial": 0},
             "result": {"status": "finished", "reached_target": False}}]
    smoke = fullbatch.parse_args(["--smoke", "--data-root", "none"])
    lines = fullbatch.unreached_lines(smoke, runs)
    assert "not reached" in lines[0] and "expected at smoke scale" in lines[1]
    smoke.smoke = False
    assert len(fullbatch.unreached_lines(smoke, runs)) == 1
    assert fullbatch.unreached_lines(smoke, [{**runs[0], "result": {"reached_target": True}}]) == []
