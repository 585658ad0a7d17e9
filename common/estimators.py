"""Sharpness, Gauss-Newton norm and input-output Jacobian norm of a PyTorch model.

Copy this file into your own project: it needs only torch and the standard library.

    from estimators import sharpness, gauss_newton_norm, jacobian_norm
    lam = sharpness(model, loss_fn, [(x1, y1), (x2, y2)])  # top Hessian eigenvalue, mean loss
    g = gauss_newton_norm(model, loss_fn, batches)         # top eigenvalue of (1/N) sum J^T H_z J
    j = jacobian_norm(model, x)                            # max_i ||d softmax(f(x_i)) / d x_i||_2

Contents: the measuring mode (`MeasureMode`, `no_tf32`), the Hessian and Gauss-Newton operators,
the Lanczos and power eigen-solvers (`top_eigenvalues`, `EigenResult`), the three estimators and
`MappingInput`.

Inputs: `batches` is a sequence of (x, y) pairs, x a tensor (model(x); integer tokens allowed
except in `jacobian_norm`, passed as they are) or a dict of tensors (model(**x), keyword inputs as
in HuggingFace; for a model called with one mapping, model(x_dict), pass MappingInput(model));
batch sizes and sequence lengths may differ. `output_fn` selects a tensor from dict or tuple
outputs (lambda out: out["logits"]). `loss_fn` must average over examples (sums are refused where
detectable). BatchNorm: `bn_mode="train"` (batch statistics, default) or "eval" (running
statistics) for the curvature; eval for the Jacobian. Floating-point inputs are fed contiguous in
the model's dtype.

Across processes (torch.distributed, e.g. launched by torchrun): after init_process_group, pass
`process_group="world"` (the default group) or a group from torch.distributed.new_group, and
each rank its own batches (its own inputs for `jacobian_norm`); every rank then returns the
value of one process holding all of them. "world" or a group given before init_process_group
is refused (ValueError). Without process_group (None, the default) the computation is local
whatever the distributed state, even inside a DDP job; torch.distributed.group.WORLD is None
before init_process_group, so passing it there silently gives that local value: pass "world".

Why these choices (measured with torch 2.14 in the reproduction this file comes from, "On
progressive sharpening, flat minima and generalisation"; the benchmarks/ and tests/ paths in
these docstrings are that repository's):
- Hessian-vector products are reverse-over-reverse (double backward autograd) with the
  first-order graph built once per batch and reused across products. torch.func's transforms
  (grad of jvp, jacrev of jacrev) gave second derivatives up to 300% off through train-mode
  BatchNorm in torch 2.14, so they are not used.
- BatchNorm in train mode must use each batch's own statistics without touching the running
  statistics: during every forward pass the BN modules are switched to
  `track_running_stats=False` (then F.batch_norm receives no running buffers), and restored.
  Every other module is in eval mode while measuring (dropout, attention dropout off), so a
  measurement is deterministic.
- Fused attention kernels (flash / memory-efficient scaled_dot_product_attention, used by
  nn.MultiheadAttention and nn.TransformerEncoderLayer) have no double backward: the forward
  passes select the math backend (torch.nn.attention.sdpa_kernel), and restore the user's
  choice after.
- Lanczos with full reorthogonalisation is the default solver: it needs about half the
  products of power iteration for the same accuracy, and it stops on a bound of the error,
  not on the change between iterates.
"""
import contextlib
import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

# Module types the measuring mode switches: every BatchNorm (1d/2d/3d, SyncBatchNorm) and dropout
# (dropout, like every module but BN, is in eval mode while measuring).
BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)
DROPOUT_TYPES = (torch.nn.modules.dropout._DropoutNd,)


class ConvergenceWarning(RuntimeWarning):
    """An eigen-solver stopped at max_iter before reaching its tolerance."""


@dataclass
class EigenResult:
    """Top eigenvalues of a symmetric operator and how they were found.

    Attributes:
        eigenvalues: the top-k eigenvalues, descending.
        eigenvectors: (dim, k) tensor of the matching unit eigenvectors.
        matvecs: number of operator products used (Lanczos: verification included).
        converged: every error estimate fell below `tol` (Lanczos: after the `guarantee`'s
            product floor, and a verification with a fresh random vector found nothing above;
            `top_eigenvalues` says what it promises).
        errors: relative error bound of each eigenvalue, to the nearest eigenvalue: the
            relative residual ||A v - theta v|| / |theta| (a bound for symmetric A). Never below
            10 eps(dtype) max|theta| / |theta| (the products' rounding).
        residuals: relative residual ||A v - theta v|| / |theta| of each returned pair: some
            eigenvalue lies within it (relative to |theta|) for symmetric A.
        iterations: solver iterations run (Lanczos: products).
    """

    eigenvalues: list
    eigenvectors: torch.Tensor = field(repr=False)
    matvecs: int
    converged: bool
    errors: list
    residuals: list
    iterations: int


class MeasureMode:
    """Context manager: put `model` into a measuring mode, restore every flag on exit.

    mode="train": BN normalises with the batch's own statistics and leaves its running
    statistics untouched (`track_running_stats=False` for the duration); every other module
    is in eval mode (dropout and attention dropout off).
    mode="eval": the usual eval mode (BN uses running statistics; dropout off).
    In both, scaled_dot_product_attention uses its math backend (twice differentiable).
    Parameters and buffers are never written.
    """

    def __init__(self, model, mode):
        self.model, self.mode = model, _check_bn_mode(mode, "mode")

    def __enter__(self):
        modules = list(self.model.modules())
        self.saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in modules]
        self.model.eval()
        if self.mode == "train":
            for m in modules:
                if isinstance(m, BN_TYPES):
                    m.training = True  # this module alone (BN has no children)
                    m.track_running_stats = False
        self.attention = math_attention()
        self.attention.__enter__()
        return self.model

    def __exit__(self, *exc):
        self.attention.__exit__(*exc)
        for m, training, track in self.saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track
        return False


def math_attention():
    """Context manager selecting the math backend of scaled_dot_product_attention (the fused
    CPU / CUDA kernels have no double backward); a no-op where torch lacks sdpa_kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def no_tf32():
    """Context manager (and decorator): TensorFloat-32 off in cuDNN convolutions and CUDA
    matmuls, restored on exit. PyTorch lets cuDNN use TF32 (10 mantissa bits) for float32
    convolutions by default; on an H100 that put errors of 9e-4 into the sharpness and 5e-3 into
    the Jacobian norm of a float32 VGG11, against 1e-6 without it. Every estimator runs inside it."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _check_bn_mode(mode, name="bn_mode"):
    """`mode` if it is "train" or "eval"; a ValueError naming the argument otherwise."""
    if not isinstance(mode, str) or mode not in ("train", "eval"):
        raise ValueError(f"{name} must be 'train' or 'eval', got {mode!r}")
    return mode


def _check_model(model):
    """The module to measure: `model`, or the original module of a torch.compile'd one (its
    `_orig_mod`, holding the same parameter tensors: compiled graphs have no double backward).
    TypeError unless `model` is a torch.nn.Module."""
    if isinstance(model, torch.nn.Module):
        original = getattr(model, "_orig_mod", None)
        return original if isinstance(original, torch.nn.Module) else model
    hint = (" (a state_dict? load it into its module and pass the module)"
            if isinstance(model, Mapping) else " (a function? wrap it in a torch.nn.Module "
            "that holds its parameters)" if callable(model) else "")
    raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")


# reductions that average over examples ("batchmean": nn.KLDivLoss)
MEAN_REDUCTIONS = ("mean", "batchmean")


def _check_loss_fn(loss_fn):
    """TypeError unless loss_fn is a callable instance or function; ValueError if it declares a
    reduction other than a mean (a loss module's `.reduction`, or a functools.partial's
    `reduction=` keyword)."""
    if isinstance(loss_fn, type):
        raise TypeError(f"loss_fn is the class {loss_fn.__name__}: pass an instance "
                        f"({loss_fn.__name__}()) or a function such as F.cross_entropy")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable loss_fn(outputs, targets) -> scalar, got "
                        f"{type(loss_fn).__name__}")
    reduction = getattr(loss_fn, "reduction", None)
    keywords = getattr(loss_fn, "keywords", None)  # functools.partial
    if reduction is None and isinstance(keywords, dict):
        reduction = keywords.get("reduction")
    if isinstance(reduction, str) and reduction not in MEAN_REDUCTIONS:
        raise ValueError(f"loss_fn has reduction={reduction!r}: the estimators need a batch-mean "
                         f"loss (reduction='mean'); a sum would scale every value by the batch "
                         f"size")


def _check_mean_over_examples(loss_fn, outputs, targets):
    """ValueError if loss_fn sums over examples: its value on two examples equals the sum of its
    values on each alone (a mean gives their average). Checked on the first two examples only;
    skipped where outputs or targets are not tensors split along dim 0, or where loss_fn refuses
    one example (a loss that couples the examples of a batch cannot be checked this way)."""
    if not (torch.is_tensor(outputs) and torch.is_tensor(targets) and outputs.dim()
            and targets.dim() and len(outputs) >= 2 and len(targets) == len(outputs)):
        return
    z = outputs.detach()
    try:
        with torch.no_grad():
            both, one, two = (float(loss_fn(z[s], targets[s]))
                              for s in (slice(0, 2), slice(0, 1), slice(1, 2)))
    except Exception:  # noqa: BLE001 - an uncheckable loss is the caller's to validate
        return
    total = one + two
    if total != 0 and abs(both - total) <= 1e-4 * abs(total) < abs(both - total / 2):
        raise ValueError("loss_fn sums over the examples (its value on two examples is the sum "
                         "of their values): the estimators need a batch-mean loss, e.g. "
                         "reduction='mean'; a sum would scale every value by the batch size")


def _check_output_fn(output_fn):
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be None or a callable (e.g. lambda out: out['logits']), "
                        f"got {type(output_fn).__name__}")


class MappingInput(torch.nn.Module):
    """Adapter for a model whose forward takes one mapping, `model(x_dict)` (curvlinops'
    convention): the estimators call `model(**x)` for a dict x (keyword inputs, HuggingFace
    style), and MappingInput(model)(**x) calls model(x). It holds `model` (the same
    parameters); pass MappingInput(model) wherever the model goes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **x):
        return self.model(x)


def _check_keyword_inputs(model, x, i):
    """TypeError unless model.forward takes the keys of the dict x as keyword arguments (the
    estimators call model(**x)); a forward whose signature cannot be read is not checked."""
    try:
        inspect.signature(model.forward).bind(**x)
    except (TypeError, ValueError) as e:
        try:
            inspect.signature(model.forward)
        except (TypeError, ValueError):
            return
        raise TypeError(f"batch {i}: the model's forward does not take x's keys "
                        f"{sorted(map(str, x))} as keyword arguments ({e}): a dict x is passed "
                        f"as model(**x); for a model called as model(x_dict), pass "
                        f"MappingInput(model)") from None


def _integer_inputs(x):
    """The dtype of the first integer tensor of x (a tensor or a dict), or None."""
    return next((t.dtype for t in _tensors(x) if torch.is_tensor(t)
                 and not t.is_floating_point() and not t.is_complex()), None)


def _forward(model, x, output_fn=None):
    """model(**x) for a dict of inputs (HuggingFace style), model(x) otherwise; then
    output_fn(outputs) if given. A dtype error raised by the model on integer inputs becomes a
    one-line TypeError saying that integer x is passed as it is."""
    try:
        out = model(**x) if isinstance(x, Mapping) else model(x)
    except RuntimeError as e:
        dtype = _integer_inputs(x)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if dtype is None or "type" not in first.lower():
            raise
        raise TypeError(f"the model refused the integer inputs x ({dtype}; {first}): integer x "
                        f"is passed as it is (tokens for an embedding); for a model of "
                        f"floating-point inputs pass x.float()") from None
    return out if output_fn is None else output_fn(out)


def _output_tensor(out, who):
    """`out` if it is a tensor; a TypeError telling `who`'s caller to pass output_fn otherwise."""
    if torch.is_tensor(out):
        return out
    raise TypeError(f"{who} needs the model's outputs as one tensor, got "
                    f"{type(out).__name__}: pass output_fn= to select it (e.g. "
                    f"output_fn=lambda out: out['logits'] or lambda out: out[0])")


def _process_group(group):
    """The torch.distributed group to sum over, or None (local). `group="world"` is the default
    group, and refused before init_process_group (where torch.distributed.group.WORLD is None)."""
    if group is None:
        return None
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if isinstance(group, str):
        if group != "world":
            raise ValueError(f"process_group must be a torch.distributed group, 'world' or None, "
                             f"got {group!r}")
        group = torch.distributed.group.WORLD if initialised else None
    if not initialised or group is None:
        raise ValueError("process_group was given but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (or pass None for a local "
                         "measurement)")
    return group


def _reference_parameter(model):
    """The model's first parameter (its device and dtype are the measurement's)."""
    for p in model.parameters():
        return p
    raise ValueError("model has no parameters: the estimators measure a model with parameters "
                     "(its device and dtype are taken from them)")


def _check_finite(tensors, what):
    """ValueError naming `what` unless every floating-point tensor is finite (one sync)."""
    tensors = [t for t in tensors if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise ValueError(f"{what} contain NaN or inf")


def _trainable_parameters(model):
    _reference_parameter(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (all have requires_grad=False)")
    _check_finite(params, "the model's trainable parameters")
    return params


def _check_scalar_loss(loss):
    """ValueError unless `loss` is a scalar tensor connected to the trainable parameters."""
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor, got "
                         f"{tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__}")
    if not loss.requires_grad:
        raise ValueError("the loss does not depend on the model's trainable parameters: are the "
                         "outputs detached, or computed under torch.no_grad() inside the model?")


def _unflatten(vector, params):
    """Split a flat (P,) vector into tensors shaped like `params`."""
    chunks = torch.split(vector, [p.numel() for p in params])
    return [c.view_as(p) for c, p in zip(chunks, params)]


def _flatten(tensors, params):
    """Concatenate per-parameter tensors into one flat (P,) vector (zeros where None)."""
    return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1)
                      for t, p in zip(tensors, params)])


def _batch_size(x, i):
    """Examples in the inputs x of batch i: dim 0 of x, or of the first tensor of a dict."""
    first = next((v for v in x.values() if torch.is_tensor(v)), None) \
        if isinstance(x, Mapping) else x
    if not torch.is_tensor(first) or first.dim() == 0:
        raise TypeError(f"batch {i}: inputs must be a tensor with a batch dimension or a dict of "
                        f"such tensors (passed as model(**x)), got {type(x).__name__}")
    return len(first)


def _to_model(x, ref):
    """x on the model's device; floating-point tensors also in its dtype and contiguous (the
    gradients of some backends depend on the memory layout: wrong oneDNN channels-last
    convolution gradients were reported on a CPU), integer tensors (tokens) as they are."""
    if isinstance(x, Mapping):
        return {k: _to_model(v, ref) for k, v in x.items()}
    if not torch.is_tensor(x):
        return x
    if x.is_floating_point():
        return x.to(ref.device, ref.dtype).contiguous()
    return x.to(ref.device)


def _tensors(x):  # the tensors of x, a tensor or a dict
    return [v for v in x.values() if torch.is_tensor(v)] if isinstance(x, Mapping) else [x]


def _check_batches(batches, model, allow_empty=False):
    """Validate `batches` and return it as a list of (x, y, n) on the model's device, n the
    batch's example count (its weight). Examples may differ in shape from batch to batch
    (sequences); y holds n targets, or n * T for per-position targets flattened by the model.
    allow_empty: an empty `batches` gives [] (a rank of a group without batches)."""
    if torch.is_tensor(batches) or isinstance(batches, Mapping):
        raise TypeError(f"batches must be a sequence of (x, y) pairs, got a "
                        f"{type(batches).__name__}")
    try:
        batches = list(batches)
    except TypeError:
        raise TypeError(f"batches must be a sequence of (x, y) pairs, got "
                        f"{type(batches).__name__}") from None
    if not batches and not allow_empty:
        raise ValueError("batches is empty: pass at least one (x, y) pair")
    ref = _reference_parameter(model)
    checked = []
    for i, pair in enumerate(batches):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            hint = ": pass [(x, y)], a list of pairs" if torch.is_tensor(pair) else ""
            raise ValueError(f"batch {i} is not an (x, y) pair{hint}")
        x, y = pair
        n = _batch_size(x, i)
        if isinstance(x, Mapping):
            _check_keyword_inputs(model, x, i)
        if n == 0:
            raise ValueError(f"batch {i} is empty")
        # y: n targets, or n * T when a sequence model flattens its per-position targets
        if not isinstance(y, Mapping) and (not torch.is_tensor(y) or y.dim() == 0 or len(y) % n):
            raise ValueError(f"batch {i}: x has {n} examples but y has "
                             f"{len(y) if torch.is_tensor(y) and y.dim() else 'no tensor of'} "
                             f"targets (n, or n * T flattened over positions)")
        _check_finite(_tensors(x), f"batch {i}: inputs")
        _check_finite(_tensors(y), f"batch {i}: targets")
        checked.append((_to_model(x, ref), _to_model(y, ref) if isinstance(y, Mapping)
                        else y.to(ref.device), n))
    return checked


def _sum_over(group, value, device):
    """sum over the ranks of `group` of a float (the value itself when group is None)."""
    if group is None:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, group=group)
    return t.item()


def _group_batches(batches, model, group):
    """`_check_batches`, except that a rank of a group may hold no batch; returns the batches
    and N, their example count summed over the group."""
    checked = _check_batches(batches, model, allow_empty=group is not None)
    ref = next(iter(model.parameters()))
    total = int(_sum_over(group, sum(n for _, _, n in checked), ref.device))
    if total == 0:
        raise ValueError("batches is empty on every rank: pass at least one (x, y) pair")
    return checked, total


def _reduced(matvec, group):
    """matvec followed by a sum over the group's ranks (each rank's products already carry
    the weights n_b / N of the global N), so every rank holds the same product."""
    if group is None:
        return matvec

    def reduced(v):
        out = matvec(v)
        torch.distributed.all_reduce(out, group=group)
        return out
    return reduced


def _check_solver_options(k, tol, max_iter, method, guarantee):
    if guarantee is not None:
        if not (isinstance(guarantee, (tuple, list)) and len(guarantee) == 2
                and all(isinstance(g, (int, float)) and not isinstance(g, bool)
                        for g in guarantee)):
            raise TypeError(f"guarantee must be None or a pair (eps, delta), got {guarantee!r}")
        if not (0 < guarantee[0] <= 1 and 0 < guarantee[1] < 1):
            raise ValueError(f"guarantee (eps, delta) needs 0 < eps <= 1 and 0 < delta < 1, "
                             f"got {guarantee!r}")
    for name, value in (("k", k), ("max_iter", max_iter)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be a positive integer, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool):
        raise TypeError(f"tol must be a positive number, got {tol!r}")
    if not 0 < tol < float("inf"):
        raise ValueError(f"tol must be positive and finite, got {tol!r}")
    if method not in _SOLVERS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(_SOLVERS)}")


def hessian_operator(model, loss_fn, batches, reuse_graph=True, *, process_group=None,
                     bn_mode="train", output_fn=None):
    """Hessian-vector product of the mean loss over all examples in `batches`.

    The loss is L(theta) = sum_b (n_b / N) * loss_fn(output_fn(model(x_b)), y_b), with n_b the
    size of batch b and N = sum_b n_b, so every example counts equally. BatchNorm:
    bn_mode="train" (default) normalises each batch with its own statistics (ghost batches),
    "eval" with the running statistics; running statistics are never touched.

    Args (model, loss_fn, batches, bn_mode, output_fn: as for `sharpness`):
        model: products are w.r.t. its trainable parameters, flattened in
            `model.parameters()` order.
        reuse_graph: build each batch's first-order graph once and reuse it for every
            product (about 2/3 the cost of a product; memory of one double-backward graph
            per batch). False rebuilds it per product.
        process_group: a torch.distributed group (or "world") whose ranks each pass their own
            batches (possibly none); N and every product are summed over the ranks. None: local.

    Returns:
        (matvec, dim): matvec(v) = H v for a flat (dim,) vector v.
    """
    matvec, dim, _ = _hessian_operator(model, loss_fn, batches, reuse_graph, process_group,
                                       bn_mode, output_fn)
    return matvec, dim


def _hessian_operator(model, loss_fn, batches, reuse_graph, group=None, bn_mode="train",
                      output_fn=None):
    """`hessian_operator`'s (matvec, dim) and the flat mean-loss gradient (P,), read off the
    reused first-order graphs at no cost (None when reuse_graph=False)."""
    model, group = _check_model(model), _process_group(group)
    _check_loss_fn(loss_fn)
    _check_output_fn(output_fn)
    _check_bn_mode(bn_mode)
    params = _trainable_parameters(model)
    batches, total = _group_batches(batches, model, group)
    unchecked = [True]  # the mean-over-examples check runs on the first batch only

    @no_tf32()
    @torch.enable_grad()
    def batch_gradient(x, y):
        with MeasureMode(model, bn_mode):
            outputs = _forward(model, x, output_fn)
            loss = loss_fn(outputs, y)
        _check_scalar_loss(loss)
        if unchecked[0]:
            unchecked[0] = False
            _check_mean_over_examples(loss_fn, outputs, y)
        return torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)

    graphs = [batch_gradient(x, y) for x, y, _ in batches] if reuse_graph else None
    gradient = None
    if reuse_graph:
        gradient = sum(((n / total) * _flatten([None if g is None else g.detach()
                                                for g in grads], params)
                        for (_, _, n), grads in zip(batches, graphs)),
                       torch.zeros(sum(p.numel() for p in params), device=params[0].device,
                                   dtype=params[0].dtype) if group is not None else 0)
        if group is not None:  # the same start vector on every rank
            torch.distributed.all_reduce(gradient, group=group)

    @no_tf32()
    @torch.enable_grad()
    def matvec(v):
        vs = _unflatten(v.to(params[0].dtype), params)
        out = torch.zeros_like(v, dtype=params[0].dtype)
        for i, (x, y, n) in enumerate(batches):
            grads = graphs[i] if reuse_graph else batch_gradient(x, y)
            used = [(g, u) for g, u in zip(grads, vs) if g is not None and g.requires_grad]
            if not used:  # the loss is linear in the parameters: this batch's H is 0
                continue
            hv = torch.autograd.grad([g for g, _ in used], params, [u for _, u in used],
                                     retain_graph=reuse_graph, allow_unused=True)
            out += (n / total) * _flatten(hv, params)
        return out

    return _reduced(matvec, group), sum(p.numel() for p in params), gradient


def _output_hessian_factor(loss_fn, outputs, targets, params):
    """Return u -> H_z u, H_z = Hessian of loss_fn(z, targets) w.r.t. z at z = outputs.

    ValueError if loss_fn depends on `params` other than through z (e.g. weight decay inside
    loss_fn): the Gauss-Newton matrix covers the loss of the outputs alone."""
    z = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(z, targets)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            _check_scalar_loss(loss)
        if not loss.requires_grad:  # loss constant in z: H_z = 0
            return lambda u: torch.zeros_like(u)
        direct = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        if any(g is not None for g in direct):
            raise ValueError("loss_fn depends on the model's parameters other than through the "
                             "outputs (e.g. weight decay inside loss_fn): the Gauss-Newton "
                             "matrix covers the loss of the outputs alone; pass that loss (an "
                             "L2 term (wd/2)||theta||^2 adds wd * I, so wd to the norm)")
        (gz,) = torch.autograd.grad(loss, z, create_graph=True, allow_unused=True)
    if gz is None or not gz.requires_grad:  # loss linear (or constant) in z: H_z = 0
        return lambda u: torch.zeros_like(u)
    return lambda u: torch.autograd.grad(gz, z, u, retain_graph=True)[0]


def gauss_newton_operator(model, loss_fn, batches, *, process_group=None, bn_mode="train",
                          output_fn=None):
    """Gauss-Newton-vector product G v with G = (1/N) sum_i J_i^T H_i J_i.

    J_i is the Jacobian of example i's outputs z_i = output_fn(model(x_i)) w.r.t. the trainable
    parameters and H_i the Hessian of its loss w.r.t. those outputs (for a batch-mean loss_fn
    the batch's H_z already carries 1/n_b; batches are weighted by n_b/N). G is never formed:
    per product, J v comes from a double vector-Jacobian product through a graph built once per
    batch, and J^T (H J v) from one vector-Jacobian product. BatchNorm: bn_mode="train"
    (default) uses each batch's own statistics (so J couples the examples of a batch), "eval"
    the running statistics; running statistics are not touched. Arguments and refusals: as
    for `hessian_operator` and `gauss_newton_norm`.

    Returns:
        (matvec, dim): matvec(v) = G v for a flat (dim,) vector v.
    """
    model, process_group = _check_model(model), _process_group(process_group)
    _check_loss_fn(loss_fn)
    _check_output_fn(output_fn)
    _check_bn_mode(bn_mode)
    params = _trainable_parameters(model)
    batches, total = _group_batches(batches, model, process_group)
    pieces = []
    for i, (x, y, n) in enumerate(batches):
        with MeasureMode(model, bn_mode), torch.enable_grad(), no_tf32():
            z = _output_tensor(_forward(model, x, output_fn), "gauss_newton_norm")  # (n_b, ...)
        if not z.requires_grad:
            raise ValueError("the model's outputs do not depend on its trainable parameters: "
                             "are they detached, or computed under torch.no_grad()?")
        if i == 0:
            _check_mean_over_examples(loss_fn, z, y)
        dummy = torch.zeros_like(z, requires_grad=True)
        # J^T dummy as a differentiable function of dummy: differentiating it w.r.t. dummy
        # along v gives J v without forward-mode AD.
        with torch.enable_grad(), no_tf32():
            jt_dummy = torch.autograd.grad(z, params, dummy, create_graph=True,
                                           allow_unused=True)
        pieces.append((z, dummy, jt_dummy, _output_hessian_factor(loss_fn, z, y, params), n))

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

    return (_reduced(no_tf32()(torch.enable_grad()(matvec)), process_group),
            sum(p.numel() for p in params))


def _start_vectors(dim, k, generator, start=None):
    """(dim, k) orthonormal Gaussian start in float64 on the CPU, so a seed gives the same start
    on every device. A `start` direction is added, with equal weight, to the first random
    vector: the mix keeps a random component (so no eigenvector is missed for want of overlap)
    and the start's overlap with the wanted eigenvectors."""
    q = torch.randn(dim, k, generator=generator, dtype=torch.float64)
    if start is not None:
        s = start.detach().reshape(-1).to("cpu", torch.float64)
        norm = torch.linalg.vector_norm(s)
        if torch.isfinite(norm) and norm > 0:
            q[:, 0] = q[:, 0] / torch.linalg.vector_norm(q[:, 0]) + s / norm
    return torch.linalg.qr(q)[0]


class _Operator:
    """The user's matvec on float64 vectors: each product is taken in the operator's dtype
    (given, or the first of `candidates` the matvec accepts) and returned in float64."""

    def __init__(self, matvec, dtype, candidates):
        self.matvec, self.dtype, self.candidates, self.products = matvec, dtype, candidates, 0

    def __call__(self, v):
        if self.dtype is None:
            out = self._first_product(v)
        else:
            out = self.matvec(v.to(self.dtype))
        self.products += 1
        return out.to(torch.float64).reshape(-1)

    def _first_product(self, v):
        error = None
        for dtype in self.candidates:
            try:
                out = self.matvec(v.to(dtype))
            except (RuntimeError, TypeError) as e:  # a dtype mismatch: try the next dtype
                error = error or e
                continue
            self.dtype = out.dtype if out.dtype.is_floating_point else dtype
            return out
        raise error

    def floor(self, scale):
        """Error floor: the products' own rounding, about eps(dtype) * ||A||, is not seen by
        the solver (it takes them as exact); 10 eps * scale stands for it."""
        return 10 * torch.finfo(self.dtype or torch.float64).eps * scale


class _KrylovSpace:
    """Orthonormal float64 basis Q of one or more Krylov chains (Lanczos with full
    reorthogonalisation, twice: "twice is enough") and the coefficients C[i, j] = q_i . A q_j of
    every multiplied q_j. The remainder of each product is appended to the basis, so
    A Q_M = Q C[:, M] for the multiplied vectors M: the Ritz residuals are exact norms."""

    def __init__(self, op, dim, device, generator):
        self.op, self.dim, self.device, self.generator = op, dim, device, generator
        rows = min(dim, 16)  # grows by doubling: memory follows the steps taken
        self.q = torch.empty(rows, dim, dtype=torch.float64, device=device)  # (rows, P)
        self.coef = torch.zeros(rows, rows, dtype=torch.float64)
        self.n, self.multiplied, self.tips = 0, [], []

    def add(self, v):
        """Append v orthogonalised against the basis as the tip of a new chain; False when
        nothing of it is left (the basis already spans it)."""
        size = torch.linalg.vector_norm(v)
        v = self._orthogonalised(v)[0]
        norm = torch.linalg.vector_norm(v)
        if self.n == self.dim or not norm > 1e-10 * size:
            return False
        self.tips.append(self._append(v / norm))
        return True

    def add_random(self):
        v = torch.randn(self.dim, generator=self.generator, dtype=torch.float64)
        return self.add(v.to(self.device))

    def step(self):
        """Multiply the newest tip; its remainder becomes that chain's next tip."""
        j = self.tips.pop()
        w = self.op(self.q[j])
        size = torch.linalg.vector_norm(w)
        w, c = self._orthogonalised(w)
        self.coef[: self.n, j] = c.cpu()
        self.multiplied.append(j)
        beta = torch.linalg.vector_norm(w)
        if self.n < self.dim and beta > 1e-10 * size:
            i = self._append(w / beta)
            self.coef[i, j] = beta.item()
            self.tips.append(i)

    def ritz(self):
        """Ritz values (descending), coordinates s (|M|, |M|) over the multiplied vectors, and
        residual norms ||A y - theta y|| of the Ritz vectors y = Q_M s."""
        m = torch.tensor(self.multiplied)
        cols = self.coef[: self.n, m]  # (n, |M|)
        h = cols[m]
        theta, s = torch.linalg.eigh((h + h.T) / 2)
        theta, s = theta.flip(0), s.flip(1)
        r = cols @ s
        r[m] -= s * theta
        return theta.tolist(), s, torch.linalg.vector_norm(r, dim=0).tolist()

    def vectors(self, s):
        m = torch.tensor(self.multiplied, device=self.device)
        return self.q[m].T @ s.to(self.device)  # (P, columns of s)

    def _orthogonalised(self, v):
        q = self.q[: self.n]
        c = torch.zeros(self.n, dtype=torch.float64, device=v.device)
        for _ in range(2):
            d = q @ v
            v, c = v - q.T @ d, c + d
        return v, c

    def _append(self, v):
        if self.n == len(self.q):
            rows = min(2 * self.n, self.dim)
            self.q = torch.cat([self.q, self.q.new_empty(rows - self.n, self.dim)])
            coef = torch.zeros(rows, rows, dtype=torch.float64)
            coef[: self.n, : self.n] = self.coef
            self.coef = coef
        self.q[self.n] = v
        self.n += 1
        return self.n - 1


# Lanczos stopping rule: at least _MIN_STEPS products before any stop (more under a
# `guarantee`: `_guaranteed_products`), then each stop is verified by _VERIFY_STEPS products of
# a fresh random chain (see `_lanczos`).
_MIN_STEPS = 3
_VERIFY_STEPS = 3
GUARANTEE = (0.1, 1e-3)  # default (eps, delta): miss by > 10% of the spread w.p. <= 1e-3


def _guaranteed_products(dim, guarantee):
    """Fewest products m of a Krylov chain from a uniformly random start after which the
    Kuczynski-Wozniakowski (1992) bound, for symmetric A with eigenvalues l_1 >= ... >= l_n,

        P( theta_1 < l_1 - eps (l_1 - l_n) ) <= 1.65 sqrt(n) exp(-sqrt(eps) (2m - 1)),

    is at most delta: m = ceil((ln(1.65 sqrt(n) / delta) / sqrt(eps) + 1) / 2). Any spectrum,
    any gap; 0 without a guarantee."""
    if guarantee is None:
        return 0
    eps, delta = guarantee
    return math.ceil((math.log(1.65 * math.sqrt(dim) / delta) / math.sqrt(eps) + 1) / 2)


def _lanczos(op, dim, k, tol, max_iter, generator, device, start, guarantee):
    """Lanczos with full reorthogonalisation for the k largest (algebraic) eigenvalues, stopped
    by a residual bound and verified with fresh random vectors.

    The Ritz pairs (theta_j, y_j) of the space built so far estimate the top eigenpairs; the
    residual r_j = ||A y_j - theta_j y_j|| is computed exactly (up to rounding). For symmetric A
    some eigenvalue lies within r_j of theta_j (all k at once, counting multiplicity, within
    max_j r_j: Kahan). The error estimate is r_j / |theta_j|. The sharper Kato-Temple bound
    r_j^2 / gap_j is not used: a gap estimated from the Ritz values misses an eigenvalue the
    space has not resolved (a Ritz vector mixing two close eigenvectors), and is then optimistic.

    Stop: once every bound is <= tol (after at least _MIN_STEPS products, and, under a
    `guarantee` (eps, delta), at least `_guaranteed_products` on the first chain), a fresh Gaussian
    vector, orthogonalised against the basis, starts a new chain in the same space, run for
    _VERIFY_STEPS * k products (Rayleigh-Ritz is over the whole space: a block Krylov space). The
    stop is accepted if then every estimate is still <= tol and no top-k Ritz value rose by
    more than tol * |theta_j|; otherwise the newest chain is continued until the estimates are
    below tol again, and verified again with another fresh vector. Each verification chain
    brings in a random component of any eigenvector the space missed (an eigenvalue hidden
    from a start that leaned on other eigenvectors, a further copy of a repeated eigenvalue).
    """
    space = _KrylovSpace(op, dim, device, generator)
    space.add(_start_vectors(dim, 1, generator, start)[:, 0].to(device))
    # No stop, hence no verification chain, before the first chain alone has this many products.
    fewest = min(max(_MIN_STEPS, _guaranteed_products(dim, guarantee)), dim)
    theta, s, res, errors = [], None, [], []
    snapshot, verify_left, converged = None, 0, False
    while op.products < max_iter:
        if not space.tips and not space.add_random():
            break  # the multiplied vectors span the whole space: the Ritz values are exact
        space.step()
        theta, s, res = space.ritz()
        errors = _ritz_errors(res, theta, k, op.floor(max(abs(t) for t in theta)))
        verify_left -= 1
        if verify_left > 0:
            continue
        if op.products < fewest or len(theta) < k or max(errors) > tol:
            snapshot = None
            continue
        if snapshot is not None and all(theta[j] - snapshot[j] <= tol * abs(theta[j])
                                        for j in range(k)):
            converged = True
            break
        snapshot = theta[:k]
        verify_left = _VERIFY_STEPS * k
        if not space.add_random():
            converged = True  # nothing left to verify: the space is the whole space
            break
    if not converged and not space.tips and len(space.multiplied) == dim:
        converged = len(theta) >= k and max(errors) <= tol
    k_found = min(k, len(theta))
    vectors = space.vectors(s[:, :k_found]).to(op.dtype)
    residuals = [res[j] / max(abs(theta[j]), 1e-30) for j in range(k_found)]
    return EigenResult(eigenvalues=theta[:k_found], eigenvectors=vectors, matvecs=op.products,
                       converged=converged, errors=errors, residuals=residuals,
                       iterations=op.products)


def _ritz_errors(res, theta, k, floor):
    """Relative error bounds r_j / |theta_j| of the top-k Ritz values, never below the
    products' rounding floor."""
    return [max(res[j], floor) / max(abs(theta[j]), 1e-30) for j in range(min(k, len(theta)))]


def _power(op, dim, k, tol, max_iter, generator, device, start, guarantee):
    """Power (subspace) iteration with Rayleigh-Ritz for the k largest (algebraic) eigenvalues.
    `guarantee` is not used: power iteration promises only the residual bound.

    Kept for parity with the paper, which used the power method. Subspace iteration finds the k
    largest in magnitude; if one of them is negative, the iteration is run again on the
    shifted operator A - sigma I, sigma the most negative value found (about lambda_min, so
    A - sigma I is positive semi-definite and its largest-magnitude eigenvalues are the largest
    algebraic ones of A, shifted by -sigma). The shift slows convergence (ratio
    (lambda_2 - sigma) / (lambda_1 - sigma)). Stops when every relative residual
    ||A v_j - theta_j v_j|| / |theta_j| <= tol: some eigenvalue lies within it (symmetric A),
    unlike a stop on the change between iterates. Not verified like `_lanczos`: a start with
    no component along the top eigenvector misses it.
    """
    v = _start_vectors(dim, k, generator, start).to(device)  # (P, k)
    result = _subspace_iteration(op, v, tol, max_iter, 0.0)
    sigma = min(result.eigenvalues)
    if sigma < 0 and result.iterations < max_iter:
        first = result.iterations
        # from the start again: the vector found is an eigenvector (of eigenvalue 0) of A - sigma I
        result = _subspace_iteration(op, v, tol, max_iter - first, sigma)
        result.iterations += first
    result.matvecs = op.products
    result.eigenvectors = result.eigenvectors.to(op.dtype)
    return result


def _subspace_iteration(op, v, tol, max_iter, shift):
    """At most max_iter iterations of subspace iteration on A - shift I from the orthonormal
    columns of v (P, k), in float64; eigenvalues of A, descending."""
    k = v.shape[1]
    converged = False
    for it in range(1, max_iter + 1):
        av = torch.stack([op(v[:, j]) - shift * v[:, j] for j in range(k)], dim=1)  # (P, k)
        small = v.T @ av  # (k, k) Rayleigh quotient
        theta, s = torch.linalg.eigh(((small + small.T) / 2).cpu())
        order = theta.abs().argsort(descending=True)
        theta, s = theta[order], s[:, order].to(v.device)
        ritz, aritz = v @ s, av @ s
        res = torch.linalg.vector_norm(aritz - ritz * theta.to(v.device), dim=0).cpu()
        values = (theta + shift).tolist()
        residuals = (res / (theta + shift).abs().clamp_min(1e-30)).tolist()
        scale = max(abs(t) for t in values)
        errors = [max(r, op.floor(scale) / max(abs(t), 1e-30)) for r, t in zip(residuals, values)]
        if all(e <= tol for e in errors):
            converged = True
            break
        v = torch.linalg.qr(aritz)[0]
    order = sorted(range(k), key=lambda j: -values[j])
    # for a symmetric operator the relative residual bounds the relative eigenvalue error
    return EigenResult(eigenvalues=[values[j] for j in order], eigenvectors=ritz[:, order],
                       matvecs=op.products, converged=converged,
                       errors=[errors[j] for j in order],
                       residuals=[residuals[j] for j in order], iterations=it)


_SOLVERS = {"lanczos": _lanczos, "power": _power}


def top_eigenvalues(matvec, dim, k=1, method="lanczos", tol=1e-5, max_iter=100,
                    generator=None, device=None, dtype=None, start=None, guarantee=GUARANTEE):
    """Top-k (largest algebraic) eigenvalues of a symmetric linear operator given its products.

    What `converged=True` promises (Lanczos, the default):
    - rigorous (up to the products' own rounding): `errors[j]` <= tol, and theta_j lies within
      errors[j] * |theta_j| of an eigenvalue of A (errors[j] = r_j / |theta_j|, r_j =
      ||A y_j - theta_j y_j|| the residual of its returned vector); the k values together
      match k eigenvalues, counting multiplicity, within max_j r_j (Kahan);
    - that theta_1 is the top eigenvalue holds in probability, never for sure: no Krylov
      method can see an eigenvector its vectors have no component along. With a
      `guarantee` (eps, delta) (default (0.1, 1e-3)) and no `start`, the first chain, from
      a uniformly random vector, runs at least m = ceil((ln(1.65 sqrt(dim) / delta) /
      sqrt(eps) + 1) / 2) products before any stop (21 at dim 5e4, 24 at 1e7; all of dim if
      fewer), which makes P(theta_1 < lambda_1 - eps (lambda_1 - lambda_dim)) <= delta for
      every spectrum and gap (Kuczynski and Wozniakowski, 1992; later products only raise
      theta_1). Within that, a top eigenvalue less than eps of the spread above the next can
      still be missed, the stop then being within tol of the lower one. With a `start` the
      floor is kept but the bound is not proved (the start is not uniformly random).
    - every stop is also verified with a fresh Gaussian vector (a new chain of 3k products in
      the same space, a component along every eigenvector with probability 1); the stop
      stands only if no top-k Ritz value then rises by more than tol. This is what finds a
      further copy of a repeated eigenvalue for k > 1; it is a check, not a bound: 3
      products from a share of ~1/sqrt(dim) along a missed eigenvector can miss it.
    Measured without the floor (`guarantee=None`), false stops (converged, more than tol
    low): benchmarks/lanczos_sweep.py (top pairs 0 to 50% apart above a dense bulk, dims 200
    to 2000, tol 1e-2 to 1e-5) 0/180 from a random start, 12/180 from a start v2 + 0.1 v1
    (as the gradient can lean at the edge of stability), 38/180 from exactly v2; on a real
    ResNet18 at the edge of stability (benchmarks/edge_false_stop.py, top pair 597 / 497)
    1 of 20 random starts stopped at 497 after 9 products; on a top pair 1.0 / 0.7 above a
    bulk in [-1, 0.8] (dim 2000, tol 0.1, tests/test_lanczos.py) 46 of 300 seeds stopped
    23% low. With the default floor: 0 of 180, 0 of 180 and 7 of 180 (each within 10 tol) in
    the sweep, 0 of 20 on the ResNet18, 0 of 300 on the wide bulk; mean products in the
    sweep's random-start runs 17.4 -> 23.4.
    Power iteration promises the rigorous part only (no verification).

    Args:
        matvec: v -> A v for flat (dim,) tensors; A must be symmetric.
        dim: the operator's size.
        k: how many eigenvalues (a repeated eigenvalue counts as many times as it is repeated).
        method: "lanczos" (default; full reorthogonalisation in float64, vectors kept on
            `device`) or "power" (subspace iteration, as in the paper; on A - sigma I if a
            negative eigenvalue dominates, so it also returns the largest algebraic ones).
        tol: stop once every eigenvalue's estimated relative error is below tol. The estimate
            never goes below 10 eps(dtype) ||A|| / |theta_j| (the products' own rounding, which
            the solver cannot see).
        max_iter: most products (Lanczos, verification included) / power iterations.
        generator: torch.Generator (CPU) for the random vectors; default seed 0.
        device: of the vectors (default: `start`'s, else the CPU).
        dtype: in which the products are taken (the operator's). None: `start`'s dtype if
            given, else the first of torch.get_default_dtype() and the other of
            float32/float64 that `matvec` accepts. Lanczos keeps its basis and scalars in
            float64 whatever the dtype: (products + verification chains) * dim * 8 bytes.
        start: optional (dim,) direction mixed, with equal weight, into the random start
            (e.g. a guess of the top eigenvector); None: a purely random start.
        guarantee: (eps, delta) for the product floor above (Lanczos only; `GUARANTEE` =
            (0.1, 1e-3) by default); None: no floor beyond 3 products (fewer products, no
            promise about a missed top eigenvalue).

    Returns:
        EigenResult with eigenvalues descending and diagnostics.
    """
    _check_solver_options(k, tol, max_iter, method, guarantee)
    return _solve(matvec, dim, k, method, tol, max_iter, generator, device, dtype, start,
                  guarantee)


def _solve(matvec, dim, k, method, tol, max_iter, generator, device, dtype, start,
           guarantee):
    """`top_eigenvalues` with its options already checked."""
    if dim < k:
        raise ValueError(f"k={k} exceeds the operator's dimension {dim}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    if device is None:
        device = start.device if isinstance(start, torch.Tensor) else torch.device("cpu")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    op = _Operator(matvec, dtype, _dtype_candidates(start))
    result = _SOLVERS[method](op, dim, k, tol, max_iter, generator, torch.device(device), start,
                              guarantee)
    if not result.converged:
        warnings.warn(f"{method} stopped at max_iter={max_iter} before reaching tol={tol:g} "
                      f"(estimated relative errors {[f'{e:.2g}' for e in result.errors]}); "
                      f"raise max_iter or tol (EigenResult.converged is False)",
                      ConvergenceWarning, stacklevel=4)
    return result


def _dtype_candidates(start):
    first = torch.get_default_dtype()
    if isinstance(start, torch.Tensor) and start.dtype.is_floating_point:
        first = start.dtype
    return (first,) + tuple(d for d in (torch.float32, torch.float64) if d != first)


def _operator_eigenvalues(operator, model, k, method, tol, max_iter, generator, return_info,
                          start, guarantee):
    """The operator's top eigenvalue(s), or its EigenResult; the caller checked the options."""
    matvec, dim = operator
    ref = _reference_parameter(model)
    result = _solve(matvec, dim, k, method, tol, max_iter, generator, ref.device, ref.dtype,
                    start, guarantee)
    if return_info:
        return result
    return result.eigenvalues[0] if k == 1 else result.eigenvalues


def sharpness(model, loss_fn, batches, *, k=1, method="lanczos", tol=1e-5, max_iter=100,
              generator=None, reuse_graph=True, gradient_start=False, return_info=False,
              process_group=None, bn_mode="train", output_fn=None, guarantee=GUARANTEE):
    """Sharpness: the largest eigenvalue of the loss Hessian w.r.t. the trainable parameters.

        lambda_max( d^2/dtheta^2 [ (1/N) sum_i loss(f(x_i; theta), y_i) ] )

    The mean runs over every example in `batches` (each batch weighted by its size).
    BatchNorm: bn_mode="train" (default) normalises each batch with its own statistics (ghost
    batches), "eval" with the running statistics; running statistics, parameters and training
    flags are left exactly as they were. Dropout is off while measuring. Floating-point inputs
    are fed contiguous (NCHW for images) in the model's dtype: the gradients of some backends
    depend on the memory layout, so the value does not depend on the caller's.

    Args:
        model: torch.nn.Module (CPU or CUDA, float32 or float64; a torch.compile'd module is
            measured through its original module, `_orig_mod`).
        loss_fn: loss_fn(outputs, targets) -> batch-mean scalar, e.g. F.cross_entropy or
            nn.CrossEntropyLoss() (label_smoothing allowed; targets may be indices or
            probability vectors). A parameter term inside it (weight decay) is included.
            A sum over examples is refused (ValueError): a loss module's or partial's
            `reduction` other than "mean"/"batchmean", and any loss whose value on the first
            two examples is the sum of their values.
        batches: sequence of (x, y) pairs: x a tensor (model(x)), integer tokens allowed, or a
            dict of tensors (model(**x); a model called as model(x_dict) goes in as
            MappingInput(model)); the batch size n_b is dim 0 of x (of the dict's first
            tensor); shapes may differ between batches (sequence lengths).
        k: number of top eigenvalues (k > 1 returns a descending list).
        method: "lanczos" (default) or "power".
        tol: relative error target of the eigenvalue estimate (see `top_eigenvalues`).
        max_iter: most products / iterations.
        generator: torch.Generator for the random start (default: seed 0).
        reuse_graph: see `hessian_operator`.
        gradient_start: mix the loss gradient (free from the reused graph) into the random
            start vector. The gradient lies largely in the top Hessian eigenspace (Gur-Ari et
            al., 2018): about 10-15% fewer products with guarantee=None, none saved under the
            default guarantee's product floor (the benchmarks). Off by default:
            where the gradient leans on the 2nd eigenvector (the edge of stability), the
            verification can miss a top eigenvalue close above it (`top_eigenvalues`; without
            the floor, false stops 12/180 against 0/180 from a random start; the floor's bound
            needs a purely random start). Ignored when
            reuse_graph=False.
        return_info: return the full `EigenResult` (eigenvalues, products, convergence).
        process_group: torch.distributed group; each rank passes its own batches (possibly
            none) and all return the value for the union of them. The Lanczos vectors are
            replicated (same start on every rank: pass `generator`s seeded alike). Pass
            "world" (the default group) or a group from torch.distributed.new_group, after
            init_process_group; before it both are refused. None (the default) is local;
            torch.distributed.group.WORLD is None before init_process_group, so prefer "world".
        bn_mode: "train" or "eval", the mode of the BatchNorm layers.
        output_fn: optional function of the model's outputs giving what loss_fn receives
            (e.g. lambda out: out["logits"]).
        guarantee: (eps, delta), default (0.1, 1e-3): Lanczos takes at least the products
            after which, from its random start, it misses the top eigenvalue by more than eps
            (lambda_max - lambda_min) with probability at most delta, whatever the spectrum
            (`top_eigenvalues`); None: no such floor (fewer products, no such promise).

    Returns:
        float (k == 1), list of floats (k > 1) or EigenResult (return_info=True).
    """
    _check_solver_options(k, tol, max_iter, method, guarantee)
    model = _check_model(model)
    matvec, dim, gradient = _hessian_operator(model, loss_fn, batches, reuse_graph,
                                              process_group, bn_mode, output_fn)
    return _operator_eigenvalues((matvec, dim), model, k, method, tol, max_iter, generator,
                                 return_info, gradient if gradient_start else None, guarantee)


def gauss_newton_norm(model, loss_fn, batches, *, k=1, method="lanczos", tol=1e-5,
                      max_iter=100, generator=None, return_info=False, process_group=None,
                      bn_mode="train", output_fn=None, guarantee=GUARANTEE):
    """Spectral norm of the Gauss-Newton matrix (its largest eigenvalue; G is PSD for a
    convex loss):

        G = (1/N) sum_i J_i^T H_i J_i,  J_i = d f(x_i) / d theta,  H_i = d^2 loss_i / d f^2

    with f = output_fn o model. Same conventions, options and returns as `sharpness` (bn_mode,
    inputs, model state untouched, `process_group`), except: the outputs must be one tensor
    (a dict or tuple output needs `output_fn`, else TypeError), and a loss_fn that depends on
    the parameters other than through the outputs (weight decay inside it) is refused with a
    ValueError, since G would leave that term out. See `gauss_newton_operator`. G is PSD, so
    under the `guarantee` (eps, delta) a miss by more than eps lambda_max has probability at
    most delta.
    """
    _check_solver_options(k, tol, max_iter, method, guarantee)
    model = _check_model(model)
    operator = gauss_newton_operator(model, loss_fn, batches, process_group=process_group,
                                     bn_mode=bn_mode, output_fn=output_fn)
    return _operator_eigenvalues(operator, model, k, method, tol, max_iter, generator,
                                 return_info, None, guarantee)


def _not_differentiable_in_x():
    """The ValueError for outputs that depend on x through no differentiable operation."""
    return ValueError("the model's outputs do not depend on x through differentiable "
                      "operations (does the model turn x into integers, as token ids for an "
                      "embedding?): tokens have no input Jacobian; measure one w.r.t. "
                      "floating-point inputs, such as the embeddings")


def _sample_jacobian_norms_exact(out, x):
    """Per-sample spectral norms from C vector-Jacobian products.

    In eval mode sample i's outputs depend on x_i alone, so the gradient of sum_i out[i, c]
    w.r.t. x is row c of every per-sample Jacobian J_i (C, D) at once. Then
    ||J_i||_2 = sqrt(lambda_max(J_i J_i^T)), a C x C eigenproblem per sample.
    """
    n, c = out.shape
    rows = [torch.autograd.grad(out[:, j].sum(), x, retain_graph=j + 1 < c, allow_unused=True)[0]
            for j in range(c)]
    if all(r is None for r in rows):
        raise _not_differentiable_in_x()
    jac = torch.stack([torch.zeros_like(x) if r is None else r for r in rows],
                      dim=1).reshape(n, c, -1)  # (n, C, D)
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
    (jt_dummy,) = torch.autograd.grad(out, x, dummy, create_graph=True, allow_unused=True)
    if jt_dummy is None:  # else (n, *x)
        raise _not_differentiable_in_x()
    v = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x)
    v = v / torch.linalg.vector_norm(v.reshape(n, -1), dim=1).view(-1, *[1] * (x.dim() - 1))
    sq = torch.zeros(n, dtype=x.dtype, device=x.device)
    converged = False
    for _ in range(max_iter):
        (jv,) = torch.autograd.grad(jt_dummy, dummy, v, retain_graph=True)  # (n, C)
        (jtjv,) = torch.autograd.grad(out, x, jv, retain_graph=True)  # (n, *x)
        sq = (jv * jv).sum(1)  # (n,) Rayleigh quotients v^T J^T J v
        flat_v, flat_a = v.reshape(n, -1), jtjv.reshape(n, -1)
        res = torch.linalg.vector_norm(flat_a - sq[:, None] * flat_v, dim=1)
        if bool((res <= tol * sq.clamp_min(1e-30)).all()):
            converged = True
            break
        norms = torch.linalg.vector_norm(flat_a, dim=1).clamp_min(1e-30)
        v = (flat_a / norms[:, None]).view_as(v)
    if not converged:
        warnings.warn(f"jacobian_norm's power iteration stopped at max_iter={max_iter} before "
                      f"reaching tol={tol:g}; raise max_iter or use method='exact'",
                      ConvergenceWarning, stacklevel=3)
    return sq.double().clamp_min(0).sqrt()


def jacobian_norm(model, x, softmax=True, *, batch_size=256, method="auto", tol=1e-6,
                  max_iter=200, generator=None, return_per_sample=False, process_group=None,
                  output_fn=None):
    """Largest input-output Jacobian spectral norm over the samples of x.

        max_i || d g(x_i) / d x_i ||_2,   g = softmax o output_fn o model (or without softmax)

    BatchNorm in eval mode (running statistics; there is no bn_mode: in train mode a sample's
    output would depend on the other samples of its chunk), dropout off; the model's state is
    left exactly as it was. x is fed contiguous (NCHW for images) in the model's dtype: the
    gradients of some backends depend on the memory layout.

    Sequence outputs (N, T, C): the softmax runs over the last axis and J_i is the Jacobian of
    all T*C outputs of sample i w.r.t. all its inputs, ||d vec(g(x_i)) / d vec(x_i)||_2.

    Args:
        model: torch.nn.Module mapping (N, *D) inputs to (N, C) (or (N, T, C)) outputs; a
            torch.compile'd module is measured through its original module.
        x: (N, *D) floating-point tensor (integer tokens have no input Jacobian: TypeError).
        softmax: differentiate the softmaxed outputs (the paper's choice) or the logits.
        batch_size: samples per chunk (memory: batch_size * C * D numbers for "exact").
        method: "exact" (C vector-Jacobian products and a C x C eigenproblem per sample),
            "power" (per-sample power iteration on J^T J, for very large C) or "auto"
            (exact when C <= 128; C counts all outputs of a sample).
        tol, max_iter, generator: for method "power".
        return_per_sample: return the (N,) tensor of per-sample norms instead of the max.
        process_group: torch.distributed group (or "world"); each rank passes its own inputs
            (possibly none) and all return the maximum over the union (all-reduce max).
            Per-sample norms stay this rank's; "power" starts differ from one process's
            (within tol).
        output_fn: optional function of the model's outputs selecting the logits tensor
            (e.g. lambda out: out["logits"]); a dict or tuple output without it: TypeError.

    Returns:
        float, or a float64 (N,) CPU tensor if return_per_sample.
    """
    model, process_group = _check_model(model), _process_group(process_group)
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (jacobian_norm differentiates "
                        f"w.r.t. the inputs; integer tokens have none), got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or (len(x) == 0 and process_group is None):
        raise ValueError("x is empty" if x.dim() else "x must have a batch dimension")
    if method not in ("auto", "exact", "power"):
        raise ValueError(f"unknown method {method!r}; choose from ['auto', 'exact', 'power']")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        raise TypeError(f"batch_size must be an integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    _check_output_fn(output_fn)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    ref = _reference_parameter(model)
    _check_finite([x], "inputs x")
    _check_finite(list(model.parameters()), "the model's parameters")
    norms = []
    with MeasureMode(model, "eval"), torch.enable_grad(), no_tf32():
        for start in range(0, len(x), batch_size):
            xb = _to_model(x[start:start + batch_size], ref).requires_grad_(True)
            out = _output_tensor(_forward(model, xb, output_fn), "jacobian_norm")  # (n, C)
            if out.dim() < 2 or len(out) != len(xb):
                raise ValueError(f"jacobian_norm needs (N, C) outputs, got shape "
                                 f"{tuple(out.shape)}: reshape them in a wrapper module or "
                                 f"output_fn (e.g. (N,) -> (N, 1))")
            if not out.requires_grad:
                raise ValueError("the model's outputs do not depend on the inputs x: are they "
                                 "detached, or computed under torch.no_grad()?")
            if softmax:
                out = torch.softmax(out, dim=-1)
            out = out.flatten(1)  # (n, C), or (n, T * C) for sequence outputs
            use_exact = method == "exact" or (method == "auto" and out.shape[1] <= 128)
            if use_exact:
                norms.append(_sample_jacobian_norms_exact(out, xb).cpu())
            else:
                norms.append(_sample_jacobian_norms_power(out, xb, tol, max_iter,
                                                          generator).cpu())
    norms = torch.cat(norms) if norms else torch.zeros(0, dtype=torch.float64)
    if return_per_sample:
        return norms
    if process_group is None:
        return norms.max().item()
    # norms are >= 0, so 0 stands for a rank without inputs
    top = torch.tensor([norms.max().item() if len(norms) else 0.0], dtype=torch.float64,
                       device=ref.device)
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=process_group)
    return top.item()

