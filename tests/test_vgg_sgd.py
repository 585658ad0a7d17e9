"""vgg_sgd.py end to end on synthetic data: smoke run and its measurement schedule, a killed
multi-epoch run continuing from its checkpoint, bad arguments, --plot-only."""
import json
from pathlib import Path

import pytest
import torch

import common
import vgg_sgd
from conftest import Interrupt, assert_one_line_error, interrupt_at_call

TINY = ["--smoke", "--no-progress"]


def run_main(argv):
    vgg_sgd.main(vgg_sgd.parse_args(argv))


def results(out):
    """{smoothing: loaded run} of the finished runs under out."""
    runs = [common.load_run(d) for d in Path(out).iterdir() if (d / "result.json").exists()]
    return {r["config"]["smoothing"]: r for r in runs}


@pytest.mark.slow
def test_smoke_run_measures_on_schedule_and_plots_both_figures(tmp_path):
    out = tmp_path / "out"
    run_main(TINY + ["--out", str(out), "--smoothings", "0", "0.75"])
    runs = results(out)
    assert sorted(runs) == [0.0, 0.75]
    for run in runs.values():
        # smoke: 64 images, batch 16 -> 4 iterations per epoch, 3 epochs; every 2 in epoch 1
        assert [m["step"] for m in run["metrics"]] == [0, 2, 4, 8, 12]
        assert run["result"]["steps_per_epoch"] == 4 and run["result"]["iterations"] == 12
        for m in run["metrics"]:
            assert m["loss"] >= -1e-6 and m["jacobian"] > 0 and m["output_norm"] > 0
            assert m["logit_jacobian"] > 0  # the logits' Jacobian, same subset
            assert m["sharpness"] > 0 and m["epoch"] == m["step"] / 4
            assert m["secant_curvature"] is not None and m["secant_step"] > 0
            # the curvature the next SGD step realised: every measurement but the last
            assert ("realised_curvature" in m) == (m["step"] < 12)
        assert all("train_loss" in m for m in run["metrics"][1:])
    for stem in ("fig28_first_epoch", "fig29_all_epochs"):
        assert (out / "plots" / f"{stem}.png").stat().st_size > 0


def test_curve_point_records_the_logits_jacobian_beside_the_softmax_one():
    args = vgg_sgd.parse_args(TINY + ["--dataset", "synthetic-cifar10"])
    config = vgg_sgd.run_configs(args)[0]
    model = vgg_sgd.make_model(config, 10, "cpu").train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4)
    row, _ = vgg_sgd.curve_point(model, common.cross_entropy(0.0), x, y, config, 10)
    model.eval()  # the reference: eval mode set by hand, one dense Jacobian per image

    def norms(softmax):
        fn = (lambda v: torch.softmax(model(v[None])[0], 0)) if softmax else (lambda v: model(v[None])[0])
        return [torch.linalg.matrix_norm(torch.func.jacrev(fn)(xi).reshape(10, -1).double(), ord=2)
                for xi in x]

    assert row["logit_jacobian"] == pytest.approx(max(norms(False)).item(), rel=1e-4)
    assert row["jacobian"] == pytest.approx(max(norms(True)).item(), rel=1e-4)
    assert row["logit_jacobian"] > 2 * row["jacobian"]  # softmax's Jacobian has norm <= 1/2


@pytest.mark.slow
def test_killed_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    argv = TINY + ["--smoothings", "0.5", "--epochs", "4", "--checkpoint-seconds", "0"]
    reference = tmp_path / "reference"
    run_main(argv + ["--out", str(reference)])
    killed = tmp_path / "killed"
    # killed in SGD step 3, mid-epoch: the last checkpoint is the one after the step-2 measurement
    calls = interrupt_at_call(monkeypatch, common, "train_step", 4)
    with pytest.raises(Interrupt):
        run_main(argv + ["--out", str(killed)])
    assert len(calls) == 4
    (run_dir,) = killed.iterdir()
    assert not (run_dir / "result.json").exists()
    partial = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert partial["state"]["step"] == 2
    run_main(argv + ["--out", str(killed)])
    assert len(calls) == 4 + 16 - 2  # the resumed run took steps 2..15 only
    got, want = results(killed)[0.5], results(reference)[0.5]
    assert len(got["meta"]["resumed"]) == 1
    assert [m["step"] for m in got["metrics"]] == [m["step"] for m in want["metrics"]] \
        == [0, 2, 4, 8, 12, 16]
    for a, b in zip(got["metrics"], want["metrics"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("argv,message", [
    (["--model", "vgg12"], "invalid choice"),
    (["--lr", "0"], "--lr must be positive"),
    (["--smoothings", "0", "-0.1"], "--smoothings must lie in [0, 1]"),
    (["--momentum", "1.2"], "--momentum must lie in [0, 1]"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--train-size", "100", "--batch-size", "128"], "exceeds the training set"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent"], "not found"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, bad_arguments, argv, message):
    bad_arguments(vgg_sgd, argv + ["--out", tmp_path / "out"], message, tmp_path / "out")


@pytest.mark.slow
def test_plot_only_redraws_from_saved_results(tmp_path, cli):
    out = tmp_path / "out"
    nothing_saved = cli.main(vgg_sgd, TINY + ["--out", out, "--plot-only"])
    assert_one_line_error(nothing_saved, "no saved results")
    argv = TINY + ["--out", str(out), "--smoothings", "0", "--epochs", "1"]
    run_main(argv)
    png = out / "plots" / "fig28_first_epoch.png"
    assert not (out / "plots" / "fig29_all_epochs.png").exists()  # one epoch: Figure 28 only
    png.unlink()
    for path in out.glob("*/metrics.json"):  # as saved before the logits' Jacobian was measured
        rows = json.loads(path.read_text())
        path.write_text(json.dumps([{k: v for k, v in m.items() if k != "logit_jacobian"}
                                    for m in rows]))
    saved = {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")
             if p.parent.name != "plots"}  # the runs; plots/runs.json is redrawn
    run_main(argv + ["--plot-only"])
    assert png.stat().st_size > 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")
             if p.parent.name != "plots"}  # the runs; plots/runs.json is redrawn == saved
