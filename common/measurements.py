"""Measurements: what the figures plot.

- `progressive_sharpening_metrics` (Figures 1, 6-11 of fullbatch.py and 28-29 of vgg_sgd.py): sharpness,
  softmax Jacobian norm (and output norm) on a fixed training subset during training.
- `end_of_training_metrics` (Figures 2-5, 12-27 of batch_lr.py and train_regularisers.py):
  losses, gap, sharpness, Gauss-Newton norm and Jacobian norm of a trained model.
"""
import contextlib
import math
import warnings

import torch

from .data import subset_indices
from .distributed import share
from .estimators import ConvergenceWarning, MeasureMode, gauss_newton_norm, jacobian_norm, sharpness
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
    """{name: top eigenvalue, name_converged: bool} from `estimator(..., return_info=True)`."""
    with recorded_convergence():
        info = estimator(*args, return_info=True, **kwargs)
    return {name: info.eigenvalues[0], f"{name}_converged": info.converged}


def progressive_sharpening_metrics(model, loss_fn, x, y, *, ghost_batch_size=None, tol=1e-3,
                                   max_iter=100, with_output_norm=False, process_group=None):
    """One point of the progressive-sharpening curves (Figures 1, 6-11 and 28-29), measured on a
    fixed training subset (x, y) during training.

    sharpness: top Hessian eigenvalue of the mean loss over (x, y), BN in train mode with each
        ghost batch of `ghost_batch_size` examples normalised by its own statistics (Lanczos,
        relative error `tol`; `sharpness_matvecs` products were used; `sharpness_converged`
        False if Lanczos stopped at `max_iter` first).
    jacobian: largest spectral norm over x of d softmax(f(x)) / dx, BN in eval mode.
    output_norm (if asked): Frobenius norm of the (N, K) logits, eval mode.
    Pure: parameters, buffers, `.grad` and training flags are left as they were.
    With a torch.distributed `process_group`, each rank measures its share of the ghost batches
    and of x (`distributed.share`), and all return the values for the whole of (x, y).

    Returns:
        dict of floats.
    """
    batches = [(x[s], y[s]) for s in index_chunks(len(x), ghost_batch_size)]
    x_mine = x
    if process_group is not None:
        start, stop = share(len(batches), process_group)
        batches = batches[start:stop]
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
    return row


# --- regularisers: augmentation, mixup, SAM (train_regularisers.py, batch_lr.py) ---------------
#
# All randomness comes from an explicit CPU torch.Generator (so a checkpoint can save its state
# and a resumed run draws the same numbers); the draws are small and moved to the data's device,
# the images never leave it.
import contextlib



def end_of_training_metrics(model, loss_fn, data, seed, *, measure_size, ghost_batch_size,
                            eig_tol=1e-4, eig_max_iter=100, gauss_newton=False,
                            batch_size=1000):
    """The end-of-training point of a sweep cell (Figures 2-5 and 12-27), on clean data, without
    weight decay.

    train_loss / test_loss / *_accuracy: eval mode over the whole splits; gap = |test - train|
    (the paper's generalisation gap). On `measure_size` training examples drawn with `seed`
    (the model's seed): sharpness (and the Gauss-Newton norm if asked) of `loss_fn` with BN in
    train mode over ghost batches of `ghost_batch_size`, and the softmax Jacobian norm in eval
    mode. Whole-split losses are evaluated in chunks of `batch_size` (memory only).
    weight_norm: Euclidean norm of the trainable parameters (`weight_norm`).

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
    return out



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
