"""Sweeps (batch_lr.py, train_regularisers.py): grids of cells, `--list-grid` / `--grid-index`,
and Kendall's tau between the generalisation gap and the curvature measures.

A sweep is a list of cells, each a full resolved config (trial included). `--list-grid` prints
it, `--grid-index i` runs cell i alone (one Slurm array task), `--plot-only` loads every cell
that has finished. A cell's run directory is named by its config (see `run_name`), so array
tasks never collide and a rerun skips finished cells.
"""
import itertools
import math

import numpy as np

from .cli import check
from .runs import config_hash, run_name

def grid(**axes):
    """Cartesian product of the given lists, the last axis varying fastest.

    grid(lr=[0.1, 0.01], trial=[0, 1]) -> [{"lr": 0.1, "trial": 0}, {"lr": 0.1, "trial": 1}, ...]
    """
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def unique_configs(configs):
    """Configs with exact duplicates removed (first occurrence kept, order preserved)."""
    seen, out = set(), []
    for config in configs:
        key = config_hash(config)
        if key not in seen:
            seen.add(key)
            out.append(config)
    return out


def add_grid_flags(parser, measure_size):
    """--list-grid, --grid-index, --checkpoint-seconds and the end-of-training measurement flags."""
    g = parser.add_argument_group("grid")
    g.add_argument("--list-grid", action="store_true",
                   help="print the grid (index, run name) and exit; '# N cells' comes last")
    g.add_argument("--grid-index", type=int, default=None,
                   help="run only this cell of the grid (a Slurm array task id)")
    g.add_argument("--checkpoint-seconds", type=float, default=300.0,
                   help="least seconds between checkpoints of a running cell")
    g = parser.add_argument_group("measurements")
    g.add_argument("--measure-size", type=int, default=measure_size,
                   help="clean training examples (drawn with the model's seed) for sharpness "
                        "and Jacobian norm")
    g.add_argument("--eig-tol", type=float, default=1e-4,
                   help="relative error target of the top-eigenvalue estimates")
    g.add_argument("--eig-max-iter", type=int, default=100,
                   help="most Lanczos steps per top-eigenvalue estimate")
    return parser


def check_grid_index(args, cells):
    """fail() unless --grid-index is None or a valid index into cells."""
    i = args.grid_index
    check(i is None or 0 <= i < len(cells),
          f"--grid-index must lie in [0, {len(cells) - 1}] (the grid has {len(cells)} cells), got {i}")


def print_grid(cells, keys):
    """Prints 'index<TAB>run name' per cell, then '# N cells'."""
    for i, cell in enumerate(cells):
        print(f"{i}\t{run_name(cell, keys)}")
    print(f"# {len(cells)} cells")


def selected_cells(args, cells):
    """The cells this invocation trains: cell --grid-index alone, or all of them."""
    return cells if args.grid_index is None else [cells[args.grid_index]]


def kendall_tau(x, y):
    """Kendall's tau-b rank correlation of paired samples, pairs with a non-finite value dropped.

        tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2)),  n0 = n (n - 1) / 2,

    C / D: concordant / discordant pairs, n1 / n2: pairs tied in x / in y. NaN when fewer than
    two pairs remain or either variable is constant. O(n^2) memory: fine for sweeps.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    if n < 2:
        return math.nan
    upper = np.triu_indices(n, 1)
    dx = np.sign(x[:, None] - x[None, :])[upper]  # (n (n - 1) / 2,)
    dy = np.sign(y[:, None] - y[None, :])[upper]
    n0 = n * (n - 1) / 2
    n1, n2 = np.sum(dx == 0), np.sum(dy == 0)
    denominator = math.sqrt((n0 - n1) * (n0 - n2))
    return float(np.sum(dx * dy) / denominator) if denominator > 0 else math.nan


def sweep_correlations(runs, gap="gap", against=("jacobian", "sharpness"), within=None):
    """{"n": cells used, "tau_<gap>_<m>": Kendall tau of gap against m} over the finished (not
    diverged) runs, each cell (trial) one point. With within="lr" (a config key) it adds
    "per_lr": {value: the same dict over the cells with that value}, keys sorted by value."""
    done = [r for r in runs if r["result"]["status"] == "finished"]

    def values(cells, metric):
        return [math.nan if r["result"].get(metric) is None else r["result"][metric] for r in cells]

    def taus(cells):
        return {"n": len(cells), **{f"tau_{gap}_{m}": kendall_tau(values(cells, gap), values(cells, m))
                                    for m in against}}

    out = taus(done)
    if within is not None:
        levels = sorted({r["config"][within] for r in done})
        out[f"per_{within}"] = {str(v): taus([r for r in done if r["config"][within] == v])
                                for v in levels}
    return out
