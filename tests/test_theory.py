"""theory.py (Section 4): the immersion, the sup estimate, sample maxima, smoke run, errors."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import theory as th

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on shared, busy cores extra threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smoke_args(out, *extra):
    return th.parse_args(["--smoke", "--out", str(out), "--no-progress", *extra])


def config(distribution="immersion", task="classification", **over):
    args = smoke_args("unused", "--distributions", distribution, "--tasks", task)
    cfg = th.run_configs(args)[0]
    cfg.update(over)
    return cfg


def trained_model(cfg, dist, steps=30):
    """A student fitted for a few steps: a generic smooth network on the data."""
    x, y, _, _ = th.make_data(cfg, dist)
    model, loss_fn = th.make_model(cfg, dist), th.training_cost(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model


def test_immersion_has_full_column_rank_everywhere_and_is_injective_and_smooth():
    dist = th.Distribution(config(ambient_dim=6, immersion_width=4, latent_dim=3))
    g = dist.embed
    assert torch.linalg.matrix_rank(g.w1.double()) == 3 and torch.linalg.matrix_rank(g.w2.double()) == 4
    z = dist.latents(2000, seed=1)
    svals = torch.linalg.svdvals(th.jacobians(g, z))  # (2000, 3)
    assert svals.shape == (2000, 3) and svals.min() > 0.05  # Jg injective at every sampled z
    z2 = dist.latents(2000, seed=2)
    with torch.no_grad():
        ratio = (g(z) - g(z2)).norm(dim=1) / (z - z2).norm(dim=1)
    assert ratio.min() > 0.05 and ratio.max() <= 2.0 + 1e-5  # bi-Lipschitz on pairs, Lip(g) <= 2
    # smooth: the Jacobian moves little for a small step (no kinks)
    dz = 1e-3 * torch.randn_like(z)
    change = (th.jacobians(g, z + dz) - th.jacobians(g, z)).flatten(1).norm(dim=1)
    assert change.max() < 0.1


def test_smooth_leaky_relu_is_an_increasing_one_lipschitz_diffeomorphism():
    u = torch.linspace(-20, 20, 4001, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(th.smooth_leaky_relu(u, 0.2).sum(), u)
    assert grad.min() >= 0.2 - 1e-9 and grad.max() <= 1 + 1e-9


def test_spectral_norms_match_common_jacobian_norm():
    cfg = config()
    dist = th.Distribution(cfg)
    model = th.make_model(cfg, dist)
    x = dist.inputs(50, seed=3)
    with torch.no_grad():
        ours = th.spectral_norms(model, x)
    theirs = common.jacobian_norm(model, x, softmax=False, return_per_sample=True)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-6)


def test_projected_ascent_stays_in_the_cube_and_never_lowers_the_value():
    cfg = config(distribution="cube", task="regression")
    dist = th.Distribution(cfg)
    model = trained_model(cfg, dist)
    seen = []

    def value(z):
        seen.append(z.detach().clone())
        return th.spectral_norms(model, dist.embed(z))

    z0 = dist.latents(16, seed=4)
    with torch.no_grad():
        start = th.spectral_norms(model, z0)
    best, best_z = th.projected_ascent(value, z0, steps=25, lr=0.2)  # big steps: hit the walls
    visited = torch.cat(seen)
    assert visited.min() >= 0 and visited.max() <= 1
    assert best_z.min() >= 0 and best_z.max() <= 1
    assert torch.all(best >= start - 1e-6)
    assert (visited == 0).any() or (visited == 1).any()  # the clamp was exercised


def test_sample_maxima_are_monotone_in_n_and_below_the_sup_estimate():
    cfg = config()
    dist = th.Distribution(cfg)
    model = trained_model(cfg, dist)
    z_pool = dist.latents(3000, seed=5)
    with torch.no_grad():
        norms = th.spectral_norms(model, dist.embed(z_pool))
    sup, z_star, pool_max = th.estimate_sup(lambda z: th.spectral_norms(model, dist.embed(z)), z_pool,
                                            norms, starts=4, steps=15, lr=0.02)
    assert sup >= pool_max == pytest.approx(float(norms.max()))
    assert z_star.min() >= 0 and z_star.max() <= 1
    grid = th.sample_size_grid(3000)
    maxima = th.sample_maxima(norms, grid, draws=30, seed=0)  # (30, len(grid))
    assert grid[0] == 10 and grid[-1] == 3000
    assert np.all(np.diff(maxima, axis=1) >= 0)
    assert maxima.max() <= sup and maxima[:, -1] == pytest.approx(pool_max)


def test_h_of_theorem_4_4_is_the_quarter_disc_in_two_dimensions():
    assert th.h_theory(0.1, 2, 1.0) == pytest.approx(math.pi * 0.01 / 4)
    assert th.h_theory(0.2, 2, 2.0) == pytest.approx(th.h_theory(0.1, 2, 1.0))  # h'(t) = h(t / Lip g)
    assert th.h_theory(5.0, 2, 1.0) == pytest.approx(math.pi / 4)  # capped at radius 1


def test_eq10_failure_terms_shrink_with_more_data():
    def h(t):
        return th.h_theory(t, 2, 1.0)
    small = th.eq10_failure(0.1, 0.5, 100, 5.0, 50.0, 1.0, h)
    large = th.eq10_failure(0.1, 0.5, 10**6, 5.0, 50.0, 1.0, h)
    assert large < small and small > 1 > large


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory")
    th.main(smoke_args(out))
    return out


@pytest.mark.slow
def test_smoke_run_writes_runs_summary_and_plots_and_plot_only_redraws(smoke_out):
    runs = [common.load_run(d) for d in sorted(smoke_out.iterdir()) if d.name.startswith("task=")]
    assert len(runs) == len(th.family(smoke_args("unused")))
    for run in runs:
        res = run["result"]
        assert res["status"] == "finished" and res["gap"] >= 0 and res["lip_jf"] > 0
        assert [m["step"] for m in run["metrics"]][0] == 0 and "sharpness" in run["metrics"][-1]
        assert run["meta"]["torch"] == torch.__version__ and run["meta"]["seed"] == run["config"]["seed"]
    base = next(r for r in runs if r["config"]["variant"] == "base")["result"]["thm45"]
    assert base["maxima_monotone"] and base["maxima_below_sup"] and base["sup"] >= base["pool_max"]
    summary = common.load_json(smoke_out / "plots" / "theory_summary.json")
    assert summary["groups"][0]["n"] == len(runs)
    plots = smoke_out / "plots"
    stamps = {}
    for stem in ("thm45", "thm46", "ansatz"):
        for ext in ("png", "pdf"):
            path = plots / f"{stem}.{ext}"
            assert path.stat().st_size > 1000
            stamps[path] = path.stat().st_mtime_ns
    (plots / "theory_table.md").unlink()
    th.main(smoke_args(smoke_out, "--plot-only"))
    assert (plots / "theory_table.md").exists()
    assert all(path.stat().st_mtime_ns > t for path, t in stamps.items())


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("flags", [["--train-size", "-5"], ["--smoothings", "1.5"], ["--lr", "nan"],
                                   ["--tasks", "ranking"]])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(tmp_path, flags):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "theory.py", "--smoke", "--out", str(out), *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "error" in proc.stderr and not out.exists()


@pytest.mark.slow
def test_plot_summary_redraws_thm46_from_the_committed_summary(tmp_path):
    th.main(th.parse_args(["--plot-summary", str(REPO / "plots" / "theory" / "theory_summary.json"),
                           "--out", str(tmp_path)]))
    assert (tmp_path / "plots" / "thm46.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["thm46.pdf", "thm46.png"]
