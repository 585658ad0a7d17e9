"""Plotting: mean +- std bands over trials from saved runs, sweep panels, the step-scale
curvatures beside a sharpness panel, figure saving (PNG and PDF, atomically). matplotlib's
object API (Figure, no pyplot): no global backend is set."""
import math
import warnings
from pathlib import Path

import numpy as np

from .runs import atomic_write, config_hash, metric_series

UNCONVERGED_LABEL = "eigensolver not converged"

# Line styles tell settings apart (colours do too, but a printed figure may be grey).
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]


def mean_std(series):
    """Mean and std over trials of curves measured at (possibly different) steps.

    Args:
        series: list of (steps, values) pairs, one per trial.
    Returns:
        steps (union, sorted), mean, std (numpy, ddof=0), count: trials with a finite value at
        each step. A trial that stopped early (diverged) leaves the later means to the rest.
    """
    steps = np.unique(np.concatenate([np.asarray(s) for s, _ in series])) if series else np.array([])
    table = np.full((len(series), len(steps)), np.nan)
    for i, (s, v) in enumerate(series):
        table[i, np.searchsorted(steps, s)] = v
    count = np.isfinite(table).sum(0)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, quietly
        mean, std = np.nanmean(table, 0), np.nanstd(table, 0)
    return steps, mean, std, count


TRIAL_END_LABEL = "a trial ends (fewer trials after)"


def plot_band(ax, series, label=None, linestyle="-", color=None):
    """Draws the mean over trials as a line and mean +- std as a shaded band. Where a trial ends
    before the others (runs of different lengths, or a diverged run) a vertical tick on the mean
    marks it: past it the mean is over fewer trials, so a jump there is not a change in time."""
    steps, mean, std, _ = mean_std(series)
    (line,) = ax.plot(steps, mean, linestyle=linestyle, color=color, label=label)
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ends = sorted({int(np.asarray(s)[np.isfinite(v)].max()) for s, v in series
                   if np.isfinite(v).any()})[:-1]  # every trial's last step but the latest
    at = np.isin(steps, ends)
    if at.any():
        labels = [h.get_label() for h in ax.get_lines()]
        ax.plot(steps[at], mean[at], "|", color=line.get_color(), markersize=12, mew=1.5,
                label=None if TRIAL_END_LABEL in labels else TRIAL_END_LABEL)
    return line


def new_figure(nrows=1, ncols=1, panel_size=(3.6, 2.8)):
    """(Figure, 2-D array of axes), without pyplot."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes


SETTINGS_KEY = "Settings-hash"  # PNG text chunk naming the settings a figure shows


def _figure_settings(png):
    """The settings hash stored in a PNG written by save_figure, or None."""
    try:
        from PIL import Image
        with Image.open(png) as image:
            return image.info.get(SETTINGS_KEY)
    except Exception:  # unreadable or not ours: treated as other settings
        return None


def _settings_stem(stem, settings):
    """(stem, hash): `stem` itself, unless a figure of other settings is there already (per the
    hash in its PNG, or a PNG without one); then `<stem>-<hash of settings>`, said on the
    terminal."""
    if settings is None:
        return stem, None
    digest = config_hash(settings)
    if Path(f"{stem}.png").exists() and _figure_settings(f"{stem}.png") != digest:
        print(f"{stem}.png holds a figure of other settings: writing {stem}-{digest}.png")
        stem = f"{stem}-{digest}"
    return stem, digest


def save_figure(fig, stem, dpi=150, settings=None):
    """Writes `<stem>.png` and `<stem>.pdf` atomically; returns their paths.

    settings: what tells this figure apart (e.g. the configs of the runs plotted). Given, its
    hash is stored in the PNG, and a figure of other settings at `stem` is never overwritten:
    this one goes to `<stem>-<hash of settings>` instead.
    """
    stem, digest = _settings_stem(stem, settings)
    paths = []
    for ext in ("png", "pdf"):
        path = Path(f"{stem}.{ext}")
        metadata = {SETTINGS_KEY: digest} if digest and ext == "png" else None
        atomic_write(path, lambda f: fig.savefig(f, format=ext, dpi=dpi, metadata=metadata))
        paths.append(path)
    return paths


def plot_runs(runs, metrics, style_key, *, labels=None, style_label=None, title=None,
              xlabel="iteration", log_metrics=(), ncols=None):
    """One panel per metric; one line (mean +- std over the runs sharing a setting) per value
    of config[style_key], told apart by line style. Reads only loaded runs (see load_run).

    Args:
        runs: loaded runs (trials of several settings).
        metrics: metric names, one panel each. labels: metric name -> axis label.
        style_key: the config key whose values get a line style each.
        log_metrics: metrics drawn on a log scale. ncols: panels per row (all in one row if None).
    Returns:
        (Figure, {metric: its Axes}).
    """
    labels = labels or {}
    settings = sorted({r["config"][style_key] for r in runs})
    ncols = ncols or len(metrics)
    fig, axes = new_figure(math.ceil(len(metrics) / ncols), ncols)
    for ax in axes.flat[len(metrics):]:
        fig.delaxes(ax)  # unused panels of the last row
    for ax, metric in zip(axes.flat, metrics):
        for i, value in enumerate(settings):
            trials = [metric_series(r, metric) for r in runs if r["config"][style_key] == value]
            line = plot_band(ax, trials, label=f"{style_label or style_key} = {value}",
                             linestyle=LINESTYLES[i % len(LINESTYLES)], color=f"C{i}")
            mine = [r for r in runs if r["config"][style_key] == value]
            mark_unconverged(ax, mine, metric, line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(labels.get(metric, metric))
        if metric in log_metrics:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig, dict(zip(metrics, axes.flat))


def unconverged_steps(runs, metric):
    """Steps at which some run's `metric` was measured by an eigensolver that stopped at its
    max_iter unconverged (logged as `<metric>_converged` = False)."""
    steps = set()
    for r in runs:
        for m in r["metrics"]:
            if m.get(f"{metric}_converged") is False:
                steps.add(m["step"])
    return sorted(steps)


def mark_unconverged(ax, runs, metric, color):
    """Hollow circles on the mean curve of `runs` where the eigensolver did not converge."""
    steps = unconverged_steps(runs, metric)
    if not steps:
        return
    s, mean, _, _ = mean_std([metric_series(r, metric) for r in runs])
    at = np.isin(s, steps)
    ax.plot(s[at], mean[at], "o", mfc="none", color=color, markersize=6, label=UNCONVERGED_LABEL)


def plot_sweep(ax, runs, x_key, style_key, metric, *, style_label=None, log_x=False, log_y=False):
    """One panel: end-of-training `metric` against config[x_key], a line (mean +- std over
    trials, markers at the measured points) per value of config[style_key]. Cells that diverged
    are drawn as an 'x' at the top edge of the panel above their x, in their line's colour."""
    from matplotlib.transforms import blended_transform_factory
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for i, style in enumerate(sorted({r["config"][style_key] for r in runs})):
        mine = [r for r in runs if r["config"][style_key] == style]
        xs = sorted({r["config"][x_key] for r in mine})
        stats = []
        for xv in xs:
            values = [r["result"].get(metric) for r in mine
                      if r["config"][x_key] == xv and r["result"]["status"] == "finished"]
            values = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
            values = values[np.isfinite(values)]
            if len(values):
                stats.append((xv, values.mean(), values.std()))
        color = f"C{i}"
        if stats:
            sx, mean, std = map(np.array, zip(*stats))
            ax.plot(sx, mean, linestyle=LINESTYLES[i % len(LINESTYLES)], marker=".", color=color,
                    label=f"{style_label or style_key} = {style:g}")
            ax.fill_between(sx, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        loose = sorted({r["config"][x_key] for r in mine if r["result"]["status"] == "finished"
                        and r["result"].get(f"{metric}_converged") is False})
        finite = [(xv, m) for xv, m, _ in stats if xv in loose]
        if finite:
            ax.plot(*zip(*finite), "o", mfc="none", color=color, markersize=7,
                    label=UNCONVERGED_LABEL)
        diverged = sorted({r["config"][x_key] for r in mine if r["result"]["status"] == "diverged"})
        if diverged:
            ax.plot(diverged, [0.97] * len(diverged), "x", color=color, transform=top,
                    clip_on=False, label=f"diverged ({style_label or style_key} = {style:g})")
    if log_x:  # ticks at the swept values, labelled plainly (64, 128, ... not 10^2)
        from matplotlib.ticker import NullFormatter
        ax.set_xscale("log")
        values = sorted({r["config"][x_key] for r in runs})
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:  # few, compact ticks: weight decays like 0.0005 would otherwise collide
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


# The step-scale curvatures drawn beside the sharpness (common.step_curvature and
# realised_curvature): markers in each setting's colour, so the line styles stay the settings'.
STEP_CURVATURES = {"realised_curvature": ("x", "realised by the step: (g'-g).v / dθ.v"),
                   "secant_curvature": ("^", "secant at the step's length h")}


def plot_step_curvatures(ax, runs, style_key, two_over_lr=None):
    """On a sharpness panel: the mean over trials of each step-scale curvature as markers in the
    colour of its config[style_key] value (runs without them are skipped), 2/lr as a grey
    horizontal line if given (only named in the legend when it is over 3x the panel's top), and
    a small legend of these below the panel (the settings are in the figure's first legend), so
    no legend covers the curves."""
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color="black", linestyle="-", label="sharpness (line)")]
    for i, value in enumerate(sorted({r["config"][style_key] for r in runs})):
        mine = [r for r in runs if r["config"][style_key] == value]
        for metric, (marker, _) in STEP_CURVATURES.items():
            series = [metric_series(r, metric) for r in mine]
            steps, mean, _, _ = mean_std([s for s in series if len(s[0])])
            if np.isfinite(mean).any():
                ax.plot(steps, mean, marker, color=f"C{i}", markersize=4, mfc="none",
                        linewidth=0)
    shown = {m for r in runs for row in r["metrics"] for m in STEP_CURVATURES if m in row}
    handles += [Line2D([], [], color="black", marker=marker, mfc="none", linewidth=0,
                       label=label) for m, (marker, label) in STEP_CURVATURES.items() if m in shown]
    marks = {h.get_label(): h for h in ax.get_lines()
             if h.get_label() in (UNCONVERGED_LABEL, TRIAL_END_LABEL)}
    handles += list(marks.values())
    if two_over_lr is not None and two_over_lr > 3 * ax.get_ylim()[1]:
        # far above every curve: a line there would flatten them, so the legend gives the value
        handles.append(Line2D([], [], color="grey", linewidth=0.8, linestyle=":",
                              label=f"2 / lr = {two_over_lr:g} (above the panel)"))
    elif two_over_lr is not None:
        handles.append(ax.axhline(two_over_lr, color="grey", linewidth=0.8, linestyle=":",
                                  label="2 / lr"))
    ax.legend(handles=handles, fontsize="x-small", loc="upper center",
              bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
