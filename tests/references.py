"""Tiny float64 models and dense references for the estimators and measurements, built
independently of common/: Hessians and Jacobians column by column with torch.func.jvp,
BN train mode by hand. Shared by test_estimators.py and test_measurements.py."""
import functools
import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacrev

# ----------------------------------------------------------------------------- fixtures


def mlp(act, seed=0, d_in=5, width=7, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), act(), nn.Linear(width, classes)).double()


class TinyCNN(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> pool -> Linear, a few hundred params."""

    def __init__(self, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(16, classes)

    def forward(self, x):  # (N, 2, 4, 4) -> (N, classes)
        return self.head(self.dropout(self.features(x)))


def cnn(seed=0):
    model = TinyCNN(seed=seed).double()
    # non-default running statistics, so eval mode differs from train mode and any update
    # of them would show
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + .5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return model


def class_batches(sizes, shape, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=torch.float64),
             torch.randint(classes, (n,), generator=g)) for n in sizes]


def soft_batches(sizes, shape, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=torch.float64),
             torch.softmax(2 * torch.randn(n, classes, generator=g, dtype=torch.float64), 1))
            for n in sizes]


def regression_batches(sizes, shape, outputs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=torch.float64),
             torch.randn(n, outputs, generator=g, dtype=torch.float64)) for n in sizes]


# ------------------------------------------------------------------ dense references


class batch_stats_mode:
    """Reference BN handling, written independently of common.MeasureMode: train-mode BN
    without running statistics, dropout off."""

    def __init__(self, model, train):
        self.model, self.train = model, train

    def __enter__(self):
        self.state = {m: (m.training, getattr(m, "track_running_stats", None))
                      for m in self.model.modules()}
        self.model.train(self.train)
        for m in self.model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
            if self.train and isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False

    def __exit__(self, *exc):
        for m, (training, track) in self.state.items():
            m.training = training
            if track is not None:
                m.track_running_stats = track


def dense_jacobian(f, x0):
    """Jacobian of f at x0, one forward-mode product per input coordinate.

    No vmap: in torch 2.14 vmapped transforms (jacrev, jacfwd, hessian) give wrong
    second derivatives for train-mode BatchNorm weights (up to 300% off; see
    test_dense_reference_matches_finite_differences), while plain jvp is right."""
    eye = torch.eye(x0.numel(), dtype=x0.dtype).view(-1, *x0.shape)
    cols = [torch.func.jvp(f, (x0,), (e,))[1] for e in eye]
    return torch.stack(cols, dim=-1)  # (*f(x0).shape, x0.numel())


def flat_function(model, trainable_only=False):
    """(flat parameter vector, flat -> {name: tensor}) over all parameters, or over those that
    require gradients."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    names = [n for n, _ in named]
    params = [p.detach() for _, p in named]
    flat0 = torch.cat([p.reshape(-1) for p in params])

    def unflat(flat):
        out, i = {}, 0
        for n, p in zip(names, params):
            out[n] = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
        return out
    return flat0, unflat


# jvp(grad(F.mse_loss)) raises "ZeroTensors are immutable"; the reference uses the formula.
REFERENCE_LOSS = {F.mse_loss: lambda z, y: ((z - y) ** 2).mean()}


_CACHE = {}


def _content_key(kind, model, loss_fn, batches):
    """Everything a dense reference depends on: the model's class, flags, parameters and buffers,
    the loss function (by identity) and the batches' values."""
    h = hashlib.sha256(f"{kind} {type(model).__name__} {id(loss_fn)}".encode())
    h.update(repr([m.training for m in model.modules()]).encode())
    h.update(repr([p.requires_grad for p in model.parameters()]).encode())
    for k, t in model.state_dict().items():
        h.update(k.encode() + str(t.dtype).encode() + t.detach().cpu().numpy().tobytes())
    for x, y in batches:
        h.update(x.detach().cpu().numpy().tobytes() + str(tuple(x.shape)).encode())
        h.update(y.detach().cpu().numpy().tobytes() + str(tuple(y.shape)).encode())
    return h.hexdigest()


def cached(kind):
    """Memoise a dense reference on the content of its inputs (they cost seconds each, and
    several tests need the same one); a copy is returned so callers may modify it."""
    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(model, loss_fn, batches):
            key = _content_key(kind, model, loss_fn, batches)
            if key not in _CACHE:
                _CACHE[key] = fn(model, loss_fn, batches)
            return _CACHE[key].clone()
        return wrapper
    return wrap


@cached("hessian")
def dense_hessian(model, loss_fn, batches):
    loss_fn = REFERENCE_LOSS.get(loss_fn, loss_fn)
    flat0, unflat = flat_function(model)
    total = sum(len(x) for x, _ in batches)

    def loss(flat):
        return sum(len(x) / total * loss_fn(functional_call(model, unflat(flat), (x,)), y)
                   for x, y in batches)
    with batch_stats_mode(model, train=True):
        return dense_jacobian(torch.func.grad(loss), flat0)


@cached("gauss-newton")
def dense_gauss_newton(model, loss_fn, batches):
    flat0, unflat = flat_function(model)
    total = sum(len(x) for x, _ in batches)
    g = torch.zeros(len(flat0), len(flat0), dtype=torch.float64)
    with batch_stats_mode(model, train=True):
        for x, y in batches:
            z0 = functional_call(model, unflat(flat0), (x,))
            jac = dense_jacobian(lambda f: functional_call(model, unflat(f), (x,)), flat0)
            hz = jacrev(jacrev(lambda z: loss_fn(z, y)))(z0)  # (n, C, n, C); no BN here
            nc = z0.numel()
            jac, hz = jac.reshape(nc, -1), hz.reshape(nc, nc)
            g += len(x) / total * jac.T @ hz @ jac
    return g


def dense_jacobian_norms(model, x, softmax):
    with batch_stats_mode(model, train=False):
        def f(xi):
            out = model(xi[None])[0]
            return torch.softmax(out, 0) if softmax else out
        return torch.stack([torch.linalg.matrix_norm(jacrev(f)(xi).reshape(-1, xi.numel()), 2)
                            for xi in x])


def top_dense(matrix, k=1):
    return torch.linalg.eigvalsh(matrix).flip(0)[:k]


def rel(a, b):
    return abs(a - b) / abs(b)


def state_of(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            [getattr(m, "track_running_stats", None) for m in model.modules()])


def assert_same_state(model, before):
    params, flags, tracks = before
    after = model.state_dict()
    assert after.keys() == params.keys()
    for k in params:
        assert torch.equal(after[k], params[k]), f"{k} changed"
    assert [m.training for m in model.modules()] == flags
    assert [getattr(m, "track_running_stats", None) for m in model.modules()] == tracks
