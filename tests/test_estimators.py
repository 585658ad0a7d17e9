"""Estimators against dense float64 references built with torch.func on tiny models."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacrev

import common
from common import (gauss_newton_norm, hessian_operator, jacobian_norm, sharpness,
                    top_eigenvalues)
from references import (assert_same_state, batch_stats_mode, class_batches, cnn,
                        dense_gauss_newton, dense_hessian, dense_jacobian_norms,
                        flat_function, mlp, regression_batches, rel, soft_batches, state_of,
                        top_dense)


smooth_ce = lambda z, y: F.cross_entropy(z, y, label_smoothing=0.2)  # noqa: E731

CASES = {
    "tanh-ce": (lambda: mlp(nn.Tanh), lambda: class_batches([6], (5,)), F.cross_entropy),
    "relu-ce-smooth-2batches": (lambda: mlp(nn.ReLU, seed=3),
                                lambda: class_batches([7, 4], (5,)), smooth_ce),
    "tanh-soft-targets": (lambda: mlp(nn.Tanh, seed=1), lambda: soft_batches([5, 3], (5,)),
                          F.cross_entropy),
    "tanh-mse": (lambda: mlp(nn.Tanh, seed=2), lambda: regression_batches([6, 2], (5,)),
                 F.mse_loss),
    "cnn-bn-train-2batches-smooth": (cnn, lambda: class_batches([6, 3], (2, 4, 4)), smooth_ce),
}


# -------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", CASES)
def test_sharpness_matches_dense_hessian(name):
    make_model, make_batches, loss_fn = CASES[name]
    model, batches = make_model(), make_batches()
    exact = top_dense(dense_hessian(model, loss_fn, batches)).item()
    before = state_of(model)
    got = sharpness(model, loss_fn, batches)
    assert rel(got, exact) < 1e-4
    assert_same_state(model, before)


@pytest.mark.parametrize("name", CASES)
def test_gauss_newton_norm_matches_dense(name):
    make_model, make_batches, loss_fn = CASES[name]
    model, batches = make_model(), make_batches()
    exact = top_dense(dense_gauss_newton(model, loss_fn, batches)).item()
    before = state_of(model)
    got = gauss_newton_norm(model, loss_fn, batches)
    assert rel(got, exact) < 1e-4
    assert_same_state(model, before)


@pytest.mark.parametrize("name", ["tanh-ce", "cnn-bn-train-2batches-smooth"])
def test_operators_match_dense_matrices(name):
    """Every product, not just the top eigenvalue, is exact."""
    make_model, make_batches, loss_fn = CASES[name]
    model, batches = make_model(), make_batches()
    h = dense_hessian(model, loss_fn, batches)
    g = dense_gauss_newton(model, loss_fn, batches)
    v = torch.randn(len(h), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for reuse in (True, False):
        hv, _ = hessian_operator(model, loss_fn, batches, reuse_graph=reuse)
        torch.testing.assert_close(hv(v), h @ v, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(hv(v), h @ v, rtol=1e-9, atol=1e-11)  # reused twice
    gv, _ = common.gauss_newton_operator(model, loss_fn, batches)
    torch.testing.assert_close(gv(v), g @ v, rtol=1e-9, atol=1e-11)


def test_dense_reference_matches_finite_differences():
    """Check the reference itself: central differences of the gradient along v."""
    model, batches = cnn(), class_batches([6, 3], (2, 4, 4))
    h = dense_hessian(model, smooth_ce, batches)
    flat0, unflat = flat_function(model)

    def loss(flat):
        return sum(len(x) / 9 * smooth_ce(functional_call(model, unflat(flat), (x,)), y)
                   for x, y in batches)
    v = torch.randn(len(h), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with batch_stats_mode(model, train=True):
        grad = torch.func.grad(loss)
        fd = (grad(flat0 + 1e-6 * v) - grad(flat0 - 1e-6 * v)) / 2e-6
    torch.testing.assert_close(h @ v, fd, rtol=1e-6, atol=1e-7)


def test_train_mode_bn_differs_from_eval_mode():
    """The reference is not trivially eval mode: along a random direction, the eval-mode
    Hessian-vector product (one forward-over-reverse product) differs from the train-mode dense
    Hessian's, while the train-mode product matches it."""
    model, batches = cnn(), class_batches([6, 3], (2, 4, 4))
    h = dense_hessian(model, smooth_ce, batches)  # cached: the CASES entry
    flat0, unflat = flat_function(model)

    def loss(flat):
        return sum(len(x) / 9 * smooth_ce(functional_call(model, unflat(flat), (x,)), y)
                   for x, y in batches)
    v = torch.randn(len(h), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    products = {}
    for train in (True, False):
        with batch_stats_mode(model, train=train):
            products[train] = torch.func.jvp(torch.func.grad(loss), (flat0,), (v,))[1]
    torch.testing.assert_close(products[True], h @ v, rtol=1e-9, atol=1e-11)
    assert (products[False] - h @ v).norm() > 1e-2 * (h @ v).norm()
    assert rel(sharpness(model, smooth_ce, batches), top_dense(h).item()) < 1e-4


def test_top_k_matches_dense():
    model, batches = mlp(nn.Tanh), class_batches([8, 5], (5,))
    exact = top_dense(dense_hessian(model, F.cross_entropy, batches), 3)
    got = sharpness(model, F.cross_entropy, batches, k=3)
    assert got == sorted(got, reverse=True)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), exact, rtol=1e-4, atol=0)
    info = gauss_newton_norm(model, F.cross_entropy, batches, k=3, return_info=True)
    exact_g = top_dense(dense_gauss_newton(model, F.cross_entropy, batches), 3)
    torch.testing.assert_close(torch.tensor(info.eigenvalues, dtype=torch.float64), exact_g,
                               rtol=1e-4, atol=0)
    assert info.converged and info.matvecs == info.iterations
    assert all(e <= 1e-5 for e in info.errors)
    assert info.eigenvectors.shape == (sum(p.numel() for p in model.parameters()), 3)


def test_lanczos_and_power_agree_on_psd_matrix():
    model, batches = cnn(), class_batches([6, 3], (2, 4, 4))
    exact = top_dense(dense_gauss_newton(model, F.cross_entropy, batches), 2)
    lan = gauss_newton_norm(model, F.cross_entropy, batches, k=2, return_info=True)
    pow_ = gauss_newton_norm(model, F.cross_entropy, batches, k=2, method="power",
                             tol=1e-6, max_iter=5000, return_info=True)
    assert pow_.converged and lan.converged
    for a, b, e in zip(lan.eigenvalues, pow_.eigenvalues, exact.tolist()):
        assert rel(a, e) < 1e-5 and rel(b, e) < 1e-5
    assert lan.matvecs < pow_.matvecs


def test_solver_on_explicit_matrix_with_known_spectrum():
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))[0]
    spectrum = torch.cat([torch.tensor([10.0, 9.0, 4.0]), torch.linspace(-3, 1, 57)])
    a = q @ torch.diag(spectrum.double()) @ q.T
    for method in ("lanczos", "power"):
        res = top_eigenvalues(lambda v: a @ v, 60, k=2, method=method, tol=1e-8,
                              max_iter=2000, dtype=torch.float64)
        assert res.converged
        torch.testing.assert_close(torch.tensor(res.eigenvalues, dtype=torch.float64),
                                   torch.tensor([10.0, 9.0], dtype=torch.float64), rtol=1e-7,
                                   atol=0)
        # returned vectors are unit eigenvectors with the reported residuals
        v, theta = res.eigenvectors, torch.tensor(res.eigenvalues, dtype=torch.float64)
        torch.testing.assert_close(v.norm(dim=0), torch.ones(2, dtype=torch.float64))
        actual = (a @ v - v * theta).norm(dim=0) / theta.abs()
        torch.testing.assert_close(actual, torch.tensor(res.residuals, dtype=torch.float64),
                                   rtol=1e-2, atol=1e-12)


def test_lanczos_finds_largest_algebraic_not_largest_magnitude():
    a = torch.diag(torch.tensor([2.0, 1.0, 0.5, -5.0], dtype=torch.float64))
    res = top_eigenvalues(lambda v: a @ v, 4, dtype=torch.float64)
    assert abs(res.eigenvalues[0] - 2.0) < 1e-10


def test_float32_near_its_floor():
    model64, batches64 = cnn(), class_batches([6, 3], (2, 4, 4))
    exact = top_dense(dense_hessian(model64, smooth_ce, batches64)).item()  # cached: CASES
    model32 = cnn().float()
    batches32 = [(x.float(), y) for x, y in batches64]
    got = sharpness(model32, smooth_ce, batches32, tol=1e-4)
    assert rel(got, exact) < 1e-4
    assert isinstance(got, float)


def test_deterministic_for_a_generator():
    model, batches = cnn(), class_batches([6, 3], (2, 4, 4))
    runs = [sharpness(model, F.cross_entropy, batches, tol=1e-2, return_info=True,
                      generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0].eigenvalues == runs[1].eigenvalues
    assert runs[0].matvecs == runs[1].matvecs
    other = sharpness(model, F.cross_entropy, batches, tol=1e-2, return_info=True,
                      generator=torch.Generator().manual_seed(8))
    assert other.eigenvalues != runs[0].eigenvalues


def test_estimators_print_nothing(capsys):
    model, batches = cnn(), class_batches([6, 3], (2, 4, 4))
    sharpness(model, F.cross_entropy, batches)
    gauss_newton_norm(model, F.cross_entropy, batches)
    jacobian_norm(model, batches[0][0])
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_works_under_no_grad():
    model, batches = mlp(nn.Tanh), class_batches([6], (5,))
    expected = sharpness(model, F.cross_entropy, batches)
    with torch.no_grad():
        assert sharpness(model, F.cross_entropy, batches) == expected
        assert jacobian_norm(model, batches[0][0]) > 0


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("method", ["exact", "power"])
def test_jacobian_norm_matches_dense_svd(softmax, method):
    model = cnn()
    x = class_batches([7], (2, 4, 4))[0][0]
    before = state_of(model)
    exact = dense_jacobian_norms(model, x, softmax)
    per = jacobian_norm(model, x, softmax=softmax, method=method, batch_size=3,
                        return_per_sample=True)
    torch.testing.assert_close(per, exact, rtol=1e-6, atol=0)
    assert jacobian_norm(model, x, softmax=softmax, method=method) == pytest.approx(
        exact.max().item(), rel=1e-6)
    assert_same_state(model, before)


def test_jacobian_norm_on_mlp_and_uses_eval_mode_bn():
    model = mlp(nn.ReLU)
    x = class_batches([9], (5,))[0][0]
    torch.testing.assert_close(jacobian_norm(model, x, return_per_sample=True),
                               dense_jacobian_norms(model, x, True), rtol=1e-6, atol=0)
    # a model left in train mode is still measured in eval mode
    bn = cnn().train()
    xb = class_batches([4], (2, 4, 4))[0][0]
    assert jacobian_norm(bn, xb) == pytest.approx(
        dense_jacobian_norms(bn, xb, True).max().item(), rel=1e-6)
    assert bn.training


@pytest.mark.parametrize("call, match", [
    (lambda m, b: sharpness(m, F.cross_entropy, []), "empty"),
    (lambda m, b: sharpness(m, F.cross_entropy, b, k=0), "k must be"),
    (lambda m, b: gauss_newton_norm(m, F.cross_entropy, b, k=-1), "k must be"),
    (lambda m, b: sharpness(m, F.cross_entropy, [(b[0][0], b[0][1][:-1])]), "targets"),
    (lambda m, b: sharpness(m, F.cross_entropy, b, method="arnoldi"), "unknown method"),
    (lambda m, b: sharpness(m, F.cross_entropy, b, tol=0), "tol"),
    (lambda m, b: jacobian_norm(m, b[0][0][:0]), "empty"),
    (lambda m, b: top_eigenvalues(lambda v: v, 3, k=4), "exceeds"),
])
def test_bad_arguments_raise_value_error(call, match):
    model, batches = mlp(nn.Tanh), class_batches([6], (5,))
    with pytest.raises(ValueError, match=match):
        call(model, batches)


def test_start_direction_saves_products_and_keeps_the_answer():
    """A start direction near the top eigenvector (the gradient, for sharpness) is mixed into
    the random start: fewer products, same eigenvalue; the random half keeps it generic."""
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))[0]
    spectrum = torch.cat([torch.tensor([10.0, 9.5]), torch.linspace(-3, 9, 58)])
    a = q @ torch.diag(spectrum.double()) @ q.T
    runs = [top_eigenvalues(lambda v: a @ v, 60, tol=1e-8, max_iter=60, dtype=torch.float64,
                            start=start) for start in (None, q[:, 0])]
    assert all(abs(r.eigenvalues[0] - 10.0) < 1e-7 for r in runs)
    assert runs[1].matvecs < runs[0].matvecs
    model, batches = mlp(nn.Tanh), class_batches([8, 5], (5,))
    exact = top_dense(dense_hessian(model, smooth_ce, batches)).item()
    for gradient_start in (True, False):
        assert rel(sharpness(model, smooth_ce, batches, gradient_start=gradient_start),
                   exact) < 1e-4
    # the default start is purely random: a gradient leaning on the 2nd eigenvector can hide
    # a top eigenvalue close above it from the verification (benchmarks/lanczos_sweep.py)
    default, hinted, random = (sharpness(model, smooth_ce, batches, return_info=True, **kw)
                               for kw in ({}, {"gradient_start": True},
                                          {"gradient_start": False}))
    assert default.eigenvectors.equal(random.eigenvectors)
    assert not default.eigenvectors.equal(hinted.eigenvectors)


def test_guarantee_reaches_sharpness_and_gauss_newton():
    """`guarantee` is passed through: the default floor of products applies (more than the
    bare stop needs at tol 1e-2 on a tiny model), None removes it, and a bad value is refused."""
    from common.estimators import GUARANTEE, _guaranteed_products
    model, batches = mlp(nn.Tanh), class_batches([8, 5], (5,))
    dim = sum(p.numel() for p in model.parameters())
    for estimate in (sharpness, gauss_newton_norm):
        held, free = (estimate(model, smooth_ce, batches, tol=1e-2, return_info=True, **kw)
                      for kw in ({}, {"guarantee": None}))
        assert held.converged and free.converged
        assert free.matvecs < _guaranteed_products(dim, GUARANTEE) <= held.matvecs
        assert rel(free.eigenvalues[0], held.eigenvalues[0]) < 1e-2
        with pytest.raises(ValueError, match="guarantee"):
            estimate(model, smooth_ce, batches, guarantee=(2.0, 1e-3))


def test_lanczos_past_its_initial_basis_allocation():
    """More steps than the first basis block (16 rows): the basis grows and stays exact."""
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))[0]
    spectrum = torch.cat([torch.tensor([10.0, 9.0, 4.0]), torch.linspace(-3, 1, 57)]).double()
    a = q @ torch.diag(spectrum) @ q.T
    res = top_eigenvalues(lambda v: a @ v, 60, k=3, tol=1e-30, max_iter=40, dtype=torch.float64)
    assert res.matvecs > 16
    torch.testing.assert_close(torch.tensor(res.eigenvalues, dtype=torch.float64),
                               spectrum[:3], rtol=1e-12, atol=0)
    torch.testing.assert_close(res.eigenvectors.T @ res.eigenvectors,
                               torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)


class RecordsTF32(nn.Module):
    """A tiny model that records, at every forward, whether TF32 was allowed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return self.net(x)


def test_estimators_turn_tf32_off_and_restore_it():
    """cuDNN's default TF32 puts ~1e-3 errors into float32 products on GPUs: estimators
    switch it off while they run and put the user's settings back."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    model, batches = RecordsTF32(), class_batches([6, 3], (5,))
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        sharpness(model, F.cross_entropy, batches, reuse_graph=False, tol=1e-2)
        gauss_newton_norm(model, F.cross_entropy, batches, tol=1e-2)
        jacobian_norm(model, batches[0][0])
        hv, dim = hessian_operator(model, F.cross_entropy, batches, reuse_graph=False)
        hv(torch.ones(dim, dtype=torch.float64))
        assert model.seen and all(flags == (False, False) for flags in model.seen)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (
            True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ------------------------------------------------------------------ frozen parameters


def freeze(model, names):
    """requires_grad=False on the named parameters; returns the trainable coordinates' indices
    in the flat vector of all parameters (the dense references' order)."""
    keep, i = [], 0
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
        else:
            keep += range(i, i + p.numel())
        i += p.numel()
    return torch.tensor(keep)


FROZEN = {
    "mlp-first-layer": (lambda: mlp(nn.Tanh, seed=4), {"0.weight", "0.bias"},
                        lambda: class_batches([7, 4], (5,)), smooth_ce),
    "cnn-bn-and-head-bias": (cnn, {"features.1.weight", "features.4.bias", "head.bias"},
                             lambda: class_batches([6, 3], (2, 4, 4)), smooth_ce),
}


@pytest.mark.parametrize("name", list(FROZEN))
def test_frozen_parameters_are_left_out_of_the_products(name):
    """Products over the trainable parameters only: the dense float64 Hessian / Gauss-Newton
    matrix of all parameters, restricted to the trainable rows and columns."""
    build, frozen, make_batches, loss_fn = FROZEN[name]
    model, batches = build(), make_batches()
    full_h = dense_hessian(model, loss_fn, batches)
    full_g = dense_gauss_newton(model, loss_fn, batches)
    keep = freeze(model, frozen)
    h, g = full_h[keep][:, keep], full_g[keep][:, keep]
    assert len(keep) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(keep) < len(full_h)
    hv, dim = hessian_operator(model, loss_fn, batches)
    gv, gdim = common.gauss_newton_operator(model, loss_fn, batches)
    assert dim == gdim == len(keep)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(hv(v), h @ v, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gv(v), g @ v, rtol=1e-9, atol=1e-11)
    assert rel(sharpness(model, loss_fn, batches, tol=1e-8), top_dense(h).item()) < 1e-6
    assert rel(gauss_newton_norm(model, loss_fn, batches, tol=1e-8), top_dense(g).item()) < 1e-6
    # and the restriction matters: the unrestricted top eigenvalue is a different number
    assert rel(top_dense(h).item(), top_dense(full_h).item()) > 1e-3
    assert all(p.grad is None for p in model.parameters())


def test_a_model_with_every_parameter_frozen_is_an_error():
    model, batches = mlp(nn.Tanh), class_batches([6], (5,))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sharpness(model, F.cross_entropy, batches)


# ------------------------------------------------------------------ non-convergence


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_solver_reports_not_converged_at_max_iter(method):
    """A tolerance no number of steps below max_iter can reach: converged=False, exactly
    max_iter products, and the reported error bound above tol."""
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))[0]
    spectrum = torch.linspace(0, 1, 200, dtype=torch.float64)  # no gap at the top
    a = q @ torch.diag(spectrum) @ q.T
    calls = []

    def matvec(v):
        calls.append(1)
        return a @ v
    res = top_eigenvalues(matvec, 200, method=method, tol=1e-10, max_iter=7, dtype=torch.float64)
    assert res.converged is False
    assert res.matvecs == len(calls) == 7 and res.iterations == 7
    assert max(res.errors) > 1e-10
    assert res.eigenvalues[0] <= 1.0 + 1e-12  # a Ritz value never exceeds the top eigenvalue
    # the same operator with room to converge does
    done = top_eigenvalues(lambda v: a @ v, 200, tol=1e-3, max_iter=200, dtype=torch.float64)
    assert done.converged and done.matvecs < 200


def test_sharpness_reports_not_converged_at_max_iter():
    model, batches = mlp(nn.Tanh, seed=5, width=9), class_batches([6, 3], (5,))
    info = sharpness(model, F.cross_entropy, batches, tol=1e-12, max_iter=3, return_info=True)
    assert info.converged is False and info.matvecs == 3
    exact = top_dense(dense_hessian(model, F.cross_entropy, batches)).item()
    assert info.eigenvalues[0] <= exact * (1 + 1e-9)  # Ritz values lie below the top
