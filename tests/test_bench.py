"""benchmarks/bench.py runs end to end in a tiny mode (synthetic data). Timings are not tested:
targets live in the benchmark's own output. PyHessian and curvlinops are optional."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("scipy")  # the float64 references use scipy's eigsh
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench  # noqa: E402

TINY = ["--smoke", "--dataset", "synthetic-cifar10", "--models", "vgg11", "--no-progress",
        "--batch-size", "8", "--train-size", "32", "--jacobian-size", "3"]


def run_bench(tmp_path, *extra):
    return bench.main(bench.parse_args(TINY + ["--out", str(tmp_path)] + list(extra)))


@pytest.mark.slow
def test_runs_without_optional_packages(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "optional_import", lambda name: None)
    results = run_bench(tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["pyhessian"] == "not installed"
    vgg = saved["models"]["vgg11"]
    assert set(vgg["sharpness"]["methods"]) == {"ours (Lanczos)", "ours, gradient start (opt-in)",
                                                "ours, tol 1e-3", "plain power (double backward)"}
    assert set(vgg["gauss_newton"]["methods"]) == {"ours (Lanczos)"}
    # our estimators agree with the float64 references on this tiny problem
    assert vgg["sharpness"]["methods"]["ours (Lanczos)"]["error"] < 1e-4
    assert vgg["gauss_newton"]["methods"]["ours (Lanczos)"]["error"] < 1e-4
    assert vgg["jacobian"]["methods"]["ours (exact)"]["error"] < 1e-5
    cost = vgg["cost_per_hvp"]
    for key in ("gradient_s", "ours_hvp_s", "ours_graph_build_s"):
        assert 0 < cost[key] < 60, key  # seconds for one pass of a 9,854-parameter model
    assert cost["ours_hvp_in_gradients"] == pytest.approx(cost["ours_hvp_s"] / cost["gradient_s"])
    assert cost["ours_graph_build_in_gradients"] == pytest.approx(
        cost["ours_graph_build_s"] / cost["gradient_s"])
    # products are counted: Lanczos within its default max_iter, plain power one per iteration
    # within --smoke's 30, and Lanczos needs fewer
    sharp = vgg["sharpness"]["methods"]
    assert all(isinstance(m["hvps"], int) for m in sharp.values())
    assert 1 <= sharp["ours (Lanczos)"]["hvps"] <= 100
    assert sharp["ours (Lanczos)"]["hvps"] < sharp["plain power (double backward)"]["hvps"] <= 30
    assert vgg["sharpness_trained"]["methods"]["ours (Lanczos)"]["error"] < 1e-4
    assert {"SGD epoch, tensors (ours)", "SGD epoch, DataLoader (workers=0)"} <= set(
        saved["training"]["loops"])
    # the GPU training target is reported as not measurable on a CPU
    assert any(row["met"] is None for row in saved["targets"].values())
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| ours (Lanczos) |" in text and "GPU: not measured" in text
    assert text in capsys.readouterr().out
    # --plot-only redraws the table from the saved results alone
    (tmp_path / "RESULTS.md").unlink()
    bench.main(bench.parse_args(TINY + ["--out", str(tmp_path), "--plot-only"]))
    assert (tmp_path / "RESULTS.md").read_text() == text
    # VGG11 without BN at width 1/32 (channels 2, 4, 8, 8, 16, 16, 16, 16; classifier 16-16-16-10):
    # convs 56 + 76 + 296 + 584 + 1168 + 3 x 2320 = 9140, linears 272 + 272 + 170 = 714
    assert results["models"]["vgg11"]["parameters"] == 9_854


@pytest.mark.slow
def test_compares_with_pyhessian_and_curvlinops(tmp_path):
    pytest.importorskip("pyhessian")
    pytest.importorskip("curvlinops")
    results = run_bench(tmp_path, "--sections", "sharpness", "--trained-steps", "0")
    methods = results["models"]["vgg11"]["sharpness"]["methods"]
    assert {"PyHessian", "curvlinops + eigsh"} <= set(methods)
    assert methods["curvlinops + eigsh"]["error"] < 1e-4
    assert methods["PyHessian"]["error"] < 1e-2
    assert all(m["hvps"] == int(m["hvps"]) and 1 <= m["hvps"] <= 1000 for m in methods.values())


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--width", "-1"], "--width must be positive"),
    (["--threads", "-2"], "--threads must be >= 0"),
    (["--merge"], "--merge is for --sections sharpness and/or equal_accuracy alone"),
])
def test_bad_arguments_exit_2(argv, message, tmp_path, bad_arguments):
    bad_arguments(bench, ["--dataset", "synthetic-cifar10", "--out", tmp_path / "out", *argv],
                  message, tmp_path / "out")


def test_merge_replaces_only_the_rerun_sections():
    saved = {"machine": {"date": "old"}, "training": {"t": 1}, "equal_accuracy": {"e": "old"},
             "models": {"cnn": {"parameters": 5, "sharpness": "old", "gauss_newton": "kept",
                                "jacobian": "kept"}}}
    new = {"machine": {"date": "new"}, "equal_accuracy": {"e": "new"},
           "models": {"cnn": {"parameters": 5, "sharpness": "new", "trained": "t"}}}
    out = bench.merged(saved, new, ["sharpness"])
    cnn = out["models"]["cnn"]
    assert (cnn["sharpness"], cnn["trained"], cnn["gauss_newton"], cnn["jacobian"]) == (
        "new", "t", "kept", "kept")
    assert out["equal_accuracy"] == {"e": "old"} and out["training"] == {"t": 1}
    assert out["sharpness_rerun"]["date"] == "new" and out["machine"]["date"] == "old"
    assert bench.merged(saved, new, ["equal_accuracy"])["equal_accuracy"] == {"e": "new"}


def fake_run(trajectory):
    """A run(tol, seed) returning the first value of `trajectory` (products, value) whose tol
    stop rule (change below tol) holds; seconds = products / 10."""
    def run(tol, seed):
        previous = None
        for products, value in trajectory:
            if previous is not None and abs(value - previous) <= tol * abs(value):
                break
            previous = value
        return dict(value=value, products=products, seconds=products / 10 + seed / 100,
                    converged=True)
    return run


def test_equal_accuracy_picks_the_cheapest_setting_within_each_target():
    import equal_accuracy as ea
    reference = 1.0
    ours = fake_run([(n, 1 - 0.5 * 10.0 ** -n) for n in range(1, 12)])  # error 5e-(n+1)
    slow = fake_run([(n, 1 - 0.5 ** n) for n in range(1, 60)])  # error 2^-n
    out = ea.compare(ours, slow, reference, seeds=[0, 1], ours_tols=(1e-1, 1e-2, 1e-3, 1e-4),
                     pyhessian_tols=(1e-2, 1e-3, 1e-4, 1e-5), targets=(1e-3, 1e-4))
    t3, t4 = out["targets"]["0.001"], out["targets"]["0.0001"]
    # ours: tol 1e-2 stops after 3 products (change 4.5e-3 <= 1e-2) with error 5e-4, tol 1e-3
    # after 4 with error 5e-5
    assert (t3["ours"]["tol"], t3["ours"]["products"]) == (1e-2, 3)
    assert (t4["ours"]["tol"], t4["ours"]["products"]) == (1e-3, 4)
    assert t3["pyhessian"]["error"] <= 1e-3 < t3["pyhessian"]["products"] and t3["met"] is not None
    assert t4["pyhessian"]["error"] <= 1e-4 and t4["pyhessian"]["reached_all_seeds"]
    assert t4["ratio_products"] == t4["pyhessian"]["products"] / t4["ours"]["products"]
    assert t4["ratio_seconds_worst"] == pytest.approx(
        t4["pyhessian"]["max_seconds"] / t4["ours"]["max_seconds"])
    assert out["ours_converged_honest"] == f"{len(out['runs']['ours'])}/{len(out['runs']['ours'])}"
    # the walk stops at the first setting within the tightest target: tol 1e-4 not run
    assert {r["tol"] for r in out["runs"]["ours"]} == {1e-1, 1e-2, 1e-3}


def test_equal_accuracy_reports_a_baseline_that_never_gets_there_as_a_lower_bound():
    import equal_accuracy as ea
    ours = fake_run([(n, 2 - 10.0 ** -n) for n in range(1, 12)])
    wrong = fake_run([(n, 1.5 - 0.5 ** n) for n in range(1, 60)])  # converges to 1.5, not 2
    out = ea.compare(ours, wrong, 2.0, seeds=[0], targets=(1e-3,))
    entry = out["targets"]["0.001"]
    assert not entry["pyhessian"]["reached"] and entry["lower_bound"] and entry["met"]
    assert entry["pyhessian"]["tol"] == ea.PYHESSIAN_TOLS[-1]  # every setting was tried
    rows = ea.targets({"models": {"m": {"init": out}}})
    assert "lower bound" in next(iter(rows.values()))["note"]


@pytest.mark.slow
def test_krylov_floor_errors_never_rise_along_the_chain(tmp_path):
    """The chain's top Ritz value is the largest Rayleigh quotient over a growing space: from
    below, its error cannot rise with m (what makes the fewest-products floor meaningful)."""
    import krylov_floor
    out = tmp_path / "floor.json"
    krylov_floor.main(krylov_floor.parse_args(
        ["--dataset", "synthetic-cifar10", "--models", "cnn", "--seeds", "1",
         "--max-products", "6", "--out", str(out)]))
    saved = json.loads(out.read_text())
    for state in ("cnn init", "cnn trained"):
        errors = saved["models"][state]["errors"]["0"]
        assert len(errors) == 6
        assert all(b <= a * (1 + 1e-6) + 1e-9 for a, b in zip(errors, errors[1:]))
        assert errors[-1] < errors[0]


@pytest.mark.parametrize("flags", [["--plot-only"], ["--sections", "sharpness", "--merge"]])
def test_damaged_saved_results_stop_with_one_line_and_stay_untouched(flags, tmp_path, cli):
    """--plot-only and --merge read the saved results.json: a damaged one is named in one line
    (--merge before any measuring) and left as it was."""
    from conftest import assert_one_line_error
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{damaged")
    result = cli.main(bench, ["--smoke", "--dataset", "synthetic-cifar10", "--out", out, *flags])
    assert_one_line_error(result, f"cannot read {out / 'results.json'}")
    assert (out / "results.json").read_text() == "{damaged"
    assert not (out / "RESULTS.md").exists()
