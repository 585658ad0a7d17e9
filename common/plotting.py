"""Plotting: mean +- std bands over trials from saved runs, sweep panels, the step-scale
curvatures on a sharpness panel, legends under the panels, figure saving (PNG and PDF,
atomically, checked by `figure_check.layout_problems`). matplotlib's object API (Figure, no
pyplot): no global backend is set."""
import math
import sys
import textwrap
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


def wrapped(label, width=20):
    """An axis label broken into lines of at most `width` characters (a y label longer than
    its panel is tall would run into the title or off the canvas)."""
    return "\n".join(textwrap.wrap(label, width)) or label


def labelled_handles(axes):
    """The legend entries of `axes` (an iterable of Axes): each labelled artist, one per
    label, in order of appearance, the marks (a trial ends, not converged) after the rest."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    marks = (TRIAL_END_LABEL, UNCONVERGED_LABEL)
    return ([h for label, h in seen.items() if label not in marks]
            + [h for label, h in seen.items() if label in marks])


def legend_below(fig, *groups, fontsize="small"):
    """Figure legends under the panels, in canvas height added for them: constrained layout
    keeps them off the panels, and the panels keep their size. One group of handles is
    centred, two sit side by side (left, right); each takes as many columns as fit its share of
    the width. Returns the legends."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    groups = [g for g in groups if g]
    if len(groups) > 2:
        raise ValueError(f"legend_below takes one or two groups of handles, got {len(groups)}")
    if not groups:
        return []
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    width, height = fig.get_size_inches()
    share = 0.95 * width * fig.dpi / len(groups)  # px
    locs = ["outside lower center"] if len(groups) == 1 else ["outside lower left",
                                                               "outside lower right"]
    legends, tallest = [], 0.0
    for handles, loc in zip(groups, locs):
        for ncol in range(len(handles), 0, -1):
            legend = fig.legend(handles=handles, loc=loc, ncol=ncol, fontsize=fontsize,
                                frameon=False)
            box = legend.get_window_extent(renderer)
            if box.width <= share or ncol == 1:
                break
            legend.remove()
        legends.append(legend)
        tallest = max(tallest, box.height / fig.dpi)
    fig.set_size_inches(width, height + tallest + 0.1)
    return legends


def log_tick_labels(ax, which="xy"):
    """Labels on ax's log axes (of `which`: "x", "y" or "xy") that neither crowd nor vanish:
    at the powers of ten where the view holds two or more of them; else plain numbers at 1, 2
    and 5 times them ("0.2", "0.5", "1"), or, where fewer than two of those are in view, at
    three or four places ("2.5"). Minor ticks unlabelled. Call it once the panel's data are
    drawn (it reads the view)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        lo, hi = sorted(limits)
        if axis.axis_name not in which or axis.get_scale() != "log" or lo <= 0:
            continue
        powers = math.floor(math.log10(hi)) - math.ceil(math.log10(lo)) + 1  # in the view
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        nice = sum(lo <= m * 10.0 ** d <= hi for d in decades for m in (1, 2, 5))
        if powers < 2:
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)) if nice >= 2
                                   else MaxNLocator(nbins=3))
            axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())


MIN_RELATIVE_SPAN = 1e-3  # a linear y data range narrower than this (relative) is widened to it


def plain_ticks(ax):
    """Tick labels without an additive offset ("1e-5+3.09e1": each label would then be read
    against another number): ScalarFormatter axes lose the offset, and a linear y data range
    that is nearly constant is widened to MIN_RELATIVE_SPAN of its level (autoscaling stays on
    for what is drawn later), so the labels stay short and the curve shows as flat."""
    from matplotlib.ticker import ScalarFormatter
    for axis in (ax.xaxis, ax.yaxis):
        if isinstance(axis.get_major_formatter(), ScalarFormatter):
            axis.get_major_formatter().set_useOffset(False)
    lo, hi = ax.dataLim.y0, ax.dataLim.y1
    level = max(abs(lo), abs(hi))
    if ax.get_yscale() == "linear" and np.isfinite(level) and hi - lo < MIN_RELATIVE_SPAN * level:
        middle, half = (lo + hi) / 2, MIN_RELATIVE_SPAN * level / 2
        x = ax.dataLim.x0
        ax.update_datalim([(x, middle - half), (x, middle + half)], updatex=False)
        ax.autoscale_view()


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


LAYOUT_KEY = "Layout-check"  # PNG text chunk: "ok", or the layout problems found


def png_layout_check(png):
    """The layout check stored in a PNG written by save_figure ("ok" or its problems), or None."""
    try:
        from PIL import Image
        with Image.open(png) as image:
            return image.info.get(LAYOUT_KEY)
    except Exception:  # unreadable or not ours
        return None


def save_figure(fig, stem, dpi=150, settings=None):
    """Writes `<stem>.png` and `<stem>.pdf` atomically; returns their paths.

    The PNG is the draw that `layout_problems` checked (text beyond the canvas, a legend over a
    panel): each problem is said on stderr and all are stored in the PNG (LAYOUT_KEY, "ok" if
    none). settings: what tells this figure apart (e.g. the configs of the runs plotted). Given,
    its hash is stored in the PNG, and a figure of other settings at `stem` is never
    overwritten: this one goes to `<stem>-<hash of settings>` instead.
    """
    from matplotlib.image import imsave

    from .figure_check import layout_problems
    stem, digest = _settings_stem(stem, settings)
    problems = layout_problems(fig, dpi)
    for problem in problems:
        print(f"{stem}.png: layout: {problem}", file=sys.stderr)
    metadata = {LAYOUT_KEY: "; ".join(problems) or "ok",
                **({SETTINGS_KEY: digest} if digest else {})}
    png, pdf = Path(f"{stem}.png"), Path(f"{stem}.pdf")
    pixels = fig.canvas.buffer_rgba()  # (H, W, 4), the checked draw
    atomic_write(png, lambda f: imsave(f, pixels, format="png", origin="upper", dpi=dpi,
                                       metadata=metadata))
    atomic_write(pdf, lambda f: fig.savefig(f, format="pdf", dpi=dpi))
    return [png, pdf]


def plot_runs(runs, metrics, style_key, *, labels=None, style_label=None, title=None,
              xlabel="iteration", log_metrics=(), ncols=None, legend=True):
    """One panel per metric; one line (mean +- std over the runs sharing a setting) per value
    of config[style_key], told apart by line style. Reads only loaded runs (see load_run).

    Args:
        runs: loaded runs (trials of several settings).
        metrics: metric names, one panel each. labels: metric name -> axis label.
        style_key: the config key whose values get a line style each.
        log_metrics: metrics drawn on a log scale. ncols: panels per row (all in one row if None).
        legend: put the legend of the settings (and marks) under the panels; False leaves it
            to the caller, who may add entries (`legend_below(fig, labelled_handles(...))`).
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
        ax.set_ylabel(wrapped(labels.get(metric, metric)))
        if metric in log_metrics:
            ax.set_yscale("log")
        plain_ticks(ax)
        log_tick_labels(ax, "y")
        ax.grid(alpha=0.3)
    panels = dict(zip(metrics, axes.flat))
    if legend:
        legend_below(fig, labelled_handles(panels.values()))
    if title:
        fig.suptitle(title)
    return fig, panels


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


def plot_sweep(ax, runs, x_key, style_key, metric, *, style_label=None, log_x=False, log_y=False,
               xlabel=None, ylabel=None):
    """One panel: end-of-training `metric` against config[x_key], a line (mean +- std over
    trials, markers at the measured points) per value of config[style_key]. Cells that diverged
    are drawn as an 'x' at the top edge of the panel above their x, in their line's colour.
    log_y applies where the means span at least a factor LOG_Y_SPAN (a narrower range reads
    better on a linear axis, with short tick labels). A linear x axis of small (or large)
    values is labelled in units of a power of ten, said in `xlabel`: "weight decay (x 1e-4)"."""
    from matplotlib.transforms import blended_transform_factory
    top = blended_transform_factory(ax.transData, ax.transAxes)
    means = []
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
            means += list(mean)
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
        from matplotlib.ticker import FuncFormatter, MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(4))
        exponent = power_of_ten([r["config"][x_key] for r in runs])
        if exponent:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 10 ** exponent:g}"))
            xlabel = xlabel and f"{xlabel} (× 1e{exponent})"
    positive = [m for m in means if m > 0]
    if log_y and positive and max(positive) >= LOG_Y_SPAN * min(positive):
        ax.set_yscale("log")
    plain_ticks(ax)
    log_tick_labels(ax, "y")
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(wrapped(ylabel))
    ax.grid(alpha=0.3)


LOG_Y_SPAN = 3.0  # plot_sweep's log_y applies where the means span at least this factor


def power_of_ten(values):
    """The exponent e for labelling a linear axis over `values` in units of 10^e: that of the
    largest magnitude where it is below 1e-2 or at least 1e4, else 0 (plain numbers)."""
    top = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0)
    if top == 0 or 1e-2 <= top < 1e4:
        return 0
    return math.floor(math.log10(top))


# The step-scale curvatures drawn on the sharpness panel (common.step_curvature and
# realised_curvature): markers in each setting's colour, so the line styles stay the settings'.
STEP_CURVATURES = {"realised_curvature": ("x", "sharpness panel: curvature the step realised, "
                                               "(g'-g).v / dθ.v"),
                   "secant_curvature": ("^", "sharpness panel: secant curvature at the step's "
                                             "length h")}


def plot_step_curvatures(ax, runs, style_key, two_over_lr=None):
    """On a sharpness panel: the mean over trials of each step-scale curvature as markers in the
    colour of its config[style_key] value (runs without them are skipped), and 2/lr as a grey
    horizontal line if given (only named in the legend when it is over 3x the panel's top, where
    a line would flatten the curves). Markers over 3x the curves' top are left above the panel and
    counted in the legend, for the same reason. Returns the legend entries the panel's artists do not
    carry (the markers' meaning, a 2/lr above the panel): the caller puts them in the figure's
    legend (`legend_below`) with the settings, so no legend covers the curves."""
    from matplotlib.lines import Line2D
    curves_ylim, above = ax.get_ylim(), []
    for i, value in enumerate(sorted({r["config"][style_key] for r in runs})):
        mine = [r for r in runs if r["config"][style_key] == value]
        for metric, (marker, _) in STEP_CURVATURES.items():
            series = [metric_series(r, metric) for r in mine]
            steps, mean, _, _ = mean_std([s for s in series if len(s[0])])
            if np.isfinite(mean).any():
                ax.plot(steps, mean, marker, color=f"C{i}", markersize=4, mfc="none",
                        linewidth=0)
                above += [v for v in mean[np.isfinite(mean)] if v > 3 * curves_ylim[1]]
    shown = {m for r in runs for row in r["metrics"] for m in STEP_CURVATURES if m in row}
    handles = [Line2D([], [], color="black", marker=marker, mfc="none", linewidth=0,
                      label=label) for m, (marker, label) in STEP_CURVATURES.items() if m in shown]
    if above:
        # a step-scale curvature divides by a small number (d(theta).v, or h^2 for the secant):
        # one such marker far above the sharpness would flatten the curves, so the panel keeps
        # the curves' range
        line = two_over_lr if two_over_lr is not None and two_over_lr <= 3 * curves_ylim[1] else 0
        ax.set_ylim(curves_ylim[0], max(curves_ylim[1], 1.05 * line))
        handles.append(Line2D([], [], color="black", marker="x", mfc="none", linewidth=0,
                              label=f"sharpness panel: {len(above)} marker(s) above the panel "
                                    f"(largest {max(above):.3g})"))
    if two_over_lr is not None and two_over_lr > 3 * ax.get_ylim()[1]:
        handles.append(Line2D([], [], color="grey", linewidth=0.8, linestyle=":",
                              label=f"sharpness panel: 2 / lr = {two_over_lr:g} (above the panel)"))
    elif two_over_lr is not None:
        ax.axhline(two_over_lr, color="grey", linewidth=0.8, linestyle=":",
                   label="sharpness panel: 2 / lr")
    return handles
