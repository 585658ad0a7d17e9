"""Adversarial sweep of the Lanczos stopping rule: how often `top_eigenvalues` reports
converged=True with an error above tol (false convergence), and whether its error bound
covers the distance to the nearest eigenvalue (bound_broken); worst: largest error / tol
among the converged runs.

Spectra: a top pair (relative gaps 0, 1e-4, 1e-2, 0.1, 0.5) above a dense bulk (top of the bulk
at 0.5 or 0.95 of lambda_2), dims 200-2000, random orthogonal eigenbasis (float64). Starts:
random; a hint leaning on the 2nd eigenvector (v2 + 0.1 v1, as the gradient at the edge of
stability); exactly v2. Also k=2, 3 with the top eigenvalue repeated 2 or 3 times.

    python benchmarks/lanczos_sweep.py                      # this checkout's estimators
    python benchmarks/lanczos_sweep.py --estimators /work/main/common/estimators.py
"""
import argparse
import importlib.util
import itertools
import json
import warnings
from pathlib import Path

import torch


def load(path):
    spec = importlib.util.spec_from_file_location("estimators_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def basis(dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]


def spectrum(dim, top, bulk_top, seed):
    g = torch.Generator().manual_seed(seed)
    bulk = bulk_top * torch.rand(dim - len(top), generator=g, dtype=torch.float64) ** 0.5
    return torch.cat([torch.tensor(top, dtype=torch.float64), bulk.sort(descending=True)[0]])


def cases():
    for dim, gap, bulk_top, seed in itertools.product((200, 500, 2000), (0, 1e-4, 1e-2, 0.1, 0.5),
                                                      (0.5, 0.95), range(2)):
        yield dict(dim=dim, top=[1 + gap, 1.0], bulk_top=bulk_top, k=1, seed=seed)
    for dim, mult, seed in itertools.product((200, 500), (2, 3), range(2)):
        yield dict(dim=dim, top=[1.0] * mult + [0.9], bulk_top=0.8, k=mult, seed=seed)


def run(module, tols=(1e-2, 1e-3, 1e-5)):
    counts = {}
    qs = {}
    for case in cases():
        dim = case["dim"]
        q = qs.setdefault(dim, basis(dim, dim))
        lam = spectrum(dim, case["top"], case["bulk_top"], case["seed"])
        a = (q * lam) @ q.T
        starts = {"random": None, "hint v2+0.1v1": q[:, 1] + 0.1 * q[:, 0], "exactly v2": q[:, 1]}
        for tol, (start_name, start) in itertools.product(tols, starts.items()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = module.top_eigenvalues(lambda v: a @ v, dim, k=case["k"], tol=tol,
                                             max_iter=300, dtype=torch.float64, start=start,
                                             generator=torch.Generator().manual_seed(case["seed"]))
            true = [abs(t - l) / abs(l) for t, l in zip(res.eigenvalues, lam[:case["k"]].tolist())]
            key = f"{start_name}, k={case['k']}"
            c = counts.setdefault(key, dict(runs=0, converged=0, false=0, bound_broken=0,
                                            worst=0.0, products=0))
            c["runs"] += 1
            c["products"] += res.matvecs
            if res.converged:
                c["converged"] += 1
                c["false"] += max(true) > tol
                c["worst"] = max(c["worst"], max(true) / tol)
            # errors[j] * |theta_j| must bound the distance to the nearest eigenvalue
            c["bound_broken"] += any((lam - t).abs().min() > e * abs(t) * (1 + 1e-9) + 1e-14
                                     for t, e in zip(res.eigenvalues, res.errors))
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent.parent / "common" / "estimators.py"
    parser.add_argument("--estimators", default=str(here))
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = run(load(args.estimators))
    for key, c in counts.items():
        c["mean_products"] = round(c.pop("products") / c["runs"], 1)
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
