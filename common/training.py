"""Training: losses, the ghost-batch gradient, the one optimiser step every script takes
(`train_step`), evaluation, the regularisers' batch transforms (augmentation, mixup), the
Jacobian penalty (`jacobian_penalty`) and the start-of-run gradient check (`gradient_check`).

All randomness comes from an explicit CPU torch.Generator (so a checkpoint can save its state
and a resumed run draws the same numbers); the draws are small and moved to the data's device,
the images never leave it.
"""
import contextlib
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .estimators import BN_TYPES, no_tf32

def label_entropy(smoothing, num_classes):
    """Entropy of a label-smoothed one-hot target, H(q) with q = (1 - s) e_y + s / K.

    Cross entropy against q is H(q) + KL(q || p) >= H(q), so reporting `loss - label_entropy`
    makes losses with different smoothings comparable (0 at a perfect fit).
    """
    s, k = float(smoothing), int(num_classes)
    probs = [1 - s + s / k] + [s / k] * (k - 1)
    return -sum(p * math.log(p) for p in probs if p > 0)


def cross_entropy(smoothing=0.0):
    """loss_fn(outputs (N, K), labels (N,)) -> mean cross entropy with label smoothing."""
    def loss_fn(outputs, labels):
        return F.cross_entropy(outputs, labels, label_smoothing=smoothing)
    return loss_fn


def index_chunks(n, size=None):
    """Slices covering range(n) in order, each of at most `size` (all of it if None)."""
    size = n if size is None else max(1, int(size))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def ghost_batch_gradient(model, loss_fn, x, y, ghost_batch_size=None, process_group=None,
                         penalty=None):
    """Accumulates into `.grad` the gradient of the mean loss over all of (x, y).

        grad (1/N) sum_i l_i = sum_k (n_k / N) grad mean_{i in ghost batch k} l_i

    so each ghost batch's mean loss is weighted by its size. With `penalty`, a callable
    (outputs (n, K), inputs (n, ...)) -> scalar tensor, each ghost batch's loss is
    loss_fn + penalty, the inputs a leaf that requires grad (so the penalty can differentiate
    the outputs with respect to them) and the returned loss includes it. The model keeps its mode: in train
    mode a BN net normalises each ghost batch with its own statistics [Cohen et al. 2021].
    With a torch.distributed `process_group` every rank holds all of (x, y), computes its share
    of the ghost batches (`distributed.share`) and gets the sums over the ranks: gradient,
    loss, accuracy and BN running statistics as in one process (`common.distributed`).

    Returns:
        (mean loss, accuracy) over the data as floats; accuracy is None unless y holds class
        indices. Gradients add to existing `.grad` (zero them first).
    """
    n = len(x)
    chunks = index_chunks(n, ghost_batch_size)
    start, stop = distributed.share(len(chunks), process_group)
    total_loss, correct = 0.0, 0
    with (contextlib.nullcontext() if process_group is None else
          distributed.shared_bn_statistics(model, start, stop, len(chunks), process_group)):
        for s in chunks[start:stop]:
            inputs = x[s] if penalty is None else x[s].detach().requires_grad_(True)
            outputs = model(inputs)
            loss = loss_fn(outputs, y[s])
            if penalty is not None:
                loss = loss + penalty(outputs, inputs)
            (loss * ((s.stop - s.start) / n)).backward()
            total_loss += loss.item() * (s.stop - s.start)
            if not y.is_floating_point():
                correct += (outputs.argmax(1) == y[s]).sum().item()
    if process_group is not None:
        total_loss, correct = distributed.all_reduce_gradients(model, total_loss, correct,
                                                               process_group)
    return total_loss / n, (correct / n if not y.is_floating_point() else None)


@torch.no_grad()
def evaluate(model, loss_fn, x, y, batch_size=None):
    """(mean loss, accuracy) of the model on (x, y) in eval mode, without gradients, in chunks
    of `batch_size` examples (memory only: eval-mode outputs do not depend on the chunking).
    The model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    n = len(x)
    total_loss, correct = 0.0, 0
    for s in index_chunks(n, batch_size):
        outputs = model(x[s])
        total_loss += loss_fn(outputs, y[s]).item() * (s.stop - s.start)
        if not y.is_floating_point():
            correct += (outputs.argmax(1) == y[s]).sum().item()
    model.train(was_training)
    return total_loss / n, (correct / n if not y.is_floating_point() else None)


def sgd(model, lr, momentum=0.0, weight_decay=0.0):
    """torch.optim.SGD over the model's parameters: v <- mu v + g + wd w; w <- w - lr v."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_step(model, optimizer, loss_fn, x, y, *, ghost_batch_size=None, rho=0.0, penalty=None):
    """One optimiser step on the mean loss over (x, y), the model in train mode.

    (x, y) is the whole training set for full-batch gradient descent, or one minibatch for
    SGD; either way it is split into ghost batches of `ghost_batch_size` (BN statistics per
    ghost batch; None: one batch). With rho > 0 the step is sharpness-aware minimisation
    [Foret et al. 2021]:

        g = grad L(w),  e = rho g / ||g||,  step with grad L(w + e)

    The optimizer (momentum, weight decay, learning rate) steps from w with that gradient; the
    perturbed pass leaves BN running statistics alone (they track w, not w + e). The step is
    skipped when the loss is not finite; the forward pass has then already put that batch's
    (non-finite) statistics into BN's running statistics, which is why every script records
    such a run as diverged and stops it. `penalty` (see `ghost_batch_gradient`, e.g. a multiple
    of `jacobian_penalty`) is added to the loss of every pass, the perturbed one included.

    Returns:
        (loss at w, accuracy at w) as floats (the loss with the penalty); accuracy is None for
        probability targets.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss, accuracy = ghost_batch_gradient(model, loss_fn, x, y, ghost_batch_size, penalty=penalty)
    if not math.isfinite(loss):
        return loss, accuracy
    if rho > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        scale = rho / norm.clamp_min(1e-12)
        with torch.no_grad():
            shifts = [p.grad * scale for p in params]
            for p, e in zip(params, shifts):
                p.add_(e)
        optimizer.zero_grad(set_to_none=True)
        with _frozen_bn_statistics(model):
            ghost_batch_gradient(model, loss_fn, x, y, ghost_batch_size, penalty=penalty)
        with torch.no_grad():
            for p, e in zip(params, shifts):
                p.sub_(e)
    optimizer.step()
    return loss, accuracy


def jacobian_penalty(outputs, inputs, generator, *, softmax=True, projections=1):
    """Random-projection estimate of the mean squared Frobenius norm of the input-output
    Jacobian [Hoffman et al. 2019], differentiable (double backward) for use as a regulariser:

        penalty = (K / P) sum_p (1/N) ||d (sum_i u_pi . g_i) / dX||^2,   g_i = softmax(outputs_i)

    with u_pi drawn uniformly from the unit sphere of R^K. E[u u^T] = I / K, so for independent
    examples (eval mode, or no BN) E[penalty] = (1/N) sum_i ||J_i||_F^2, J_i = d g_i / d x_i
    (K x D). In train mode BN couples the examples and the expectation also counts the small
    cross terms d g_i / d x_j (the squared Frobenius norm of d g(X) / dX, over N).

    Args:
        outputs: (N, K) logits computed from `inputs` with the graph kept.
        inputs: (N, ...) tensor that requires grad. generator: CPU torch.Generator (draws: one
            (N, K) standard normal per projection). softmax: g is the softmax (else the logits).
        projections: P, the number of random directions.
    Returns:
        scalar tensor whose gradient reaches the parameters.
    """
    if outputs.dim() != 2:
        raise ValueError(f"jacobian_penalty: outputs must be (N, K), got shape {tuple(outputs.shape)}")
    if not inputs.requires_grad:
        raise ValueError("jacobian_penalty: inputs must require grad")
    n, k = outputs.shape
    g = torch.softmax(outputs, dim=1) if softmax else outputs  # (N, K)
    total = 0.0
    for p in range(projections):
        u = torch.randn(n, k, generator=generator)
        u = (u / torch.linalg.vector_norm(u, dim=1, keepdim=True)).to(g.device, g.dtype)  # (N, K)
        (grad,) = torch.autograd.grad((g * u).sum(), inputs, create_graph=True,
                                      retain_graph=True)  # (N, ...)
        total = total + grad.square().sum()
    return total * (k / (projections * n))


def shuffled_batches(n, batch_size, generator, drop_last=False):
    """Index tensors of one epoch: a random permutation of range(n) cut into batches.

    Args:
        n: number of examples. batch_size: examples per batch (the last may be smaller unless
            drop_last). generator: CPU torch.Generator driving the permutation.
    Returns:
        list of (b,) int64 CPU tensors.
    """
    order = torch.randperm(n, generator=generator)
    batches = list(torch.split(order, batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def augment(x, p, generator, pad=4):
    """Standard CIFAR augmentation, each image independently with probability p.

    An augmented image is zero-padded by `pad` pixels on every side, cropped back to its size at
    a uniformly random offset, and flipped left-right with probability 1/2; the others are
    returned unchanged (offset `pad`, no flip). Zero is the mean colour of standardised data.

    Args:
        x: (N, C, H, W) images on any device. p: probability in [0, 1].
        generator: CPU torch.Generator (draws: N uniforms, N x 2 offsets, N flips, always, so
            the stream does not depend on p).
    Returns:
        (N, C, H, W) contiguous tensor on x's device.
    """
    n, c, h, w = x.shape
    apply = torch.rand(n, generator=generator) < p  # (N,)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)  # (N, 2) top, left
    flips = torch.rand(n, generator=generator) < 0.5  # (N,)
    offsets[~apply] = pad
    flips &= apply
    padded = F.pad(x, (pad, pad, pad, pad))  # (N, C, H + 2 pad, W + 2 pad)
    rows = (torch.arange(h)[None] + offsets[:, :1])  # (N, H)
    cols = torch.arange(w)[None].expand(n, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols) + offsets[:, 1:]  # (N, W)
    rows, cols = rows.to(x.device), cols.to(x.device)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]].contiguous()


def mixup(x, labels, beta, num_classes, generator):
    """Mixup [Zhang et al. 2018] with one coefficient per example.

    Example i becomes (1 - theta_i) (x_i, y_i) + theta_i (x_j, y_j), j = pi(i) for a random
    permutation pi of the batch, theta_i ~ Beta(beta, beta); beta = 0 is the limit
    Bernoulli(1/2) (each example replaced by itself or its partner, unmixed).

    Args:
        x: (N, ...) inputs. labels: (N,) class indices. beta: >= 0. num_classes: K.
        generator: CPU torch.Generator (the Beta draws use numpy seeded from it).
    Returns:
        (mixed x (N, ...) contiguous, soft targets (N, K) float) on x's device; the targets
        work with `cross_entropy`, which accepts probability targets (and smooths them).
    """
    n = len(x)
    partner = torch.randperm(n, generator=generator)
    if beta == 0:
        theta = (torch.rand(n, generator=generator) < 0.5).double()
    else:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        theta = torch.from_numpy(np.random.default_rng(seed).beta(beta, beta, size=n))
    theta = theta.to(x.device, x.dtype)  # (N,)
    partner = partner.to(x.device)
    onehot = F.one_hot(labels, num_classes).to(x.dtype)  # (N, K)
    t = theta.view(-1, *[1] * (x.dim() - 1))
    mixed = ((1 - t) * x + t * x[partner]).contiguous()  # elementwise ops keep x's layout
    targets = (1 - theta[:, None]) * onehot + theta[:, None] * onehot[partner]
    return mixed, targets


# The start-of-run gradient check (`gradient_check`) fails when the whole gradient's relative
# error exceeds GRADIENT_CHECK_TOLERANCE. Float32 against float64 is not bounded by a small
# multiple of eps here: a pre-activation within rounding of a ReLU's kink, or two near-equal
# inputs of a max-pool, take different branches in the two precisions, and BN in train mode
# amplifies that in narrow networks. Measured on contiguous inputs at initialisation (real
# CIFAR-10, first batches of 32, 125 and 256 images, 3 seeds, the VGG11 / ResNet18 widths and BN
# settings of the committed runs): up to 6e-3 (VGG11 width 1/8 with BN), 8e-4 without BN, 3e-6
# for the MLPs; the tolerance is 8 times the largest. The channels-last oneDNN fault measured
# 1e-3 to 4e-2 on such batches and 2.5 on others: the check stops gross failures (and crashes
# before training), the contiguous data path avoids the rest.
GRADIENT_CHECK_TOLERANCE = 0.05


@dataclass
class GradientCheck:
    """Outcome of `gradient_check`: `error` the whole gradient's relative error, `tolerance`
    the largest allowed, `worst` the parameter with the largest error norm and `worst_error`
    its own relative error."""
    error: float
    tolerance: float
    worst: str
    worst_error: float

    @property
    def passed(self):
        return self.error <= self.tolerance


def gradient_check(model, loss_fn, x, y):
    """Compares the float32 loss gradient training computes on one batch with a reference.

    g = grad loss_fn(model(x), y) as training computes it (x as given, train mode: BN uses the
    batch's statistics); r the same from a copy of the model in float64 on contiguous inputs (on
    a GPU: float32, contiguous); both without TF32. error = ||g - r|| / ||r||; the tolerance is
    explained at GRADIENT_CHECK_TOLERANCE. The model is left as it was: mode, buffers (BN running
    statistics) and `.grad` untouched (gradients through autograd.grad).

    Returns:
        GradientCheck.
    """
    cpu = x.device.type == "cpu"
    dtype = torch.float64 if cpu else torch.float32
    reference = copy.deepcopy(model).to(dtype)
    saved = [b.clone() for b in model.buffers()]
    was_training = model.training
    try:
        with no_tf32():
            got = _named_loss_gradient(model, loss_fn, x, y)
            want = _named_loss_gradient(reference, loss_fn, x.to(dtype).contiguous(),
                                        y.to(dtype) if y.is_floating_point() else y)
    finally:
        with torch.no_grad():
            for b, value in zip(model.buffers(), saved):
                b.copy_(value)
        model.train(was_training)
    diffs = {k: (got[k].to(dtype) - r).norm().item() for k, r in want.items()}
    scale = math.sqrt(sum(r.norm().item() ** 2 for r in want.values())) or 1e-300
    worst = max(diffs, key=diffs.get)
    return GradientCheck(error=math.sqrt(sum(d * d for d in diffs.values())) / scale,
                         tolerance=GRADIENT_CHECK_TOLERANCE, worst=worst,
                         worst_error=diffs[worst] / max(want[worst].norm().item(), 1e-300))


def _named_loss_gradient(model, loss_fn, x, y):
    """name -> d loss_fn(model(x), y) / d parameter, in train mode, through autograd.grad (so no
    `.grad` is written)."""
    model.train()
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g.detach() for (k, p), g in zip(named, grads)}


@contextlib.contextmanager
def _frozen_bn_statistics(model):
    """Context: BN layers normalise with batch statistics as usual but leave their running
    statistics as they were (momentum 0 makes the update r <- (1 - 0) r + 0 * batch_stat)."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.momentum is not None]
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
