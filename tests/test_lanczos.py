"""The eigen-solvers' stopping rule on adversarial dense spectra (float64, random orthogonal
eigenbasis): converged=True must mean every reported eigenvalue is within tol (relative) of the
true j-th top eigenvalue, and the reported error bound must cover the true error."""
import functools
import itertools
import warnings

import pytest
import torch

from common.estimators import ConvergenceWarning, top_eigenvalues


@functools.lru_cache(maxsize=None)
def basis(dim):
    g = torch.Generator().manual_seed(dim)
    return torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]


def matrix(top, dim, bulk_top, seed=0):
    """Eigenvalues `top` (descending) above a dense bulk in [0, bulk_top]: (A, lambdas, Q)."""
    g = torch.Generator().manual_seed(seed)
    bulk = (bulk_top * torch.rand(dim - len(top), generator=g, dtype=torch.float64) ** 0.5)
    lam = torch.cat([torch.tensor(top, dtype=torch.float64), bulk.sort(descending=True)[0]])
    q = basis(dim)
    return (q * lam) @ q.T, lam, q


def solve(a, k, tol, start=None, seed=0, method="lanczos", max_iter=400):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return top_eigenvalues(lambda v: a @ v, a.shape[0], k=k, tol=tol, max_iter=max_iter,
                               method=method, dtype=torch.float64, start=start,
                               generator=torch.Generator().manual_seed(seed))


def check(res, lam, tol):
    """converged => within tol of the true j-th top eigenvalue (multiplicity counted); and
    always: errors[j] bounds the distance to the nearest eigenvalue (the residual bound)."""
    true = [abs(t - l) / abs(l) for t, l in zip(res.eigenvalues, lam.tolist())]
    if res.converged:
        assert max(true) <= tol, (res.eigenvalues, lam[:len(true)].tolist(), res.matvecs)
    for t, e in zip(res.eigenvalues, res.errors):
        assert (lam - t).abs().min() <= e * abs(t) * (1 + 1e-9) + 1e-14
    return res.converged


GAPS = (0.0, 1e-4, 1e-2, 0.1, 0.5)


@pytest.mark.parametrize("dim,tol,gaps", [(200, 1e-2, GAPS), (500, 1e-3, GAPS),
                                          (1000, 1e-5, GAPS), (2000, 1e-3, (1e-4, 0.1))])
def test_near_degenerate_top_pair_random_start(dim, tol, gaps):
    converged = 0
    for gap, bulk_top in itertools.product(gaps, (0.5, 0.95)):
        a, lam, q = matrix([1 + gap, 1.0], dim, bulk_top)
        converged += check(solve(a, 1, tol), lam, tol)
    assert converged >= len(gaps)  # the checks above are not vacuous


@pytest.mark.parametrize("dim,tol", [(200, 1e-2), (500, 1e-3), (1000, 1e-5)])
def test_start_leaning_on_second_eigenvector(dim, tol):
    """A start v2 + 0.1 v1 (as the gradient can be at the edge of stability) or exactly v2:
    the top is found when it stands >= 50 tol above v2's eigenvalue; closer, the documented
    limit: the value is then within tol of the 2nd, an eigenvalue of the top pair."""
    converged = 0
    for gap, bulk_top in itertools.product(GAPS, (0.5, 0.95)):
        a, lam, q = matrix([1 + gap, 1.0], dim, bulk_top)
        for start in (q[:, 1] + 0.1 * q[:, 0], q[:, 1]):
            res = solve(a, 1, tol, start)
            if gap >= 50 * tol:
                converged += check(res, lam, tol)
            elif res.converged:
                value = res.eigenvalues[0]
                assert abs(value - 1.0) <= tol or abs(value - lam[0]) <= tol * lam[0]
    assert converged >= 4


def test_converged_is_right_over_many_seeds():
    """Random starts, a top pair 1% apart just above a dense bulk: zero false stops for tol
    <= 1/10 of the gap (a top eigenvalue less than ~10 tol above others can be missed: a stop
    within tol of one of them is possible, the documented limit)."""
    a, lam, q = matrix([1.01, 1.0], 300, 0.97)
    tols = (1e-3, 1e-4)
    results = [solve(a, 1, tol, None, seed) for seed in range(20) for tol in tols]
    assert sum(check(r, lam, r_tol) for r, r_tol in zip(results, tols * 20)) >= 35


@pytest.mark.parametrize("mult", [2, 3])
def test_repeated_top_eigenvalue_is_found_with_its_multiplicity(mult):
    a, lam, q = matrix([2.0] * mult + [1.5], 300, 1.0)
    for seed, start in itertools.product(range(3), (None, q[:, 0])):
        res = solve(a, mult, 1e-4, start, seed)
        assert check(res, lam, 1e-4)
        assert max(abs(t - 2.0) for t in res.eigenvalues) < 1e-4


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_indefinite_spectrum_gives_largest_algebraic(method):
    """The largest-magnitude eigenvalue is negative (-8): both solvers return lambda_max."""
    a, lam, _ = matrix([2.66, 2.0], 200, 1.0)
    q = basis(200)
    lam = lam.clone()
    lam[-1] = -8.0
    a = (q * lam) @ q.T
    res = solve(a, 1, 1e-6, method=method, max_iter=3000)
    assert res.converged
    assert abs(res.eigenvalues[0] - 2.66) <= 1e-6 * 2.66


def test_float64_operator_with_default_dtype():
    a, lam, _ = matrix([3.0, 1.0], 100, 0.9)
    res = top_eigenvalues(lambda v: a @ v, 100, tol=1e-10)
    assert res.converged and abs(res.eigenvalues[0] - 3.0) < 3e-10
    assert res.eigenvectors.dtype == torch.float64
    a32 = a.float()
    res32 = top_eigenvalues(lambda v: a32 @ v, 100, tol=1e-4)
    assert res32.converged and res32.eigenvectors.dtype == torch.float32


def test_float32_bound_is_not_below_rounding():
    """In float32 the bound never claims more than the products' rounding allows."""
    a, lam, _ = matrix([3.0, 1.0], 300, 0.9)
    a32 = a.float()
    res = top_eigenvalues(lambda v: a32 @ v, 300, tol=1e-5)
    assert res.converged
    assert abs(res.eigenvalues[0] - 3.0) / 3.0 <= res.errors[0]
    assert res.errors[0] >= 10 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(tol=None), TypeError, "tol"),
    (dict(tol=float("nan")), ValueError, "tol"),
    (dict(generator=0), TypeError, "generator"),
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(max_iter=2.0), TypeError, "max_iter"),
    (dict(k=1.5), TypeError, "k must"),
    (dict(k=True), TypeError, "k must"),
    (dict(dtype="float64"), TypeError, "dtype"),
])
def test_bad_solver_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        top_eigenvalues(lambda v: v, 5, **kwargs)
