"""Sharpness at equal accuracy: our Lanczos against PyHessian's power iteration (the
`equal_accuracy` section of bench.py).

The two `tol`s mean different things: ours bounds the eigenvalue's relative error by the Ritz
residual (the actual error is usually far below tol); PyHessian's is the relative change
between two power iterates (the actual error is often above it, and power iteration finds the
eigenvalue of largest magnitude, not the largest). So the methods are compared at equal
*actual* error against a float64 reference: for each accuracy target, each method's cheapest
setting (fewest products) among a list of tols whose result is within the target.

Each method walks its tols from the loosest, one run each at the base seed, and stops after
the first run within the tightest target. For each target, the chosen setting is then rerun
with further seeds (start vectors); the worst of the seeds is reported next to the base seed.
Where PyHessian never gets within a target, the ratio is a lower bound: the seconds of its
tightest setting (which still misses) over ours.

This module holds the bookkeeping (walk, choice, ratios, table); bench.py supplies the runs.
"""

OURS_TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4)
PYHESSIAN_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
ACCURACY_TARGETS = (1e-3, 1e-4)
SPEEDUP_TARGET = 2.5
METHODS = ("ours", "pyhessian")


def relative_error(value, reference):
    return abs(value - reference) / abs(reference)


class Runner:
    """Runs one method at (tol, seed), each setting at most once.

    Args:
        run: run(tol, seed) -> dict with value, products, seconds and, for ours, converged.
        reference: the float64 reference eigenvalue.
    """

    def __init__(self, run, reference):
        self.run, self.reference, self.rows = run, reference, {}

    def __call__(self, tol, seed):
        key = (tol, seed)
        if key not in self.rows:
            row = dict(tol=tol, seed=seed, **self.run(tol, seed))
            row["error"] = relative_error(row["value"], self.reference)
            if "converged" in row:  # ours: converged promises error <= tol
                row["honest"] = bool(not row["converged"] or row["error"] <= tol)
            self.rows[key] = row
        return self.rows[key]

    def walk(self, tols, seed, target):
        """Runs tols loosest first until one is within target; returns the rows run."""
        rows = []
        for tol in tols:
            rows.append(self(tol, seed))
            if rows[-1]["error"] <= target:
                break
        return rows


def cheapest(rows, target):
    """The row within target with the fewest products (the looser tol on a tie), or None."""
    within = [r for r in rows if r["error"] <= target]
    return min(within, key=lambda r: r["products"]) if within else None


def _summary(runner, tol, seeds, target):
    """The chosen setting at every seed: base-seed numbers and the worst over seeds."""
    rows = [runner(tol, s) for s in seeds]
    return dict(tol=tol, reached=True, products=rows[0]["products"], seconds=rows[0]["seconds"],
                error=rows[0]["error"], seeds=[r["seed"] for r in rows],
                worst_error=max(r["error"] for r in rows),
                max_products=max(r["products"] for r in rows),
                min_products=min(r["products"] for r in rows),
                max_seconds=max(r["seconds"] for r in rows),
                min_seconds=min(r["seconds"] for r in rows),
                reached_all_seeds=all(r["error"] <= target for r in rows))


def compare(run_ours, run_pyhessian, reference, seeds, ours_tols=OURS_TOLS,
            pyhessian_tols=PYHESSIAN_TOLS, targets=ACCURACY_TARGETS, deadline=None):
    """Both methods at each accuracy target, for one model state.

    Args:
        run_ours, run_pyhessian: see `Runner` (run_pyhessian None: PyHessian not installed).
        reference: float64 reference eigenvalue.
        seeds: the base seed first; the chosen settings are rerun at the others.
        deadline: callable -> True once there is no time left for the extra seeds.

    Returns:
        dict: reference, every run ("runs": method -> rows), and per target ("targets":
        str(target) -> ours / pyhessian summaries, ratios, met).
    """
    runners = {"ours": Runner(run_ours, reference)}
    tols = {"ours": ours_tols, "pyhessian": pyhessian_tols}
    if run_pyhessian is not None:
        runners["pyhessian"] = Runner(run_pyhessian, reference)
    walks = {m: r.walk(tols[m], seeds[0], min(targets)) for m, r in runners.items()}
    out = {"reference": reference, "targets": {}}
    for target in targets:
        entry = {"target": target}
        for method, runner in runners.items():
            best = cheapest(walks[method], target)
            if best is None:
                last = walks[method][-1]  # the tightest setting tried
                entry[method] = dict(reached=False, tol=last["tol"], products=last["products"],
                                     seconds=last["seconds"], error=last["error"],
                                     walk_seconds=sum(r["seconds"] for r in walks[method]))
            else:
                use = seeds if not (deadline and deadline()) else seeds[:1]
                entry[method] = _summary(runner, best["tol"], use, target)
        out["targets"][str(target)] = _ratios(entry)
    out["runs"] = {m: sorted(r.rows.values(), key=lambda row: (row["seed"], -row["tol"]))
                   for m, r in runners.items()}
    honest = [r["honest"] for r in out["runs"]["ours"]]
    out["ours_converged_honest"] = f"{sum(honest)}/{len(honest)}"
    return out


def _ratios(entry):
    """PyHessian over ours (seconds and products) at the base seed, and of each method's worst
    (most) over the seeds; met: ours within target at every seed and the worst-case seconds
    ratio >= SPEEDUP_TARGET, or PyHessian never within target."""
    ours, ph = entry["ours"], entry.get("pyhessian")
    if ph is None or not ours["reached"]:
        entry["met"] = None if ph is None else False
        return entry
    entry["ratio_seconds"] = ph["seconds"] / ours["seconds"]
    entry["ratio_products"] = ph["products"] / ours["products"]
    entry["lower_bound"] = not ph["reached"]
    if ph["reached"]:
        entry["ratio_seconds_worst"] = ph["max_seconds"] / ours["max_seconds"]
        entry["ratio_products_worst"] = ph["max_products"] / ours["max_products"]
        entry["met"] = bool(ours["reached_all_seeds"]
                            and entry["ratio_seconds_worst"] >= SPEEDUP_TARGET)
    else:
        entry["met"] = bool(ours["reached_all_seeds"])
    return entry


def targets(section):
    """check_targets rows: one per model, state and accuracy target."""
    out = {}
    for model, states in section["models"].items():
        for state in ("init", "trained"):
            for target, e in states.get(state, {}).get("targets", {}).items():
                if e["met"] is None:
                    continue
                value = e.get("ratio_seconds_worst", e.get("ratio_seconds", 0.0))
                name = (f"{model} ({state}): sharpness speedup vs PyHessian at equal accuracy "
                        f"(error <= {float(target):g}), >= {SPEEDUP_TARGET:g}x")
                ours_error = e["ours"].get("worst_error", e["ours"]["error"])
                out[name] = dict(value=value, error=ours_error, met=e["met"])
                if "pyhessian" in e:
                    out[name]["baseline_error"] = e["pyhessian"].get("worst_error",
                                                                     e["pyhessian"]["error"])
                    if not e["pyhessian"]["reached"]:
                        out[name]["note"] = "PyHessian never within target; ratio is a lower bound"
    return out


def _fmt_method(m):
    if m is None:
        return ["-"] * 4
    if not m["reached"]:
        return [f"not reached (tightest {m['tol']:g})", str(m["products"]), f"{m['seconds']:.2f}",
                f"{m['error']:.1e}"]
    spread = lambda lo, hi, f: f if lo == hi else f"{f} ({lo}-{hi})"  # noqa: E731
    return [f"{m['tol']:g}", spread(m["min_products"], m["max_products"], str(m["products"])),
            f"{m['seconds']:.2f}" + ("" if len(m["seeds"]) == 1 else
                                     f" ({m['min_seconds']:.2f}-{m['max_seconds']:.2f})"),
            f"{m['error']:.1e}" + ("" if len(m["seeds"]) == 1 else f" ({m['worst_error']:.1e})")]


def markdown(section):
    """The section's lines for RESULTS.md."""
    m, c = section["machine"], section["config"]
    lines = ["## Sharpness at equal accuracy (ours vs PyHessian)", "",
             f"Run: {m['date']}, {m['cpu']}, {m['torch_threads']} torch thread(s), torch "
             f"{m['torch']}, pyhessian {m['pyhessian']}; {section['wall_s'] / 60:.1f} min. "
             f"Batch of {c['batch_size']}, width {c['width']:g}, no BN; trained = "
             f"{c['trained_steps']} full-batch GD steps, lr {c['trained_lr']:g}. One timing "
             f"per run; both methods timed side by side in this run (other jobs shared the "
             f"machine: compare within this section; product counts do not depend on load). "
             f"{section.get('note', '')}", "",
             "Error: actual relative error against the float64 reference. Per target, each "
             "method's cheapest tol (fewest products) whose result is within the target: ours "
             f"over tol {', '.join(f'{t:g}' for t in c['ours_tols'])}; PyHessian (its own power "
             f"iteration and HVP, maxIter {c['pyhessian_max_iter']}) over tol "
             f"{', '.join(f'{t:g}' for t in c['pyhessian_tols'])}. Base seed {c['seeds'][0]}; "
             f"in brackets the range over seeds {', '.join(map(str, c['seeds']))} at the chosen "
             "setting (worst error). Ratio: PyHessian / ours at the base seed; 'worst case': "
             "PyHessian's most / our most over the seeds (the verdict uses its seconds). '>': "
             "PyHessian never got within the target: its tightest setting's cost over ours.", "",
             "| model | state | target | ours tol | products | s | error | PyHessian tol | "
             "products | s | error | s ratio | products ratio | worst case s / products | "
             f">= {SPEEDUP_TARGET:g}x |",
             "|" + "---|" * 15]
    for model, states in section["models"].items():
        for state in ("init", "trained"):
            s = states.get(state)
            if not s:
                continue
            for target, e in s["targets"].items():
                ph = e.get("pyhessian")
                bound = ">" if e.get("lower_bound") else ""
                ratio = [f"{bound}{e['ratio_seconds']:.2f}", f"{bound}{e['ratio_products']:.2f}"] \
                    if "ratio_seconds" in e else ["-", "-"]
                worst = (f"{e['ratio_seconds_worst']:.2f} / {e['ratio_products_worst']:.2f}"
                         if "ratio_seconds_worst" in e else "-")
                met = {True: "yes", False: "**no**", None: "-"}[e["met"]]
                lines.append("| " + " | ".join([model, state, f"{float(target):g}"]
                                               + _fmt_method(e["ours"]) + _fmt_method(ph)
                                               + ratio + [worst, met]) + " |")
    lines += ["", "Our `converged` flag honest (error <= tol whenever it says converged): "
              + "; ".join(f"{model} {state} {s[state]['ours_converged_honest']}"
                          for model, s in section["models"].items()
                          for state in ("init", "trained") if state in s) + ".", ""]
    lines += ["Cost per product, side by side (median of repeated single products on the "
              "batch; 'in runs': seconds / products of the runs above, graph build and solver "
              "included):", "",
              "| model | gradient ms | our HVP ms (gradients) | PyHessian HVP ms (gradients) "
              "| ours in runs, ms | PyHessian in runs, ms |", "|---|---|---|---|---|---|"]
    for model, states in section["models"].items():
        cost = states.get("cost")
        if not cost:
            continue
        per = {}
        for method in METHODS:
            rows = [r for st in ("init", "trained") if st in states
                    for r in states[st]["runs"].get(method, [])]
            if rows:
                per[method] = 1e3 * sum(r["seconds"] for r in rows) / sum(r["products"]
                                                                          for r in rows)
        g = cost["gradient_s"]
        ph = (f"{cost['pyhessian_hvp_s'] * 1e3:.1f} ({cost['pyhessian_hvp_s'] / g:.2f})"
              if "pyhessian_hvp_s" in cost else "-")
        lines.append(f"| {model} | {g * 1e3:.1f} | {cost['ours_hvp_s'] * 1e3:.1f} "
                     f"({cost['ours_hvp_s'] / g:.2f}) | {ph} | "
                     f"{per.get('ours', float('nan')):.1f} | "
                     f"{per.get('pyhessian', float('nan')):.1f} |")
    lines.append("")
    for model, states in section["models"].items():
        for state in ("init", "trained"):
            s = states.get(state)
            if not s:
                continue
            lines += [f"Every run, {model} {state} (reference {s['reference']:.8g}):", "",
                      "| method | tol | seed | value | products | s | error | converged |",
                      "|---|---|---|---|---|---|---|---|"]
            for method, rows in s["runs"].items():
                for r in rows:
                    conv = ("-" if "converged" not in r else
                            f"{r['converged']}" + ("" if r["honest"] else " (**not honest**)"))
                    lines.append(f"| {method} | {r['tol']:g} | {r['seed']} | {r['value']:.7g} | "
                                 f"{r['products']} | {r['seconds']:.2f} | {r['error']:.1e} | "
                                 f"{conv} |")
            lines.append("")
    return lines
