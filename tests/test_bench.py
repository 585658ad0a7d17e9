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


def test_runs_without_optional_packages(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "optional_import", lambda name: None)
    results = run_bench(tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["pyhessian"] == "not installed"
    vgg = saved["models"]["vgg11"]
    assert set(vgg["sharpness"]["methods"]) == {"ours (Lanczos)", "ours, random start (before)",
                                                "plain power (double backward)"}
    assert set(vgg["gauss_newton"]["methods"]) == {"ours (Lanczos)"}
    # our estimators agree with the float64 references on this tiny problem
    assert vgg["sharpness"]["methods"]["ours (Lanczos)"]["error"] < 1e-4
    assert vgg["gauss_newton"]["methods"]["ours (Lanczos)"]["error"] < 1e-4
    assert vgg["jacobian"]["methods"]["ours (exact)"]["error"] < 1e-5
    assert vgg["cost_per_hvp"]["ours_hvp_s"] > 0
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
    assert results["models"]["vgg11"]["parameters"] > 0


def test_compares_with_pyhessian_and_curvlinops(tmp_path):
    pytest.importorskip("pyhessian")
    pytest.importorskip("curvlinops")
    results = run_bench(tmp_path, "--sections", "sharpness", "--trained-steps", "0")
    methods = results["models"]["vgg11"]["sharpness"]["methods"]
    assert {"PyHessian", "curvlinops + eigsh"} <= set(methods)
    assert methods["curvlinops + eigsh"]["error"] < 1e-4
    assert all(m["hvps"] > 0 for m in methods.values())


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--width", "-1"], "--width must be positive"),
    (["--threads", "-2"], "--threads must be >= 0"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--dataset", "synthetic-cifar10"] + argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
