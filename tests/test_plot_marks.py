"""plot_band marks where a trial ends before the others."""
import numpy as np

import common


def test_trial_ends_are_ticked_on_the_mean_and_only_there():
    fig, axes = common.new_figure()
    ax = axes[0, 0]
    series = [(np.array([0, 10, 20]), np.array([1.0, 2.0, 3.0])),
              (np.array([0, 10, 20, 30, 40]), np.array([1.0, 4.0, 5.0, 6.0, 7.0])),
              (np.array([0, 10, 20, 30, 40]), np.array([1.0, 4.0, 5.0, 6.0, 8.0]))]
    common.plot_band(ax, series, label="s")
    ticks = [line for line in ax.get_lines() if line.get_marker() == "|"]
    assert len(ticks) == 1
    np.testing.assert_allclose(ticks[0].get_xdata(), [20])
    np.testing.assert_allclose(ticks[0].get_ydata(), [13 / 3])  # the mean at step 20
    assert ticks[0].get_label() == common.plotting.TRIAL_END_LABEL


def test_no_tick_when_every_trial_has_the_same_length():
    fig, axes = common.new_figure()
    series = [(np.array([0, 1]), np.array([1.0, 2.0]))] * 3
    common.plot_band(axes[0, 0], series)
    assert not [line for line in axes[0, 0].get_lines() if line.get_marker() == "|"]


def _run(realised):
    metrics = [{"step": s, "sharpness": 10.0 + s, "realised_curvature": c, "secant_curvature": 12.0}
               for s, c in zip(range(0, 40, 10), realised)]
    return {"config": {"smoothing": 0.0, "trial": 0}, "metrics": metrics}


def test_a_step_curvature_far_above_the_sharpness_is_left_above_the_panel_and_counted():
    """One realised curvature divided by a tiny d(theta).v must not flatten the sharpness curves."""
    fig, axes = common.new_figure()
    ax = axes[0, 0]
    ax.plot([0, 30], [10.0, 40.0])
    handles = common.plot_step_curvatures(ax, [_run([11.0, 5900.0, 30.0, 41.0])], "smoothing", two_over_lr=25.0)
    assert ax.get_ylim()[1] < 100
    assert any("1 marker(s) above the panel (largest 5.9e+03)" in h.get_label() for h in handles)
    # markers within 3x the curves' top widen the panel as before, and nothing is counted
    fig, axes = common.new_figure()
    ax = axes[0, 0]
    ax.plot([0, 30], [10.0, 40.0])
    handles = common.plot_step_curvatures(ax, [_run([11.0, 60.0, 30.0, 41.0])], "smoothing", two_over_lr=25.0)
    assert ax.get_ylim()[1] >= 60
    assert not any("above the panel" in h.get_label() for h in handles)
