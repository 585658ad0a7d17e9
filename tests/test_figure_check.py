"""The figure check (common.figure_check.layout_problems) finds each kind of layout fault on a
figure made to have it and none on a clean one; save_figure writes the draw it checked and
stores the verdict in the PNG; the legend and tick helpers keep figures clean."""
import numpy as np
import pytest
from matplotlib.image import imread

import common
from common.figure_check import additive_offset, layout_problems


def clean_figure():
    fig, axes = common.new_figure(1, 2)
    for i, ax in enumerate(axes[0]):
        ax.plot([0, 1, 2], [1, 3, 2], label="a line")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"metric {i}")
    common.legend_below(fig, common.labelled_handles(axes[0]))
    fig.suptitle("a title")
    return fig


def test_a_clean_figure_has_no_problem():
    assert layout_problems(clean_figure()) == []


def test_a_text_beyond_the_canvas_is_found_with_its_side():
    fig = clean_figure()
    fig.text(0.99, 0.5, "a note running off the right edge")
    problems = layout_problems(fig)
    assert any("a note running off" in p and "right edge" in p for p in problems), problems


def test_a_legend_over_a_panel_is_found():
    fig = clean_figure()
    fig.axes[0].legend()
    problems = layout_problems(fig)
    assert any(p.startswith("legend of panel 0") and "plotting area of panel 0" in p
               for p in problems), problems


def test_texts_over_each_other_are_found():
    fig = clean_figure()
    fig.axes[1].set_ylabel("a long label " * 3)  # reaches over its neighbour's tick labels
    fig.axes[1].set_yticks([1, 1.02], ["1.00", "1.02"])
    problems = layout_problems(fig)
    assert any("tick label '1.00'" in p and "tick label '1.02'" in p for p in problems), problems


def test_an_additive_offset_and_an_axis_without_labels_are_found():
    fig = clean_figure()
    fig.axes[0].plot([0, 2], [30.92401, 30.92402])
    fig.axes[0].set_ylim(30.924, 30.92403)
    fig.axes[1].set_xticks([])
    problems = layout_problems(fig)
    assert any("offset text" in p and "additive" in p for p in problems), problems
    assert any(p.startswith("x axis of panel 1") for p in problems), problems


@pytest.mark.parametrize("text, additive", [("1e-5", False), ("1e\u22125", False),
                                            ("+3.092e1", True), ("1e-5+3.0923e1", True),
                                            ("\u22123.09e1", True)])
def test_additive_offsets_are_told_from_powers_of_ten(text, additive):
    assert additive_offset(text) is additive


def test_save_figure_writes_the_checked_draw_and_its_verdict(tmp_path, capsys):
    fig = clean_figure()
    png, _ = common.save_figure(fig, tmp_path / "clean")
    assert common.plotting.png_layout_check(png) == "ok"
    saved = np.round(imread(png) * 255).astype(np.uint8)  # (H, W, 4)
    assert saved.shape[:2] == (round(fig.bbox.height), round(fig.bbox.width))
    assert np.array_equal(saved, np.asarray(fig.canvas.buffer_rgba()))
    fig.axes[0].legend()
    png, _ = common.save_figure(fig, tmp_path / "faulty")
    assert "legend of panel 0" in common.plotting.png_layout_check(png)
    assert "faulty.png: layout: legend of panel 0" in capsys.readouterr().err


def test_legend_below_grows_the_canvas_and_wraps_to_its_width():
    fig, axes = common.new_figure(1, 1)
    for i in range(12):
        axes[0, 0].plot([0, 1], [i, i], label=f"setting number {i}")
    before = fig.get_size_inches()[1]
    (legend,) = common.legend_below(fig, common.labelled_handles(axes[0]))
    assert fig.get_size_inches()[1] > before and 1 < legend._ncols < 12
    assert layout_problems(fig) == []


def test_nearly_constant_values_get_plain_ticks_without_offset():
    fig, axes = common.new_figure(1, 1)
    axes[0, 0].plot([0, 1], [30.92401, 30.92402])
    common.plain_ticks(axes[0, 0])
    axes[0, 0].plot([2], [31.0])  # drawn later: still in view (autoscaling stays on)
    lo, hi = axes[0, 0].get_ylim()
    assert lo < 30.924 - 0.01 and hi > 31.0
    fig2, axes2 = common.new_figure(1, 1)
    axes2[0, 0].plot([0, 1], [30.92401, 30.92402])
    common.plain_ticks(axes2[0, 0])
    lo, hi = axes2[0, 0].get_ylim()
    assert hi - lo >= common.plotting.MIN_RELATIVE_SPAN * 30.924
    assert layout_problems(fig) == [] and layout_problems(fig2) == []
