"""small_network.py (Appendix C.2): smoke runs, resume, --plot-only, command-line errors."""
from pathlib import Path

import pytest

import common
import small_network
from conftest import REAL_DATA, Interrupt, interrupt_at_call


def smoke_args(out, *extra):
    return small_network.parse_args(["--smoke", "--dataset", "synthetic-cifar10", "--out", str(out),
                                     "--no-progress", *extra])


def saved_files(out):
    return {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("small_network")
    small_network.main(smoke_args(out))
    return out


@pytest.mark.slow
def test_smoke_run_writes_runs_and_figures(smoke_out):
    runs = [common.load_run(d) for d in sorted(smoke_out.iterdir()) if d.name != "plots"]
    assert len(runs) == 2 * 3 * 2  # activations x scales x trials
    for run in runs:
        assert run["result"]["status"] == "finished"
        steps, sharp = common.metric_series(run, "sharpness")
        assert steps.tolist() == [0, 3, 6] and (sharp > 0).all()
        assert common.metric_series(run, "loss")[0].tolist() == list(range(7))
        assert run["meta"]["torch"] and run["meta"]["device"] == "cpu"
        assert not (run["dir"] / "checkpoint.pt").exists()
    for stem in ("fig30_relu", "fig31_tanh"):
        for ext in ("png", "pdf"):
            assert (smoke_out / "plots" / f"{stem}.{ext}").stat().st_size > 1000


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_plot_only_redraws(smoke_out, monkeypatch):
    before = {p: t for p, t in saved_files(smoke_out).items() if "plots" not in p.parts}
    for png in (smoke_out / "plots").iterdir():
        png.unlink()
    monkeypatch.setattr(common, "load_data", lambda *a, **k: pytest.fail("finished runs reloaded data"))
    small_network.main(smoke_args(smoke_out))  # all runs saved: nothing is trained again
    after = saved_files(smoke_out)
    assert all(after[p] == t for p, t in before.items())
    assert (smoke_out / "plots" / "fig30_relu.png").exists()
    (smoke_out / "plots" / "fig31_tanh.png").unlink()
    small_network.main(smoke_args(smoke_out, "--plot-only"))
    assert (smoke_out / "plots" / "fig31_tanh.png").exists()


@pytest.mark.slow
def test_interrupted_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    def args(out):
        return smoke_args(out, "--activations", "tanh", "--scales", "1.5", "--trials", "1")

    small_network.main(args(tmp_path / "reference"))
    reference = common.load_saved(tmp_path / "reference", small_network.run_configs(args(tmp_path)),
                                  small_network.RUN_KEYS)[0]
    original_init = common.Run.__init__
    monkeypatch.setattr(common.Run, "__init__",
                        lambda self, *a, **k: original_init(self, *a, **{**k, "checkpoint_seconds": 0.0}))
    calls = interrupt_at_call(monkeypatch, common, "train_step", 5)  # step 4
    with pytest.raises(Interrupt):
        small_network.main(args(tmp_path / "resumed"))
    run_dir = next(d for d in (tmp_path / "resumed").iterdir() if d.name != "plots")
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "result.json").exists()
    small_network.main(args(tmp_path / "resumed"))
    assert len(calls) == 5 + 2  # the last checkpoint was after step 3: steps 4 and 5 again
    resumed = common.load_run(run_dir)
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["meta"]["resumed"]  # the restart is on record


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-0.2"], "--lr must be positive, got -0.2"),
    (["--activations", "swish"], "invalid choice: 'swish'"),
    (["--measure-size", "6000"], "--measure-size (6000) must not exceed --train-first (5000)"),
    (["--dataset", "cifar10"], "data set cifar10 not found at"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, bad_arguments, argv, message):
    bad_arguments(small_network, ["--data-root", tmp_path / "none", "--out", tmp_path / "out",
                                  "--dataset", "synthetic-cifar10", *argv], message, tmp_path / "out")


@pytest.mark.slow
def test_rejected_command_line_writes_nothing_and_shows_no_traceback(tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.json").write_text("{}")
    proc = cli.subprocess("small_network.py", ["--out", out, "--data-root", tmp_path / "none"])
    assert proc.code == 2 and proc.out == ""
    assert proc.err == (f"small_network.py: error: data set cifar10 not found at "
                           f"{tmp_path / 'none' / 'cifar10.npz'}: point --data-root at the folder "
                           "holding cifar10.npz, or pass --download to fetch it through torchvision\n")
    assert [p.name for p in out.iterdir()] == ["keep.json"]


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DATA / "cifar10.npz").exists(),
                    reason=f"real CIFAR-10 not at {REAL_DATA}/cifar10.npz (set REPRO_DATA)")
def test_smoke_run_on_real_cifar10(tmp_path):
    args = small_network.parse_args(["--smoke", "--data-root", str(REAL_DATA), "--out", str(tmp_path),
                                     "--activations", "relu", "--scales", "1.0", "--trials", "1",
                                     "--no-progress"])
    small_network.main(args)
    (run,) = common.load_saved(tmp_path, small_network.run_configs(args), small_network.RUN_KEYS)
    steps, loss = common.metric_series(run, "loss")
    assert loss[-1] < loss[0]  # gradient descent makes progress on the first 200 images
