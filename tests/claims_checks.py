"""The verdict standard of plots/CLAIMS.md and the checks that plots/claims_checks.json names.

A check reads committed results files (paths relative to plots/) and returns {setting: Setting}.
A Setting holds the signs of its units (+1 the claim holds, -1 its opposite holds, 0 neither: a
tie, a mixed ordering, a threshold missed), the sign of the claimed direction in the setting's
three-trial means (`mean`), and that sign where the effect exceeds the trial spread, i.e. the
compared trials' ranges do not overlap (`apart`, else 0). `mean` and `apart` are None where the
means routes do not apply: a unit that is one Kendall tau over every trial's cells (a pooled
correlation) has no three-trial means and no spread, and a claim of possibility has no means route.
"""
import functools
import itertools
import json
import re
import statistics
from pathlib import Path

PLOTS = Path(__file__).resolve().parent.parent / "plots"
CHECKS = {}
REGULARISERS = ("weight_decay", "smoothing", "mixup_beta", "augment_p", "sam_rho")
# A regulariser's value outside its own sweep in the regulariser sweeps.
BASE = {"weight_decay": 0.0005, "smoothing": 0, "mixup_beta": None, "augment_p": 0, "sam_rho": 0}


class Setting:
    def __init__(self, signs, apart=0, mean=0):
        self.signs, self.apart, self.mean = list(signs), apart, mean

    def __repr__(self):
        return f"Setting({self.signs}, apart={self.apart}, mean={self.mean})"


def check(function):
    CHECKS[function.__name__] = function
    return function


# ----------------------------------------------------------------------------- the standard


def holds(setting):
    """The claim holds in a setting: + in all its units, or in its means beyond the spread."""
    return all(s > 0 for s in setting.signs) or ((setting.mean or 0) > 0 and (setting.apart or 0) > 0)


def mechanical_verdict(settings, existential=False, cap=None):
    """The verdict the standard gives a row's settings (plots/CLAIMS.md, "Verdict standard")."""
    groups = list(settings.values())
    signs = [s for g in groups for s in g.signs]
    if existential:
        held = [2 * sum(s > 0 for s in g.signs) > len(g.signs) for g in groups]
        verdict = "reproduced" if all(held) else "partially reproduced" if any(held) else "not reproduced"
    elif all(s > 0 for s in signs):
        verdict = "reproduced"
    elif all(s < 0 for s in signs) or all((g.mean or 0) < 0 and (g.apart or 0) < 0 for g in groups):
        verdict = "contradicted"
    elif any(holds(g) for g in groups) or (
            all((g.mean or 0) > 0 for g in groups) and 2 * sum(s > 0 for s in signs) > len(signs)):
        verdict = "partially reproduced"
    else:
        verdict = "not reproduced"
    return "partially reproduced" if cap and verdict == "reproduced" else verdict


# ----------------------------------------------------------------------------- helpers


def sign(x):
    return (x > 0) - (x < 0)


def mean(values):
    values = list(values)
    return sum(values) / len(values)


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


def ordered_apart(columns):
    """`ordered` for trial ranges: +1 when each column's range lies above the next one's, -1 when
    each lies below, else 0 (columns: one list of trial values per compared value)."""
    steps = [apart(b, a) for a, b in zip(columns, columns[1:])]
    return steps[0] if len(set(steps)) == 1 else 0


def pairwise(high, low):
    """The Setting of the claim high > low over paired trials: signs, spread and means."""
    return Setting([sign(h - l) for h, l in zip(high, low)], apart(low, high), sign(mean(high) - mean(low)))


def threshold(values, limits):
    """The Setting of the claim value <= limit, per trial (a threshold: + where met, 0 where
    missed); the means compare the mean value with the mean limit, the spread the two ranges."""
    signs = [1 if v <= t else 0 for v, t in zip(values, limits)]
    return Setting(signs, 1 if max(values) <= min(limits) else 0, 1 if mean(values) <= mean(limits) else 0)


@functools.lru_cache(maxsize=None)
def load(name):
    """A committed results file, or the runs of a folder of committed run folders (each with
    config.json, metrics.json and result.json: a rung of the scale ladder), read once; the checks
    do not modify what it returns. A name may end in `?key=value&...` (values in JSON; a list:
    any of its values): only the runs whose config has those values."""
    path, _, query = name.partition("?")
    if (PLOTS / path).is_dir():
        data = [folder_run(d) for d in sorted((PLOTS / path).iterdir()) if (d / "result.json").exists()]
        configs = [json.dumps(r["config"], sort_keys=True) for r in data]
        if len(set(configs)) < len(configs):  # a rerun beside its first run: which one counts?
            raise ValueError(f"{path}: two run folders with the same config")
    else:
        data = json.loads((PLOTS / path).read_text())
    where = {k: json.loads(v) for k, v in (item.split("=", 1) for item in query.split("&") if item)}
    matches = lambda value, wanted: value in wanted if isinstance(wanted, list) else value == wanted
    return [r for r in data if all(matches(r["config"].get(k), v) for k, v in where.items())] if where else data


def folder_run(folder):
    """One committed run folder as a runs-file entry: {"name", "config", "metrics", "result"}."""
    meta = json.loads((folder / "config.json").read_text())
    return {"name": folder.name, "config": meta["config"], "result": json.loads((folder / "result.json").read_text()),
            "metrics": json.loads((folder / "metrics.json").read_text())}


def runs(files, where=None):
    """The runs of the files whose config matches every item of `where`; an item of `files` may
    be a list of runs already read (a rung's cells as the ladder reads them)."""
    where = where or {}
    return [run for name in files for run in (name if isinstance(name, list) else load(name))
            if all(run["config"].get(k) == v for k, v in where.items())]


def by(runs_, *keys):
    return {tuple(run["config"][k] for k in keys): run for run in runs_}


def trials_of(cells):
    """The trials of a `by(..., "trial")` mapping (its keys end in the trial)."""
    return sorted({k[-1] for k in cells})


def grouped(runs_, *keys):
    """{(keys' values): [runs in trial order]}."""
    out = {}
    for run in sorted(runs_, key=lambda r: r["config"]["trial"]):
        out.setdefault(tuple(run["config"][k] for k in keys), []).append(run)
    return out


def series(run, quantity):
    return [m[quantity] for m in run["metrics"] if quantity in m]


def statistic(run, quantity, kind):
    """A run's quantity: its "initial", "final" or "peak" measurement, or its "result"."""
    if kind == "result":
        return run["result"][quantity]
    values = series(run, quantity)
    return {"initial": values[0], "final": values[-1], "peak": max(values)}[kind]


# ----------------------------------------------------------------------------- full-batch GD


@check
def sharpening_past_edge(files):
    """Unsmoothed full-batch runs: peak sharpness above both its initial value and 2/lr (-: never
    above its initial value)."""
    out = {}
    for (model, lr), group in grouped(runs(files, {"smoothing": 0}), "model", "lr").items():
        first = [series(r, "sharpness")[0] for r in group]
        peak = [max(series(r, "sharpness")) for r in group]
        edge = 2 / lr
        signs = [1 if p > max(f, edge) else -1 if p <= f else 0 for p, f in zip(peak, first)]
        spread = 1 if min(peak) > max(max(first), edge) else 0
        out[model, lr] = Setting(signs, spread, 1 if mean(peak) > max(mean(first), edge) else 0)
    return out


@check
def grows(files, quantity, where=None, within=("model", "lr")):
    """Per run: the final value of the quantity above its initial value."""
    return {key: pairwise([series(r, quantity)[-1] for r in group], [series(r, quantity)[0] for r in group])
            for key, group in grouped(runs(files, where), *within).items()}


@check
def falls_with(files, key, values, measures, within, where=None, direction=1):
    """Per group of `within` and trial: each measure, [quantity, statistic], lower at each larger
    value of `key` (direction -1: higher). A setting per (quantity, group, neighbouring pair of
    values); its means and spread compare the two values' trial means and ranges."""
    out = {}
    cells = {}
    for run in runs(files, where):
        c = run["config"]
        cells.setdefault(tuple(c[k] for k in within), {}).setdefault(c[key], {})[c["trial"]] = run
    for quantity, kind in measures:
        for group, by_value in sorted(cells.items(), key=str):
            for a, b in zip(values, values[1:]):
                trials = sorted(set(by_value[a]) & set(by_value[b]))
                high = [direction * statistic(by_value[a][t], quantity, kind) for t in trials]
                low = [direction * statistic(by_value[b][t], quantity, kind) for t in trials]
                out[quantity, kind, *group, a, b] = pairwise(high, low)
    return out


@check
def jacobian_grows_past_edge(files):
    """From the first measurement with sharpness >= 2/lr to the end: the Jacobian norm grows by more
    than 20% and by more than the sharpness changes (it does not plateau). A claim of possibility."""
    out = {}
    for run in runs(files, {"smoothing": 0}):
        c = run["config"]
        m = [x for x in run["metrics"] if "sharpness" in x]
        i = next(k for k, x in enumerate(m) if x["sharpness"] >= 2 / c["lr"])
        jac, sharp = m[-1]["jacobian"] / m[i]["jacobian"], m[-1]["sharpness"] / m[i]["sharpness"]
        out.setdefault(c["lr"], Setting([], None, None)).signs.append(1 if jac > max(1.2, sharp) else 0)
    return out


@check
def median_near_edge(files, tolerance):
    """Unsmoothed runs: the median sharpness from the first measurement at or above 2/lr to the end
    within 1 +- tolerance of 2/lr ("close")."""
    out = {}
    for (model, lr), group in grouped(runs(files, {"smoothing": 0}), "model", "lr").items():
        ratios = []
        for run in group:
            sharp = series(run, "sharpness")
            i = next(k for k, s in enumerate(sharp) if s >= 2 / lr)
            ratios.append(statistics.median(sharp[i:]) / (2 / lr))
        setting = threshold([abs(r - 1) for r in ratios], [tolerance] * len(ratios))
        setting.mean = 1 if abs(mean(ratios) - 1) <= tolerance else 0
        out[model, lr] = setting
    return out


@check
def bn_difference_below(files, batch, threshold_):
    """Per run: the relative train/eval difference of the sample-max Jacobian norm at one batch
    size at most the threshold ("negligible")."""
    out = {}
    for (smoothing,), group in grouped(runs(files), "smoothing").items():
        diffs = [r["result"]["bn_jacobian"][str(batch)]["relative_difference_of_max"] for r in group]
        out[smoothing] = threshold(diffs, [threshold_] * len(diffs))
    return out


@check
def bn_difference_shrinks(files, statistic_):
    """Per run: the train/eval difference strictly decreasing over the checked batch sizes; the
    means and the spread over the trials' values at each batch size."""
    out = {}
    for (smoothing,), group in grouped(runs(files), "smoothing").items():
        columns = [[r["result"]["bn_jacobian"][str(b)][statistic_] for r in group]
                   for b in group[0]["config"]["bn_check_batch_sizes"]]
        signs = [ordered(values) for values in zip(*columns)]
        out[smoothing] = Setting(signs, ordered_apart(columns), ordered([mean(c) for c in columns]))
    return out


# ----------------------------------------------------------------------------- SGD over epochs


def epoch_value(run, quantity, epoch):
    return next(m[quantity] for m in run["metrics"] if m.get("epoch") == epoch and quantity in m)


@check
def final_fraction_of_peak(files, quantity, smoothings, at_most):
    """Per run: the final value of the quantity at most `at_most` of its peak (0.1: "collapses")."""
    out = {}
    for (smoothing,), group in grouped(runs(files), "smoothing").items():
        if smoothing in smoothings:
            final = [series(r, quantity)[-1] for r in group]
            out[smoothing] = threshold(final, [at_most * max(series(r, quantity)) for r in group])
    return out


@check
def still_rising(files, quantity, smoothings, window):
    """Per run: the final value above the value `window` epochs before the end ("keeps growing")."""
    out = {}
    for (smoothing,), group in grouped(runs(files), "smoothing").items():
        if smoothing in smoothings:
            end = group[0]["config"]["epochs"]
            out[smoothing] = pairwise([epoch_value(r, quantity, end) for r in group],
                                      [epoch_value(r, quantity, end - window) for r in group])
    return out


@check
def plateaus(files, quantity, smoothings, window, tolerance, floor):
    """Per run: over the last `window` epochs the value changes by at most `tolerance` (a ratio
    within 1 +- tolerance: "plateaus") and ends above `floor` of its peak ("at nonzero values");
    - where it collapses (ends at or below `floor` of its peak)."""
    out = {}
    for (smoothing,), group in grouped(runs(files), "smoothing").items():
        if smoothing not in smoothings:
            continue
        end = group[0]["config"]["epochs"]
        final = [epoch_value(r, quantity, end) for r in group]
        before = [epoch_value(r, quantity, end - window) for r in group]
        peak = [max(series(r, quantity)) for r in group]

        def verdict(f, b, p):
            return -1 if f <= floor * p else 1 if abs(f / b - 1) <= tolerance else 0

        signs = [verdict(f, b, p) for f, b, p in zip(final, before, peak)]
        ratios = [f / b for f, b in zip(final, before)]
        spread = (1 if max(abs(r - 1) for r in ratios) <= tolerance and min(final) > floor * max(peak)
                  else -1 if max(final) <= floor * min(peak) else 0)
        out[smoothing] = Setting(signs, spread, verdict(mean(final), mean(before), mean(peak)))
    return out


@check
def logits_grow_past_softmax_peak(files, smoothings):
    """Per run: the logits' Jacobian norm at the end above its value where the softmax Jacobian
    norm peaks (the network before the softmax does not flatten)."""
    out = {}
    for (smoothing,), group in grouped(runs(files), "smoothing").items():
        if smoothing in smoothings:
            final, at_peak = [], []
            for run in group:
                m = [x for x in run["metrics"] if "jacobian" in x and "logit_jacobian" in x]
                peak = max(range(len(m)), key=lambda k: m[k]["jacobian"])
                final.append(m[-1]["logit_jacobian"])
                at_peak.append(m[peak]["logit_jacobian"])
            out[smoothing] = pairwise(final, at_peak)
    return out


# ----------------------------------------------------------------------------- weight decay


@check
def against_none(files, key, quantity, direction, within=("lr",), none=0.0, where=None, values=None):
    """Per (group, value of `key` other than `none`, among `values` if given) and trial: the
    quantity without the regulariser above (direction +1) or below (-1) its value with it."""
    out = {}
    cells = by(runs(files, where), *within, key, "trial")
    for group, value in sorted({(k[:-2], k[-2]) for k in cells if k[-2] != none
                                and (values is None or k[-2] in values)}, key=str):
        trials = sorted(k[-1] for k in cells if k[:-1] == (*group, value))
        without = [direction * cells[(*group, none, t)]["result"][quantity] for t in trials]
        with_ = [direction * cells[(*group, value, t)]["result"][quantity] for t in trials]
        out[(*group, value)] = pairwise(without, with_)
    return out


@check
def collapses_against_earlier(files, quantity, fraction, where, within=("lr",)):
    """Per trial: the quantity at the end of a long run (first file) at most `fraction` of its value
    in the shorter run of the same lr and seed (second file): the only earlier value committed."""
    long_runs, short_runs = (by(runs([name], where), *within, "trial") for name in files)
    out = {}
    for group in sorted({k[:-1] for k in long_runs}):
        trials = sorted(k[-1] for k in long_runs if k[:-1] == group)
        end = [long_runs[(*group, t)]["result"][quantity] for t in trials]
        earlier = [short_runs[(*group, t)]["result"][quantity] for t in trials]
        out[group] = threshold(end, [fraction * e for e in earlier])
    return out


# ----------------------------------------------------------------------------- batch size and lr


@check
def lower_at_larger_lr(files, quantities):
    """Per (network, batch, trial): each quantity at lr 0.1 below its value at lr 0.01."""
    cells = by(runs(files), "model", "batch_size", "lr", "trial")
    trials = trials_of(cells)
    out = {}
    for quantity in quantities:
        for model, batch in sorted({k[:2] for k in cells}):
            value = lambda lr, t: cells[model, batch, lr, t]["result"][quantity]
            out[quantity, model, batch] = pairwise([value(0.01, t) for t in trials],
                                                   [value(0.1, t) for t in trials])
    return out


@check
def higher_at_larger_lr(files, quantities):
    """Per (network, batch, trial): each quantity at lr 0.1 above its value at lr 0.01."""
    return {k: Setting([-x for x in g.signs], -g.apart, -g.mean)
            for k, g in lower_at_larger_lr(files, quantities).items()}


def batch_cells(files, model, lr):
    cells = by(runs(files, {"model": model, "lr": lr}), "batch_size", "trial")
    return sorted({b for b, _ in cells}), trials_of(cells), lambda b, t, q: cells[b, t]["result"][q]


@check
def rises_with_batch(files, quantity, lrs):
    """Per (network, lr, trial): the sign of Kendall's tau between the batch size and the quantity;
    the means: tau over the batches' three-trial means; the spread: the smallest against the
    largest batch."""
    out = {}
    for model, lr in sorted({(r["config"]["model"], r["config"]["lr"]) for r in runs(files)}):
        if lr in lrs:
            batches, trials, value = batch_cells(files, model, lr)
            signs = [sign(kendall(batches, [value(b, t, quantity) for b in batches])) for t in trials]
            ends = [[value(b, t, quantity) for t in trials] for b in (batches[0], batches[-1])]
            means = [mean(value(b, t, quantity) for t in trials) for b in batches]
            out[model, lr] = Setting(signs, apart(*ends), sign(kendall(batches, means)))
    return out


@check
def gap_jacobian_tau_per_trial(files, model, lr, direction):
    """Per trial: the sign of tau(gap, Jacobian) over the batch sizes at one lr (x direction). The
    means: tau over the batches' three-trial means; the spread: as in rises_with_batch, in both
    quantities (the relation's sign where both ends are apart)."""
    batches, trials, value = batch_cells(files, model, lr)
    column = lambda t, q: [value(b, t, q) for b in batches]
    signs = [direction * sign(kendall(column(t, "gap"), column(t, "jacobian"))) for t in trials]
    means = [[mean(value(b, t, q) for t in trials) for b in batches] for q in ("gap", "jacobian")]
    ends = [apart(*[[value(b, t, q) for t in trials] for b in (batches[0], batches[-1])])
            for q in ("gap", "jacobian")]
    return {(model, lr): Setting(signs, direction * ends[0] * ends[1], direction * sign(kendall(*means)))}


# ----------------------------------------------------------------------------- correlations


def correlation_groups(files):
    """(file, group, key, taus) for each group of the correlations files, pooled and per lr. For a
    runs file or run folder the groups and taus are computed here as the sweeps' correlations files
    have them: a regulariser sweep's runs, a group per sweep (`sweep_cells`); others, one group."""
    for name in files:
        data = load(name)
        if isinstance(data, list):
            members = {}
            for run in data:
                for group in (sweep_cells(run) if "sam_rho" in run["config"] else ["cells"]):
                    members.setdefault(group, []).append(run)
            data = {group: run_taus(cells) for group, cells in members.items()}
        for group, taus in data.items():
            for key, t in [("pooled", taus)] + sorted(taus.get("per_lr", {}).items()):
                yield name, group, key, t


def run_taus(runs_):
    """{"tau_gap_<q>": Kendall tau of the gap against q} over the finished cells, pooled and
    "per_lr"."""
    done = [r for r in runs_ if r["result"]["status"] == "finished"]

    def taus(cells):
        return {f"tau_gap_{q}": kendall([r["result"]["gap"] for r in cells], [r["result"][q] for r in cells])
                for q in ("jacobian", "sharpness")}
    lrs = sorted({r["config"]["lr"] for r in done})
    per_lr = {str(lr): taus([r for r in done if r["config"]["lr"] == lr]) for lr in lrs} if len(lrs) > 1 else {}
    return {**taus(done), "per_lr": per_lr}


@check
def tau_at_least(files, threshold_=0.5):
    """Each group, pooled and within each lr: tau(gap, Jacobian) >= threshold ("well correlated").
    Pooled correlation units: a setting each."""
    return {(n, g, k): Setting([1 if t["tau_gap_jacobian"] >= threshold_ else 0], None, None)
            for n, g, k, t in correlation_groups(files)}


def ranks_better(jac, sharp):
    return 1 if jac > max(sharp, 0) else -1 if sharp > max(jac, 0) else 0


@check
def jacobian_ranks_better(files):
    """Each group, pooled and within each lr: tau(gap, Jacobian) positive and above tau(gap,
    sharpness). Pooled correlation units: a setting each."""
    return {(n, g, k): Setting([ranks_better(t["tau_gap_jacobian"], t["tau_gap_sharpness"])], None, None)
            for n, g, k, t in correlation_groups(files)}


@check
def tau_positive(files, networks):
    """Per network (a name part of its groups): each (sweep, lr) group's tau(gap, Jacobian) > 0.
    Pooled correlation units."""
    out = {}
    for name, group, key, t in correlation_groups(files):
        for network in networks:
            if f"_{network}_" in group and key != "pooled":
                out.setdefault(network, Setting([], None, None)).signs.append(sign(t["tau_gap_jacobian"]))
    return out


@check
def tau_lower_without_weight_decay(files, quantity="sharpness"):
    """Per sweep (one tau over its cells, pooled): tau(gap, quantity) without weight decay (first
    file) below its value with it (second file)."""
    without, with_ = (load(name) for name in files)
    key = f"tau_gap_{quantity}"
    return {"sweeps": Setting([sign(with_[g][key] - without[g][key]) for g in sorted(without)], None, None)}


# ----------------------------------------------------------------------------- regulariser sweeps


def sweep_cells(run):
    """The regulariser sweeps a run of a regulariser sweep belongs to: the one whose regulariser it
    moves off its base value, or, for the base cell, every sweep whose values include the base
    (not mixup's, which has no "off" value)."""
    c = run["config"]
    moved = [k for k in BASE if c[k] != BASE[k]]
    return moved or [k for k in BASE if k != "mixup_beta"]


@check
def regulariser_lowers(files, quantities, regularisers):
    """Per (network, regulariser, lr) and trial: the quantity at the largest value of the
    regulariser below its value without it (weight decay: 0; mixup: not applied)."""
    out = {}
    for name in files:
        cells = {}
        for run in load(name):
            c = run["config"]
            for k in [k for k in BASE if c[k] != BASE[k]] or list(BASE):
                cells.setdefault((c["model"], c["batch_norm"], k, c["lr"]), {}).setdefault(
                    c[k], {})[c["trial"]] = run["result"]
        for (model, bn, k, lr), values in sorted(cells.items(), key=str):
            if k not in regularisers:
                continue
            none = values[0.0 if k == "weight_decay" else BASE[k]]
            strongest = values[max(v for v in values if v is not None)]
            trials = sorted(set(none) & set(strongest))
            for q in quantities:
                out[name, model, bn, k, lr, q] = pairwise([none[t][q] for t in trials],
                                                          [strongest[t][q] for t in trials])
    return out


@check
def regulariser_spares_sharpness(files):
    """Per (network, trial): some regulariser, at its largest value and some lr, lowers the gap while
    the sharpness does not fall. A claim of possibility: a setting per network."""
    found = {}
    for (name, model, bn, k, lr, q), setting in regulariser_lowers(files, ["gap", "sharpness"], REGULARISERS).items():
        found.setdefault((name, model, bn, k, lr), {})[q] = setting.signs
    out = {}
    for (name, model, bn, k, lr), signs in found.items():
        setting = out.setdefault((name, model, bn), Setting([0] * len(signs["gap"]), None, None))
        for t, (g, s) in enumerate(zip(signs["gap"], signs["sharpness"])):
            if g > 0 and s <= 0:
                setting.signs[t] = 1
    return out


@check
def gauss_newton_close(files, tolerance):
    """Per cell (a setting per configuration, its trials the units): Gauss-Newton norm / sharpness
    within 1 +- tolerance ("close")."""
    out = {}
    for name in files:
        cells = {}
        for run in load(name):
            c = {k: v for k, v in run["config"].items() if k not in ("trial", "seed")}
            cells.setdefault((name, json.dumps(c, sort_keys=True)), []).append(run["result"])
        for key, results in cells.items():
            off = [abs(r["gauss_newton"] / r["sharpness"] - 1) for r in results]
            setting = threshold(off, [tolerance] * len(off))
            ratio = mean(r["gauss_newton"] for r in results) / mean(r["sharpness"] for r in results)
            setting.mean = 1 if abs(ratio - 1) <= tolerance else 0
            out[key] = setting
    return out


@check
def large_hessian_small_jacobian(files, high=0.75, low=0.25):
    """Per (network, trial): some cell's sharpness at or above the `high` quantile and its Jacobian
    norm at or below the `low` quantile of its (sweep, lr) group. A claim of possibility."""
    out = {}
    for name in files:
        groups = {}
        for run in load(name):
            c = run["config"]
            for k in sweep_cells(run):
                groups.setdefault((c["model"], c["batch_norm"], k, c["lr"]), []).append(run)
        found = {}
        for (model, bn, _, _), group in groups.items():
            sharp = quantile([r["result"]["sharpness"] for r in group], high)
            jac = quantile([r["result"]["jacobian"] for r in group], low)
            for run in group:
                hit = run["result"]["sharpness"] >= sharp and run["result"]["jacobian"] <= jac
                key = (name, model, bn)
                found.setdefault(key, {})
                found[key][run["config"]["trial"]] = found[key].get(run["config"]["trial"], False) or hit
        for key, trials in found.items():
            out[key] = Setting([1 if trials[t] else 0 for t in sorted(trials)], None, None)
    return out


def quantile(values, q):
    """numpy's default (linear) quantile."""
    values = sorted(values)
    position = q * (len(values) - 1)
    i = int(position)
    return values[i] + (values[min(i + 1, len(values) - 1)] - values[i]) * (position - i)


@check
def penalty_lowers_gap_sharpness_stays(files, strength, floor):
    """Per (lr, trial): the Jacobian penalty at `strength` against none lowers the gap while the
    sharpness ends at >= `floor` of its value without it ("stays or rises"); - where the gap rises."""
    # A run folder's lambda = 0 cell has no jacobian_penalty in its config (the runs files add it).
    cells = {(r["config"]["lr"], r["config"].get("jacobian_penalty", 0.0), r["config"]["trial"]): r
             for r in runs(files)}
    out = {}
    for lr in sorted({k[0] for k in cells}):
        trials = sorted(k[2] for k in cells if k[:2] == (lr, 0.0))
        res = lambda s, t: cells[lr, s, t]["result"]
        gap0, gap1 = [res(0.0, t)["gap"] for t in trials], [res(strength, t)["gap"] for t in trials]
        sharp0, sharp1 = [res(0.0, t)["sharpness"] for t in trials], [res(strength, t)["sharpness"] for t in trials]
        signs = [-1 if g1 > g0 else 1 if g1 < g0 and s1 >= floor * s0 else 0
                 for g0, g1, s0, s1 in zip(gap0, gap1, sharp0, sharp1)]
        spread = 1 if apart(gap1, gap0) > 0 and min(sharp1) >= floor * max(sharp0) else 0
        means = 1 if mean(gap1) < mean(gap0) and mean(sharp1) >= floor * mean(sharp0) else 0
        out[lr] = Setting(signs, spread, -1 if mean(gap1) > mean(gap0) else means)
    return out


# ----------------------------------------------------------------------------- coordinate network


@check
def smooth_against_oscillating(files, claims):
    """Per trial (paired by seed): the ratio of the smooth fit's quantity (init "low") to the
    oscillating fit's ("high"); + where it lies in the claim's `plus` interval, - in its `minus`
    interval (bounds [low, high], None: unbounded). Each claim is a setting: {"activation",
    "quantity", optional "index" into per-layer lists, "plus", "minus"}."""
    fits = {(r["config"]["activation"], r["config"]["init"]): r["result"] for r in runs(files)}

    def inside(x, bounds):
        lo, hi = bounds
        return (lo is None or x >= lo) and (hi is None or x <= hi)

    def sign_of(x, claim):
        return 1 if inside(x, claim["plus"]) else -1 if inside(x, claim["minus"]) else 0

    out = {}
    for claim in claims:
        values = [fits[claim["activation"], init][claim["quantity"]] for init in ("low", "high")]
        if "index" in claim:
            values = [[v[claim["index"]] for v in vs] for vs in values]
        smooth, oscillating = values
        ratios = [s / o for s, o in zip(smooth, oscillating)]
        ends = [sign_of(max(smooth) / min(oscillating), claim), sign_of(min(smooth) / max(oscillating), claim)]
        key = (claim["activation"], claim["quantity"], claim.get("index"))
        out[key] = Setting([sign_of(r, claim) for r in ratios], ends[0] if ends[0] == ends[1] else 0,
                           sign_of(mean(smooth) / mean(oscillating), claim))
    return out


# ----------------------------------------------------------------------------- theory


def theory_groups(files):
    for name in files:
        for group in load(name)["groups"]:
            yield f"{group['task']}/{group['distribution']}", group


@check
def sample_max_approaches_sup(files):
    """Per base student: the median of sup - max_N over draws strictly decreasing in N."""
    out = {}
    for key, group in theory_groups(files):
        curves = [r["thm45"]["gap_median"] for r in group["runs"] if "thm45" in r]
        columns = [list(c) for c in zip(*curves)]
        out[key] = Setting([ordered(c) for c in curves], ordered_apart(columns), ordered([mean(c) for c in columns]))
    return out


@check
def bound_holds(files):
    """Per student: Eq. (10) holds at the measured gap. A failure probability >= 1 makes it hold
    whatever the gap (vacuous: the row caps it); below 1 one draw cannot test it (0)."""
    out = {}
    for key, group in theory_groups(files):
        failures = [r["bound"]["failure"] for r in group["runs"]]
        out[key] = Setting([1 if f >= 1 else 0 for f in failures], 1 if min(failures) >= 1 else 0,
                           1 if mean(failures) >= 1 else 0)
    return out


@check
def theory_jacobian_ranks_better(files):
    """Per (task, distribution): tau(gap, Jacobian) over its students positive and above tau(gap,
    sharpness). Pooled correlation units."""
    return {key: Setting([ranks_better(g["tau_gap_jacobian"], g["tau_gap_sharpness"])], None, None)
            for key, g in theory_groups(files)}


@check
def ansatz_tau_positive(files):
    """Per student: Kendall tau between sharpness and the Jacobian norm over its 8 checkpoints
    positive. The checkpoints' values are not committed, so there are no means to compare."""
    return {key: Setting([sign(r["ansatz_tau"]) for r in g["runs"]], None, None)
            for key, g in theory_groups(files)}


# ----------------------------------------------------------------------------- the scale ladder
# A Section 6 row's "ladder" (plots/claims_checks.json) applies the row's check, unchanged, at each
# rung of plots/ladder.py: {"args": the check's arguments there (default the row's), "rungs":
# [{"label", "files", optional "args", optional "cells": the rung's grid size}, bottom first]}. A
# rung is judged once every cell of its grid has finished; the ledger's row then quotes the rung's
# verdict, units and medians, and the trend from the bottom rung to the highest judged one. A
# ladder with "confound": "training loss" applies the row's cap only at rungs where the training
# loss ranks the gaps at least as well as the Jacobian norm (Kendall tau over the rung's cells);
# "confound": "unmatched" applies it unless every penalised cell reached matched training loss, or
# the rung has "matched_by" (the lambda = 0 cells' trajectories: `at_matched_loss`) and every
# unpenalised cell is read at its penalised cell's training loss.

RANK = {"contradicted": 0, "not reproduced": 1, "partially reproduced": 2, "reproduced": 3}


def rung_cells(rung, statuses=("finished",)):
    """The cells of a rung that ended with one of `statuses` (its files' runs; a rung in progress
    may have no folder yet)."""
    files = [f for f in rung["files"] if "cells" not in rung or (PLOTS / f.partition("?")[0]).exists()]
    return [r for r in runs(files) if r["result"]["status"] in statuses]


def rung_complete(rung, cells=None):
    """Every cell of the rung's grid has finished (distinct configs; a rung with a diverged cell
    is not judged: the checks compare finished cells). `cells`: its finished cells, if read."""
    cells = rung_cells(rung) if cells is None else cells
    return "cells" not in rung or len({json.dumps(r["config"], sort_keys=True) for r in cells}) >= rung["cells"]


def rung_args(spec, rung):
    """The check's arguments at a rung: the row's, the ladder's, the rung's."""
    return {**spec.get("args", {}), **spec["ladder"].get("args", {}), **rung.get("args", {})}


def at_matched_loss(cells, trajectories, strength):
    """The rung's cells with each lambda = 0 cell read at its penalised cell's training loss: at
    the first epoch of its trajectory (the same cell rerun with --measure-each-epoch, every
    end-of-training metric logged as epoch_<metric>) whose clean training loss is at most the
    final one of the cell with lambda = `strength` at its lr and trial. A lambda = 0 cell stays as
    it ended, with "matched": True where that penalised cell trained on to its loss (--match-train-
    loss), or "matched": False where its trajectory never gets there or it has none."""
    def plain(config):
        return {k: v for k, v in config.items() if k != "measure_each_epoch"}
    traj = {json.dumps(plain(r["config"]), sort_keys=True): r for r in trajectories}
    penalised = {(r["config"]["lr"], r["config"]["trial"]): r["result"] for r in cells
                 if r["config"].get("jacobian_penalty", 0.0) == strength}
    out = []
    for r in cells:
        key = (r["config"]["lr"], r["config"]["trial"])
        if r["config"].get("jacobian_penalty", 0.0) > 0 or key not in penalised:
            out.append(r)
            continue
        target = penalised[key]["train_loss"]
        if penalised[key].get("matched"):  # the penalised cell trained on to this cell's loss
            out.append({**r, "result": {**r["result"], "matched": True}})
            continue
        run = traj.get(json.dumps(r["config"], sort_keys=True))
        points = [m for m in (run["metrics"] if run else [])
                  if m.get("epoch_train_loss") is not None and m["epoch_train_loss"] <= target]
        if not points:
            out.append({**r, "result": {**r["result"], "matched": False}})
            continue
        read = {k.removeprefix("epoch_"): v for k, v in points[0].items() if k.startswith("epoch_")}
        out.append({**r, "result": {"status": "finished", **read, "matched": True,
                                    "matched_epoch": points[0]["step"], "match_target": target}})
    return out


def rung_files(spec, rung):
    """What the row's check reads at a rung: its files, or with "matched_by" its cells with the
    unpenalised ones read at matched training loss (`at_matched_loss`)."""
    if "matched_by" not in rung:
        return rung["files"]
    trajectories = load(rung["matched_by"]) if (PLOTS / rung["matched_by"]).exists() else []
    return [at_matched_loss(runs(rung["files"]), trajectories, rung_args(spec, rung)["strength"])]


def rung_summary(spec, rung):
    """{"verdict", "plus": units with +, "units", "short": cells short of their loss target,
    "test_accuracy", "train_loss" (medians over the finished cells), and the cap's test
    ("tau_loss" and "tau_jacobian", "matched" or "read_at_loss")} of a complete rung; {"finished",
    "diverged", "cells"} of one in progress."""
    cells = rung_cells(rung)
    if not rung_complete(rung, cells):
        return {"finished": len(cells), "diverged": len(rung_cells(rung, ("diverged",))), "cells": rung["cells"]}
    files = rung_files(spec, rung)  # read at matched loss once, for the check and the cap's test
    settings = CHECKS[spec["check"]](files, **rung_args(spec, rung))
    signs = [x for g in settings.values() for x in g.signs]
    if not signs:
        raise ValueError(f"row {spec['row']}, {rung['label']}: the check found no units")
    out = {"plus": sum(x > 0 for x in signs), "units": len(signs),
           "short": sum(r["result"].get("reached_target") is False for r in cells),
           "test_accuracy": statistics.median(r["result"]["test_accuracy"] for r in cells),
           "train_loss": statistics.median(r["result"]["train_loss"] for r in cells)}
    cap = spec.get("cap")
    if spec["ladder"].get("confound") == "training loss":
        # The row's cap is the confound of networks stopped far from a minimum: it applies at a
        # rung where how far a cell trained ranks the gaps at least as well as the Jacobian does.
        gap = [r["result"]["gap"] for r in cells]
        out["tau_loss"] = kendall(gap, [-r["result"]["train_loss"] for r in cells])
        out["tau_jacobian"] = kendall(gap, [r["result"]["jacobian"] for r in cells])
        cap = cap if out["tau_loss"] >= out["tau_jacobian"] else None
    if spec["ladder"].get("confound") == "unmatched" and "matched_by" in rung:
        # The row's cap is the penalty's raised training loss: it applies at a rung unless every
        # lambda = 0 cell could be read at its penalised cell's training loss.
        (read,) = files
        unpenalised = [r["result"] for r in read if r["config"].get("jacobian_penalty", 0.0) == 0]
        out["read_at_loss"] = sum(bool(r.get("matched")) for r in unpenalised), len(unpenalised)
        cap = cap if out["read_at_loss"][0] < len(unpenalised) else None
    elif spec["ladder"].get("confound") == "unmatched":
        # ... or unless every penalised cell trained on until its clean training loss matched its
        # lambda = 0 cell's.
        penalised = [r["result"] for r in cells if r["config"].get("jacobian_penalty", 0.0) > 0]
        out["matched"] = sum(bool(r.get("matched")) for r in penalised), len(penalised)
        cap = cap if out["matched"][0] < len(penalised) else None
    return {"verdict": mechanical_verdict(settings, spec.get("existential", False), cap), **out}


def trend(bottom, top):
    """"toward the paper" where the top rung's verdict ranks higher (reproduced > partially >
    not reproduced > contradicted), or ranks the same with a larger share of + units; "away from
    the paper" for the reverse; else "flat"."""
    key = lambda s: (RANK[s["verdict"]], s["plus"] / s["units"])
    return "toward the paper" if key(top) > key(bottom) else "away from the paper" if key(top) < key(bottom) else "flat"


def rung_notes(s):
    """What qualifies a judged rung's verdict: the cap's test, cells short of their target."""
    notes = []
    if "tau_loss" in s:
        applies = s["tau_loss"] >= s["tau_jacobian"]
        notes.append(f"tau(gap, -training loss) {s['tau_loss']:.2f} {'>=' if applies else '<'} tau(gap, Jacobian) "
                     f"{s['tau_jacobian']:.2f}: {'the confound cap applies' if applies else 'no confound cap'}")
    if "matched" in s:
        applies = s["matched"][0] < s["matched"][1]
        notes.append(f"{s['matched'][0]} of {s['matched'][1]} penalised cells at matched training loss: "
                     f"{'the confound cap applies' if applies else 'no confound cap'}")
    if "read_at_loss" in s:
        applies = s["read_at_loss"][0] < s["read_at_loss"][1]
        notes.append(f"{s['read_at_loss'][0]} of {s['read_at_loss'][1]} unpenalised cells read at their penalised "
                     f"cells' training loss: {'the confound cap applies' if applies else 'no confound cap'}")
    if s["short"]:
        notes.append(f"{s['short']} cells stopped short of the loss target")
    return notes


def ladder_sentence(spec):
    """The ledger's sentence for a row's ladder: each rung's verdict (or progress) and the trend."""
    parts, judged = [], []
    for rung in spec["ladder"]["rungs"]:
        s = rung_summary(spec, rung)
        if "verdict" in s:
            judged.append((rung["label"], s))
            details = [f"{s['plus']} of {s['units']} units +", f"median test accuracy {s['test_accuracy']:.2f}, "
                       f"training loss {s['train_loss']:.2g}", *rung_notes(s)]
            parts.append(f"{rung['label']}: {s['verdict']} ({'; '.join(details)})")
        else:
            diverged = f", {s['diverged']} diverged" if s["diverged"] else ""
            parts.append(f"{rung['label']}: in progress ({s['finished']} of {s['cells']} cells{diverged})")
    text = "Ladder ([rungs](README.md#ladder)): " + "; ".join(parts) + "."
    if len(judged) > 1:
        text += f" Trend ({judged[0][0]} -> {judged[-1][0]}): {trend(judged[0][1], judged[-1][1])}."
    return text


def top_rung_verdict(spec):
    """The verdict of a row's top rung once it is complete, else None."""
    top = spec["ladder"]["rungs"][-1]
    return rung_summary(spec, top)["verdict"] if rung_complete(top) else None


def updated_ledger(text, specs):
    """The ledger's text with each laddered row's evidence ending in its current ladder sentence
    (an older one replaced): `python tests/claims_checks.py --update-ledger` after cells land."""
    ladders = {str(spec["row"]): ladder_sentence(spec) for spec in specs["rows"] if "ladder" in spec}
    ladders.update({row: f"Ladder ([rungs](README.md#ladder)): not on it: {why}."
                    for row, why in specs.get("not_on_ladder", {}).items()})
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if line.startswith("| ") and cells and cells[0] in ladders:
            evidence = re.sub(r" ?Ladder \(\[rungs\]\(README\.md#ladder\)\): .*$", "", cells[5])
            # the evidence cell carries no final full stop of its own (table style)
            cells[5] = f"{evidence.rstrip('.')}. {ladders[cells[0]]}"
            lines[i] = "| " + " | ".join(cells) + " |"
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Print the ladder sentences of plots/CLAIMS.md's rows.")
    parser.add_argument("--update-ledger", action="store_true",
                        help="rewrite them in place: each laddered row's evidence ends with its sentence")
    specs_ = json.loads((PLOTS / "claims_checks.json").read_text())
    ledger = PLOTS / "CLAIMS.md"
    if parser.parse_args().update_ledger:
        ledger.write_text(updated_ledger(ledger.read_text(), specs_))
    else:
        for spec in specs_["rows"]:
            if "ladder" in spec:
                print(f"row {spec['row']}: {ladder_sentence(spec)}")
