"""Figure checks: every text on the canvas and no legend over a panel, judged on the figure
drawn as `save_figure` saves it (Agg, the saving dpi, the whole canvas: no tight bounding box).

matplotlib's constrained layout places an axis label from the tick labels of the previous draw,
so a figure's first draw can leave a long y label beyond the canvas where the next one does not:
`drawn` draws twice, and `save_figure` writes the PNG from the buffer of the checked draw."""
import re

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.legend import Legend
from matplotlib.text import Text

TOLERANCE_PX = 1.0  # rounding of extents; a text cut by less than a pixel loses nothing
TEXT_GAP_PT = 2.5  # least gap between two tick labels of an axis, in points


def drawn(fig, dpi):
    """Draws `fig` with the Agg renderer at `dpi` (layout engine included, as savefig does),
    twice: the first draw settles the axis labels' places. Returns the renderer; fig.canvas
    holds the second draw's pixels."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    canvas.draw()
    return canvas.get_renderer()


def _shown(text):
    return isinstance(text, Text) and text.get_visible() and bool(text.get_text().strip())


def _tick_labels(axis):
    """The tick labels `axis` draws: visible, non-empty and at a location inside the view."""
    lo, hi = sorted(axis.get_view_interval())
    slack = 1e-9 * max(abs(lo), abs(hi), 1e-300)
    index = 0 if axis.axis_name == "x" else 1
    return [t for minor in (False, True) for t in axis.get_ticklabels(minor=minor)
            if _shown(t) and lo - slack <= t.get_position()[index] <= hi + slack]


def panel_name(ax, i):
    """How messages name a panel: its number and its y label or title."""
    label = ax.get_ylabel() or ax.get_title() or ax.get_xlabel()
    return f"panel {i}" + (f" ({label!r})" if label else "")


def text_items(fig):
    """(name, artist, panel index or None, row) for every text the figure draws and every
    legend: figure texts (suptitle included) and legends, then per panel its titles, axis
    labels, offset texts ("1e-5", "+3.1e1"), tick labels, annotations and legends. `row` is
    ("x" or "y", panel index) for a tick label, the row of labels it stands in, else None."""
    items = [(f"figure text {t.get_text()!r}", t, None, None) for t in fig.texts if _shown(t)]
    items += [("figure legend", legend, None, None) for legend in fig.legends
              if legend.get_visible()]
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        where = panel_name(ax, i)
        for child in ax.get_children():
            if _shown(child):
                items.append((f"text {child.get_text()!r} of {where}", child, i, None))
            elif isinstance(child, Legend) and child.get_visible():
                items.append((f"legend of {where}", child, i, None))
        if not ax.axison:
            continue
        for axis in (ax.xaxis, ax.yaxis):
            name = axis.axis_name
            if _shown(axis.label):
                items.append((f"{name} label {axis.label.get_text()!r} of {where}", axis.label,
                              i, None))
            if _shown(axis.offsetText):
                items.append((f"{name} offset text {axis.offsetText.get_text()!r} of {where}",
                              axis.offsetText, i, None))
            items += [(f"{name} tick label {t.get_text()!r} of {where}", t, i, (name, i))
                      for t in _tick_labels(axis)]
    return items


def additive_offset(text):
    """Whether an axis offset text adds a number to the tick labels ("+3.09e1", "1e-5+3.09e1",
    read against every label), not only scales them by a power of ten ("1e-5", "x10^{-5}")."""
    rest = re.sub(r"(e|\^\{)[+\-\u2212]", r"\1", text)
    return any(sign in rest for sign in "+-\u2212")


def _outside(box, width, height):
    """{side: pixels beyond the canvas} for a display-space box."""
    sides = {"left": -box.x0, "bottom": -box.y0, "right": box.x1 - width, "top": box.y1 - height}
    return {side: d for side, d in sides.items() if d > TOLERANCE_PX}


def _overlap(a, b):
    """Area in px^2 shared by two display-space boxes."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def layout_problems(fig, dpi=150):
    """What breaks the figure rules in `fig` drawn at `dpi` on its whole canvas, one line per
    problem (empty when there is none):
    - a text or legend, or a panel's tight bounding box (everything it draws, marks outside
      its plotting area included), reaching beyond the canvas (by more than TOLERANCE_PX);
    - a legend over a panel's plotting area (it may cover data: legends go beside the panels);
    - a text over another panel's plotting area (a figure text: over any panel's);
    - two texts or legends over each other (tick labels, labels, offset texts, titles), or
      two tick labels of one axis closer than TEXT_GAP_PT;
    - an additive axis offset (see `additive_offset`);
    - an axis without a single tick label (no scale to read the panel by).
    Leaves the checked draw's pixels in fig.canvas (`save_figure` writes them)."""
    renderer = drawn(fig, dpi)
    items = [(name, artist, owner, row, artist.get_window_extent(renderer))
             for name, artist, owner, row in text_items(fig)]
    panels = [(i, ax) for i, ax in enumerate(fig.axes) if ax.get_visible() and ax.axison]
    problems = []
    for name, artist, owner, _, box in items:
        problems += [f"{name}: {d:.0f} px beyond the canvas's {side} edge"
                     for side, d in _outside(box, fig.bbox.width, fig.bbox.height).items()]
        problems += [f"{name} overlaps the plotting area of {panel_name(ax, i)}"
                     for i, ax in panels if (isinstance(artist, Legend) or i != owner)
                     and _overlap(box, ax.bbox) > TOLERANCE_PX ** 2]
        if " offset text " in name and additive_offset(artist.get_text()):
            problems.append(f"{name}: an additive offset (each tick label reads only against it)")
    problems += [f"{panel_name(ax, i)} (its tight bounding box): {d:.0f} px beyond the "
                 f"canvas's {side} edge" for i, ax in panels
                 for side, d in _outside(ax.get_tightbbox(renderer), fig.bbox.width,
                                         fig.bbox.height).items()]
    problems += [f"{axis.axis_name} axis of {panel_name(ax, i)}: no tick label"
                 for i, ax in panels for axis in (ax.xaxis, ax.yaxis)
                 if axis.get_visible() and not _tick_labels(axis)]
    return problems + _crowded([(name, row, box) for name, _, _, row, box in items], dpi)


def _crowded(boxes, dpi):
    """A line for each pair of (name, row, display box) over each other, or in the same row of
    tick labels and closer than TEXT_GAP_PT ("-1.00-0.75" reads as one number)."""
    gap = TEXT_GAP_PT * dpi / 72  # px
    problems = []
    for k, (name, row, box) in enumerate(boxes):
        for other, row2, box2 in boxes[k + 1:]:
            if row is not None and row == row2:
                if _overlap(box.padded(gap / 2), box2.padded(gap / 2)) > 0:
                    problems.append(f"{name} and {other} all but touch (gap under "
                                    f"{TEXT_GAP_PT:g} pt)")
            elif _overlap(box, box2) > TOLERANCE_PX ** 2:
                problems.append(f"{name} and {other} overlap")
    return problems
