"""The scale ladder of Section 6 (plots/CLAIMS.md, rows 7-23 and 46-51): the thesis statistics
against the number of training images, from committed results alone.

Each sweep of Section 6 (the regularisers, Appendix B.3; learning rate x batch size, B.2) is run
at several rungs: the reduced scale of the ledger's rows (the bottom rung) and rungs on more
training images up to all 50,000 of CIFAR-10. Per rung this reads every finished cell and gives
the number of cells, the median test accuracy and final clean training loss (is the rung in a
regime where networks generalise?) and Kendall's tau of the generalisation gap against the
softmax Jacobian norm, the sharpness and the Gauss-Newton norm, over the rung's cells at
initial learning rate 0.1 (the one learning rate every rung has; the pooled value over all
learning rates is saved too). A rung's taus are drawn and tabulated once it has MIN_CELLS cells
at lr 0.1 (the JSON has them from two cells on).

    python plots/ladder.py            # writes plots/ladder/ladder.{png,pdf,json}, prints the tables
    python plots/ladder.py --update-readme   # and puts them into plots/README.md

It also tabulates one cell per sweep (the regularisers' baseline, weight decay 5e-4 and nothing
else; B.2's batch 128; both at lr 0.1) at every width and number of images tried, with its CPU
minutes (training and the end-of-training measurements, one thread): the table each rung's
width was chosen from.

And it tabulates the Jacobian penalty at the top rung (ledger row 46), cell by cell: the
training loss and test accuracy beside the gap, Jacobian norm and sharpness where each cell
stopped (a penalised cell trains on toward its lambda = 0 cell's training loss), at the end of
the shared schedule, and, from the lambda = 0 cells' --measure-each-epoch reruns, the lambda = 0
cell at the penalised cell's training loss (the first epoch there, and interpolated to it).

The rungs' commands are in plots/README.md ("The scale ladder"). A rung is a committed runs
file (`*_runs.json`) or a folder of committed run folders (config.json, metrics.json,
result.json each); a rung not committed yet is skipped.
"""
import argparse
import math
import statistics
import sys
from pathlib import Path

PLOTS = Path(__file__).resolve().parent
sys.path.insert(0, str(PLOTS.parent))
import common  # noqa: E402

# Sweep -> its rungs, bottom first (paths relative to plots/).
LADDER = {
    "regularisers, VGG11+BN": ["train_regularisers/fig21_runs.json",
                               "train_regularisers/ladder/n10000",
                               "train_regularisers/ladder/n50000"],
    "batch/lr, VGG11+BN": ["batch_lr/three_trials/fig14_fig18_runs.json",
                           "batch_lr/ladder/vgg11_n10000"],
    "batch/lr, ResNet18+BN": ["batch_lr/three_trials/fig12_fig16_runs.json",
                              "batch_lr/ladder/resnet18_n10000"],
}
STATISTICS = {"jacobian": "τ(gap, Jacobian)", "sharpness": "τ(gap, sharpness)",
              "gauss_newton": "τ(gap, Gauss-Newton)"}
IMAGE_TICKS = (1000, 2000, 4000, 10_000, 50_000)
COMMON_LR = "0.1"
# The cell each sweep's widths were chosen by, at every width and number of images tried, per
# sweep: its rungs and what the cell's config holds (regularisers: weight decay 5e-4 and nothing
# else; B.2: batch 128), at lr 0.1.
WIDTH_TABLE = {
    "regularisers": (["train_regularisers/fig21_runs.json", "train_regularisers/ladder/width_table",
                      "train_regularisers/ladder/n10000", "train_regularisers/ladder/n50000"],
                     {"lr": 0.1, "weight_decay": 0.0005, "smoothing": 0.0, "mixup_beta": None,
                      "augment_p": 0.0, "sam_rho": 0.0}),
    "batch/lr": ([p for sweep, paths in LADDER.items() if sweep.startswith("batch/lr") for p in paths],
                 {"lr": 0.1, "batch_size": 128}),
}
# The Jacobian penalty's rung (ledger row 46); its lambda = 0 cells carry no jacobian_penalty key.
PENALTY = "train_regularisers/ladder/penalty_n50000"
# Its lambda = 0 cells rerun with --measure-each-epoch: each read where it passes a penalised cell's loss.
TRAJECTORY = "train_regularisers/ladder/penalty_n50000_trajectory"
MATCH_KEYS = ("jacobian_penalty", "match_train_loss", "match_max_epochs", "measure_each_epoch")
MIN_CELLS = 6  # a rung's taus are drawn and tabulated from this many cells at lr 0.1 on
TRAIN_SPLIT = 50_000  # CIFAR-10's training split: a cell with train_size None used all of it


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=PLOTS, help="where the rungs are (plots/)")
    parser.add_argument("--out", type=Path, default=PLOTS / "ladder", help="folder of the figure and JSON")
    parser.add_argument("--update-readme", action="store_true",
                        help="also replace the three tables in plots/README.md by the fresh ones")
    return parser.parse_args(argv)


def rung_runs(path):
    """A rung's saved runs: a runs file's entries, or the run folders under a folder."""
    if path.suffix == ".json":
        return common.load_json(path)
    return [common.load_run(d) for d in sorted(path.iterdir()) if (d / "result.json").exists()]


def median(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def rung_summary(runs):
    """One rung's row: its scale, how well its networks fit and generalise, and the taus."""
    finished = [r for r in runs if r["result"]["status"] == "finished"]
    config = runs[0]["config"]
    tau = common.sweep_correlations(runs, against=tuple(STATISTICS), within="lr")
    at_lr = tau["per_lr"].get(COMMON_LR, {})
    return {"images": config.get("train_size") or TRAIN_SPLIT, "width": config["width"],
            "test_images": config.get("test_size") or 10_000,
            "epochs": sorted({r["config"].get("epochs") for r in runs}, key=str),
            "lrs": sorted({r["config"]["lr"] for r in runs}),
            "trials": len({r["config"]["trial"] for r in runs}),
            "cells": len(runs), "finished": len(finished),
            "median_test_accuracy": median([r["result"].get("test_accuracy") for r in finished]),
            "median_train_loss": median([r["result"].get("train_loss") for r in finished]),
            "cells_at_lr": at_lr.get("n", 0),
            **{f"tau_{q}": at_lr.get(f"tau_gap_{q}", math.nan) for q in STATISTICS},
            **{f"tau_{q}_pooled": tau[f"tau_gap_{q}"] for q in STATISTICS}}


def ladder(root):
    """{sweep: [rung summaries, bottom first]} over the committed rungs."""
    out = {}
    for sweep, paths in LADDER.items():
        rungs = []
        for path in paths:
            if (root / path).exists() and (runs := rung_runs(root / path)):
                rungs.append({"source": path, **rung_summary(runs)})
        if rungs:
            out[sweep] = rungs
    return out


def width_table(root):
    """Rows (sweep, model, width, images, epochs, cells, median test accuracy and training loss,
    minutes a cell) of the cells WIDTH_TABLE picks, grouped by sweep, model, width, images."""
    groups = {}
    for sweep, (paths, picked) in WIDTH_TABLE.items():
        for path in paths:
            if not (root / path).exists():
                continue
            for r in rung_runs(root / path):
                c = r["config"]
                if (r["result"]["status"] == "finished" and not c.get("jacobian_penalty")
                        and all(c.get(k) == v for k, v in picked.items())):
                    key = (sweep, c["model"], c["width"], c.get("train_size") or TRAIN_SPLIT,
                           c.get("epochs") or "to target")
                    groups.setdefault(key, []).append(r["result"])
    return [{"sweep": sweep, "model": model, "width": w, "images": n, "epochs": e,
             "cells": len(results),
             "median_test_accuracy": median([x["test_accuracy"] for x in results]),
             "median_train_loss": median([x["train_loss"] for x in results]),
             "minutes": statistics.mean((x["train_seconds"] + x["measure_seconds"]) / 60
                                        for x in results)}
            for (sweep, model, w, n, e), results in sorted(groups.items(), key=lambda g: g[0][:4])]


def unpenalised_at(trajectories, config, loss, interpolate=False):
    """The lambda = 0 cell of a penalised cell's config, read from its trajectory at the first
    epoch whose clean training loss is at most `loss`: {"epoch", metric: value}, or None. With
    `interpolate`, each metric is interpolated linearly in the training loss between that epoch
    and the one before, to its value at `loss` ("epoch" is then the first epoch's)."""
    plain = lambda c: {k: v for k, v in c.items() if k not in MATCH_KEYS}
    for run in trajectories:
        if plain(run["config"]) != plain(config):
            continue
        points = [m for m in run["metrics"] if m.get("epoch_train_loss") is not None]
        for i, m in enumerate(points):
            if m["epoch_train_loss"] <= loss:
                read = {k.removeprefix("epoch_"): v for k, v in m.items() if k.startswith("epoch_")}
                if not (interpolate and i > 0):
                    return {"epoch": m["step"], **read}
                before = points[i - 1]
                w = (before["epoch_train_loss"] - loss) / (before["epoch_train_loss"] - m["epoch_train_loss"])
                return {"epoch": m["step"], **{k: before[f"epoch_{k}"] + w * (v - before[f"epoch_{k}"])
                                               for k, v in read.items()
                                               if isinstance(v, float) and before.get(f"epoch_{k}") is not None}}
    return None


def penalty_table(root):
    """Rows (lambda, trial, epochs trained, whether matched and its target, then training loss,
    test accuracy, gap, Jacobian norm, sharpness where the cell stopped, the training loss, gap,
    Jacobian norm at the end of the schedule, and its lambda = 0 cell read at its training loss:
    at the first epoch there, and interpolated to it) of the penalty rung's cells, by lambda, trial."""
    if not (root / PENALTY).exists():
        return []
    trajectories = rung_runs(root / TRAJECTORY) if (root / TRAJECTORY).exists() else []
    rows = []
    for r in rung_runs(root / PENALTY):
        c, res = r["config"], r["result"]
        rows.append({"lambda": c.get("jacobian_penalty", 0.0), "trial": c["trial"],
                     "status": res["status"], "epochs": res.get("epochs_trained", c["epochs"]),
                     "matched": res.get("matched"), "target": res.get("match_target"),
                     **{k: res.get(k, math.nan) for k in
                        ("train_loss", "test_accuracy", "gap", "jacobian", "sharpness")},
                     **{f"scheduled_{k}": res.get(f"scheduled_{k}", res.get(k, math.nan))
                        for k in ("train_loss", "gap", "jacobian")},
                     **{key: (unpenalised_at(trajectories, c, res["train_loss"], interpolate)
                              if c.get("jacobian_penalty") and res["status"] == "finished" else None)
                        for key, interpolate in (("unpenalised_at_loss", False),
                                                 ("unpenalised_interpolated", True))}})
    return sorted(rows, key=lambda row: (row["lambda"], row["trial"]))


def penalty_markdown(rows):
    """The penalty table as markdown (plots/README.md quotes it)."""
    lines = ["| λ | trial | epochs | matched (target) | train loss | test acc. | gap | Jacobian | sharpness "
             "| at the schedule's end: train loss / gap / Jacobian "
             "| λ = 0 at this train loss: epoch, train loss / test acc. / gap / Jacobian / sharpness |",
             "|---" * 11 + "|"]
    for r in rows:
        if r["status"] != "finished":
            lines.append(f"| {r['lambda']:g} | {r['trial']} | {r['status']} |" + " |" * 8)
            continue
        u = r["unpenalised_at_loss"]
        at_loss = ("-" if u is None else f"{u['epoch']}, {u['train_loss']:.3f} / {u['test_accuracy']:.3f} / "
                   f"{u['gap']:.3f} / {u['jacobian']:.2f} / {u['sharpness']:.1f}")
        matched = ("-" if r["matched"] is None
                   else f"{'yes' if r['matched'] else 'no'} ({r['target']:.3f})")
        lines.append(f"| {r['lambda']:g} | {r['trial']} | {r['epochs']} | {matched} | {r['train_loss']:.3f} "
                     f"| {r['test_accuracy']:.3f} | {r['gap']:.3f} | {r['jacobian']:.2f} | {r['sharpness']:.1f} "
                     f"| {r['scheduled_train_loss']:.3f} / {r['scheduled_gap']:.3f} / {r['scheduled_jacobian']:.2f} "
                     f"| {at_loss} |")
    return "\n".join(lines)


def table(data):
    """The ladder as a markdown table (plots/README.md quotes it)."""
    lines = ["| sweep | images | width | epochs | cells (at lr 0.1) | median test acc. | median train loss "
             "| τ(gap, J) | τ(gap, sharp.) | τ(gap, GN) |", "|---" * 10 + "|"]
    for sweep, rungs in data.items():
        for r in rungs:
            epochs = "/".join(str(e) for e in r["epochs"]) if r["epochs"] != [None] else "to target"
            taus = " | ".join(f"{r[f'tau_{q}']:.2f}" if r["cells_at_lr"] >= MIN_CELLS else "-"
                              for q in STATISTICS)
            lines.append(f"| {sweep} | {r['images']} | 1/{round(1 / r['width'])} | {epochs} "
                         f"| {r['finished']} ({r['cells_at_lr']}) | {r['median_test_accuracy']:.3f} "
                         f"| {r['median_train_loss']:.3g} | {taus} |")
    return "\n".join(lines)


def width_markdown(rows):
    """The width table as markdown (plots/README.md quotes it)."""
    lines = ["| sweep | model | width | images | epochs | cells | median test acc. | median train loss "
             "| minutes a cell |", "|---" * 9 + "|"]
    lines += [f"| {r['sweep']} | {r['model']} | 1/{round(1 / r['width'])} | {r['images']} | {r['epochs']} | {r['cells']} "
              f"| {r['median_test_accuracy']:.3f} | {r['median_train_loss']:.3g} | {r['minutes']:.1f} |"
              for r in rows]
    return "\n".join(lines)


def with_table(text, table_):
    """text with the markdown table that has table_'s header line replaced by table_."""
    start = text.index(table_.splitlines()[0])
    end = text.find("\n\n", start)
    return text[:start] + table_ + (text[end:] if end >= 0 else "\n")


def plot(data, out):
    """Top row: each tau against the training images, a line per sweep; bottom row: the median
    test accuracy and training loss, and the cells, so a tau is read beside its regime."""
    fig, axes = common.new_figure(2, 3, panel_size=(3.4, 2.6))
    styles = dict(zip(LADDER, ("o-", "s--", "^:")))
    panels = [(axes[0, i], f"tau_{q}", label) for i, (q, label) in enumerate(STATISTICS.items())]
    panels += [(axes[1, 0], "median_test_accuracy", "median test accuracy"),
               (axes[1, 1], "median_train_loss", "median final training loss"),
               (axes[1, 2], "cells_at_lr", f"cells at lr {COMMON_LR}")]
    for ax, key, label in panels:
        for sweep, rungs in data.items():
            shown = [r for r in rungs if not key.startswith("tau") or r["cells_at_lr"] >= MIN_CELLS]
            ax.plot([r["images"] for r in shown], [r[key] for r in shown], styles[sweep], label=sweep)
        ax.set_xscale("log")
        ax.set_xlim(700, 80_000)
        ax.set_xticks(IMAGE_TICKS, [f"{n // 1000}k" for n in IMAGE_TICKS])
        ax.minorticks_off()
        ax.set_xlabel("training images")
        ax.set_ylabel(label)
        if key.startswith("tau"):
            ax.set_ylim(-1.05, 1.05)
            ax.axhline(0, color="0.7", lw=0.8)
    axes[1, 1].set_yscale("log")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
    fig.suptitle(f"Scale ladder (CPU runs, CIFAR-10): Kendall τ over each rung's cells at lr "
                 f"{COMMON_LR}")
    return common.save_figure(fig, out / "ladder")


def main(args):
    common.check(args.root.is_dir(), f"--root {args.root}: no such folder (it holds the rungs: plots/)")
    data, widths, penalty = ladder(args.root), width_table(args.root), penalty_table(args.root)
    args.out.mkdir(parents=True, exist_ok=True)
    common.save_json(args.out / "ladder.json", {"ladder": data, "width_table": widths, "penalty": penalty})
    tables = [table(data), width_markdown(widths), penalty_markdown(penalty)]
    print(*tables, sep="\n\n")
    if args.update_readme:
        readme = args.root / "README.md"
        text = readme.read_text()
        for t in tables:
            text = with_table(text, t)
        common.atomic_write(readme, lambda f: f.write(text), mode="w")
        print(f"updated the tables of {readme}")
    for path in plot(data, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main(parse_args())
