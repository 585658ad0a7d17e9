"""Shared code for the reproduction of "On progressive sharpening, flat minima and
generalisation" (MacDonald, Valmadre, Lucey).

Sections, in order:
  1. Estimators: sharpness, Gauss-Newton norm, input-output Jacobian norm and the
     Lanczos / power eigen-solver behind them. Self-contained (imports torch only):
     copy the section whole into your own project.
  2. Data: CIFAR-10/100 as device tensors, standardisation, subsets, synthetic stand-ins.
  3. Models: MLPs, VGG11, ResNet18.
  4. Training: losses, ghost-batch full-batch gradient descent, SGD helpers.
  5. Runs: run directories, atomic saving, checkpoints, resume.
  6. Command line: shared flags and validation (one-line errors, exit status 2).
  7. Plotting: mean +- std bands from saved results.
"""
import math
from dataclasses import dataclass, field

import torch

# =============================================================================
# 1. Estimators
#    To copy this section into another project, it needs only:
#        from dataclasses import dataclass, field
#        import torch
# =============================================================================

# Why these choices (measured; see the README's "Estimators" section):
# - Hessian-vector products are reverse-over-reverse (double backward) with the first-order
#   graph built once per batch and reused across products. torch.func's reverse-over-forward
#   (grad of jvp) is silently wrong through train-mode BatchNorm, so it is not used.
# - BatchNorm in train mode must use each batch's own statistics without touching the running
#   statistics: during every forward pass the BN modules are switched to
#   `track_running_stats=False` (then F.batch_norm receives no running buffers), and restored.
# - Lanczos with full reorthogonalisation is the default solver: it needs about half the
#   products of power iteration for the same accuracy, and it stops on a bound of the error,
#   not on the change between iterates.

_BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)
_DROPOUT_TYPES = (torch.nn.modules.dropout._DropoutNd,)


@dataclass
class EigenResult:
    """Top eigenvalues of a symmetric operator and how they were found.

    Attributes:
        eigenvalues: the top-k eigenvalues, descending.
        eigenvectors: (dim, k) tensor of the matching unit eigenvectors.
        matvecs: number of operator products used.
        converged: whether every error estimate fell below `tol`.
        errors: estimated relative error of each eigenvalue (a bound for the power method;
            min(r, r^2/gap)/|theta| from the Ritz residual r for Lanczos).
        residuals: relative residual ||A v - theta v|| / |theta| of each returned pair.
        iterations: solver iterations run.
    """

    eigenvalues: list
    eigenvectors: torch.Tensor = field(repr=False)
    matvecs: int
    converged: bool
    errors: list
    residuals: list
    iterations: int


class _MeasureMode:
    """Context manager: put `model` into a measuring mode, restore every flag on exit.

    mode="train": BN normalises with the batch's own statistics and leaves its running
    statistics untouched (`track_running_stats=False` for the duration); dropout is off.
    mode="eval": the usual eval mode (BN uses running statistics; dropout off).
    Parameters and buffers are never written.
    """

    def __init__(self, model, mode):
        self.model, self.mode = model, mode

    def __enter__(self):
        modules = list(self.model.modules())
        self.saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in modules]
        self.model.train(self.mode == "train")
        for m in modules:
            if isinstance(m, _DROPOUT_TYPES):
                m.eval()
            if self.mode == "train" and isinstance(m, _BN_TYPES):
                m.track_running_stats = False
        return self.model

    def __exit__(self, *exc):
        for m, training, track in self.saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track
        return False


class _NoTF32:
    """Context manager: TensorFloat-32 off in cuDNN convolutions and CUDA matmuls, restored on
    exit. PyTorch lets cuDNN use TF32 (10 mantissa bits) for float32 convolutions by default;
    on an H100 that put errors of 9e-4 into the sharpness and 5e-3 into the Jacobian norm of a
    float32 VGG11, against 1e-6 without it. Every estimator runs inside this context."""

    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved
        return False

    def __call__(self, fn):  # as a decorator
        def wrapped(*args, **kwargs):
            with _NoTF32():
                return fn(*args, **kwargs)
        return wrapped


def _trainable_parameters(model):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    return params


def _unflatten(vector, params):
    """Split a flat (P,) vector into tensors shaped like `params`."""
    chunks = torch.split(vector, [p.numel() for p in params])
    return [c.view_as(p) for c, p in zip(chunks, params)]


def _flatten(tensors, params):
    """Concatenate per-parameter tensors into one flat (P,) vector (zeros where None)."""
    return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1)
                      for t, p in zip(tensors, params)])


def _check_batches(batches, model):
    """Validate `batches` and return it as a list of (x, y) on the model's device."""
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass at least one (x, y) pair")
    ref = next(iter(model.parameters()))
    checked, shape = [], None
    for i, pair in enumerate(batches):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"batch {i} is not an (x, y) pair")
        x, y = pair
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"batch {i}: inputs must be a floating-point tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if not torch.is_tensor(y) or len(x) != len(y):
            raise ValueError(f"batch {i}: x has {len(x)} examples but y has "
                             f"{len(y) if torch.is_tensor(y) else 'no tensor of'} targets")
        if len(x) == 0:
            raise ValueError(f"batch {i} is empty")
        if shape is not None and x.shape[1:] != shape:
            raise ValueError(f"batch {i}: example shape {tuple(x.shape[1:])} differs from "
                             f"batch 0's {tuple(shape)}")
        shape = x.shape[1:]
        checked.append((x.to(ref.device, ref.dtype), y.to(ref.device)))
    return checked


def _check_solver_options(k, tol, max_iter, method):
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if method not in _SOLVERS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(_SOLVERS)}")


def hessian_operator(model, loss_fn, batches, reuse_graph=True):
    """Hessian-vector product of the mean loss over all examples in `batches`.

    The loss is L(theta) = sum_b (n_b / N) * loss_fn(model(x_b), y_b), with n_b the size of
    batch b and N = sum_b n_b, so every example counts equally. BatchNorm is in train mode
    with each batch's own statistics (ghost batches); running statistics are not touched.

    Args:
        model: a torch.nn.Module; products are w.r.t. its trainable parameters, flattened
            in `model.parameters()` order.
        loss_fn: loss_fn(outputs, targets) -> batch-mean scalar.
        batches: sequence of (x, y) pairs.
        reuse_graph: build each batch's first-order graph once and reuse it for every
            product (about 2/3 the cost of a product; memory of one double-backward graph
            per batch). False rebuilds it per product.

    Returns:
        (matvec, dim): matvec(v) = H v for a flat (dim,) vector v.
    """
    matvec, dim, _ = _hessian_operator(model, loss_fn, batches, reuse_graph)
    return matvec, dim


def _hessian_operator(model, loss_fn, batches, reuse_graph):
    """`hessian_operator`'s (matvec, dim) and the flat mean-loss gradient (P,), read off the
    reused first-order graphs at no cost (None when reuse_graph=False)."""
    batches = _check_batches(batches, model)
    params = _trainable_parameters(model)
    total = sum(len(x) for x, _ in batches)

    @_NoTF32()
    @torch.enable_grad()
    def batch_gradient(x, y):
        with _MeasureMode(model, "train"):
            loss = loss_fn(model(x), y)
        return torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)

    graphs = [batch_gradient(x, y) for x, y in batches] if reuse_graph else None
    gradient = None
    if reuse_graph:
        gradient = sum((len(x) / total) * _flatten([None if g is None else g.detach()
                                                    for g in grads], params)
                       for (x, _), grads in zip(batches, graphs))

    @_NoTF32()
    @torch.enable_grad()
    def matvec(v):
        vs = _unflatten(v.to(params[0].dtype), params)
        out = torch.zeros_like(v, dtype=params[0].dtype)
        for i, (x, y) in enumerate(batches):
            grads = graphs[i] if reuse_graph else batch_gradient(x, y)
            used = [(g, u) for g, u in zip(grads, vs) if g is not None and g.requires_grad]
            hv = torch.autograd.grad([g for g, _ in used], params, [u for _, u in used],
                                     retain_graph=reuse_graph, allow_unused=True)
            out += (len(x) / total) * _flatten(hv, params)
        return out

    return matvec, sum(p.numel() for p in params), gradient


def _output_hessian_factor(loss_fn, outputs, targets):
    """Return u -> H_z u, H_z = Hessian of loss_fn(z, targets) w.r.t. z at z = outputs."""
    z = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (gz,) = torch.autograd.grad(loss_fn(z, targets), z, create_graph=True)
    if not gz.requires_grad:  # loss linear in z: H_z = 0
        return lambda u: torch.zeros_like(u)
    return lambda u: torch.autograd.grad(gz, z, u, retain_graph=True)[0]


def gauss_newton_operator(model, loss_fn, batches):
    """Gauss-Newton-vector product G v with G = (1/N) sum_i J_i^T H_i J_i.

    J_i is the Jacobian of example i's outputs w.r.t. the trainable parameters and H_i the
    Hessian of its loss w.r.t. those outputs (for a batch-mean loss_fn the batch's H_z
    already carries 1/n_b; batches are weighted by n_b/N). G is never formed: per product,
    J v comes from a double vector-Jacobian product through a graph built once per batch,
    and J^T (H J v) from one vector-Jacobian product. BatchNorm is in train mode with each
    batch's own statistics (so J couples the examples of a batch); running statistics are
    not touched.

    Returns:
        (matvec, dim): matvec(v) = G v for a flat (dim,) vector v.
    """
    batches = _check_batches(batches, model)
    params = _trainable_parameters(model)
    total = sum(len(x) for x, _ in batches)
    pieces = []
    for x, y in batches:
        with _MeasureMode(model, "train"), torch.enable_grad(), _NoTF32():
            z = model(x)  # (n_b, C)
        dummy = torch.zeros_like(z, requires_grad=True)
        # J^T dummy as a differentiable function of dummy: differentiating it w.r.t. dummy
        # along v gives J v without forward-mode AD.
        with torch.enable_grad(), _NoTF32():
            jt_dummy = torch.autograd.grad(z, params, dummy, create_graph=True,
                                           allow_unused=True)
        pieces.append((z, dummy, jt_dummy, _output_hessian_factor(loss_fn, z, y), len(x)))

    def matvec(v):
        vs = _unflatten(v.to(params[0].dtype), params)
        out = torch.zeros_like(v, dtype=params[0].dtype)
        for z, dummy, jt_dummy, hz, n in pieces:
            used = [(g, u) for g, u in zip(jt_dummy, vs) if g is not None and g.requires_grad]
            (jv,) = torch.autograd.grad([g for g, _ in used], dummy, [u for _, u in used],
                                        retain_graph=True)
            jthjv = torch.autograd.grad(z, params, hz(jv), retain_graph=True, allow_unused=True)
            out += (n / total) * _flatten(jthjv, params)
        return out

    return _NoTF32()(torch.enable_grad()(matvec)), sum(p.numel() for p in params)


def _start_vectors(dim, k, generator, device, dtype, start=None):
    """(dim, k) orthonormal Gaussian start, drawn on the CPU in float64 so a seed gives the
    same start on every device. A `start` direction is added, with equal weight, to the first
    random vector: the mix keeps a random component (so no eigenvector is missed for want of
    overlap) and the start's overlap with the wanted eigenvectors."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    q = torch.randn(dim, k, generator=generator, dtype=torch.float64)
    if start is not None:
        s = start.detach().reshape(-1).to("cpu", torch.float64)
        norm = torch.linalg.vector_norm(s)
        if torch.isfinite(norm) and norm > 0:
            q[:, 0] = q[:, 0] / torch.linalg.vector_norm(q[:, 0]) + s / norm
    return torch.linalg.qr(q)[0].to(device=device, dtype=dtype)


def _lanczos(matvec, dim, k, tol, max_iter, generator, device, dtype, start=None):
    """Lanczos with full reorthogonalisation for the k largest (algebraic) eigenvalues.

    After m steps the Ritz pairs (theta_j, y_j) of the tridiagonal T_m estimate the top
    eigenpairs; the residual of pair j is r_j = |beta_m * s_{m,j}| (s: eigenvectors of T_m).
    For a symmetric operator some eigenvalue lies within min(r_j, r_j^2 / gap_j) of theta_j
    (Kato-Temple, gap_j estimated from the next Ritz value); we stop once that bound is
    below tol * |theta_j| for every j <= k.
    """
    steps = min(max_iter, dim)
    q = _start_vectors(dim, 1, generator, device, dtype, start)[:, 0]
    # the basis grows by doubling: memory follows the steps taken, not max_iter
    basis = torch.empty(min(steps + 1, 16), dim, device=device, dtype=dtype)  # (rows, P)
    basis[0] = q
    alphas, betas = [], []
    converged, m = False, 0
    for m in range(1, steps + 1):
        w = matvec(basis[m - 1])
        alphas.append(torch.dot(w, basis[m - 1]).item())
        # full reorthogonalisation, twice ("twice is enough")
        for _ in range(2):
            w = w - basis[:m].T @ (basis[:m] @ w)
        beta = torch.linalg.vector_norm(w).item()
        theta, s = _tridiagonal_eigh(alphas, betas)
        errors, residuals = _ritz_errors(theta, s, beta, k)
        if len(theta) >= k and all(e <= tol for e in errors):
            converged = True
            break
        if beta <= 1e-12 * max(1.0, abs(theta[0])):  # invariant subspace found: exact
            errors, residuals = [0.0] * len(errors), [0.0] * len(residuals)
            converged = len(theta) >= k
            break
        betas.append(beta)
        if m == len(basis):
            grown = torch.empty(min(2 * m, steps + 1), dim, device=device, dtype=dtype)
            grown[:m] = basis
            basis = grown
        basis[m] = w / beta
    k_found = min(k, len(theta))
    vectors = basis[:m].T @ s[:, :k_found].to(device=device, dtype=dtype)  # (P, k)
    return EigenResult(theta[:k_found].tolist(), vectors, m, converged, errors, residuals, m)


def _tridiagonal_eigh(alphas, betas):
    """Eigenpairs of the Lanczos tridiagonal, descending (float64, CPU)."""
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    return theta.flip(0), s.flip(1)


def _ritz_errors(theta, s, beta, k):
    """Relative error bounds and residuals of the top-k Ritz values."""
    res = (beta * s[-1, :].abs()).tolist()
    theta = theta.tolist()
    errors, residuals = [], []
    for j in range(min(k, len(theta))):
        scale = max(abs(theta[j]), 1e-30)
        gap = theta[j] - theta[j + 1] - res[j + 1] if j + 1 < len(theta) else 0.0
        bound = min(res[j], res[j] ** 2 / gap) if gap > 0 else res[j]
        errors.append(bound / scale)
        residuals.append(res[j] / scale)
    return errors, residuals


def _power(matvec, dim, k, tol, max_iter, generator, device, dtype, start=None):
    """Power (subspace) iteration with Rayleigh-Ritz for the k largest-magnitude eigenvalues.

    Kept for parity with the paper, which used the power method. Stops when every relative
    residual ||A v_j - theta_j v_j|| / |theta_j| <= tol, a bound on the relative eigenvalue
    error for symmetric operators (unlike a stop on the change between iterates).
    """
    v = _start_vectors(dim, k, generator, device, dtype, start)  # (P, k)
    matvecs, converged, it = 0, False, 0
    for it in range(1, max_iter + 1):
        av = torch.stack([matvec(v[:, j]) for j in range(k)], dim=1)  # (P, k)
        matvecs += k
        small = v.T @ av  # (k, k) Rayleigh quotient
        small = (small + small.T) / 2
        theta, s = torch.linalg.eigh(small.double())
        order = theta.abs().argsort(descending=True)
        theta, s = theta[order], s[:, order].to(dtype)
        ritz, aritz = v @ s, av @ s
        res = torch.linalg.vector_norm(aritz - ritz * theta.to(dtype), dim=0).double()
        residuals = (res / theta.abs().clamp_min(1e-30)).tolist()
        if all(r <= tol for r in residuals):
            converged = True
            break
        v = torch.linalg.qr(aritz)[0]
    values = theta.tolist()
    order = sorted(range(k), key=lambda j: -values[j])
    return EigenResult([values[j] for j in order], ritz[:, order], matvecs, converged,
                       [residuals[j] for j in order], [residuals[j] for j in order], it)


_SOLVERS = {"lanczos": _lanczos, "power": _power}


def top_eigenvalues(matvec, dim, k=1, method="lanczos", tol=1e-5, max_iter=100,
                    generator=None, device=None, dtype=torch.float32, start=None):
    """Top-k eigenvalues of a symmetric linear operator given only its products.

    Args:
        matvec: v -> A v for flat (dim,) tensors; A must be symmetric.
        dim: the operator's size.
        k: how many eigenvalues.
        method: "lanczos" (default; k largest algebraic eigenvalues, full
            reorthogonalisation, vectors kept on `device`) or "power" (subspace iteration;
            k largest in magnitude, as in the paper).
        tol: stop once every eigenvalue's estimated relative error is below tol.
        max_iter: most Lanczos steps / power iterations.
        generator: torch.Generator (CPU) for the start vector; default seed 0.
        device, dtype: of the vectors (those of the operator's inputs).
        start: optional (dim,) direction mixed, with equal weight, into the random start
            (e.g. a guess of the top eigenvector); None: a purely random start.

    Returns:
        EigenResult with eigenvalues descending and diagnostics.
    """
    _check_solver_options(k, tol, max_iter, method)
    if dim < k:
        raise ValueError(f"k={k} exceeds the operator's dimension {dim}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _SOLVERS[method](matvec, dim, k, tol, max_iter, generator, device, dtype, start)


def _operator_eigenvalues(operator, model, k, method, tol, max_iter, generator, return_info,
                          start=None):
    matvec, dim = operator
    ref = next(iter(model.parameters()))
    result = top_eigenvalues(matvec, dim, k, method, tol, max_iter, generator,
                             ref.device, ref.dtype, start)
    if return_info:
        return result
    return result.eigenvalues[0] if k == 1 else result.eigenvalues


def sharpness(model, loss_fn, batches, *, k=1, method="lanczos", tol=1e-5, max_iter=100,
              generator=None, reuse_graph=True, gradient_start=True, return_info=False):
    """Sharpness: the largest eigenvalue of the loss Hessian w.r.t. the trainable parameters.

        lambda_max( d^2/dtheta^2 [ (1/N) sum_i loss(f(x_i; theta), y_i) ] )

    The mean runs over every example in `batches` (each batch weighted by its size).
    BatchNorm: train mode, each batch normalised with its own statistics (ghost batches);
    running statistics, parameters and training flags are left exactly as they were.
    Dropout is off while measuring.

    Args:
        model: torch.nn.Module (CPU or CUDA, float32 or float64).
        loss_fn: loss_fn(outputs, targets) -> batch-mean scalar, e.g. F.cross_entropy
            (label_smoothing allowed; targets may be indices or probability vectors).
        batches: sequence of (x, y) pairs.
        k: number of top eigenvalues (k > 1 returns a descending list).
        method: "lanczos" (default) or "power".
        tol: relative error target of the eigenvalue estimate (see `top_eigenvalues`).
        max_iter: most products / iterations.
        generator: torch.Generator for the random start (default: seed 0).
        reuse_graph: see `hessian_operator`.
        gradient_start: mix the loss gradient (free from the reused graph) into the random
            start vector. The gradient lies largely in the top Hessian eigenspace (Gur-Ari et
            al., 2018), so Lanczos needs fewer products; the random part keeps the start
            generic. Ignored when reuse_graph=False.
        return_info: return the full `EigenResult` (eigenvalues, products, convergence).

    Returns:
        float (k == 1), list of floats (k > 1) or EigenResult (return_info=True).
    """
    _check_solver_options(k, tol, max_iter, method)
    matvec, dim, gradient = _hessian_operator(model, loss_fn, batches, reuse_graph)
    return _operator_eigenvalues((matvec, dim), model, k, method, tol, max_iter, generator,
                                 return_info, gradient if gradient_start else None)


def gauss_newton_norm(model, loss_fn, batches, *, k=1, method="lanczos", tol=1e-5,
                      max_iter=100, generator=None, return_info=False):
    """Spectral norm of the Gauss-Newton matrix (its largest eigenvalue; G is PSD for a
    convex loss):

        G = (1/N) sum_i J_i^T H_i J_i,  J_i = d f(x_i) / d theta,  H_i = d^2 loss_i / d f^2

    Same conventions, options and returns as `sharpness` (BN in train mode with batch
    statistics, model state untouched). See `gauss_newton_operator`.
    """
    _check_solver_options(k, tol, max_iter, method)
    operator = gauss_newton_operator(model, loss_fn, batches)
    return _operator_eigenvalues(operator, model, k, method, tol, max_iter, generator,
                                 return_info)


def _sample_jacobian_norms_exact(out, x):
    """Per-sample spectral norms from C vector-Jacobian products.

    In eval mode sample i's outputs depend on x_i alone, so the gradient of sum_i out[i, c]
    w.r.t. x is row c of every per-sample Jacobian J_i (C, D) at once. Then
    ||J_i||_2 = sqrt(lambda_max(J_i J_i^T)), a C x C eigenproblem per sample.
    """
    n, c = out.shape
    rows = [torch.autograd.grad(out[:, j].sum(), x, retain_graph=j + 1 < c)[0].reshape(n, -1)
            for j in range(c)]
    jac = torch.stack(rows, dim=1)  # (n, C, D)
    gram = (jac @ jac.transpose(1, 2)).double()  # (n, C, C)
    return torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt()


def _sample_jacobian_norms_power(out, x, tol, max_iter, generator):
    """Per-sample spectral norms by power iteration on J_i^T J_i, all samples at once.

    J v comes from a double vector-Jacobian product (graph built once), J^T u from one
    vector-Jacobian product. Stops when every sample's relative residual
    ||J^T J v - s^2 v|| / s^2 <= tol.
    """
    n = out.shape[0]
    dummy = torch.zeros_like(out, requires_grad=True)
    (jt_dummy,) = torch.autograd.grad(out, x, dummy, create_graph=True)  # (n, *x)
    v = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x)
    v = v / torch.linalg.vector_norm(v.reshape(n, -1), dim=1).view(-1, *[1] * (x.dim() - 1))
    sq = torch.zeros(n, dtype=x.dtype, device=x.device)
    for _ in range(max_iter):
        (jv,) = torch.autograd.grad(jt_dummy, dummy, v, retain_graph=True)  # (n, C)
        (jtjv,) = torch.autograd.grad(out, x, jv, retain_graph=True)  # (n, *x)
        sq = (jv * jv).sum(1)  # (n,) Rayleigh quotients v^T J^T J v
        flat_v, flat_a = v.reshape(n, -1), jtjv.reshape(n, -1)
        res = torch.linalg.vector_norm(flat_a - sq[:, None] * flat_v, dim=1)
        if bool((res <= tol * sq.clamp_min(1e-30)).all()):
            break
        norms = torch.linalg.vector_norm(flat_a, dim=1).clamp_min(1e-30)
        v = (flat_a / norms[:, None]).view_as(v)
    return sq.double().clamp_min(0).sqrt()


def jacobian_norm(model, x, softmax=True, *, batch_size=256, method="auto", tol=1e-6,
                  max_iter=200, generator=None, return_per_sample=False):
    """Largest input-output Jacobian spectral norm over the samples of x.

        max_i || d g(x_i) / d x_i ||_2,   g = softmax o model (or model, softmax=False)

    BatchNorm in eval mode (running statistics), so each sample's output depends on that
    sample alone; dropout off; the model's state is left exactly as it was.

    Args:
        model: torch.nn.Module mapping (N, *D) inputs to (N, C) logits.
        x: (N, *D) floating-point inputs.
        softmax: differentiate the softmaxed outputs (the paper's choice) or the logits.
        batch_size: samples per chunk (memory: batch_size * C * D numbers for "exact").
        method: "exact" (C vector-Jacobian products and a C x C eigenproblem per sample),
            "power" (per-sample power iteration on J^T J, for very large C) or "auto"
            (exact when C <= 128).
        tol, max_iter, generator: for method "power".
        return_per_sample: return the (N,) tensor of per-sample norms instead of the max.

    Returns:
        float, or a float64 (N,) CPU tensor if return_per_sample.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if len(x) == 0:
        raise ValueError("x is empty")
    if method not in ("auto", "exact", "power"):
        raise ValueError(f"unknown method {method!r}; choose from ['auto', 'exact', 'power']")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    ref = next(iter(model.parameters()))
    norms = []
    with _MeasureMode(model, "eval"), torch.enable_grad(), _NoTF32():
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(ref.device, ref.dtype).requires_grad_(True)
            out = model(xb)  # (n, C)
            if softmax:
                out = torch.softmax(out, dim=1)
            use_exact = method == "exact" or (method == "auto" and out.shape[1] <= 128)
            if use_exact:
                norms.append(_sample_jacobian_norms_exact(out, xb).cpu())
            else:
                norms.append(_sample_jacobian_norms_power(out, xb, tol, max_iter,
                                                          generator).cpu())
    norms = torch.cat(norms)
    return norms if return_per_sample else norms.max().item()


# =============================================================================
# 2. Data
# =============================================================================

# Sections 2-7 need more than torch; section 1 stays torch-only, so these imports live here.
import argparse
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# Data sets are registries from name to number of classes. The real ones load
# `<root>/<name>.npz` (uint8 x_train (N, 32, 32, 3), int64 y_train, x_test, y_test, classes);
# the synthetic ones are stand-ins of the same shapes, used only when asked for by name.
DATASETS = {"cifar10": 10, "cifar100": 100, "synthetic-cifar10": 10, "synthetic-cifar100": 100}
STANDARDISATIONS = ("component", "channel", "none")


@dataclass
class Data:
    """A data set as tensors on one device: images (N, C, H, W) float32, labels (N,) int64."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: list = field(default_factory=list)


def dataset_path(name, root):
    """Where the npz cache of a real data set lives: `<root>/<name>.npz`."""
    return Path(root) / f"{name}.npz"


def is_synthetic(name):
    return name.startswith("synthetic-")


def download_dataset(name, root):
    """Downloads CIFAR-10/100 once through torchvision and writes the npz cache; returns its path.

    CIFAR-100 keeps its fine labels (torchvision's default). The raw download goes to a temporary
    folder inside `root` and is deleted once the npz has been written (atomically).
    """
    import torchvision  # imported here: only a download needs it

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    path = dataset_path(name, root)
    Path(root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-download-") as tmp:
        train = cls(tmp, train=True, download=True)
        test = cls(tmp, train=False, download=True)
        arrays = dict(x_train=np.asarray(train.data, dtype=np.uint8),
                      y_train=np.asarray(train.targets, dtype=np.int64),
                      x_test=np.asarray(test.data, dtype=np.uint8),
                      y_test=np.asarray(test.targets, dtype=np.int64),
                      classes=np.asarray(train.classes))
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return path


@functools.lru_cache(maxsize=2)
def synthetic_arrays(num_classes, seed=0, n_train=50000, n_test=10000):
    """A learnable stand-in with CIFAR's shapes: a random template per class plus pixel noise.

    Returns read-only numpy arrays (cached) with the npz layout (x uint8 (N, 32, 32, 3), y int64).
    """
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(num_classes, 32, 32, 3), dtype=np.uint8)

    def split(n):
        y = rng.integers(0, num_classes, size=n, dtype=np.int64)
        noise = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        x = (templates[y] >> 1) + (noise >> 1)  # half template, half noise; stays in uint8
        return x, y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    classes = np.asarray([f"class{k}" for k in range(num_classes)])
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=classes)
    for a in arrays.values():
        a.flags.writeable = False  # shared by every caller through the cache
    return arrays


def load_arrays(name, root="data", download=False):
    """The data set's numpy arrays (npz layout). Raises FileNotFoundError if absent and not allowed
    to download; synthetic sets are generated (deterministically) instead of read."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r} (choose from {', '.join(DATASETS)})")
    if is_synthetic(name):
        return synthetic_arrays(DATASETS[name])
    path = dataset_path(name, root)
    if not path.exists():
        if not download:
            raise FileNotFoundError(missing_data_message(name, root))
        download_dataset(name, root)
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes")}


def missing_data_message(name, root):
    return (f"data set {name} not found at {dataset_path(name, root)}: point --data-root at the "
            f"folder holding {name}.npz, or pass --download to fetch it through torchvision")


def to_images(x_uint8):
    """uint8 (N, H, W, C) numpy -> float32 (N, C, H, W) tensor in [0, 1]."""
    x_uint8 = x_uint8 if x_uint8.flags.writeable else x_uint8.copy()  # torch wants writable
    return torch.from_numpy(x_uint8).permute(0, 3, 1, 2).float().div_(255)


def standardisation_stats(x_uint8, mode, chunk=5000):
    """Mean and std of images for standardisation (sums exact in int64, then float64).

    Args:
        x_uint8: uint8 numpy images (N, H, W, C) whose statistics are measured.
        mode: "component": every one of the C*H*W coordinates gets its own mean and std (shapes
            (1, C, H, W)); "channel": one mean and std per colour channel, over all pixels and
            samples (shapes (1, C, 1, 1)); "none": mean 0, std 1. Pixels are scaled to [0, 1].
    """
    if mode not in STANDARDISATIONS:
        raise ValueError(f"unknown standardisation {mode!r} (choose from {STANDARDISATIONS})")
    n, h, w, c = x_uint8.shape
    if mode == "none":
        return torch.zeros(1, c, 1, 1), torch.ones(1, c, 1, 1)
    total = np.zeros((h, w, c), np.int64)
    total_sq = np.zeros((h, w, c), np.int64)
    for start in range(0, n, chunk):
        xb = x_uint8[start:start + chunk].astype(np.int32)  # (B, H, W, C)
        total += xb.sum(0, dtype=np.int64)
        total_sq += (xb * xb).sum(0, dtype=np.int64)
    count = n
    if mode == "channel":
        total, total_sq, count = total.sum((0, 1)), total_sq.sum((0, 1)), n * h * w  # (C,)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0))
    shape = (1, c, h, w) if mode == "component" else (1, c, 1, 1)
    mean, std = (torch.from_numpy(np.moveaxis(a / 255, -1, 0).copy()).float().reshape(shape)
                 for a in (mean, std))  # channels first
    return mean, std.clamp_min(1e-8)  # constant coordinates stay finite


def subset_indices(n_total, n=None, seed=None):
    """Indices of a subset: all if n is None, the first n if seed is None, else n drawn without
    replacement by a generator seeded with `seed` (returned sorted, so order follows the data)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    if seed is None:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


def load_data(name, root="data", *, device="cpu", standardise="component", train_size=None,
              train_seed=None, test_size=None, test_seed=None, download=False):
    """CIFAR-10/100 (or a synthetic stand-in) as standardised tensors on `device`.

    Standardisation statistics are measured on the whole training split (before subsetting) and
    applied to both splits. Subsets: see `subset_indices`.
    """
    arrays = load_arrays(name, root, download)
    mean, std = standardisation_stats(arrays["x_train"], standardise)

    def split(x, y, n, seed):
        idx = subset_indices(len(x), n, seed).numpy()
        images = (to_images(x[idx]) - mean) / std  # (N, C, H, W)
        return images.to(device), torch.from_numpy(y[idx]).long().to(device)

    x_train, y_train = split(arrays["x_train"], arrays["y_train"], train_size, train_seed)
    x_test, y_test = split(arrays["x_test"], arrays["y_test"], test_size, test_seed)
    return Data(x_train, y_train, x_test, y_test, DATASETS[name], [str(c) for c in arrays["classes"]])


# =============================================================================
# 3. Models
# =============================================================================

class Gaussian(nn.Module):
    """Gaussian activation exp(-x^2 / (2 sigma^2)), as in coordinate networks."""

    def __init__(self, sigma=0.1):
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        return torch.exp(-x.square() / (2 * self.sigma ** 2))

    def extra_repr(self):
        return f"sigma={self.sigma}"


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gaussian": Gaussian}


def _init_default(linear, std):
    linear.reset_parameters()  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias


def _init_normal(linear, std):
    nn.init.normal_(linear.weight, 0.0, std)
    nn.init.normal_(linear.bias, 0.0, std)


def _init_kaiming_normal(linear, std):
    nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
    nn.init.zeros_(linear.bias)


def _init_xavier_normal(linear, std):
    nn.init.xavier_normal_(linear.weight)
    nn.init.zeros_(linear.bias)


# Initialisations of one nn.Linear: (linear, std) -> None. "normal" draws weights and biases
# from N(0, std^2); the others ignore std.
INITS = {"default": _init_default, "normal": _init_normal,
         "kaiming_normal": _init_kaiming_normal, "xavier_normal": _init_xavier_normal}


class MLP(nn.Sequential):
    """Fully-connected network: flatten, then `depth` linear layers of width `width` with the
    activation between them (none after the last).

    Args:
        in_features, out_features: input size (after flattening) and number of outputs.
        width: hidden width. depth: number of linear layers (>= 1).
        activation: key of ACTIVATIONS. sigma: width of the Gaussian activation.
        init: key of INITS; init_std: the std for "normal".
    """

    def __init__(self, in_features, out_features, width=200, depth=3, activation="relu",
                 init="default", init_std=1.0, sigma=0.1):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (choose from {', '.join(ACTIVATIONS)})")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r} (choose from {', '.join(INITS)})")
        sizes = [in_features] + [width] * (depth - 1) + [out_features]
        layers = [nn.Flatten()]
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i > 0:
                layers.append(Gaussian(sigma) if activation == "gaussian" else ACTIVATIONS[activation]())
            linear = nn.Linear(fan_in, fan_out)
            INITS[init](linear, init_std)
            layers.append(linear)
        super().__init__(*layers)

    def linears(self):
        """The linear layers, first to last."""
        return [m for m in self if isinstance(m, nn.Linear)]

    def features(self, x):
        """The last hidden layer's features (N, width): the input of the last linear layer."""
        for module in list(self)[:-1]:
            x = module(x)
        return x


def _scaled(channels, width):
    """Channel count `channels * width`, rounded to the nearest integer, at least 1."""
    return max(1, round(channels * width))


def _check_model_args(num_classes, width):
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")


# VGG11 is configuration "A" of chengyangfu/pytorch-vgg-cifar10's vgg.py: numbers are conv
# output channels, "M" is a 2x2 max-pool.
VGG11_CONFIG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG11(nn.Module):
    """VGG11 for 32x32 inputs: chengyangfu/pytorch-vgg-cifar10's `vgg11_bn` without dropout.

    features: per entry of VGG11_CONFIG, conv3x3(padding 1) -> [BatchNorm2d] -> ReLU, or a
    2x2 max-pool; classifier: Linear(512, 512) -> ReLU -> Linear(512, 512) -> ReLU ->
    Linear(512, num_classes). The source's two Dropout layers are removed (paper, B.1/B.2).
    With `batch_norm=False` the BatchNorm2d layers are dropped and nothing takes their place;
    the convolutions keep their biases either way, as in the source's `vgg11` and `vgg11_bn`.

    Initialisation as in the source: conv weights ~ N(0, 2 / (3 * 3 * out_channels)) and conv
    biases zero; Linear and BatchNorm layers keep PyTorch's defaults.

    Args:
        num_classes: number of outputs (10 for CIFAR-10, 100 for CIFAR-100).
        batch_norm: whether each conv is followed by BatchNorm2d.
        width: channel multiplier; every conv and hidden Linear width is scaled and rounded
            (at least 1). 1.0 is the paper's model.
    """

    def __init__(self, *, num_classes=10, batch_norm=True, width=1.0):
        super().__init__()
        _check_model_args(num_classes, width)
        layers, in_channels = [], 3
        for v in VGG11_CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_channels = _scaled(v, width)
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU())  # out of place (the source's is in place) for torch.func
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        hidden = _scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        # Same rule and order as the source, so a seeded width-1 model equals the source's.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / n))
                    m.bias.zero_()

    def forward(self, x):  # x: (N, 3, 32, 32)
        x = self.features(x)  # (N, C, 1, 1), C = 512 * width
        return self.classifier(x.flatten(1))  # (N, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block (kuangliu/pytorch-cifar): two conv3x3 plus a shortcut.

    out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), where the shortcut is the
    identity, or conv1x1(stride) -> BN when the shape changes. Convs have no bias, as in the
    source; with `batch_norm=False` each BN is an identity.
    """

    def __init__(self, in_planes, planes, stride=1, batch_norm=True):
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            layers = [nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(planes))
            self.shortcut = nn.Sequential(*layers)

    def forward(self, x):  # x: (N, in_planes, H, W)
        out = F.relu(self.bn1(self.conv1(x)))  # (N, planes, H / stride, W / stride)
        out = self.bn2(self.conv2(out))
        # Out-of-place add (the source's is in place) so torch.func transforms compose.
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 for 32x32 inputs: kuangliu/pytorch-cifar's models/resnet.py, BasicBlock [2,2,2,2].

    conv3x3(3, 64) -> BN -> ReLU, four stages of two BasicBlocks with 64, 128, 256, 512
    planes (strides 1, 2, 2, 2), 4x4 average pool, Linear(512, num_classes). Convs have no
    bias, as in the source. With `batch_norm=False` every BatchNorm2d is removed and nothing
    takes its place (the source has no BN-free variant; the convs stay bias-free, so the only
    change is the missing BN). Initialisation: PyTorch's defaults, as in the source.

    Args:
        num_classes: number of outputs (10 for CIFAR-10, 100 for CIFAR-100).
        batch_norm: whether BatchNorm2d layers are present.
        width: channel multiplier; every stage's planes are scaled and rounded (at least 1).
            1.0 is the paper's model.
    """

    def __init__(self, *, num_classes=10, batch_norm=True, width=1.0):
        super().__init__()
        _check_model_args(num_classes, width)
        planes = [_scaled(p, width) for p in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0]) if batch_norm else nn.Identity()
        blocks, in_planes = [], planes[0]
        for p, stride in zip(planes, (1, 2, 2, 2)):
            blocks.append(nn.Sequential(BasicBlock(in_planes, p, stride, batch_norm),
                                        BasicBlock(p, p, 1, batch_norm)))
            in_planes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.linear = nn.Linear(planes[3], num_classes)

    def forward(self, x):  # x: (N, 3, 32, 32)
        out = F.relu(self.bn1(self.conv1(x)))  # (N, 64w, 32, 32)
        out = self.layer1(out)  # (N, 64w, 32, 32)
        out = self.layer2(out)  # (N, 128w, 16, 16)
        out = self.layer3(out)  # (N, 256w, 8, 8)
        out = self.layer4(out)  # (N, 512w, 4, 4)
        out = F.avg_pool2d(out, 4)  # (N, 512w, 1, 1)
        return self.linear(out.flatten(1))  # (N, num_classes)


# Constructors sharing the keyword signature (num_classes=10, batch_norm=True, width=1.0).
MODELS = {"vgg11": VGG11, "resnet18": ResNet18}


def build_model(name, **kwargs):
    """The model registered as `name` in MODELS, built with `kwargs`; ValueError if unknown."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choices: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


# =============================================================================
# 4. Training
# =============================================================================

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


def index_chunks(n, chunk_size=None):
    """Slices covering range(n) in order, each of at most chunk_size (all of it if None)."""
    size = n if chunk_size is None else max(1, int(chunk_size))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def full_batch_gradient(model, loss_fn, x, y, chunk_size=None):
    """Accumulates into `.grad` the gradient of the mean loss over all of (x, y).

    grad (1/N) sum_i l_i = sum_k (n_k / N) grad mean_{i in chunk k} l_i, so each chunk's mean
    loss is weighted by its size. The model keeps its mode: in train mode a BN net normalises
    each chunk with its own statistics, i.e. every chunk is a ghost batch [Cohen et al. 2021].

    Returns:
        (mean loss, accuracy) over the data as floats; accuracy is None unless y holds class
        indices. Gradients add to existing `.grad` (zero them first).
    """
    n = len(x)
    total_loss, correct = 0.0, 0
    for s in index_chunks(n, chunk_size):
        outputs = model(x[s])
        loss = loss_fn(outputs, y[s])
        (loss * ((s.stop - s.start) / n)).backward()
        total_loss += loss.item() * (s.stop - s.start)
        if not y.is_floating_point():
            correct += (outputs.argmax(1) == y[s]).sum().item()
    return total_loss / n, (correct / n if not y.is_floating_point() else None)


@torch.no_grad()
def evaluate(model, loss_fn, x, y, chunk_size=None, train_mode=False):
    """(mean loss, accuracy) of the model on (x, y) without gradients, in eval mode unless
    train_mode; the model's mode is restored afterwards."""
    was_training = model.training
    model.train(train_mode)
    n = len(x)
    total_loss, correct = 0.0, 0
    for s in index_chunks(n, chunk_size):
        outputs = model(x[s])
        total_loss += loss_fn(outputs, y[s]).item() * (s.stop - s.start)
        if not y.is_floating_point():
            correct += (outputs.argmax(1) == y[s]).sum().item()
    model.train(was_training)
    return total_loss / n, (correct / n if not y.is_floating_point() else None)


def sgd(model, lr, momentum=0.0, weight_decay=0.0):
    """torch.optim.SGD over the model's parameters: v <- mu v + g + wd w; w <- w - lr v."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def gradient_descent_step(model, optimizer, loss_fn, x, y, chunk_size=None):
    """One full-batch (ghost-batch) gradient step on all of (x, y); returns (loss, accuracy)
    measured at the parameters before the step. The step is skipped if the loss is not finite."""
    optimizer.zero_grad(set_to_none=True)
    loss, accuracy = full_batch_gradient(model, loss_fn, x, y, chunk_size)
    if math.isfinite(loss):
        optimizer.step()
    return loss, accuracy


def seed_everything(seed):
    """Seeds torch (CPU and CUDA) and numpy; returns a torch.Generator seeded the same way."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    return torch.Generator().manual_seed(seed)


# (progressive-sharpening additions go here)

# Measurements shared by fullbatch.py (Appendix B.1) and vgg_sgd.py (Appendix C.1): both track
# sharpness, the softmaxed model's Jacobian norm and the excess loss on a fixed subset of the
# training set during training.

def excess_loss(loss, smoothing, num_classes):
    """Cross entropy minus the label entropy: 0 at a perfect fit for every smoothing, so losses
    with different smoothings share one axis (the paper's Figure 1 and Section 5)."""
    return loss - label_entropy(smoothing, num_classes)


@torch.no_grad()
def output_norm(model, x, chunk_size=None):
    """Frobenius norm ||f(X)||_F of the (N, K) logits over the inputs x, in eval mode (BN running
    statistics, as for the Jacobian norm); the model's mode is restored and nothing is written."""
    total = 0.0
    with _MeasureMode(model, "eval"):
        for s in index_chunks(len(x), chunk_size):
            total += model(x[s]).double().square().sum().item()
    return math.sqrt(total)


def sharpening_measurements(model, loss_fn, x, y, *, ghost_batch_size=None, tol=1e-3,
                            max_iter=100, with_output_norm=False):
    """What the progressive-sharpening figures plot, measured on a fixed subset (x, y).

    sharpness: top Hessian eigenvalue of the mean loss over (x, y), BN in train mode with each
        ghost batch of `ghost_batch_size` examples normalised by its own statistics (Lanczos,
        relative error `tol`; `sharpness_matvecs` products were used).
    jacobian: largest spectral norm over x of d softmax(f(x)) / dx, BN in eval mode.
    output_norm (if asked): Frobenius norm of the (N, K) logits, eval mode.
    Pure: parameters, buffers, `.grad` and training flags are left as they were.

    Returns:
        dict of floats.
    """
    batches = [(x[s], y[s]) for s in index_chunks(len(x), ghost_batch_size)]
    info = sharpness(model, loss_fn, batches, tol=tol, max_iter=max_iter, return_info=True)
    row = {"sharpness": info.eigenvalues[0], "sharpness_matvecs": info.matvecs,
           "jacobian": jacobian_norm(model, x, softmax=True)}
    if with_output_norm:
        row["output_norm"] = output_norm(model, x, ghost_batch_size)
    return row


# --- regularisers: augmentation, mixup, SAM (train_regularisers.py, batch_lr.py) ---------------
#
# All randomness comes from an explicit CPU torch.Generator (so a checkpoint can save its state
# and a resumed run draws the same numbers); the draws are small and moved to the data's device,
# the images never leave it.
import contextlib


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
        (N, C, H, W) tensor on x's device.
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
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def mixup(x, labels, beta, num_classes, generator):
    """Mixup [Zhang et al. 2018] with one coefficient per example.

    Example i becomes (1 - theta_i) (x_i, y_i) + theta_i (x_j, y_j), j = pi(i) for a random
    permutation pi of the batch, theta_i ~ Beta(beta, beta); beta = 0 is the limit
    Bernoulli(1/2) (each example replaced by itself or its partner, unmixed).

    Args:
        x: (N, ...) inputs. labels: (N,) class indices. beta: >= 0. num_classes: K.
        generator: CPU torch.Generator (the Beta draws use numpy seeded from it).
    Returns:
        (mixed x (N, ...), soft targets (N, K) float) on x's device; the targets work with
        `cross_entropy`, which accepts probability targets (and smooths them).
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
    mixed = (1 - t) * x + t * x[partner]
    targets = (1 - theta[:, None]) * onehot + theta[:, None] * onehot[partner]
    return mixed, targets


@contextlib.contextmanager
def _frozen_bn_statistics(model):
    """Context: BN layers normalise with batch statistics as usual but leave their running
    statistics as they were (momentum 0 makes the update r <- (1 - 0) r + 0 * batch_stat)."""
    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.momentum is not None]
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


def sam_step(model, optimizer, loss_fn, x, y, rho=0.0):
    """One minibatch step of sharpness-aware minimisation [Foret et al. 2021]; rho = 0 is SGD.

        g = grad L_B(w),  e = rho g / ||g||,  update with grad L_B(w + e)

    The optimizer (momentum, weight decay, learning rate) then steps from w with that gradient.
    With rho = 0 there is a single forward/backward and the step is exactly the optimizer's
    plain step. The perturbed pass leaves BN running statistics alone (they track w, not w + e).
    The step is skipped when the loss is not finite.

    Returns:
        (loss at w, accuracy at w) as floats; accuracy is None for probability targets.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    outputs = model(x)
    loss = loss_fn(outputs, y)
    loss.backward()
    value = loss.item()
    accuracy = None if y.is_floating_point() else (outputs.argmax(1) == y).float().mean().item()
    if not math.isfinite(value):
        return value, accuracy
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
            loss_fn(model(x), y).backward()
        with torch.no_grad():
            for p, e in zip(params, shifts):
                p.sub_(e)
    optimizer.step()
    return value, accuracy


def final_metrics(model, loss_fn, data, seed, *, measure_size, ghost_batch, eig_tol=1e-4,
                  eig_max_iter=100, gauss_newton=False, chunk_size=1000):
    """End-of-training measurements of a sweep cell, on clean data, without weight decay.

    train_loss / test_loss / *_accuracy: eval mode over the whole splits; gap = |test - train|
    (the paper's generalisation gap). On `measure_size` training examples drawn with `seed`
    (the model's seed): sharpness (and the Gauss-Newton norm if asked) of `loss_fn` with BN in
    train mode over ghost batches of `ghost_batch`, and the softmax Jacobian norm in eval mode.

    Returns:
        dict of floats.
    """
    train_loss, train_accuracy = evaluate(model, loss_fn, data.x_train, data.y_train, chunk_size)
    test_loss, test_accuracy = evaluate(model, loss_fn, data.x_test, data.y_test, chunk_size)
    idx = subset_indices(len(data.x_train), measure_size, seed).to(data.x_train.device)
    x, y = data.x_train[idx], data.y_train[idx]  # (M, C, H, W), (M,)
    batches = [(x[s], y[s]) for s in index_chunks(len(x), ghost_batch)]
    out = dict(train_loss=train_loss, test_loss=test_loss, gap=abs(test_loss - train_loss),
               train_accuracy=train_accuracy, test_accuracy=test_accuracy)
    if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
        return out
    out["sharpness"] = sharpness(model, loss_fn, batches, tol=eig_tol, max_iter=eig_max_iter)
    if gauss_newton:
        out["gauss_newton"] = gauss_newton_norm(model, loss_fn, batches, tol=eig_tol,
                                                max_iter=eig_max_iter)
    out["jacobian"] = jacobian_norm(model, x, softmax=True)
    return out


# =============================================================================
# 5. Runs
# =============================================================================

def atomic_write(path, write, mode="wb"):
    """Writes a file by `write(f)` on a temporary file next to it, then os.replace: readers see
    the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name opened with "x" (not mkstemp, whose files are private 0600): the file gets
    # the permissions any other file written here would get.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _jsonable(obj):
    """Non-finite floats become None (strict JSON has no NaN); tensors and numpy become lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_json(path, obj):
    """Atomically writes obj as JSON (NaN and inf stored as null)."""
    text = json.dumps(_jsonable(obj), indent=1, allow_nan=False)
    atomic_write(path, lambda f: f.write(text + "\n"), mode="w")


def load_json(path):
    with open(path) as f:
        return json.load(f)


def save_torch(path, obj):
    atomic_write(path, lambda f: torch.save(obj, f))


def config_hash(config):
    """8 hex digits identifying a resolved config (key order does not matter)."""
    text = json.dumps(_jsonable(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_name(config, keys):
    """Directory name of a run: the `keys` settings readable, then a hash of the whole config,
    e.g. "activation=relu_scale=0.5_trial=0-3f2a9c1e". Two configs differing anywhere (say a
    smoke run and the paper's run) never share a directory."""
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    readable = "_".join(f"{k}={fmt(config[k])}" for k in keys)
    readable = "".join(c if c.isalnum() or c in "=._-" else "-" for c in readable)
    return f"{readable}-{config_hash(config)}"


class Run:
    """One run's directory: config.json, metrics.json, checkpoint.pt while running, result.json
    when over (finished or diverged). All writes are atomic.

    Use:
        run = Run(out, config, keys=("activation", "trial"))
        if run.done: return run.load()           # finished earlier: skip
        state = run.begin()                      # None, or the last checkpoint's state
        ... run.log(step, loss=...); run.checkpoint(lambda: {...}) ...
        run.finish("finished" or "diverged", **summary)
    """

    def __init__(self, out, config, keys, checkpoint_seconds=300.0):
        self.config = dict(config)
        self.dir = Path(out) / run_name(self.config, keys)
        self.metrics = []
        self.checkpoint_seconds = checkpoint_seconds
        self._last_checkpoint = time.monotonic()

    @property
    def done(self):
        return (self.dir / "result.json").exists()

    def begin(self, device="cpu"):
        """Creates the directory and config.json (resolved config, seed, torch version, device);
        returns the last checkpoint's state dict, restoring the metrics logged up to it, or None."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"config": self.config, "seed": self.config.get("seed"), "torch": torch.__version__,
                "device": str(device), "python": sys.version.split()[0], "argv": sys.argv,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if (self.dir / "config.json").exists():  # resuming: keep the first record, note the restart
            old = load_json(self.dir / "config.json")
            meta = {**old, "resumed": old.get("resumed", []) + [
                {"device": str(device), "torch": torch.__version__, "at": meta["started"]}]}
        save_json(self.dir / "config.json", meta)
        self._last_checkpoint = time.monotonic()
        path = self.dir / "checkpoint.pt"
        if not path.exists():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=False)
        self.metrics = saved["metrics"]
        return saved["state"]

    def log(self, step, **metrics):
        """Records metrics measured at `step` (floats; NaN allowed)."""
        self.metrics.append({"step": int(step), **{k: _plain(v) for k, v in metrics.items()}})

    def checkpoint(self, state, force=False):
        """Saves state() (e.g. model and optimizer state dicts, next step) with the metrics so far,
        if `checkpoint_seconds` have passed since the last save or force; returns whether it did."""
        if not force and time.monotonic() - self._last_checkpoint < self.checkpoint_seconds:
            return False
        save_torch(self.dir / "checkpoint.pt", {"state": state(), "metrics": self.metrics})
        save_json(self.dir / "metrics.json", self.metrics)
        self._last_checkpoint = time.monotonic()
        return True

    def finish(self, status="finished", **summary):
        """Writes metrics.json and result.json (status: "finished" or "diverged", plus summary);
        the checkpoint is then deleted. A rerun skips a run with result.json."""
        save_json(self.dir / "metrics.json", self.metrics)
        save_json(self.dir / "result.json", {"status": status, **summary,
                                             "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        (self.dir / "checkpoint.pt").unlink(missing_ok=True)

    def load(self):
        return load_run(self.dir)


def training_state(next_step, model, optimizer=None, **extra):
    """What a checkpoint needs to continue a run exactly: the next step, model and optimizer
    state dicts, torch's RNG state, and any extra picklable items."""
    return {"step": next_step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": torch.get_rng_state(), **extra}


def restore_training_state(state, model, optimizer=None):
    """Loads a `training_state` into model and optimizer; returns the step to continue from."""
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"]


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def load_run(run_dir):
    """A saved run as {"dir", "config", "meta", "metrics", "result"}; NaN stored as null comes
    back as NaN in metrics."""
    run_dir = Path(run_dir)
    meta = load_json(run_dir / "config.json")
    metrics = load_json(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else []
    metrics = [{k: (math.nan if v is None else v) for k, v in m.items()} for m in metrics]
    result = load_json(run_dir / "result.json") if (run_dir / "result.json").exists() else None
    return {"dir": run_dir, "config": meta["config"], "meta": meta, "metrics": metrics, "result": result}


def load_saved(out, configs, keys):
    """The saved runs (finished or diverged) of these configs, in order; runs not saved (yet)
    are left out. Plotting reads results through this alone, so `--plot-only` needs no training."""
    runs = [Run(out, config, keys) for config in configs]
    return [run.load() for run in runs if run.done]


def saved_runs_or_fail(out, configs, keys):
    """The saved runs of these configs (see load_saved); exits 2 with one line if there are
    none, and prints which of them diverged. What every script plots from."""
    runs = load_saved(out, configs, keys)
    if not runs:
        fail(f"no saved results for these settings under {out}: run without --plot-only first")
    diverged = [run_name(r["config"], keys) for r in runs if r["result"]["status"] == "diverged"]
    if diverged:
        print(f"diverged (non-finite loss): {', '.join(diverged)}")
    return runs


def metric_series(run, name):
    """(steps, values) numpy arrays of one metric of a loaded run, NaN where it was not finite."""
    rows = [m for m in run["metrics"] if name in m]
    steps = np.array([m["step"] for m in rows], dtype=np.int64)
    values = np.array([math.nan if m[name] is None else m[name] for m in rows], dtype=np.float64)
    return steps, values


# =============================================================================
# 6. Command line
# =============================================================================

def fail(msg, prog=None):
    """Prints one line `<prog>: error: <msg>` to stderr and exits with status 2 (no traceback).
    Scripts validate everything with it before writing anything."""
    prog = prog or Path(sys.argv[0]).name
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse's own error prints the usage too)."""

    def error(self, message):
        fail(message, self.prog)


def make_parser(doc, *, trials, out):
    """A parser with the shared flags: --device, --data-root, --out, --trials, --seed, --smoke,
    --plot-only. Scripts add their own flags (paper settings as defaults) to it."""
    parser = ArgumentParser(description=doc.strip().splitlines()[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("shared")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda if available, else cpu")
    g.add_argument("--data-root", default="data", help="folder holding cifar10.npz / cifar100.npz")
    g.add_argument("--download", action="store_true",
                   help="allow downloading a missing data set through torchvision (writes the npz)")
    g.add_argument("--out", default=out, help="results folder (one subfolder per run)")
    g.add_argument("--trials", type=int, default=trials, help="independent trials per setting")
    g.add_argument("--seed", type=int, default=0, help="base seed; trial t uses seed + t")
    g.add_argument("--smoke", action="store_true", help="tiny config, well under a minute on a CPU")
    g.add_argument("--plot-only", action="store_true", help="only redraw plots from saved results")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def parse_with_smoke(parser, argv, smoke):
    """Parses argv; with --smoke, the `smoke` settings replace the defaults first, so flags given
    explicitly still win (`--smoke --trials 1`)."""
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args


def check(condition, msg):
    """fail(msg) unless condition."""
    if not condition:
        fail(msg)


def check_common(args, *, dataset=None):
    """Validates the shared flags (and the data set, if the script reads one) before anything is
    written: trials >= 1, seed >= 0, --out not a file, CUDA present if asked for, data present
    (or --download given) unless only plotting."""
    check(args.trials >= 1, f"--trials must be at least 1, got {args.trials}")
    check(args.seed >= 0, f"--seed must be non-negative, got {args.seed}")
    check(not Path(args.out).is_file(), f"--out {args.out} is a file, not a folder")
    check(args.device != "cuda" or torch.cuda.is_available(), "--device cuda: CUDA is not available")
    if dataset is not None and not args.plot_only:
        check(dataset in DATASETS, f"unknown data set {dataset!r}")
        if not is_synthetic(dataset) and not args.download:
            check(dataset_path(dataset, args.data_root).exists(),
                  missing_data_message(dataset, args.data_root))


def check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        check(all(v > 0 for v in values), f"--{name.replace('_', '-')} must be positive, got {value}")


def check_unit_interval(args, *names):
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        check(all(0 <= v <= 1 for v in values),
              f"--{name.replace('_', '-')} must lie in [0, 1], got {value}")


def resolve_device(name):
    """torch.device for "auto" (cuda if available, else cpu), "cpu" or "cuda"."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def progress(iterable=None, *, disable=False, **kwargs):
    """A tqdm progress bar on stderr (plain periodic lines when stderr is not a terminal)."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, disable=disable, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5 if interactive else 30.0, **kwargs)


# --- sweep grids (batch_lr.py, train_regularisers.py) ------------------------------------------
#
# A sweep is a list of cells, each a full resolved config (trial included). `--list-grid` prints
# it, `--grid-index i` runs cell i alone (one Slurm array task), `--plot-only` loads every cell
# that has finished (load_saved). A cell's run directory is named by its config (see run_name), so array
# tasks never collide and a rerun skips finished cells.


def load_cell_data(config, args, device):
    """A sweep cell's data set on the device, standardised per channel (whole-training-split
    statistics); a train_size / test_size subset is drawn with seed 0, the same for every cell."""
    return load_data(config["dataset"], args.data_root, device=device, standardise="channel",
                     train_size=config["train_size"], train_seed=0,
                     test_size=config["test_size"], test_seed=0, download=args.download)


def build_cell_model(config, num_classes, device):
    """A sweep cell's model, initialised from the cell's seed (BN unless config says otherwise)."""
    torch.manual_seed(config["seed"])
    return build_model(config["model"], num_classes=num_classes,
                       batch_norm=config.get("batch_norm", True), width=config["width"]).to(device)


def train_selected_cells(args, cells, keys, train):
    """Runs train(config, args, data, device) for every cell selected by --grid-index (all if
    absent) that is not finished yet, keeping one data set on the device at a time."""
    device = resolve_device(args.device)
    pending = [c for c in selected_cells(args, cells) if not Run(args.out, c, keys).done]
    data = {}
    for config in pending:
        if config["dataset"] not in data:
            data = {config["dataset"]: load_cell_data(config, args, device)}
        train(config, args, data[config["dataset"]], device)


def grid(**axes):
    """Cartesian product of the given lists, the last axis varying fastest.

    grid(lr=[0.1, 0.01], trial=[0, 1]) -> [{"lr": 0.1, "trial": 0}, {"lr": 0.1, "trial": 1}, ...]
    """
    import itertools
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
    """--list-grid, --grid-index, --checkpoint-every and the end-of-training measurement flags."""
    g = parser.add_argument_group("grid")
    g.add_argument("--list-grid", action="store_true",
                   help="print the grid (index, run name) and exit; '# N cells' comes last")
    g.add_argument("--grid-index", type=int, default=None,
                   help="run only this cell of the grid (a Slurm array task id)")
    g.add_argument("--checkpoint-every", type=float, default=300.0,
                   help="seconds between checkpoints of a running cell")
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


def sweep_correlations(runs, gap="gap", against=("jacobian", "sharpness")):
    """{"n": cells used, "tau_gap_<m>": Kendall tau of gap against m} over the finished (not
    diverged) runs, each cell (trial) one point."""
    done = [r for r in runs if r["result"]["status"] == "finished"]

    def values(metric):
        return [math.nan if r["result"].get(metric) is None else r["result"][metric] for r in done]

    return {"n": len(done), **{f"tau_{gap}_{m}": kendall_tau(values(gap), values(m)) for m in against}}


def plot_sweep(ax, runs, x_key, style_key, metric, *, style_label=None, log_x=False, log_y=False):
    """One panel: end-of-training `metric` against config[x_key], a line (mean +- std over
    trials, markers at the measured points) per value of config[style_key]. Cells that diverged
    are drawn as an 'x' at the top edge of the panel above their x, in their line's colour."""
    from matplotlib.transforms import blended_transform_factory
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for i, style in enumerate(sorted({r["config"][style_key] for r in runs})):
        mine = [r for r in runs if r["config"][style_key] == style]
        xs = sorted({r["config"][x_key] for r in mine})
        stats = []
        for xv in xs:
            values = [r["result"].get(metric) for r in mine
                      if r["config"][x_key] == xv and r["result"]["status"] == "finished"]
            values = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
            values = values[np.isfinite(values)]
            if len(values):
                stats.append((xv, values.mean(), values.std()))
        color = f"C{i}"
        if stats:
            sx, mean, std = map(np.array, zip(*stats))
            ax.plot(sx, mean, linestyle=LINESTYLES[i % len(LINESTYLES)], marker=".", color=color,
                    label=f"{style_label or style_key} = {style:g}")
            ax.fill_between(sx, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        diverged = sorted({r["config"][x_key] for r in mine if r["result"]["status"] == "diverged"})
        if diverged:
            ax.plot(diverged, [0.97] * len(diverged), "x", color=color, transform=top,
                    clip_on=False, label=f"diverged ({style_label or style_key} = {style:g})")
    if log_x:  # ticks at the swept values, labelled plainly (64, 128, ... not 10^2)
        from matplotlib.ticker import NullFormatter
        ax.set_xscale("log")
        values = sorted({r["config"][x_key] for r in runs})
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:  # few, compact ticks: weight decays like 0.0005 would otherwise collide
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


# =============================================================================
# 7. Plotting
# =============================================================================

# matplotlib's object API (Figure, no pyplot): no global backend is set or needed.
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]


def mean_std(series):
    """Mean and std over trials of curves measured at (possibly different) steps.

    Args:
        series: list of (steps, values) pairs, one per trial.
    Returns:
        steps (union, sorted), mean, std (numpy, ddof=0), count: trials with a finite value at
        each step. A trial that stopped early (diverged) leaves the later means to the rest.
    """
    steps = np.unique(np.concatenate([np.asarray(s) for s, _ in series])) if series else np.array([])
    table = np.full((len(series), len(steps)), np.nan)
    for i, (s, v) in enumerate(series):
        table[i, np.searchsorted(steps, s)] = v
    count = np.isfinite(table).sum(0)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, quietly
        mean, std = np.nanmean(table, 0), np.nanstd(table, 0)
    return steps, mean, std, count


def plot_band(ax, series, label=None, linestyle="-", color=None):
    """Draws the mean over trials as a line and mean +- std as a shaded band."""
    steps, mean, std, _ = mean_std(series)
    (line,) = ax.plot(steps, mean, linestyle=linestyle, color=color, label=label)
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def new_figure(nrows=1, ncols=1, panel_size=(3.6, 2.8)):
    """(Figure, 2-D array of axes), without pyplot."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes


def save_figure(fig, stem, dpi=110):
    """Writes `<stem>.png` and `<stem>.pdf` atomically; returns their paths."""
    paths = []
    for ext in ("png", "pdf"):
        path = Path(f"{stem}.{ext}")
        atomic_write(path, lambda f: fig.savefig(f, format=ext, dpi=dpi))
        paths.append(path)
    return paths


def plot_runs(runs, metrics, style_key, *, labels=None, style_label=None, title=None,
              xlabel="iteration", log_metrics=(), ncols=None):
    """One panel per metric; one line (mean +- std over the runs sharing a setting) per value
    of config[style_key], told apart by line style. Reads only loaded runs (see load_run).

    Args:
        runs: loaded runs (trials of several settings).
        metrics: metric names, one panel each. labels: metric name -> axis label.
        style_key: the config key whose values get a line style each.
        log_metrics: metrics drawn on a log scale. ncols: panels per row (all in one row if None).
    Returns:
        the Figure; fig.axes[i] is the panel of metrics[i].
    """
    labels = labels or {}
    settings = sorted({r["config"][style_key] for r in runs})
    ncols = ncols or len(metrics)
    fig, axes = new_figure(math.ceil(len(metrics) / ncols), ncols)
    for ax in axes.flat[len(metrics):]:
        fig.delaxes(ax)  # unused panels of the last row
    for ax, metric in zip(axes.flat, metrics):
        for i, value in enumerate(settings):
            trials = [metric_series(r, metric) for r in runs if r["config"][style_key] == value]
            plot_band(ax, trials, label=f"{style_label or style_key} = {value}",
                      linestyle=LINESTYLES[i % len(LINESTYLES)], color=f"C{i}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(labels.get(metric, metric))
        if metric in log_metrics:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
