"""common.measurements and common.evaluate against independent references on tiny float64
models: progressive_sharpening_metrics (fullbatch.py, vgg_sgd.py), end_of_training_metrics
(batch_lr.py, train_regularisers.py), evaluate."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from references import (assert_same_state, class_batches, dense_gauss_newton, dense_hessian,
                        dense_jacobian_norms, mlp, rel, state_of, top_dense)

SMOOTH = common.cross_entropy(0.5)
SHAPE = (5,)  # examples are 5-vectors: the BN MLP below keeps the dense references fast


def bn_mlp(seed=0):
    """Linear -> BatchNorm1d -> Tanh -> Linear, 69 parameters, float64, BN running statistics
    and affine parameters moved off their defaults (so eval mode differs from train mode)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(seed + 100)
    bn = model[1]
    bn.running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    bn.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        bn.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    return model


def eval_outputs(model, x):
    """Eval-mode logits, set by hand (running BN statistics, dropout off)."""
    flags = [m.training for m in model.modules()]
    model.eval()
    with torch.no_grad():
        out = model(x)
    for m, f in zip(model.modules(), flags):
        m.training = f
    return out


def reference_loss_and_accuracy(model, loss_fn, x, y):
    out = eval_outputs(model, x)
    return loss_fn(out, y).item(), (out.argmax(1) == y).double().mean().item()


# ----------------------------------------------------------------------------- progressive sharpening


def test_progressive_sharpening_metrics_match_dense_references_and_are_pure():
    model = bn_mlp(seed=2).train()
    x, y = class_batches([12], SHAPE, seed=5)[0]
    SMOOTH(model(x), y).backward()  # a .grad in place, which the measurement must keep
    before = state_of(model)
    grads = [p.grad.clone() for p in model.parameters()]
    row = common.progressive_sharpening_metrics(model, SMOOTH, x, y, ghost_batch_size=5,
                                                tol=1e-8, with_output_norm=True)
    assert model.training
    assert_same_state(model, before)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    # ghost batches of 5, 5, 2, each normalised with its own BN statistics
    ghosts = [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])]
    exact = top_dense(dense_hessian(model, SMOOTH, ghosts)).item()
    assert rel(row["sharpness"], exact) < 1e-6
    one_batch = common.sharpness(model, SMOOTH, [(x, y)], tol=1e-8)
    assert rel(one_batch, exact) > 1e-3  # so the ghost batching is what was measured
    assert 1 <= row["sharpness_matvecs"] <= 100
    assert row["jacobian"] == pytest.approx(dense_jacobian_norms(model, x, True).max().item(),
                                            rel=1e-8)
    assert row["output_norm"] == pytest.approx(eval_outputs(model, x).norm().item(), rel=1e-10)


def test_excess_loss_is_zero_at_the_smoothed_target():
    target = torch.full((1, 10), 0.05).scatter_(1, torch.tensor([[3]]), 0.55)
    ce = common.cross_entropy(0.5)(target.log(), torch.tensor([3])).item()
    assert common.excess_loss(ce, 0.5, 10) == pytest.approx(0.0, abs=1e-6)
    assert common.excess_loss(ce + 0.25, 0.5, 10) == pytest.approx(0.25, abs=1e-6)


# ----------------------------------------------------------------------------- end of training


@pytest.fixture(scope="module")
def trained():
    """A BN MLP after a few SGD steps, and data."""
    model = bn_mlp(seed=1)
    (x_train, y_train), (x_test, y_test) = class_batches([20, 11], SHAPE, seed=3)
    data = common.Data(x_train, y_train, x_test, y_test, num_classes=3)
    optimizer = common.sgd(model, 0.05)
    for _ in range(3):
        common.train_step(model, optimizer, SMOOTH, x_train, y_train, ghost_batch_size=5)
    model.zero_grad(set_to_none=True)
    return model, data


def drawn_subset(n_total, n, seed):
    """The documented rule: n indices without replacement from a generator seeded with seed,
    sorted."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def test_end_of_training_metrics_match_dense_references(trained):
    model, data = trained
    before = state_of(model)
    got = common.end_of_training_metrics(model, SMOOTH, data, seed=7, measure_size=9,
                                         ghost_batch_size=3, eig_tol=1e-9, gauss_newton=True,
                                         batch_size=4)
    assert_same_state(model, before)
    assert model.training
    # whole splits, eval mode; gap = |test - train|
    train = reference_loss_and_accuracy(model, SMOOTH, data.x_train, data.y_train)
    test = reference_loss_and_accuracy(model, SMOOTH, data.x_test, data.y_test)
    assert got["train_loss"] == pytest.approx(train[0], rel=1e-12)
    assert got["test_loss"] == pytest.approx(test[0], rel=1e-12)
    assert (got["train_accuracy"], got["test_accuracy"]) == (train[1], test[1])
    assert got["gap"] == pytest.approx(abs(test[0] - train[0]), rel=1e-12)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    assert got["weight_norm"] == pytest.approx(torch.linalg.vector_norm(weights).item(), rel=1e-12)
    # curvature on the 9 examples drawn with the seed, BN in train mode per ghost batch of 3
    idx = drawn_subset(20, 9, 7)
    x, y = data.x_train[idx], data.y_train[idx]
    ghosts = [(x[i:i + 3], y[i:i + 3]) for i in (0, 3, 6)]
    assert rel(got["sharpness"], top_dense(dense_hessian(model, SMOOTH, ghosts)).item()) < 1e-6
    assert rel(got["gauss_newton"],
               top_dense(dense_gauss_newton(model, SMOOTH, ghosts)).item()) < 1e-6
    assert got["jacobian"] == pytest.approx(dense_jacobian_norms(model, x, True).max().item(),
                                            rel=1e-8)
    # the checks above could fail: other examples, or one BN batch, give other numbers
    first = [(data.x_train[i:i + 3], data.y_train[i:i + 3]) for i in (0, 3, 6)]
    assert rel(got["sharpness"], common.sharpness(model, SMOOTH, first, tol=1e-8)) > 1e-3
    assert rel(got["sharpness"], common.sharpness(model, SMOOTH, [(x, y)], tol=1e-8)) > 1e-3


def test_end_of_training_metrics_draw_their_examples_with_the_seed(trained):
    model, data = trained
    a, b = (common.end_of_training_metrics(model, SMOOTH, data, seed=s, measure_size=6,
                                           ghost_batch_size=6, eig_tol=1e-6) for s in (7, 8))
    assert a["train_loss"] == b["train_loss"] and a["gap"] == b["gap"]  # whole splits
    assert a["jacobian"] != b["jacobian"]
    x = data.x_train[drawn_subset(20, 6, 8)]
    assert b["jacobian"] == pytest.approx(dense_jacobian_norms(model, x, True).max().item(),
                                          rel=1e-8)
    # measure_size >= the training set: every example, in order
    every = common.end_of_training_metrics(model, SMOOTH, data, seed=7, measure_size=20,
                                           ghost_batch_size=10, eig_tol=1e-9)
    halves = [(data.x_train[:10], data.y_train[:10]), (data.x_train[10:], data.y_train[10:])]
    assert rel(every["sharpness"], top_dense(dense_hessian(model, SMOOTH, halves)).item()) < 1e-6
    assert "gauss_newton" not in every


def test_end_of_training_metrics_of_a_diverged_model_stop_at_the_losses(trained):
    model, data = trained
    broken = bn_mlp()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken[3].bias.fill_(math.inf)
    got = common.end_of_training_metrics(broken, SMOOTH, data, seed=7, measure_size=6,
                                         ghost_batch_size=3)
    assert not math.isfinite(got["train_loss"])
    assert set(got) == {"train_loss", "test_loss", "gap", "train_accuracy", "test_accuracy",
                        "weight_norm"}


# ----------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_uses_eval_mode_and_restores_the_mode(trained, training):
    model, data = trained
    model.train(training)
    before = state_of(model)
    loss, accuracy = common.evaluate(model, SMOOTH, data.x_test, data.y_test)
    assert_same_state(model, before)  # mode restored, running statistics untouched
    assert (loss, accuracy) == pytest.approx(
        reference_loss_and_accuracy(model, SMOOTH, data.x_test, data.y_test), rel=1e-12)
    # and eval mode is not train mode here: batch statistics would give another loss
    with torch.no_grad():
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.track_running_stats = False
        train_mode = SMOOTH(model(data.x_test), data.y_test).item()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.track_running_stats = True
    model.train(training)
    assert abs(train_mode - loss) > 1e-6


@pytest.mark.parametrize("batch_size", [1, 3, 4, 11, 100])
def test_evaluate_chunking_does_not_change_the_result(trained, batch_size):
    model, data = trained
    whole = common.evaluate(model, SMOOTH, data.x_test, data.y_test)
    chunked = common.evaluate(model, SMOOTH, data.x_test, data.y_test, batch_size=batch_size)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-12) and chunked[1] == whole[1]


def test_evaluate_soft_targets_give_no_accuracy():
    model = mlp(nn.Tanh)
    x = torch.randn(6, 5, dtype=torch.float64)
    q = torch.softmax(torch.randn(6, 3, dtype=torch.float64), 1)
    loss, accuracy = common.evaluate(model, F.cross_entropy, x, q, batch_size=4)
    assert accuracy is None
    with torch.no_grad():
        expected = -(q * torch.log_softmax(model(x), 1)).sum(1).mean().item()
    assert loss == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- step-scale curvature


def linear_regression(seed=0):
    """A linear model with MSE: the loss is quadratic in the parameters, H constant."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(14, 4, generator=g, dtype=torch.float64)
    y = torch.randn(14, 3, generator=g, dtype=torch.float64)
    return model, x, y


@pytest.mark.parametrize("which", [0, 3])  # the top eigenvector and a lower one
def test_step_curvature_is_the_eigenvalue_of_a_quadratic_loss(which):
    model, x, y = linear_regression()
    hessian = dense_hessian(model, F.mse_loss, [(x[:8], y[:8]), (x[8:], y[8:])])  # (P, P)
    values, vectors = torch.linalg.eigh(hessian)
    lam, v = values[-1 - which].item(), vectors[:, -1 - which]
    row, pending = common.step_curvature(model, F.mse_loss, x, y, v, 0.3, ghost_batch_size=8)
    assert row["secant_curvature"] == pytest.approx(lam, rel=1e-8)
    assert row["secant_step"] == pytest.approx(0.3 * abs(row["grad_along_top"]), rel=1e-12)
    # any step: a gradient step on other data, so dtheta is not along v
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    F.mse_loss(model(x + 1.0), y.flip(0)).backward()
    optimizer.step()
    after = common.realised_curvature(model, F.mse_loss, x, y, pending, ghost_batch_size=8)
    assert after["realised_curvature"] == pytest.approx(lam, rel=1e-8)
    assert abs(after["step_fraction_along_top"]) < 1
    change = after["next_grad_along_top"] - row["grad_along_top"]
    assert change == pytest.approx(lam * after["step_along_top"], rel=1e-8)


def test_realised_curvature_is_none_without_a_step_along_the_eigenvector():
    model, x, y = linear_regression(seed=1)
    v = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    v[0] = 1.0  # weight[0, 0]
    _, pending = common.step_curvature(model, F.mse_loss, x, y, v, 0.1)
    with torch.no_grad():
        model.bias.add_(0.5)  # a step orthogonal to v
    after = common.realised_curvature(model, F.mse_loss, x, y, pending)
    assert after["realised_curvature"] is None and after["step_along_top"] == 0.0


def test_step_curvature_is_pure_and_matches_the_sharpness_function_in_float32():
    """BN MLP (train mode, ghost batches): state, .grad and flags unchanged; g.v is the dense
    gradient's component; the float32 model measured in float64 gives the float64 model's values."""
    model = bn_mlp(seed=3).train()
    x, y = class_batches([12], SHAPE, seed=6)[0]
    SMOOTH(model(x), y).backward()
    before = state_of(model)
    grads = [p.grad.clone() for p in model.parameters()]
    hessian = dense_hessian(model, SMOOTH, [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])])
    v = torch.linalg.eigh(hessian)[1][:, -1]
    row, pending = common.step_curvature(model, SMOOTH, x, y, v, 0.5, ghost_batch_size=5)
    after = common.realised_curvature(model, SMOOTH, x, y, pending, ghost_batch_size=5)
    assert_same_state(model, before)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert after["step_along_top"] == 0.0 and after["realised_curvature"] is None
    # g.v against a reference gradient of the same ghost-batch loss
    params = list(model.parameters())
    with common.MeasureMode(model, "train"):
        loss = sum(len(xb) / 12 * SMOOTH(model(xb), yb)
                   for xb, yb in ((x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])))
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
    assert row["grad_along_top"] == pytest.approx((g @ v).item(), rel=1e-10)
    assert_same_state(model, before)
    single = bn_mlp(seed=3).train().float()
    single.load_state_dict({k: t.float() if t.is_floating_point() else t
                            for k, t in model.state_dict().items()})
    row32, _ = common.step_curvature(single, SMOOTH, x.float(), y, v.float(), 0.5,
                                     ghost_batch_size=5)
    assert row32["secant_curvature"] == pytest.approx(row["secant_curvature"], rel=1e-3)


def test_progressive_sharpening_metrics_with_step_lr_add_the_step_curvature():
    model = bn_mlp(seed=4).train()
    x, y = class_batches([10], SHAPE, seed=7)[0]
    row, pending = common.progressive_sharpening_metrics(model, SMOOTH, x, y, ghost_batch_size=5,
                                                         tol=1e-8, step_lr=0.2)
    assert {"sharpness", "grad_along_top", "secant_curvature", "secant_step"} <= row.keys()
    assert set(pending) == {"parameters", "eigenvector", "grad_along_top"}
    hessian = dense_hessian(model, SMOOTH, [(x[:5], y[:5]), (x[5:], y[5:])])
    top = torch.linalg.eigh(hessian)[1][:, -1]
    assert abs(pending["eigenvector"] @ top) == pytest.approx(1.0, abs=1e-6)


def test_realised_curvature_after_a_diverged_step_is_none():
    model, x, y = linear_regression(seed=2)
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    _, pending = common.step_curvature(model, F.mse_loss, x, y, v, 0.1)
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    after = common.realised_curvature(model, F.mse_loss, x, y, pending)
    assert set(after.values()) == {None} and "realised_curvature" in after


# ----------------------------------------------------------------------------- Lip of the Jacobian


class Quadratic(nn.Module):
    """Logits g(x)_c = x^T A_c x / 2 (A_c symmetric): J(x) = (A_c x)^T row by row, linear in x,
    so ||J(x) - J(x')||_2 / ||x - x'|| = ||M(u)||_2, M(u)_c = (A_c u)^T, u = (x - x') / ||x - x'||."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a)  # (C, D, D)

    def forward(self, x):  # (N, D) -> (N, C)
        return 0.5 * torch.einsum("nd,cde,ne->nc", x, self.a, x)


def eval_jacobian(model, x, softmax):
    """(C, D) Jacobian at one input x (D,) by torch.func.jacrev, eval mode set by hand."""
    flags = [m.training for m in model.modules()]
    model.eval()
    fn = (lambda v: torch.softmax(model(v[None])[0], 0)) if softmax else (lambda v: model(v[None])[0])
    jac = torch.func.jacrev(fn)(x)
    for m, f in zip(model.modules(), flags):
        m.training = f
    return jac


def test_input_jacobians_match_jacrev_in_eval_mode_and_are_pure():
    model = bn_mlp(seed=3).train()
    x, _ = class_batches([7], SHAPE, seed=2)[0]
    before = state_of(model)
    for softmax in (True, False):
        got = common.input_jacobians(model, x, softmax=softmax, batch_size=3)  # (7, 3, 5)
        want = torch.stack([eval_jacobian(model, xi, softmax) for xi in x])
        assert got.shape == (7, 3, 5)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert_same_state(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_jacobian_lipschitz_is_exact_when_every_direction_has_the_same_slope():
    # A_c = a_c I: ||M(u)||_2 = ||a|| for every unit u, so every pair gives Lip(J) = ||a||
    a = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64)
    model = Quadratic(a[:, None, None] * torch.eye(4, dtype=torch.float64))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = common.jacobian_lipschitz(model, x, pairs=8, softmax=False)
    assert got == pytest.approx(a.norm().item(), rel=1e-12)


def test_jacobian_lipschitz_is_the_max_over_its_pairs_and_a_valid_lower_bound():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    a = a + a.transpose(1, 2)
    model = Quadratic(a)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    got = common.jacobian_lipschitz(model, x, pairs=12, softmax=False,
                                    generator=torch.Generator().manual_seed(5))
    # the pairs by the documented rule, each slope from jacrev
    draw = torch.Generator().manual_seed(5)
    first = torch.randint(10, (12,), generator=draw)
    other = (first + torch.randint(1, 10, (12,), generator=draw)) % 10
    assert (first != other).all()
    slopes = []
    for p in range(12):
        t = common.measurements.LIPSCHITZ_DISTANCES[p % 4]
        xa, xb = x[first[p]], x[first[p]] + t * (x[other[p]] - x[first[p]])
        diff = eval_jacobian(model, xa, False) - eval_jacobian(model, xb, False)
        slopes.append(torch.linalg.matrix_norm(diff, ord=2).item() / (xa - xb).norm().item())
    assert got == pytest.approx(max(slopes), rel=1e-10)
    # a lower bound: below Lip(J) = sup_u ||M(u)||_2 <= sqrt(sum_c ||A_c||_2^2)
    upper = torch.linalg.matrix_norm(a, ord=2).square().sum().sqrt().item()
    assert got <= upper
    # the softmax Jacobian differs (and is measured by default)
    assert common.jacobian_lipschitz(model, x, pairs=12, generator=torch.Generator().manual_seed(5)) != got


def test_jacobian_lipschitz_is_pure_and_seeded():
    model = bn_mlp(seed=4).train()
    x, _ = class_batches([9], SHAPE, seed=6)[0]
    before = state_of(model)
    a, b, c = (common.jacobian_lipschitz(model, x, pairs=6, generator=torch.Generator().manual_seed(s))
               for s in (0, 0, 1))
    assert_same_state(model, before)
    assert a == b and a != c and a > 0
    with pytest.raises(ValueError, match="pairs"):
        common.jacobian_lipschitz(model, x, pairs=0)
    with pytest.raises(ValueError, match="at least 2"):
        common.jacobian_lipschitz(model, x[:1])


def test_end_of_training_metrics_record_jacobian_lipschitz_only_when_asked(trained):
    model, data = trained
    plain = common.end_of_training_metrics(model, SMOOTH, data, seed=7, measure_size=9,
                                           ghost_batch_size=3, eig_tol=1e-6)
    asked = common.end_of_training_metrics(model, SMOOTH, data, seed=7, measure_size=9,
                                           ghost_batch_size=3, eig_tol=1e-6, lipschitz_pairs=5)
    assert "jacobian_lipschitz" not in plain
    x = data.x_train[drawn_subset(20, 9, 7)]
    assert asked["jacobian_lipschitz"] == common.jacobian_lipschitz(
        model, x, pairs=5, generator=torch.Generator().manual_seed(7))
