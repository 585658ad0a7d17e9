"""plots/CLAIMS.md: every row has one allowed verdict, the counts at the top match the rows, every
figure or results file a row names is committed, and the verdicts of the rows plots/claims_checks.json
names follow the ledger's verdict standard when recomputed from the committed results files."""
import itertools
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLOTS = ROOT / "plots"
LEDGER = PLOTS / "CLAIMS.md"
CHECKS_FILE = PLOTS / "claims_checks.json"
VERDICTS = ("partially reproduced", "not reproduced", "reproduced", "contradicted", "not run")


def rows():
    table = [line for line in LEDGER.read_text().splitlines() if re.match(r"^\| *[A-Z]?\d+ *\|", line)]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table]


def verdict_of(cell):
    text = cell.replace("*", "").strip()
    return next((v for v in VERDICTS if text.startswith(v)), None)


def test_each_row_has_one_allowed_verdict_and_a_reason_when_not_run():
    table = rows()
    assert len(table) >= 25
    for row in table:
        verdict = verdict_of(row[-1])
        assert verdict, row
        if verdict == "not run":
            assert re.match(r"not run \(.+\)", row[-1].replace("*", "")), row


def test_counts_at_the_top_match_the_rows():
    counts = {}
    for row in rows():
        counts[verdict_of(row[-1])] = counts.get(verdict_of(row[-1]), 0) + 1
    header = LEDGER.read_text().split("| # |")[0]
    for verdict, n in counts.items():
        assert re.search(rf"{verdict}\*?\*?: {n}\b", header), (verdict, n)


def test_named_files_exist():
    for row in rows():
        for name in re.findall(r"`([\w./-]+\.(?:png|json|csv|md))`", " ".join(row)):
            path = ROOT / "plots" / name
            assert path.exists(), f"row {row[0]} names {name}, not committed"


def test_readme_links_the_ledger_and_quotes_its_counts():
    counts = {}
    for row in rows():
        counts[verdict_of(row[-1])] = counts.get(verdict_of(row[-1]), 0) + 1
    readme = (ROOT / "README.md").read_text()
    assert "plots/CLAIMS.md" in readme
    sentence = re.search(r"Of its (\d+) claims, ([^.]*)\.", readme)
    assert sentence and int(sentence.group(1)) == len(rows())
    for verdict, n in counts.items():
        assert re.search(rf"\b{n} {verdict}\b", sentence.group(2)), (verdict, n)


# The verdict standard of plots/CLAIMS.md, applied mechanically to the rows that
# plots/claims_checks.json names. A check returns {setting: Setting}: the per-trial signs of the claimed
# direction (+1 holds, -1 the opposite holds, 0 neither), the sign of the direction in the three-trial
# means (`mean`), and that sign where the effect exceeds the trial spread, i.e. the compared trials'
# ranges do not overlap (`apart`, else 0).
CHECKS = {}
REGULARISERS = ("weight_decay", "smoothing", "mixup_beta", "augment_p", "sam_rho")


class Setting:
    def __init__(self, signs, apart=0, mean=0):
        self.signs, self.apart, self.mean = list(signs), apart, mean


def check(function):
    CHECKS[function.__name__] = function
    return function


def sign(x):
    return (x > 0) - (x < 0)


def kendall(x, y):
    pairs = list(itertools.combinations(range(len(x)), 2))
    return sum(sign((x[i] - x[j]) * (y[i] - y[j])) for i, j in pairs) / len(pairs)


def apart(low, high):
    """+1 when every value of `high` exceeds every value of `low`, -1 for the reverse, else 0."""
    return 1 if min(high) > max(low) else -1 if max(high) < min(low) else 0


def ordered(values):
    """+1 when strictly decreasing (the claimed order), -1 when strictly increasing, else 0."""
    steps = [sign(a - b) for a, b in zip(values, values[1:])]
    return steps[0] if len(set(steps)) == 1 else 0


def mechanical_verdict(settings, existential=False, cap=None):
    """The verdict the standard gives a row's settings (see plots/CLAIMS.md, "Verdict standard")."""
    groups = list(settings.values())
    signs = [s for g in groups for s in g.signs]
    if existential:
        held = [2 * sum(s > 0 for s in g.signs) > len(g.signs) for g in groups]
        verdict = "reproduced" if all(held) else "partially reproduced" if any(held) else "not reproduced"
    elif all(s > 0 for s in signs):
        verdict = "reproduced"
    elif all(s < 0 for s in signs) or all(g.apart < 0 for g in groups):
        verdict = "contradicted"
    elif any(all(s > 0 for s in g.signs) or g.apart > 0 for g in groups) or (
            all(g.mean > 0 for g in groups) and 2 * sum(s > 0 for s in signs) > len(signs)):
        verdict = "partially reproduced"
    else:
        verdict = "not reproduced"
    return "partially reproduced" if cap and verdict == "reproduced" else verdict


def load(name):
    return json.loads((PLOTS / name).read_text())


def runs(files):
    return [run for name in files for run in load(name)]


def by(runs_, *keys):
    return {tuple(run["config"][k] for k in keys): run for run in runs_}


def series(run, quantity):
    return [m[quantity] for m in run["metrics"] if quantity in m]


@check
def sharpening_past_edge(files):
    """Unsmoothed full-batch runs: peak sharpness above both its initial value and 2/lr."""
    out = {}
    for run in runs(files):
        c = run["config"]
        if c["smoothing"] == 0:
            sharp = series(run, "sharpness")
            ok = max(sharp) > max(sharp[0], 2 / c["lr"])
            out.setdefault((c["model"], c["lr"]), Setting([])).signs.append(1 if ok else -1)
    return out


@check
def jacobian_growth(files):
    """Unsmoothed full-batch runs: final Jacobian norm against the initial one."""
    out = {}
    for run in runs(files):
        c = run["config"]
        if c["smoothing"] == 0:
            jac = series(run, "jacobian")
            out.setdefault((c["model"], c["lr"]), Setting([])).signs.append(sign(jac[-1] - jac[0]))
    return out


@check
def smoothing_order(files, measures, smoothings=(0, 0.5, 0.75)):
    """Per (model, lr, trial) and each pair of neighbouring smoothings: each measure, [quantity, "final"
    or "peak"], lower with the larger smoothing."""
    cells = by(runs(files), "model", "lr", "trial", "smoothing")
    pick = {"final": lambda s: s[-1], "peak": max}
    out = {}
    for quantity, statistic in measures:
        for model, lr in sorted({k[:2] for k in cells}):
            trials = sorted({t for m, l, t, _ in cells if (m, l) == (model, lr)})
            value = lambda t, x: pick[statistic](series(cells[model, lr, t, x], quantity))
            for a, b in zip(smoothings, smoothings[1:]):
                high, low = [value(t, a) for t in trials], [value(t, b) for t in trials]
                signs = [sign(h - l) for h, l in zip(high, low)]
                out[quantity, model, lr, a, b] = Setting(signs, apart(low, high), sign(sum(high) - sum(low)))
    return out


@check
def jacobian_grows_past_edge(files):
    """From the first measurement with sharpness >= 2/lr to the end: the Jacobian norm grows by more
    than 20% and by more than the sharpness changes (it does not plateau)."""
    out = {}
    for run in runs(files):
        c = run["config"]
        if c["smoothing"] == 0:
            m = [x for x in run["metrics"] if "sharpness" in x]
            i = next(k for k, x in enumerate(m) if x["sharpness"] >= 2 / c["lr"])
            jac, sharp = m[-1]["jacobian"] / m[i]["jacobian"], m[-1]["sharpness"] / m[i]["sharpness"]
            out.setdefault(c["lr"], Setting([])).signs.append(1 if jac > max(1.2, sharp) else 0)
    return out


@check
def weight_decay_extreme(files, quantity, direction):
    """Per (lr, trial): the quantity without weight decay above (direction +1) or below (-1) its value
    with every weight decay."""
    cells = by(runs(files), "lr", "weight_decay", "trial")
    decays = sorted({wd for _, wd, _ in cells if wd > 0})
    out = {}
    for lr in sorted({lr for lr, _, _ in cells}):
        trials = sorted({t for l, _, t in cells if l == lr})
        value = lambda wd, t: direction * cells[lr, wd, t]["result"][quantity]
        signs = []
        for t in trials:
            d = [sign(value(0, t) - value(wd, t)) for wd in decays]
            signs.append(1 if min(d) > 0 else -1 if max(d) < 0 else 0)
        spread = [apart([value(wd, t) for t in trials], [value(0, t) for t in trials]) for wd in decays]
        means = [sign(sum(value(0, t) - value(wd, t) for t in trials)) for wd in decays]
        out[lr] = Setting(signs, spread[0] if len(set(spread)) == 1 else 0, means[0] if len(set(means)) == 1 else 0)
    return out


@check
def lower_at_larger_lr(files, quantities):
    """Per (network, batch, trial): each quantity at lr 0.1 below its value at lr 0.01."""
    cells = by(runs(files), "model", "batch_size", "lr", "trial")
    out = {}
    for quantity in quantities:
        for model, batch in sorted({k[:2] for k in cells}):
            value = lambda lr, t: cells[model, batch, lr, t]["result"][quantity]
            signs = [sign(value(0.01, t) - value(0.1, t)) for t in range(3)]
            spread = apart([value(0.1, t) for t in range(3)], [value(0.01, t) for t in range(3)])
            out[quantity, model, batch] = Setting(signs, spread, sign(sum(signs)) and sign(sum(
                value(0.01, t) - value(0.1, t) for t in range(3))))
    return out


@check
def higher_at_larger_lr(files, quantities):
    """Per (network, batch, trial): each quantity at lr 0.1 above its value at lr 0.01."""
    return {k: Setting([-x for x in g.signs], -g.apart, -g.mean)
            for k, g in lower_at_larger_lr(files, quantities).items()}


@check
def rises_with_batch(files, quantity, lrs):
    """Per (network, lr, trial): the sign of Kendall's tau between the batch size and the quantity;
    the spread test compares the smallest and the largest batch."""
    cells = by(runs(files), "model", "lr", "batch_size", "trial")
    out = {}
    for model, lr in sorted({k[:2] for k in cells}):
        if lr in lrs:
            batches = sorted({b for m, l, b, _ in cells if (m, l) == (model, lr)})
            value = lambda b, t: cells[model, lr, b, t]["result"][quantity]
            signs = [sign(kendall(batches, [value(b, t) for b in batches])) for t in range(3)]
            ends = [[value(b, t) for t in range(3)] for b in (batches[0], batches[-1])]
            means = [sum(value(b, t) for t in range(3)) for b in batches]
            out[model, lr] = Setting(signs, apart(*ends), sign(kendall(batches, means)))
    return out


@check
def gap_jacobian_tau_per_trial(files, model, lr, direction):
    """Per trial: the sign of tau(gap, Jacobian) over the batch sizes at one lr (x direction)."""
    cells = by(runs(files), "model", "lr", "batch_size", "trial")
    batches = sorted({b for m, l, b, _ in cells if (m, l) == (model, lr)})
    tau = lambda t: kendall(*[[cells[model, lr, b, t]["result"][q] for b in batches] for q in ("gap", "jacobian")])
    return {(model, lr): Setting([direction * sign(tau(t)) for t in range(3)])}


@check
def tau_at_least(files, threshold=0.5):
    """Each group of a correlations.json, pooled and within each lr: tau(gap, Jacobian) >= threshold."""
    out = {}
    for name in files:
        for group, taus in load(name).items():
            for key, t in [("pooled", taus)] + sorted(taus.get("per_lr", {}).items()):
                out[name, group, key] = Setting([1 if t["tau_gap_jacobian"] >= threshold else 0])
    return out


@check
def jacobian_ranks_better(files):
    """Each group, pooled and within each lr: tau(gap, Jacobian) positive and above tau(gap, sharpness)."""
    out = {}
    for name in files:
        for group, taus in load(name).items():
            for key, t in [("pooled", taus)] + sorted(taus.get("per_lr", {}).items()):
                jac, sharp = t["tau_gap_jacobian"], t["tau_gap_sharpness"]
                out[name, group, key] = Setting([1 if jac > max(sharp, 0) else -1 if sharp > max(jac, 0) else 0])
    return out


@check
def regulariser_lowers(files, quantities, regularisers):
    """Per (network, regulariser, lr, trial): the quantity at the largest value of the regulariser below
    its value without it (weight decay: 0)."""
    base = {"weight_decay": 0.0005, "smoothing": 0, "mixup_beta": None, "augment_p": 0, "sam_rho": 0}
    out = {}
    for name in files:
        cells = {}
        for run in load(name):
            c = run["config"]
            moved = [k for k in base if c[k] != base[k]]
            for k in moved or list(base):
                cells.setdefault((c["model"], c["batch_norm"], k, c["lr"], c["trial"]), {})[c[k]] = run["result"]
        for (model, bn, k, lr, trial), values in sorted(cells.items(), key=str):
            if k in regularisers:
                none = values[0.0 if k == "weight_decay" else base[k]]
                strongest = values[max(v for v in values if v is not None)]
                for q in quantities:
                    out.setdefault((name, model, bn, k, q), Setting([])).signs.append(sign(none[q] - strongest[q]))
    return out


@check
def regulariser_spares_sharpness(files):
    """Per (network, trial): some regulariser, at its largest value and some lr, lowers the gap while the
    sharpness does not fall."""
    found = {}
    for name in files:
        for (_, model, bn, k, q), setting in regulariser_lowers([name], ["gap", "sharpness"], REGULARISERS).items():
            found.setdefault((name, model, bn, k), {})[q] = setting.signs
    out = {}
    for (name, model, bn, k), signs in found.items():
        spared = [g > 0 and s <= 0 for g, s in zip(signs["gap"], signs["sharpness"])]  # lr 0.05 then 0.1, per trial
        setting = out.setdefault((name, model, bn), Setting([0] * (len(spared) // 2)))
        half = len(spared) // 2
        for t in range(half):
            if spared[t] or spared[half + t]:
                setting.signs[t] = 1
    return out


@check
def bn_difference_below(files, batch, threshold):
    """Per run: the relative train/eval difference of the sample-max Jacobian norm at one batch size."""
    diffs = {}
    for run in runs(files):
        diff = run["result"]["bn_jacobian"][str(batch)]["relative_difference_of_max"]
        diffs.setdefault(run["config"]["smoothing"], []).append(diff)
    return {s: Setting([1 if d <= threshold else 0 for d in ds], mean=1 if sum(ds) / len(ds) <= threshold else 0)
            for s, ds in diffs.items()}


@check
def bn_difference_shrinks(files, statistic):
    """Per run: the train/eval difference strictly decreasing over the checked batch sizes."""
    out = {}
    for run in runs(files):
        bn = run["result"]["bn_jacobian"]
        values = [bn[str(b)][statistic] for b in run["config"]["bn_check_batch_sizes"]]
        out.setdefault(run["config"]["smoothing"], Setting([])).signs.append(ordered(values))
    return out


@check
def final_fraction_of_peak(files, quantity, smoothings, at_most=(), at_least=()):
    """Per run: the final value of the quantity at most (a fall; to 0.1: a collapse) or at least (a
    plateau) each given fraction of its peak; a setting per (smoothing, fraction)."""
    out = {}
    for run in runs(files):
        c = run["config"]
        if c["smoothing"] in smoothings:
            s = series(run, quantity)
            for f in at_most:
                out.setdefault((c["smoothing"], "at most", f), Setting([])).signs.append(1 if s[-1] <= f * max(s) else 0)
            for f in at_least:
                out.setdefault((c["smoothing"], "at least", f), Setting([])).signs.append(1 if s[-1] >= f * max(s) else 0)
    return out


@check
def gauss_newton_close(files, tolerance):
    """Per cell: Gauss-Newton norm / sharpness within 1 +- tolerance."""
    out = {}
    for name in files:
        ratios = [r["result"]["gauss_newton"] / r["result"]["sharpness"] for r in load(name)]
        out[name] = Setting([1 if abs(x - 1) <= tolerance else 0 for x in ratios])
    return out


@check
def tau_lower_without_weight_decay(files, quantity="sharpness"):
    """Per sweep (a unit: one tau over its cells): tau(gap, quantity) without weight decay (first
    file) below its value with it (second file)."""
    without, with_ = (load(name) for name in files)
    key = f"tau_gap_{quantity}"
    return {"sweeps": Setting([sign(with_[g][key] - without[g][key]) for g in sorted(without)])}


def test_verdicts_obey_the_standard_where_it_is_mechanical():
    table = {row[0]: row for row in rows()}
    specs = json.loads(CHECKS_FILE.read_text())["rows"]
    assert len(specs) >= 20
    for spec in specs:
        row = table[str(spec["row"])]
        assert row[1].startswith(spec["claim_starts"]), (spec["row"], row[1][:60])
        settings = CHECKS[spec["check"]](spec["files"], **spec.get("args", {}))
        expected = mechanical_verdict(settings, spec.get("existential", False), spec.get("cap"))
        assert verdict_of(row[-1]) == expected, (spec["row"], verdict_of(row[-1]), expected)


def test_the_standard_separates_the_verdicts():
    assert mechanical_verdict({"a": Setting([1, 1, 1])}) == "reproduced"
    assert mechanical_verdict({"a": Setting([1, 1, 1])}, cap="confound") == "partially reproduced"
    assert mechanical_verdict({"a": Setting([-1, -1, 0], apart=-1), "b": Setting([-1, -1, -1], -1)}) == "contradicted"
    assert mechanical_verdict({"a": Setting([1, 1, 1]), "b": Setting([-1, -1, -1])}) == "partially reproduced"
    assert mechanical_verdict({"a": Setting([1, 0, -1]), "b": Setting([0, -1, 0])}) == "not reproduced"
    assert mechanical_verdict({"a": Setting([1, 1, 0], mean=1), "b": Setting([1, 0, 1], mean=1)}) == "partially reproduced"
    assert mechanical_verdict({"a": Setting([1, 1, 0], mean=1), "b": Setting([1, 0, 1], mean=0)}) == "not reproduced"
    assert mechanical_verdict({"a": Setting([1, 1, 0]), "b": Setting([0, 1, 1])}, existential=True) == "reproduced"
