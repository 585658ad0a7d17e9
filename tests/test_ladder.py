"""plots/ladder.py: the scale ladder's rows are computed from the rungs' saved cells (runs files
or run folders), and the committed ladder matches the committed rungs."""
import importlib.util
import json
import math

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("ladder", REPO / "plots" / "ladder.py")
ladder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ladder)


def cell(lr, trial, gap, jacobian, sharpness, gauss_newton, train_size=10_000, status="finished"):
    return {"config": {"lr": lr, "trial": trial, "width": 0.125, "train_size": train_size,
                       "test_size": None, "epochs": 30},
            "result": {"status": status, "gap": gap, "jacobian": jacobian, "sharpness": sharpness,
                       "gauss_newton": gauss_newton, "test_accuracy": 0.5 + gap / 10,
                       "train_loss": gap / 100}}


def write_run_folders(folder, cells):
    for i, c in enumerate(cells):
        run = folder / f"run{i}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"config": c["config"]}))
        (run / "metrics.json").write_text("[]")
        (run / "result.json").write_text(json.dumps(c["result"]))


def test_rung_rows_from_run_folders_and_runs_files(tmp_path, monkeypatch):
    # lr 0.1: the gap rises with the Jacobian (tau 1), falls with sharpness (tau -1), the
    # Gauss-Newton norm ties; lr 0.01 cells enter the pooled taus and the medians only.
    top = [cell(0.1, 0, 1.0, 1, 3, 1), cell(0.1, 1, 2.0, 2, 2, 1), cell(0.1, 2, 3.0, 3, 1, 1),
           cell(0.01, 0, 0.5, 9, 9, 9)]
    write_run_folders(tmp_path / "top", top)
    (tmp_path / "bottom_runs.json").write_text(json.dumps(
        [cell(0.1, t, g, g, g, g, train_size=2000) for t, g in enumerate((1.0, 2.0))]))
    monkeypatch.setattr(ladder, "LADDER", {"sweep": ["bottom_runs.json", "top", "absent"]})
    data = ladder.ladder(tmp_path)
    bottom, rung = data["sweep"]
    assert [bottom["images"], rung["images"]] == [2000, 10_000]
    assert rung["cells"] == rung["finished"] == 4 and rung["cells_at_lr"] == 3
    assert rung["tau_jacobian"] == pytest.approx(1.0)
    assert rung["tau_sharpness"] == pytest.approx(-1.0)
    assert math.isnan(rung["tau_gauss_newton"])  # constant: no ranking
    assert rung["median_test_accuracy"] == pytest.approx(0.5 + 1.5 / 10)
    assert rung["median_train_loss"] == pytest.approx(1.5 / 100)
    assert bottom["tau_jacobian"] == pytest.approx(1.0)
    row = ladder.table(data).splitlines()[3]
    assert row == "| sweep | 10000 | 1/8 | 30 | 4 (3) | 0.650 | 0.015 | - | - | - |"  # too few cells
    monkeypatch.setattr(ladder, "MIN_CELLS", 3)
    row = ladder.table(data).splitlines()[3]
    assert row == "| sweep | 10000 | 1/8 | 30 | 4 (3) | 0.650 | 0.015 | 1.00 | -1.00 | nan |"


def test_width_table_keeps_the_baseline_cells_at_lr_0_1(tmp_path, monkeypatch):
    base = dict(weight_decay=0.0005, smoothing=0.0, mixup_beta=None, augment_p=0.0, sam_rho=0.0)
    cells = []
    for lr, sam, trial, acc in ((0.1, 0.0, 0, 0.6), (0.1, 0.0, 1, 0.8), (0.1, 0.05, 0, 0.9), (0.05, 0.0, 0, 0.1)):
        c = cell(lr, trial, 1.0, 1, 1, 1)
        c["config"].update(base, sam_rho=sam, model="vgg11")
        c["result"].update(test_accuracy=acc, train_seconds=60.0 * (trial + 1), measure_seconds=60.0)
        cells.append(c)
    write_run_folders(tmp_path / "rung", cells)
    monkeypatch.setattr(ladder, "WIDTH_TABLE", {"regularisers": (["rung"], {"lr": 0.1, **base})})
    (row,) = ladder.width_table(tmp_path)
    assert (row["sweep"], row["model"]) == ("regularisers", "vgg11")
    assert (row["width"], row["images"], row["epochs"], row["cells"]) == (0.125, 10_000, 30, 2)
    assert row["median_test_accuracy"] == pytest.approx(0.7)
    assert row["minutes"] == pytest.approx(2.5)


def test_diverged_cells_are_counted_but_not_ranked(tmp_path, monkeypatch):
    cells = [cell(0.1, 0, 1.0, 1, 1, 1), cell(0.1, 1, 2.0, 2, 2, 2),
             cell(0.1, 2, math.nan, math.nan, math.nan, math.nan, status="diverged")]
    write_run_folders(tmp_path / "rung", cells)
    monkeypatch.setattr(ladder, "LADDER", {"sweep": ["rung"]})
    (rung,) = ladder.ladder(tmp_path)["sweep"]
    assert rung["cells"] == 3 and rung["finished"] == 2 and rung["cells_at_lr"] == 2
    assert rung["tau_jacobian"] == pytest.approx(1.0)


def test_penalty_table_gives_matched_and_scheduled_values(tmp_path, monkeypatch):
    # A lambda = 0 cell (no jacobian_penalty key, as a run folder saves it), a penalised cell that
    # trained 3 epochs past its schedule to reach the target, and one that diverged.
    base = cell(0.1, 0, 0.5, 6.0, 9.0, 9.0)
    base["config"]["epochs"] = 15
    base["result"].update(train_loss=0.25, test_accuracy=0.77)
    matched = cell(0.1, 0, 0.4, 2.0, 10.0, 10.0)
    matched["config"].update(epochs=15, jacobian_penalty=1.0, match_train_loss=True)
    matched["result"].update(train_loss=0.24, test_accuracy=0.78, epochs_trained=18, matched=True,
                             match_target=0.25, scheduled_train_loss=0.4, scheduled_gap=0.3,
                             scheduled_jacobian=1.5)
    diverged = cell(0.1, 1, math.nan, math.nan, math.nan, math.nan, status="diverged")
    diverged["config"].update(epochs=15, jacobian_penalty=0.3)
    write_run_folders(tmp_path / "penalty", [matched, diverged, base])
    # The lambda = 0 cell's trajectory: its clean training loss passes 0.24 at epoch 14.
    rerun = {"config": {**base["config"], "measure_each_epoch": True}, "result": base["result"]}
    write_run_folders(tmp_path / "trajectory", [rerun])
    (run,) = (tmp_path / "trajectory").iterdir()
    (run / "metrics.json").write_text(json.dumps(
        [{"step": e, "epoch_train_loss": loss, "epoch_test_accuracy": 0.75, "epoch_gap": gap,
          "epoch_jacobian": 5.0, "epoch_sharpness": 9.5} for e, loss, gap in ((13, 0.3, 0.38), (14, 0.23, 0.45), (15, 0.2, 0.5))]))
    monkeypatch.setattr(ladder, "PENALTY", "penalty")
    monkeypatch.setattr(ladder, "TRAJECTORY", "trajectory")
    rows = ladder.penalty_table(tmp_path)
    assert [(r["lambda"], r["trial"]) for r in rows] == [(0.0, 0), (0.3, 1), (1.0, 0)]
    assert rows[0]["matched"] is None and rows[0]["scheduled_gap"] == pytest.approx(0.5)
    assert rows[2]["unpenalised_at_loss"]["epoch"] == 14
    # interpolated to 0.24 between epochs 13 (0.3) and 14 (0.23): 6/7 of the way
    assert rows[2]["unpenalised_interpolated"]["gap"] == pytest.approx(0.38 + 6 / 7 * 0.07)
    assert rows[2]["unpenalised_interpolated"]["sharpness"] == pytest.approx(9.5)
    lines = ladder.penalty_markdown(rows).splitlines()
    assert lines[2] == "| 0 | 0 | 15 | - | 0.250 | 0.770 | 0.500 | 6.00 | 9.0 | 0.250 / 0.500 / 6.00 | - |"
    assert lines[3] == "| 0.3 | 1 | diverged |" + " |" * 8
    assert lines[4] == ("| 1 | 0 | 18 | yes (0.250) | 0.240 | 0.780 | 0.400 | 2.00 | 10.0 | 0.400 / 0.300 / 1.50 "
                        "| 14, 0.230 / 0.750 / 0.450 / 5.00 / 9.5 |")
    monkeypatch.setattr(ladder, "TRAJECTORY", "absent")
    assert ladder.penalty_table(tmp_path)[2]["unpenalised_at_loss"] is None
    assert ladder.penalty_table(tmp_path / "absent") == []


def plain(value):
    """value with NaN as None (as saved JSON holds it), so two ladders compare with ==."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def test_committed_ladder_matches_the_committed_rungs():
    saved = json.loads((REPO / "plots" / "ladder" / "ladder.json").read_text())
    root = REPO / "plots"
    fresh = {"ladder": ladder.ladder(root), "width_table": ladder.width_table(root),
             "penalty": ladder.penalty_table(root)}
    assert plain(fresh) == plain(saved), "plots/ladder/ladder.json is stale: rerun python plots/ladder.py"


def test_with_table_replaces_the_table_with_that_header():
    text = "intro\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nafter\n"
    assert ladder.with_table(text, "| a | b |\n|---|---|\n| 3 | 4 |") == (
        "intro\n\n| a | b |\n|---|---|\n| 3 | 4 |\n\nafter\n")


def test_plots_readme_quotes_the_committed_tables():
    readme = (REPO / "plots" / "README.md").read_text()
    root = REPO / "plots"
    assert ladder.table(ladder.ladder(root)) in readme, "plots/README.md: paste python plots/ladder.py's ladder table"
    assert ladder.width_markdown(ladder.width_table(root)) in readme, "plots/README.md: paste the width table"
    assert ladder.penalty_markdown(ladder.penalty_table(root)) in readme, "plots/README.md: paste the penalty table"


def test_the_trajectory_reruns_end_where_the_committed_unpenalised_cells_did():
    # Measuring every epoch leaves training alone: each committed --measure-each-epoch rerun ends
    # bit for bit where its lambda = 0 cell did, and its last epoch's reading is that end point.
    root = REPO / "plots"
    if not (root / ladder.TRAJECTORY).exists():
        pytest.skip("no trajectory committed yet")
    cells = {json.dumps({k: v for k, v in r["config"].items() if k not in ladder.MATCH_KEYS}, sort_keys=True): r
             for r in ladder.rung_runs(root / ladder.PENALTY)}
    for rerun in ladder.rung_runs(root / ladder.TRAJECTORY):
        plain = {k: v for k, v in rerun["config"].items() if k not in ladder.MATCH_KEYS}
        ended = cells[json.dumps(plain, sort_keys=True)]["result"]
        for key in ("train_loss", "test_loss", "gap", "jacobian", "sharpness", "gauss_newton", "test_accuracy"):
            assert rerun["result"][key] == ended[key], key
        last = [m for m in rerun["metrics"] if "epoch_train_loss" in m][-1]
        assert last["step"] == rerun["config"]["epochs"] and last["epoch_gap"] == ended["gap"]


def test_a_missing_root_is_a_one_line_error(tmp_path, cli):
    from conftest import assert_one_line_error
    result = cli.main(ladder, ["--root", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "no such folder")
    assert not (tmp_path / "out").exists()
