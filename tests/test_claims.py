"""plots/CLAIMS.md: the table parses with the header's column count, every row has one allowed
verdict, the counts at the top match the rows, every figure or results file a row names is
committed, every row with committed inputs has a check in plots/claims_checks.json, and each
check's verdict, recomputed from the committed results files (tests/claims_checks.py), is the
row's."""
import json
import re
from pathlib import Path

import pytest

from claims_checks import (CHECKS, Setting, correlation_groups, ladder_sentence, load,
                           mechanical_verdict, rung_summary, top_rung_verdict, trend, updated_ledger)

ROOT = Path(__file__).resolve().parent.parent
PLOTS = ROOT / "plots"
LEDGER = PLOTS / "CLAIMS.md"
CHECKS_FILE = PLOTS / "claims_checks.json"
VERDICTS = ("partially reproduced", "not reproduced", "reproduced", "contradicted", "not run")
# Checks whose units are pooled correlations or claims of possibility: no means routes.
NO_MEANS = {"tau_at_least", "jacobian_ranks_better", "tau_positive", "tau_lower_without_weight_decay",
            "theory_jacobian_ranks_better", "ansatz_tau_positive"}


def cells(line):
    """The cells of a markdown table line as GitHub splits them: on every `|` not escaped as `\\|`
    (inside code spans too), the outer pipes dropped."""
    parts = re.split(r"(?<!\\)\|", line.strip())
    if parts and parts[0] == "":
        parts = parts[1:]
    if parts and parts[-1] == "":
        parts = parts[:-1]
    return [p.strip() for p in parts]


def table():
    """(header cells, [row cells]) of the ledger's table."""
    lines = LEDGER.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| # |"))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append(cells(line))
    return cells(lines[start]), body


def rows():
    return table()[1]


def verdict_of(cell):
    text = cell.replace("*", "").strip()
    return next((v for v in VERDICTS if text.startswith(v)), None)


def counts():
    out = {}
    for row in rows():
        out[verdict_of(row[-1])] = out.get(verdict_of(row[-1]), 0) + 1
    return out


def test_the_cell_splitter_follows_github():
    assert cells(r"| 1 | a \| b | `x \| y` | c |") == ["1", r"a \| b", r"`x \| y`", "c"]
    assert cells("| 1 | `a | b` | c |") == ["1", "`a", "b`", "c"]  # a pipe in a code span splits


def test_every_row_has_the_header_column_count():
    header, body = table()
    assert len(body) >= 50
    numbers = [row[0] for row in body]
    assert numbers == [str(i) for i in range(1, len(body) + 1)]
    for row in body:
        assert len(row) == len(header), (row[0], len(row), len(header))


def test_each_row_has_one_allowed_verdict_and_a_reason_when_not_run():
    for row in rows():
        verdict = verdict_of(row[-1])
        assert verdict, row[0]
        rest = row[-1].replace("*", "")[len(verdict):]
        assert not any(v in rest for v in VERDICTS), (row[0], row[-1])
        if verdict == "not run":
            assert re.match(r"not run \(.+\)", row[-1].replace("*", "")), row[0]


def test_counts_at_the_top_match_the_rows():
    header = LEDGER.read_text().split("| # |")[0]
    assert re.search(rf"\*\*{len(rows())} claims\.\*\*", header)
    for verdict, n in counts().items():
        assert re.search(rf"{verdict}\*?\*?: {n}\b", header), (verdict, n)


def test_named_files_exist():
    for row in rows():
        for name in re.findall(r"`([\w./-]+\.(?:png|json|csv|md))`", " ".join(row)):
            assert (PLOTS / name).exists(), f"row {row[0]} names {name}, not committed"


def test_readme_links_the_ledger_and_quotes_its_counts():
    readme = (ROOT / "README.md").read_text()
    assert "plots/CLAIMS.md" in readme
    sentence = re.search(r"Of its (\d+) claims, ([^.]*)\.", readme)
    assert sentence and int(sentence.group(1)) == len(rows())
    for verdict, n in counts().items():
        assert re.search(rf"\b{n} {verdict}\b", sentence.group(2)), (verdict, n)


def specs():
    return json.loads(CHECKS_FILE.read_text())


def test_every_row_with_committed_inputs_has_a_check():
    checked = {spec["row"] for spec in specs()["rows"]}
    by_hand = {int(n): why for n, why in specs()["by_hand"].items()}
    assert not checked & set(by_hand)
    assert checked | set(by_hand) == set(range(1, len(rows()) + 1))
    for n, why in by_hand.items():
        row = rows()[n - 1]
        assert why and verdict_of(row[-1]) == "not run", (n, "judged by hand with inputs?")
        assert not re.findall(r"`[\w./-]+\.(?:json|csv)`", " ".join(row)), n
    paragraph = LEDGER.read_text().split("## Verdict standard")[1].split("| # |")[0]
    assert "42 and 43" in paragraph  # the ledger says which rows are judged by hand, and why


def test_verdicts_obey_the_standard():
    table_ = {row[0]: row for row in rows()}
    for spec in specs()["rows"]:
        row = table_[str(spec["row"])]
        assert row[1].startswith(spec["claim_starts"]), (spec["row"], row[1][:60])
        for name in spec["files"]:
            assert f"`{name}`" in row[5], (spec["row"], f"evidence does not name {name}")
        settings = CHECKS[spec["check"]](spec["files"], **spec.get("args", {}))
        assert settings and all(s.signs for s in settings.values()), spec["row"]
        expected = mechanical_verdict(settings, spec.get("existential", False), spec.get("cap"))
        # A Section 6 row's verdict is its ladder's top rung's once that rung is complete.
        expected = "ladder" in spec and top_rung_verdict(spec) or expected
        assert verdict_of(row[-1]) == expected, (spec["row"], verdict_of(row[-1]), expected)
        if spec.get("cap") and not ("ladder" in spec and top_rung_verdict(spec)):
            assert "caps" in row[5] + row[-1], (spec["row"], "the row does not say what caps it")


def test_the_checks_compute_the_means_routes():
    """Every check but those of pooled correlations and claims of possibility gives each setting
    its means and its spread, so the standard's means routes are applied, not skipped."""
    for spec in specs()["rows"]:
        settings = CHECKS[spec["check"]](spec["files"], **spec.get("args", {}))
        exempt = spec["check"] in NO_MEANS or spec.get("existential", False)
        for key, s in settings.items():
            assert exempt or (s.mean is not None and s.apart is not None), (spec["row"], key)


def test_the_standard_separates_the_verdicts():
    assert mechanical_verdict({"a": Setting([1, 1, 1])}) == "reproduced"
    assert mechanical_verdict({"a": Setting([1, 1, 1])}, cap="confound") == "partially reproduced"
    # contradicted: - in every unit, or the opposite in every setting's means beyond the spread
    assert mechanical_verdict({"a": Setting([-1, -1, -1]), "b": Setting([-1, -1])}) == "contradicted"
    assert mechanical_verdict({"a": Setting([-1, -1, 0], -1, -1), "b": Setting([-1, 0, 1], -1, -1)}) == "contradicted"
    assert mechanical_verdict({"a": Setting([-1, -1, 0], -1, -1), "b": Setting([-1, 0, 1], 0, -1)}) == "not reproduced"
    # partially: holds in one setting (all units, or the means beyond the spread), fails in another
    # or not: every setting's means beyond the spread, in half of the units or fewer
    assert mechanical_verdict({"a": Setting([1, 0, 0], 1, 1), "b": Setting([1, 0, -1], 1, 1)}) == "partially reproduced"
    assert mechanical_verdict({"a": Setting([1, 1, 1]), "b": Setting([-1, -1, -1])}) == "partially reproduced"
    assert mechanical_verdict({"a": Setting([1, 0, 1], 1, 1), "b": Setting([-1, 0, 0])}) == "partially reproduced"
    assert mechanical_verdict({"a": Setting([1, 0, 1], 0, 1), "b": Setting([-1, 0, 0])}) == "not reproduced"
    # or: holds in the means of every setting and in more than half of all units
    assert mechanical_verdict({"a": Setting([1, 1, 0], 0, 1), "b": Setting([1, 0, 1], 0, 1)}) == "partially reproduced"
    assert mechanical_verdict({"a": Setting([1, 1, 0], 0, 1), "b": Setting([1, 0, 1], 0, 0)}) == "not reproduced"
    assert mechanical_verdict({"a": Setting([1, 0, 0], 0, 1), "b": Setting([1, 0, 1], 0, 1)}) == "not reproduced"
    # no means (pooled correlations): the units alone decide
    assert mechanical_verdict({"a": Setting([1], None, None), "b": Setting([0], None, None)}) == "partially reproduced"
    assert mechanical_verdict({"a": Setting([1, 0], None, None)}) == "not reproduced"
    # possibility: holds where most trials show it
    assert mechanical_verdict({"a": Setting([1, 1, 0]), "b": Setting([0, 1, 1])}, existential=True) == "reproduced"
    assert mechanical_verdict({"a": Setting([1, 1, 0]), "b": Setting([0, 0, 1])}, existential=True) == "partially reproduced"


def test_the_ladder_sentences_are_current():
    """Each laddered row ends its evidence with the sentence its rungs give now (stale after cells
    land until `python tests/claims_checks.py --update-ledger` is run)."""
    text = LEDGER.read_text()
    assert updated_ledger(text, specs()) == text
    laddered = [spec for spec in specs()["rows"] if "ladder" in spec]
    assert {spec["row"] for spec in laddered} >= {*range(7, 23), 46, 48, 50, 51}
    # every Section 6 row (7-23, 46-51) is on the ladder or says why not
    assert {spec["row"] for spec in laddered} | {int(n) for n in specs()["not_on_ladder"]} == {*range(7, 24), *range(46, 52)}
    for n in specs()["not_on_ladder"]:
        assert "Ladder ([rungs](README.md#ladder)): not on it: " in rows()[int(n) - 1][5], n
    for spec in laddered:
        assert ladder_sentence(spec) in rows()[spec["row"] - 1][5], spec["row"]
        # the sentence before it ends with a full stop: "... the same verdict. Ladder (...)"
        assert f". {ladder_sentence(spec)}" in rows()[spec["row"] - 1][5], spec["row"]
        assert "cells" not in spec["ladder"]["rungs"][0], spec["row"]  # the bottom rung: the ledger's runs


def test_the_ladder_rules():
    assert trend({"verdict": "not reproduced", "plus": 5, "units": 6},
                 {"verdict": "partially reproduced", "plus": 1, "units": 4}) == "toward the paper"
    assert trend({"verdict": "reproduced", "plus": 6, "units": 6},
                 {"verdict": "partially reproduced", "plus": 6, "units": 6}) == "away from the paper"
    assert trend({"verdict": "not reproduced", "plus": 1, "units": 3},
                 {"verdict": "not reproduced", "plus": 2, "units": 4}) == "toward the paper"
    assert trend({"verdict": "partially reproduced", "plus": 2, "units": 4},
                 {"verdict": "partially reproduced", "plus": 1, "units": 2}) == "flat"
    # a rung folder reads as a runs file; a query keeps the runs whose config has its values
    cells = load("train_regularisers/ladder/n10000?weight_decay=0.0&augment_p=0")
    assert cells and all(r["config"]["weight_decay"] == 0 and set(r) >= {"config", "metrics", "result"}
                         for r in cells)
    assert len(load("train_regularisers/fig21_runs.json?lr=0.1")) * 2 == len(load("train_regularisers/fig21_runs.json"))
    # a rung short of its grid is not judged
    spec = next(s for s in specs()["rows"] if s["row"] == 7)
    rung = {**spec["ladder"]["rungs"][1], "cells": 10 ** 6}
    assert set(rung_summary(spec, rung)) == {"finished", "diverged", "cells"}
    # a list in a query keeps the runs with any of its values
    assert {r["config"]["batch_size"] for r in load("batch_lr/three_trials/fig12_fig16_runs.json?batch_size=[32,256]")} == {32, 256}
    # a regulariser sweep's runs give a correlation group per sweep, as its correlations file does
    assert sorted({g for _, g, _, _ in correlation_groups(["train_regularisers/fig21_runs.json?lr=0.1"])}) == sorted(
        ["weight_decay", "smoothing", "mixup_beta", "augment_p", "sam_rho"])


def test_a_rung_folder_with_two_runs_of_one_config_is_refused(tmp_path, monkeypatch):
    import claims_checks
    for name in ("a", "b"):
        (tmp_path / "rung" / name).mkdir(parents=True)
        for file, content in (("config.json", {"config": {"lr": 0.1, "trial": 0}}), ("metrics.json", []),
                              ("result.json", {"status": "finished"})):
            (tmp_path / "rung" / name / file).write_text(json.dumps(content))
    monkeypatch.setattr(claims_checks, "PLOTS", tmp_path)
    claims_checks.load.cache_clear()
    try:
        with pytest.raises(ValueError, match="same config"):
            claims_checks.load("rung")
    finally:
        claims_checks.load.cache_clear()


def test_unpenalised_cells_are_read_at_the_penalised_cells_training_loss(tmp_path, monkeypatch):
    import claims_checks

    def config(penalty, trial, **extra):
        return {"lr": 0.1, "trial": trial, **({"jacobian_penalty": penalty} if penalty else {}), **extra}

    def result(train_loss, gap, sharpness):
        return {"status": "finished", "train_loss": train_loss, "gap": gap, "sharpness": sharpness,
                "test_accuracy": 0.7, "jacobian": 1.0}

    def write(folder, name, config_, result_, metrics=()):
        (tmp_path / folder / name).mkdir(parents=True)
        for file, content in (("config.json", {"config": config_}), ("metrics.json", list(metrics)),
                              ("result.json", result_)):
            (tmp_path / folder / name / file).write_text(json.dumps(content))

    # Without the penalty: gap 0.5 at loss 0.25 at the end; its trajectory passes the penalised
    # cell's loss 0.4 at epoch 2 (0.35: gap 0.3, sharpness 9), not at epoch 1 (0.6).
    for trial, pen_loss in ((0, 0.4), (1, 0.1)):
        write("rung", f"base{trial}", config(0, trial), result(0.25, 0.5, 10.0))
        write("rung", f"pen{trial}", config(1.0, trial), result(pen_loss, 0.35, 9.5))
    trajectory = [{"step": e, "epoch_train_loss": loss, "epoch_gap": gap, "epoch_sharpness": 9.0,
                   "epoch_test_accuracy": 0.6, "epoch_jacobian": 2.0}
                  for e, loss, gap in ((1, 0.6, 0.2), (2, 0.35, 0.3), (3, 0.25, 0.5))]
    for trial in (0, 1):
        write("traj", f"base{trial}", config(0, trial, measure_each_epoch=True), result(0.25, 0.5, 10.0),
              metrics=[{"step": 1, "batch_loss": 0.7}, *trajectory])
    monkeypatch.setattr(claims_checks, "PLOTS", tmp_path)
    claims_checks.load.cache_clear()
    try:
        read = claims_checks.at_matched_loss(claims_checks.runs(["rung"]), claims_checks.load("traj"), 1.0)
        base = {r["config"]["trial"]: r["result"] for r in read if "jacobian_penalty" not in r["config"]}
        assert base[0]["matched"] and base[0]["matched_epoch"] == 2 and base[0]["gap"] == 0.3
        assert base[0]["match_target"] == 0.4 and base[0]["sharpness"] == 9.0
        assert base[1] == {**result(0.25, 0.5, 10.0), "matched": False}  # never down to 0.1
        # A penalised cell that trained on to its lambda = 0 cell's loss leaves that cell as it ended.
        ended = {"config": config(0, 2), "result": result(0.25, 0.5, 10.0)}
        trained_on = {"config": config(1.0, 2), "result": {**result(0.24, 0.4, 9.0), "matched": True}}
        assert claims_checks.at_matched_loss([ended, trained_on], [], 1.0)[0]["result"] == {**ended["result"], "matched": True}
        spec = {"row": 0, "check": "penalty_lowers_gap_sharpness_stays", "args": {"strength": 1.0, "floor": 0.9},
                "cap": "confound", "ladder": {"confound": "unmatched", "rungs": []}}
        rung = {"label": "top", "files": ["rung"], "cells": 4, "matched_by": "traj"}
        # Trial 0 at matched loss: gap 0.35 against 0.3, the penalty's gap is larger (-); trial 1
        # unmatched, as it ended: 0.35 against 0.5 (+); the trials' gaps overlap: not reproduced.
        # One of two read at matched loss: the cap would apply.
        summary = claims_checks.rung_summary(spec, rung)
        assert summary["read_at_loss"] == (1, 2) and (summary["plus"], summary["units"]) == (1, 2)
        assert summary["verdict"] == "not reproduced"
        assert "1 of 2 unpenalised cells read" in " ".join(claims_checks.rung_notes(summary))
        # Without the trajectories no cell is read at matched loss: the cells as they ended.
        summary = claims_checks.rung_summary(spec, {**rung, "matched_by": "absent"})
        assert summary["read_at_loss"] == (0, 2) and summary["plus"] == 2
    finally:
        claims_checks.load.cache_clear()
