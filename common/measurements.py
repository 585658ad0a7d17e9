"""Measurements: what the figures plot.

- `progressive_sharpening_metrics` (Figures 1, 6-11 of fullbatch.py and 28-29 of vgg_sgd.py): sharpness,
  softmax Jacobian norm (and output norm) on a fixed training subset during training, and with
  `step_lr` the step-scale curvature along the top eigenvector (`step_curvature`, then
  `realised_curvature` after the training step).
- `end_of_training_metrics` (Figures 2-5, 12-27 of batch_lr.py and train_regularisers.py):
  losses, gap, sharpness, Gauss-Newton norm and Jacobian norm of a trained model.
"""
import contextlib
import math
import warnings

import torch

from .data import subset_indices
from .distributed import share
from .estimators import (ConvergenceWarning, MeasureMode, _flatten, _trainable_parameters,
                         _unflatten, gauss_newton_norm, jacobian_norm, no_tf32, sharpness)
from .training import evaluate, index_chunks, label_entropy

def excess_loss(loss, smoothing, num_classes):
    """Cross entropy minus the label entropy: 0 at a perfect fit for every smoothing, so losses
    with different smoothings share one axis (the paper's Figure 1 and Section 5)."""
    return loss - label_entropy(smoothing, num_classes)


@torch.no_grad()
def output_norm(model, x, batch_size=None):
    """Frobenius norm ||f(X)||_F of the (N, K) logits over the inputs x, in eval mode (BN running
    statistics, as for the Jacobian norm), in chunks of `batch_size`; the model's mode is
    restored and nothing is written."""
    total = 0.0
    with MeasureMode(model, "eval"):
        for s in index_chunks(len(x), batch_size):
            total += model(x[s]).double().square().sum().item()
    return math.sqrt(total)


@torch.no_grad()
def weight_norm(model):
    """Euclidean norm ||w||_2 of all trainable parameters (BN's affine ones included): the vector
    that weight decay shrinks (`common.sgd` decays every parameter)."""
    return math.sqrt(sum(p.double().square().sum().item() for p in model.parameters()
                         if p.requires_grad))


@contextlib.contextmanager
def recorded_convergence():
    """Silences the estimators' ConvergenceWarning: the measurements below record
    `<metric>_converged` with every value instead, and the plots mark unconverged points."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def eigenvalue_with_convergence(estimator, name, *args, **kwargs):
    """{name: top eigenvalue, name_converged: bool, name_matvecs: products used} from
    `estimator(..., return_info=True)`."""
    with recorded_convergence():
        info = estimator(*args, return_info=True, **kwargs)
    return {name: info.eigenvalues[0], f"{name}_converged": info.converged,
            f"{name}_matvecs": info.matvecs}


def progressive_sharpening_metrics(model, loss_fn, x, y, *, ghost_batch_size=None, tol=1e-3,
                                   max_iter=100, with_output_norm=False, process_group=None,
                                   step_lr=None):
    """One point of the progressive-sharpening curves (Figures 1, 6-11 and 28-29), measured on a
    fixed training subset (x, y) during training.

    sharpness: top Hessian eigenvalue of the mean loss over (x, y), BN in train mode with each
        ghost batch of `ghost_batch_size` examples normalised by its own statistics (Lanczos,
        relative error `tol`; `sharpness_matvecs` products were used; `sharpness_converged`
        False if Lanczos stopped at `max_iter` first).
    jacobian: largest spectral norm over x of d softmax(f(x)) / dx, BN in eval mode.
    output_norm (if asked): Frobenius norm of the (N, K) logits, eval mode.
    step_lr (the learning rate, if given): also `step_curvature` along the top eigenvector.
    Pure: parameters, buffers, `.grad` and training flags are left as they were.
    With a torch.distributed `process_group`, each rank measures its share of the ghost batches
    and of x (`distributed.share`), and all return the values for the whole of (x, y).

    Returns:
        dict of floats; with `step_lr`, (that dict, pending) where pending is what
        `realised_curvature` needs after the training step.
    """
    batches = measurement_batches(x, y, ghost_batch_size, process_group)
    x_mine = x
    if process_group is not None:
        start, stop = share(len(x), process_group)
        x_mine = x[start:stop]
    with recorded_convergence():
        info = sharpness(model, loss_fn, batches, tol=tol, max_iter=max_iter, return_info=True,
                         process_group=process_group)
    row = {"sharpness": info.eigenvalues[0], "sharpness_converged": info.converged,
           "sharpness_matvecs": info.matvecs,
           "jacobian": jacobian_norm(model, x_mine, softmax=True, process_group=process_group)}
    if with_output_norm:
        row["output_norm"] = output_norm(model, x, ghost_batch_size)
    if step_lr is None:
        return row
    curvature, pending = step_curvature(model, loss_fn, x, y, info.eigenvectors[:, 0], step_lr,
                                        ghost_batch_size=ghost_batch_size,
                                        process_group=process_group)
    return {**row, **curvature}, pending


def measurement_batches(x, y, ghost_batch_size=None, process_group=None):
    """This rank's ghost batches [(x_b, y_b)] of (x, y) (`distributed.share`; all without a
    group), as the sharpness measurement splits them."""
    batches = [(x[s], y[s]) for s in index_chunks(len(x), ghost_batch_size)]
    if process_group is not None:
        start, stop = share(len(batches), process_group)
        batches = batches[start:stop]
    return batches


def _flat_parameters(model):
    """The trainable parameters as one flat (P,) copy, in `model.parameters()` order (the
    order of the estimators' eigenvectors)."""
    params = _trainable_parameters(model)
    return _flatten([p.detach() for p in params], params).clone()


def _subset_loss(model, loss_fn, batches, total, theta, *, gradient, dtype, process_group):
    """(L(theta), grad L(theta) or None) of the mean loss over the measurement ghost batches,
    L = sum_b (n_b / total) loss_fn(f(x_b; theta), y_b), at flat trainable parameters theta (P,),
    computed in `dtype` (parameters, buffers and inputs cast; torch.func.functional_call, so the
    model is not written), BN in train mode with each ghost batch's own statistics (running
    statistics untouched), TF32 off; summed over the ranks of `process_group`."""
    params = _trainable_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    theta = theta.detach().to(dtype).requires_grad_(gradient)
    values = {n: (b.to(dtype) if b.is_floating_point() else b) for n, b in model.named_buffers()}
    values.update({n: p.detach().to(dtype) for n, p in model.named_parameters()})
    loss = torch.zeros((), dtype=dtype, device=theta.device)
    grad = torch.zeros_like(theta.detach())  # (P,)
    with MeasureMode(model, "train"), no_tf32(), torch.set_grad_enabled(gradient):
        pieces = _unflatten(theta, params)
        values.update({names[id(p)]: t for p, t in zip(params, pieces)})
        for xb, yb in batches:
            out = torch.func.functional_call(model, values, (xb.to(dtype),))
            term = (len(xb) / total) * loss_fn(out, yb)
            if gradient:  # per ghost batch: one batch's graph in memory at a time
                grad += torch.autograd.grad(term, theta)[0]
            loss += term.detach()
    if process_group is not None:
        both = torch.cat([grad, loss.reshape(1)])  # (P + 1,)
        torch.distributed.all_reduce(both, group=process_group)
        grad, loss = both[:-1], both[-1]
    return loss.item(), (grad if gradient else None)


def step_curvature(model, loss_fn, x, y, eigenvector, lr, *, ghost_batch_size=None,
                   dtype=torch.float64, process_group=None):
    """The curvature a gradient step of size `lr` feels along the unit top Hessian eigenvector v
    (from `sharpness(..., return_info=True).eigenvectors[:, 0]`), on the same function as the
    sharpness: L = mean loss over (x, y) in ghost batches of `ghost_batch_size`, BN in train mode
    with each ghost batch's own statistics.

    grad_along_top: g.v, g = grad L(theta).
    secant_curvature: (L(theta + h v) - 2 L(theta) + L(theta - h v)) / h^2 at the step's scale
        h = lr |g.v| (`secant_step`; lr ||g|| if g.v = 0; None if g = 0). Equal to v^T H v for a
        quadratic L; on a ReLU net it averages the curvature over the step, where the sharpness
        is the curvature at theta alone.
    Computed in `dtype` (float64 by default: a float32 second difference has a rounding floor of
    about 4 eps L / h^2, eps = 6e-8, which at h = 1e-4 is 20 for L = 1; in float64 it is 4e-8).
    Pure: parameters, buffers, `.grad` and training flags are left as they were. With a
    torch.distributed `process_group` each rank takes its share of the ghost batches and the
    losses and gradients are summed over the ranks.

    Returns:
        (row, pending): row of floats as above (None where undefined); pending
        {"parameters": theta (P,), "eigenvector": v (P,), "grad_along_top": g.v} for
        `realised_curvature` after the training step (tensors; a checkpoint may hold it).
    """
    batches = measurement_batches(x, y, ghost_batch_size, process_group)
    theta = _flat_parameters(model)  # (P,)
    v = eigenvector.detach().reshape(-1).to(theta.device, dtype)
    v = v / torch.linalg.vector_norm(v)
    opts = dict(dtype=dtype, process_group=process_group)
    loss, grad = _subset_loss(model, loss_fn, batches, len(x), theta, gradient=True, **opts)
    along = (grad @ v).item()
    h = lr * (abs(along) or torch.linalg.vector_norm(grad).item())
    secant = None
    if h > 0:
        plus, _ = _subset_loss(model, loss_fn, batches, len(x), theta.to(dtype) + h * v,
                               gradient=False, **opts)
        minus, _ = _subset_loss(model, loss_fn, batches, len(x), theta.to(dtype) - h * v,
                                gradient=False, **opts)
        secant = (plus - 2 * loss + minus) / h ** 2
    row = {"grad_along_top": along, "secant_curvature": secant, "secant_step": h}
    return row, {"parameters": theta, "eigenvector": v, "grad_along_top": along}


def realised_curvature(model, loss_fn, x, y, pending, *, ghost_batch_size=None,
                       dtype=torch.float64, process_group=None):
    """The curvature along v that the training step from theta_t (`pending`, from
    `step_curvature` at theta_t) to the model's parameters theta_{t+1} realised:

        realised_curvature = (g_{t+1} - g_t).v / (dtheta.v),   dtheta = theta_{t+1} - theta_t

    with g the gradient of the same measurement-subset loss as `step_curvature` (BN train mode,
    ghost batches, `dtype`). For a quadratic L it is v^T H v for every step (v an eigenvector).
    With an approximate eigenvector (H v = lambda v + r) a quadratic gives lambda +
    dtheta.r / dtheta.v: the error grows as the step's fraction along v, dtheta.v / ||dtheta||
    (`step_fraction_along_top`), shrinks. step_along_top = dtheta.v; realised_curvature is None
    where dtheta.v = 0 or |dtheta.v| <= 1e-12 ||dtheta|| (no component along v to divide by).
    Pure, distributed: as `step_curvature`. Non-finite parameters (a diverged step) give None.

    Returns:
        {"realised_curvature", "step_along_top", "step_fraction_along_top",
        "next_grad_along_top": g_{t+1}.v}: floats or None.
    """
    keys = ("realised_curvature", "step_along_top", "step_fraction_along_top",
            "next_grad_along_top")
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        return dict.fromkeys(keys)  # the step diverged; the training loop says so
    batches = measurement_batches(x, y, ghost_batch_size, process_group)
    theta = _flat_parameters(model)  # (P,)
    v = pending["eigenvector"].to(theta.device, dtype)
    step = theta.to(dtype) - pending["parameters"].to(theta.device, dtype)  # exact for float32
    along_step = (step @ v).item()
    _, grad = _subset_loss(model, loss_fn, batches, len(x), theta, gradient=True, dtype=dtype,
                           process_group=process_group)
    along = (grad @ v).item()
    length = torch.linalg.vector_norm(step).item()
    defined = along_step != 0 and abs(along_step) > 1e-12 * length
    realised = (along - pending["grad_along_top"]) / along_step if defined else None
    return dict(zip(keys, (realised, along_step, along_step / length if length > 0 else None,
                           along)))


def end_of_training_metrics(model, loss_fn, data, seed, *, measure_size, ghost_batch_size,
                            eig_tol=1e-4, eig_max_iter=100, gauss_newton=False,
                            batch_size=1000, lipschitz_pairs=0):
    """The end-of-training point of a sweep cell (Figures 2-5 and 12-27), on clean data, without
    weight decay.

    train_loss / test_loss / *_accuracy: eval mode over the whole splits; gap = |test - train|
    (the paper's generalisation gap). On `measure_size` training examples drawn with `seed`
    (the model's seed): sharpness (and the Gauss-Newton norm if asked) of `loss_fn` with BN in
    train mode over ghost batches of `ghost_batch_size`, and the softmax Jacobian norm in eval
    mode. Whole-split losses are evaluated in chunks of `batch_size` (memory only).
    weight_norm: Euclidean norm of the trainable parameters (`weight_norm`).
    jacobian_lipschitz (only if `lipschitz_pairs` > 0): `jacobian_lipschitz` over that many
    pairs from the same training examples, drawn with `seed`.

    Returns:
        dict of floats.
    """
    train_loss, train_accuracy = evaluate(model, loss_fn, data.x_train, data.y_train, batch_size)
    test_loss, test_accuracy = evaluate(model, loss_fn, data.x_test, data.y_test, batch_size)
    idx = subset_indices(len(data.x_train), measure_size, seed).to(data.x_train.device)
    x, y = data.x_train[idx], data.y_train[idx]  # (M, C, H, W), (M,)
    batches = [(x[s], y[s]) for s in index_chunks(len(x), ghost_batch_size)]
    out = dict(train_loss=train_loss, test_loss=test_loss, gap=abs(test_loss - train_loss),
               train_accuracy=train_accuracy, test_accuracy=test_accuracy,
               weight_norm=weight_norm(model))
    if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
        return out
    out.update(eigenvalue_with_convergence(sharpness, "sharpness", model, loss_fn, batches,
                                           tol=eig_tol, max_iter=eig_max_iter))
    if gauss_newton:
        out.update(eigenvalue_with_convergence(gauss_newton_norm, "gauss_newton", model, loss_fn,
                                               batches, tol=eig_tol, max_iter=eig_max_iter))
    out["jacobian"] = jacobian_norm(model, x, softmax=True)
    if lipschitz_pairs:
        out["jacobian_lipschitz"] = jacobian_lipschitz(
            model, x, pairs=lipschitz_pairs, generator=torch.Generator().manual_seed(seed))
    return out


LIPSCHITZ_DISTANCES = (1.0, 0.3, 0.1, 0.03)


def input_jacobians(model, x, softmax=True, batch_size=64):
    """(N, C, D) input-output Jacobians d g(x_i) / d x_i, g = softmax o model (or the logits),
    D the flattened input size, in eval mode (BN running statistics, so the samples of a
    chunk are independent and one backward pass per class gives all their rows). The model's
    mode, parameters, buffers and `.grad` are left as they were."""
    chunks = []
    with MeasureMode(model, "eval"), torch.enable_grad(), no_tf32():
        for s in index_chunks(len(x), batch_size):
            xb = x[s].detach().contiguous().requires_grad_(True)  # (B, *D)
            out = model(xb)  # (B, C)
            out = torch.softmax(out, dim=1) if softmax else out
            rows = [torch.autograd.grad(out[:, c].sum(), xb, retain_graph=c + 1 < out.shape[1])[0]
                    .reshape(len(xb), -1) for c in range(out.shape[1])]  # C x (B, D)
            chunks.append(torch.stack(rows, dim=1))  # (B, C, D)
    return torch.cat(chunks)


def jacobian_lipschitz(model, x, *, pairs=64, distances=LIPSCHITZ_DISTANCES, generator=None,
                       softmax=True, batch_size=64):
    """Lower estimate of the Lipschitz constant of the input-output Jacobian over the data:

        max_p || J(a_p) - J(b_p) ||_2 / || a_p - b_p ||,   b_p = a_p + t_p (c_p - a_p),

    J(x) = d g(x) / dx (C x D), g = softmax o model (or the logits), a_p and c_p two different
    inputs of x drawn at random and t_p cycling through `distances` (t = 1: two inputs; smaller
    t: a point on the segment towards the other input, where the local slope shows). Every
    ratio is at most Lip(J) on the segments, so the max is a lower bound of it.
    BN in eval mode (running statistics), dropout off; the model is left exactly as it was.
    Computed in the model's dtype: at t >= 0.03 of the distance between two standardised
    images (||a - c|| ~ 50-80 for CIFAR) the Jacobians differ by far more than float32
    rounding (~1e-7 ||J|| per entry), so float32 is enough there; the spectral norms are taken
    in float64.

    Args:
        model: module mapping (N, *D) inputs to (N, C) logits.
        x: (N, *D) floating-point inputs, N >= 2.
        pairs: number of pairs P. distances: the fractions t, cycled over the pairs.
        generator: torch.Generator (CPU) for the draws (default: seeded with 0).
        softmax: differentiate the softmaxed outputs (the paper's Jacobian) or the logits.
        batch_size: inputs per chunk (memory: batch_size * C * D numbers).

    Returns:
        float.
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError("x must be a floating-point tensor with a batch dimension")
    if len(x) < 2:
        raise ValueError(f"x must hold at least 2 inputs to pair, got {len(x)}")
    if not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 1:
        raise ValueError(f"pairs must be a positive integer, got {pairs!r}")
    if not distances or not all(0 < t <= 1 for t in distances):
        raise ValueError(f"distances must be fractions in (0, 1], got {distances!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    first = torch.randint(len(x), (pairs,), generator=generator)  # (P,)
    other = (first + torch.randint(1, len(x), (pairs,), generator=generator)) % len(x)  # != first
    t = torch.tensor(distances, dtype=x.dtype)[torch.arange(pairs) % len(distances)]  # (P,)
    first, other, t = first.to(x.device), other.to(x.device), t.to(x.device)
    a, c = x[first], x[other]  # (P, *D)
    b = a + t.reshape(-1, *[1] * (x.dim() - 1)) * (c - a)
    jac = input_jacobians(model, torch.cat([a, b]), softmax, batch_size)  # (2P, C, D)
    diff = (jac[:pairs] - jac[pairs:]).double()  # (P, C, D)
    num = torch.linalg.matrix_norm(diff, ord=2)  # (P,)
    den = (a - b).flatten(1).double().norm(dim=1)  # (P,)
    keep = den > 0  # identical inputs give no slope
    return float((num[keep] / den[keep]).max()) if keep.any() else 0.0



def bn_mode_jacobian_norms(model, x, batch_sizes, *, samples=16, seed=0, softmax=True):
    """Per-sample softmax Jacobian norms with BatchNorm in train mode, for several batch sizes,
    beside the eval-mode norms of the same samples (Theorem A.1: the two agree as the batch
    grows; the paper measures the Jacobian in eval mode, the Hessian in train mode).

    In train mode sample i's output depends on the whole batch through its statistics, so its
    Jacobian is J_i = d g(X)_i / d x_i with the other B - 1 inputs held fixed (the statistics
    still move with x_i). Each of the first `samples` inputs of x is put in a batch of B with
    B - 1 others drawn at random (seeded); J_i takes C backward passes. Running statistics,
    parameters and training flags are left as they were.

    Returns:
        {"eval": [norm per sample], B: {"train": [norm per sample], "max_relative_difference":
        max_i |train_i - eval_i| / eval_i, "relative_difference_of_max": |max train - max eval| /
        max eval}} for each B in batch_sizes.
    """
    n = len(x)
    if samples > n or max(batch_sizes) > n:
        raise ValueError(f"x has {n} inputs: fewer than samples={samples} or the largest batch "
                         f"size {max(batch_sizes)}")
    generator = torch.Generator().manual_seed(seed)
    eval_norms = jacobian_norm(model, x[:samples], softmax=softmax, return_per_sample=True)
    out = {"eval": eval_norms.tolist()}
    for b in batch_sizes:
        norms = []
        for i in range(samples):
            others = torch.randperm(n - 1, generator=generator)[:b - 1] + 1  # never i itself
            others = torch.where(others <= i, others - 1, others)
            batch = torch.cat([x[i:i + 1], x[others.to(x.device)]]).detach().requires_grad_(True)
            with MeasureMode(model, "train"), torch.enable_grad():
                g = model(batch)  # (B, C)
                g = torch.softmax(g, dim=1) if softmax else g
                rows = [torch.autograd.grad(g[0, c], batch, retain_graph=c + 1 < g.shape[1])[0][0]
                        for c in range(g.shape[1])]
            jac = torch.stack([r.reshape(-1) for r in rows]).double()  # (C, D)
            norms.append(torch.linalg.matrix_norm(jac, ord=2).item())
        train = torch.tensor(norms, dtype=torch.float64)
        out[b] = {"train": norms,
                  "max_relative_difference": ((train - eval_norms).abs() / eval_norms).max().item(),
                  "relative_difference_of_max":
                      abs(train.max().item() - eval_norms.max().item()) / eval_norms.max().item()}
    return out
