"""Tests for the regularisers and sweep helpers in common: augmentation, mixup, soft-target
cross entropy, the SAM step, Kendall's tau and the grid helpers."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------- augmentation


def test_augment_probability_zero_is_the_identity():
    x = torch.randn(16, 3, 32, 32)
    out = common.augment(x, 0.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, x)


def test_augment_probability_one_is_pad_crop_flip_of_every_image():
    x = torch.randn(64, 3, 32, 32)
    out = common.augment(x, 1.0, torch.Generator().manual_seed(3))
    # Same draws, in the documented order: N uniforms, N x 2 offsets, N flips.
    g = torch.Generator().manual_seed(3)
    torch.rand(64, generator=g)
    offsets = torch.randint(0, 9, (64, 2), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(64):
        top, left = offsets[i].tolist()
        expected = padded[i, :, top:top + 32, left:left + 32]
        if flips[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)
    assert out.shape == x.shape
    assert (out != x).flatten(1).any(1).float().mean() > 0.9  # nearly all moved or flipped


def test_augment_applies_to_about_a_fraction_p():
    x = torch.randn(2000, 1, 8, 8)
    out = common.augment(x, 0.3, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(1).float().mean().item()
    # An augmented image is unchanged only at offset (4, 4) without a flip: prob 1/162.
    assert 0.25 < changed < 0.35


# ----------------------------------------------------------------------------- mixup


def test_mixup_beta_zero_is_bernoulli_half():
    labels = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(0))
    x = F.one_hot(labels, 10).float()  # inputs equal to their one-hot labels: mixing shows
    mixed, targets = common.mixup(x, labels, 0.0, 10, torch.Generator().manual_seed(1))
    assert torch.equal(mixed, targets)
    assert torch.equal(targets.max(1).values, torch.ones(2000))  # unmixed: one-hot rows
    g = torch.Generator().manual_seed(1)
    partner = torch.randperm(2000, generator=g)
    took_partner = (targets.argmax(1) == labels[partner]) & (labels != labels[partner])
    distinct = (labels != labels[partner]).float().sum()
    assert 0.45 < took_partner.float().sum() / distinct < 0.55


def test_mixup_beta_one_mixes_inputs_and_targets_alike():
    labels = torch.randint(0, 5, (500,), generator=torch.Generator().manual_seed(0))
    x = F.one_hot(labels, 5).double()
    mixed, targets = common.mixup(x, labels, 1.0, 5, torch.Generator().manual_seed(2))
    torch.testing.assert_close(mixed, targets)
    torch.testing.assert_close(targets.sum(1), torch.ones(500, dtype=torch.float64))
    top = targets.max(1).values
    assert ((top > 0.5) & (top < 0.99)).float().mean() > 0.5  # genuinely mixed, not Bernoulli
    again, _ = common.mixup(x, labels, 1.0, 5, torch.Generator().manual_seed(2))
    assert torch.equal(again, mixed)  # the generator alone decides


def test_cross_entropy_takes_soft_targets_with_label_smoothing():
    z = torch.randn(6, 4, dtype=torch.float64)
    q = torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1)
    s = 0.3
    expected = -(((1 - s) * q + s / 4) * torch.log_softmax(z, 1)).sum(1).mean()
    torch.testing.assert_close(common.cross_entropy(s)(z, q), expected)


# ----------------------------------------------------------------------------- SAM


def small_net(seed, batch_norm=True):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(12, 8)] + ([nn.BatchNorm1d(8)] if batch_norm else []) + \
             [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


def test_sam_with_rho_zero_is_the_plain_sgd_step():
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randint(0, 3, (10,))
    a, b = small_net(0), small_net(0)
    opt_a = common.sgd(a, 0.1, momentum=0.9, weight_decay=5e-4)
    opt_b = common.sgd(b, 0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = common.cross_entropy(0.1)
    for _ in range(3):
        loss, accuracy = common.train_step(a, opt_a, loss_fn, x, y, rho=0.0)
        opt_b.zero_grad()
        reference = loss_fn(b(x), y)
        reference.backward()
        opt_b.step()
        # equal up to float64 rounding: BLAS sums in an order that can depend on alignment
        # (exact equality failed now and then inside the full suite)
        assert loss == pytest.approx(reference.item(), rel=1e-13) and 0 <= accuracy <= 1
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)


def test_train_step_with_rho_uses_the_gradient_at_the_perturbed_point():
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randint(0, 3, (10,))
    model, rho, lr = small_net(1, batch_norm=False), 0.05, 0.1
    loss_fn = common.cross_entropy()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_at(p):
        return loss_fn(torch.func.functional_call(model, p, (x,)), y)

    g = torch.func.grad(loss_at)(params)
    norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
    g_sam = torch.func.grad(loss_at)({k: params[k] + rho * g[k] / norm for k in params})
    common.train_step(model, common.sgd(model, lr), loss_fn, x, y, rho=rho)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[k] - lr * g_sam[k])


def test_sam_perturbed_pass_leaves_bn_running_statistics_alone():
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randint(0, 3, (10,))
    a, b = small_net(2), small_net(2)
    common.train_step(a, common.sgd(a, 0.1), common.cross_entropy(), x, y, rho=0.1)
    b.train()
    b(x)  # one forward pass: what the running statistics should have seen
    for key in ("2.running_mean", "2.running_var", "2.num_batches_tracked"):
        torch.testing.assert_close(a.state_dict()[key], b.state_dict()[key])
    assert a[2].momentum == 0.1


@pytest.mark.parametrize("rho", [0.0, 0.05])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_train_step_is_skipped_when_the_loss_is_not_finite(rho, bad):
    """SGD, momentum and weight decay (which would move the weights even with a zero gradient):
    a non-finite loss leaves parameters, BN statistics and the optimiser state untouched."""
    model = small_net(3, batch_norm=True)
    x = torch.randn(4, 12, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    optimizer = common.sgd(model, 0.1, momentum=0.9, weight_decay=5e-4)
    common.train_step(model, optimizer, common.cross_entropy(), x, y, rho=rho)  # momentum > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x_bad = x.clone()
    x_bad[1, 0] = bad  # one bad example makes the mean loss non-finite
    loss, _ = common.train_step(model, optimizer, common.cross_entropy(), x_bad, y, rho=rho)
    assert not math.isfinite(loss)
    after = model.state_dict()
    for k, v in before.items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(after[k], v), k
    for p, m in zip(model.parameters(), momenta):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], m)
    # a finite step afterwards does move them (the check above could fail)
    common.train_step(model, optimizer, common.cross_entropy(), x, y, rho=rho)
    assert not torch.equal(model.state_dict()["1.weight"], before["1.weight"])


# ----------------------------------------------------------------------------- Jacobian penalty


def exact_squared_frobenius(model, x, softmax=True):
    """(1/N) sum_i ||d g(x_i) / d x_i||_F^2 from torch.func.jacrev, example by example."""
    def g(xi):
        out = model(xi[None])[0]  # (K,)
        return torch.softmax(out, 0) if softmax else out
    return torch.stack([torch.func.jacrev(g)(xi).square().sum() for xi in x]).mean()


def penalty_draws(model, x, draws, softmax=True, seed=0):
    """`draws` independent one-projection estimates, (draws,) float64."""
    generator = torch.Generator().manual_seed(seed)
    inputs = x.detach().requires_grad_(True)
    outputs = model(inputs)
    return torch.tensor([common.jacobian_penalty(outputs, inputs, generator, softmax=softmax).item()
                         for _ in range(draws)], dtype=torch.float64)


@pytest.mark.parametrize("softmax", [True, False])
def test_jacobian_penalty_is_unbiased_for_the_squared_frobenius_norm(softmax):
    model, x = small_net(4, batch_norm=False), torch.randn(3, 12, dtype=torch.float64)
    exact = exact_squared_frobenius(model, x, softmax).item()
    values = penalty_draws(model, x, 2000, softmax)
    standard_error = values.std().item() / math.sqrt(len(values))
    assert values.std() > 0.05 * exact  # a random estimate, not the exact value
    assert abs(values.mean().item() - exact) < 4 * standard_error
    # the K / P scaling matters: without the factor K = 3 the mean would be exact / 3
    assert abs(values.mean().item() / 3 - exact) > 20 * standard_error


def test_jacobian_penalty_gradient_is_unbiased_for_the_exact_gradient():
    """create_graph=True: the parameters get the (expected) gradient of ||J||_F^2."""
    model, x = small_net(5, batch_norm=False), torch.randn(3, 12, dtype=torch.float64)
    exact = torch.autograd.grad(exact_squared_frobenius(model, x), list(model.parameters()))
    draws = 1500
    generator = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(draws):
        inputs = x.detach().requires_grad_(True)
        penalty = common.jacobian_penalty(model(inputs), inputs, generator)
        grads = torch.autograd.grad(penalty, list(model.parameters()))
        samples.append(torch.cat([g.reshape(-1) for g in grads]))
    samples = torch.stack(samples)  # (draws, number of parameters)
    exact = torch.cat([g.reshape(-1) for g in exact])
    error = torch.linalg.vector_norm(samples.mean(0) - exact)
    expected_error = torch.sqrt((samples.var(0) / draws).sum())  # E ||mean - exact||^2, summed
    assert torch.linalg.vector_norm(exact) > 10 * expected_error  # the test can tell
    assert error < 3 * expected_error


def test_jacobian_penalty_draws_from_the_generator_and_checks_its_inputs():
    model, x = small_net(6, batch_norm=False), torch.randn(4, 12, dtype=torch.float64)
    inputs = x.clone().requires_grad_(True)
    a = common.jacobian_penalty(model(inputs), inputs, torch.Generator().manual_seed(7))
    b = common.jacobian_penalty(model(inputs), inputs, torch.Generator().manual_seed(7))
    c = common.jacobian_penalty(model(inputs), inputs, torch.Generator().manual_seed(8))
    assert a.item() == b.item() != c.item()
    with pytest.raises(ValueError, match="inputs must require grad"):
        common.jacobian_penalty(model(x), x, torch.Generator())
    with pytest.raises(ValueError, match="outputs must be"):
        common.jacobian_penalty(model(inputs)[:, 0], inputs, torch.Generator())


def test_train_step_with_a_jacobian_penalty_lowers_the_jacobian():
    """The intervention works on a small net: full-batch steps on CE + lambda penalty end with a
    smaller softmax Jacobian than steps on CE alone, from the same start."""
    x, y = torch.randn(32, 12, dtype=torch.float64), torch.randint(0, 3, (32,))
    norms = {}
    for strength in (0.0, 1.0):
        model, generator = small_net(7, batch_norm=False), torch.Generator().manual_seed(0)
        penalty = None if strength == 0 else (
            lambda out, inputs: strength * common.jacobian_penalty(out, inputs, generator))
        optimizer = common.sgd(model, 0.5)
        for _ in range(100):
            loss, _ = common.train_step(model, optimizer, common.cross_entropy(), x, y,
                                        penalty=penalty)
        norms[strength] = exact_squared_frobenius(model, x).item()
    assert norms[1.0] < 0.5 * norms[0.0]


def test_shuffled_batches_cover_every_index_once():
    batches = common.shuffled_batches(10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [len(b) for b in common.shuffled_batches(10, 4, torch.Generator(), drop_last=True)] == [4, 4]


# ----------------------------------------------------------------------------- Kendall tau


def test_kendall_tau_matches_hand_computed_values():
    # One discordant pair of six: (5 - 1) / 6.
    assert common.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # Ties: C = 4, D = 0, n0 = 6, one pair tied in x, one in y: 4 / sqrt(5 * 5).
    assert common.kendall_tau([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    assert common.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # Pairs with a NaN are dropped; too few points or a constant variable give NaN.
    assert common.kendall_tau([1, 2, math.nan, 3], [1, 2, 5, 3]) == pytest.approx(1.0)
    assert math.isnan(common.kendall_tau([1], [2]))
    assert math.isnan(common.kendall_tau([1, 1, 1], [1, 2, 3]))


def test_kendall_tau_agrees_with_scipy_if_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 40), rng.integers(0, 5, 40)  # many ties
    assert common.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)


# ----------------------------------------------------------------------------- grids


def test_grid_is_the_cartesian_product_last_axis_fastest():
    cells = common.grid(lr=[0.1, 0.01], trial=[0, 1, 2])
    assert len(cells) == 6
    assert cells[:2] == [{"lr": 0.1, "trial": 0}, {"lr": 0.1, "trial": 1}]
    assert common.unique_configs(cells + cells[:3]) == cells


def test_sweep_correlations_skip_diverged_cells():
    def run(gap, jac, status="finished"):
        return {"config": {}, "result": {"status": status, "gap": gap, "jacobian": jac,
                                         "sharpness": None if gap is None else -gap}}
    runs = [run(1, 1), run(2, 2), run(3, 3), run(None, None, "diverged")]
    c = common.sweep_correlations(runs)
    assert c == {"n": 3, "tau_gap_jacobian": pytest.approx(1.0), "tau_gap_sharpness": pytest.approx(-1.0)}


def test_sweep_correlations_within_a_learning_rate():
    def run(lr, gap, jac):
        return {"config": {"lr": lr}, "result": {"status": "finished", "gap": gap, "jacobian": jac,
                                                 "sharpness": gap}}
    # Pooled, the Jacobian follows the gap; within each lr it runs against it.
    runs = [run(0.1, 1, 2), run(0.1, 2, 1), run(0.01, 3, 4), run(0.01, 4, 3)]
    c = common.sweep_correlations(runs, within="lr")
    assert c["tau_gap_jacobian"] == pytest.approx(1 / 3)
    assert list(c["per_lr"]) == ["0.01", "0.1"]
    for lr in ("0.01", "0.1"):
        assert c["per_lr"][lr] == {"n": 2, "tau_gap_jacobian": pytest.approx(-1.0),
                                   "tau_gap_sharpness": pytest.approx(1.0)}
