"""Benchmarks: our estimators and training loops side by side with PyHessian, curvlinops, plain
power iteration and a torchvision DataLoader loop (not an appendix section).

On one model and one real CIFAR-10 batch, in one process, it measures:
  - sharpness (top Hessian eigenvalue): ours (common.sharpness, defaults; and with a purely
    random start, without the gradient mixed in) vs PyHessian (`hessian(...)
    .eigenvalues()`, its defaults; and at tol 1e-5) vs curvlinops (HessianLinearOperator + scipy
    eigsh, defaults) vs a plain double-backward power method: wall time, Hessian-vector products
    (HVPs) and relative error against a float64 reference (ARPACK Lanczos, tol 1e-10, on the
    float64 model). At initialisation and again after --trained-steps full-batch GD steps on
    the batch (progressive sharpening, where the paper measures);
  - Gauss-Newton norm: ours vs curvlinops' GGNLinearOperator + eigsh (same reference scheme);
  - Jacobian norm (max over samples of ||d softmax(f(x)) / dx||_2): ours (exact) vs power
    iteration on J^T J to 1e-3 (batched over samples, and one sample at a time), error against a
    float64 jacrev + SVD reference;
  - cost of one HVP in units of one gradient on the same batch;
  - training: one ghost-batch full-batch gradient step and one SGD epoch on a subset with our
    device-resident tensors vs a conventional torchvision DataLoader loop (images per second);
  - equal_accuracy (not in the default sections): sharpness, ours against PyHessian at equal
    actual error (1e-3 and 1e-4 against the float64 reference), each at its cheapest tol that
    gets there, over several seeds (see equal_accuracy.py); with the cost of one product each.
Models: a small CNN without BN and VGG11 / ResNet18 without BN (reduced width on CPU), so that
every tool differentiates the same function (PyHessian switches the model to eval mode; without
BN and dropout, train and eval mode agree). The training comparison uses VGG11 with BN.

Run (about 10 minutes on one core; needs `pip install -r benchmarks/requirements.txt`):
    python3 benchmarks/bench.py --data-root ../shared/data --threads 1
On a GPU: python3 benchmarks/bench.py --device cuda --width 1.0 --data-root <folder>
Tiny check (synthetic data, seconds): python3 benchmarks/bench.py --smoke --dataset
synthetic-cifar10 --out /tmp/bench
Missing PyHessian / curvlinops: their rows are left out (the machine line says "not installed").
Redraw the table from saved results: --plot-only.
Equal accuracy and the sharpness sections, merged into the saved results (equal accuracy about
17 minutes on one shared core; its extra seeds stop after --accuracy-budget minutes):
    python3 benchmarks/bench.py --data-root ../shared/data --threads 1 --trials 1 \
        --sections sharpness equal_accuracy --merge

Writes, under --out (default benchmarks/): results.json (every number, the machine, the config)
and RESULTS.md (the markdown table, also printed).

Shared flags: --trials is the number of timing repeats (the median is reported); --seed seeds the
models, start vectors and shuffles.
"""
import contextlib
import copy
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import equal_accuracy  # noqa: E402  (benchmarks/ is on the path: run as a script or by the tests)
from equal_accuracy import relative_error  # noqa: E402

SECTIONS = ("sharpness", "gauss_newton", "jacobian", "training")
ALL_SECTIONS = SECTIONS + ("equal_accuracy",)
MERGEABLE = ("sharpness", "equal_accuracy")
SHARPNESS_KEYS = ("parameters", "cost_per_hvp", "sharpness", "trained", "sharpness_trained")
SHARPNESS_NOTE = ("Lanczos stops on the residual bound, verified with a fresh random vector, from "
                  "a random start ('ours, gradient start': the loss gradient mixed into it); the "
                  "'ours, tol 1e-3' row: its error is still below PyHessian's at tol 1e-5.")
BENCH_MODELS = ("cnn", "vgg11", "resnet18")
# --smoke: a tiny config (synthetic data works; about half a minute on one core)
SMOKE = dict(trained_steps=2, trials=1, batch_size=16, jacobian_size=4, train_size=64, sgd_batch_size=16,
             chunk_size=32, width=1 / 32, workers=[0], power_max_iter=30, threads=1)
TARGETS = {"sharpness_speedup_vs_pyhessian": 3.0, "sharpness_error": 1e-4,
           "hvp_in_gradients": 2.5, "jacobian_speedup_vs_power": 20.0,
           "training_speedup_vs_dataloader": 2.0}


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    parser = common.make_parser(__doc__, trials=3, out="benchmarks")
    parser.add_argument("--dataset", default="cifar10", choices=list(common.DATASETS))
    parser.add_argument("--models", nargs="+", default=list(BENCH_MODELS), choices=BENCH_MODELS)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=ALL_SECTIONS)
    parser.add_argument("--width", type=float, default=None,
                        help="VGG11 / ResNet18 width multiplier (default: 0.125 on CPU, 1 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="examples in the batch the curvature estimators see")
    parser.add_argument("--jacobian-size", type=int, default=64, help="samples for the Jacobian norm")
    parser.add_argument("--train-size", type=int, default=2048, help="images in the training subset")
    parser.add_argument("--sgd-batch-size", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=256, help="ghost batch of the full-batch step")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader num_workers settings to compare against")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default). On a shared, loaded machine "
                             "use 1: a descheduled OpenMP thread stalls every parallel op")
    parser.add_argument("--trained-steps", type=int, default=100,
                        help="sharpness is also measured after this many full-batch GD steps on "
                             "the batch (0: only at initialisation)")
    parser.add_argument("--trained-lr", type=float, default=0.05, help="learning rate of those steps")
    parser.add_argument("--power-tol", type=float, default=1e-4,
                        help="plain power method: stop when the eigenvalue changes by less (relative)")
    parser.add_argument("--power-max-iter", type=int, default=100)
    g = parser.add_argument_group("equal_accuracy section")
    g.add_argument("--ours-tols", type=float, nargs="+", default=list(equal_accuracy.OURS_TOLS))
    g.add_argument("--pyhessian-tols", type=float, nargs="+",
                   default=list(equal_accuracy.PYHESSIAN_TOLS))
    g.add_argument("--accuracy-targets", type=float, nargs="+",
                   default=list(equal_accuracy.ACCURACY_TARGETS),
                   help="relative errors against the float64 reference")
    g.add_argument("--pyhessian-max-iter", type=int, default=1000)
    g.add_argument("--accuracy-seeds", type=int, default=3,
                   help="seeds (from --seed) at each chosen setting")
    g.add_argument("--accuracy-budget", type=float, default=10.0,
                   help="minutes: past this, chosen settings are run at the base seed only")
    g.add_argument("--merge", action="store_true",
                   help="with --sections sharpness and/or equal_accuracy only: replace those "
                        "sections in the saved results.json under --out, keep everything else")
    args = parser.parse_args(argv)
    if args.smoke:  # tiny defaults; flags given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    common.check(args.trained_steps >= 0, f"--trained-steps must be >= 0, got {args.trained_steps}")
    common.check_positive(args, "trained_lr", "batch_size", "jacobian_size", "train_size", "sgd_batch_size",
                          "chunk_size", "power_tol", "power_max_iter", "pyhessian_max_iter",
                          "accuracy_seeds", "accuracy_budget")
    common.check(not args.merge or set(args.sections) <= set(MERGEABLE),
                 f"--merge is for --sections {' and/or '.join(MERGEABLE)} alone")
    common.check(all(t > 0 for t in args.ours_tols + args.pyhessian_tols + args.accuracy_targets),
                 "--ours-tols/--pyhessian-tols/--accuracy-targets must be positive")
    common.check(args.width is None or args.width > 0, f"--width must be positive, got {args.width}")
    common.check(args.threads >= 0, f"--threads must be >= 0, got {args.threads}")
    common.check(all(w >= 0 for w in args.workers), f"--workers must be >= 0, got {args.workers}")
    need = max(args.batch_size, args.jacobian_size, args.train_size)
    common.check(need <= 50000, f"--batch-size/--jacobian-size/--train-size must be <= 50000")
    common.check_common(args, dataset=args.dataset)
    return args


# ----------------------------------------------------------------------------- data and models


def load_images(args, device):
    """Channel-standardised training images (the DataLoader pipeline uses the same statistics)."""
    n = max(args.batch_size, args.jacobian_size, args.train_size)
    return common.load_data(args.dataset, args.data_root, device=device, standardise="channel",
                            train_size=n, test_size=1, download=args.download)


class SmallCNN(nn.Sequential):
    """conv3x3(3, 16) -> ReLU -> maxpool -> conv3x3(16, 32) -> ReLU -> maxpool -> Linear(2048, 64)
    -> ReLU -> Linear(64, 10): no BN, no dropout (~137k parameters)."""

    def __init__(self, num_classes=10):
        super().__init__(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(),
                         nn.Linear(64, num_classes))


def build_bench_model(name, width, num_classes, seed, device, batch_norm=False):
    torch.manual_seed(seed)
    if name == "cnn":
        model = SmallCNN(num_classes)
    else:
        model = common.build_model(name, num_classes=num_classes, batch_norm=batch_norm, width=width)
    return model.to(device)


def parameter_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- timing


def synchronise(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=1):
    """(median seconds over `repeats` calls, the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        synchronise(device)
        start = time.perf_counter()
        result = fn()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def gradient_seconds(model, x, y, device, repeats):
    """Median time of one gradient (forward + backward of the mean cross entropy) on (x, y)."""
    def gradient():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    gradient()  # warm-up
    seconds, _ = timed(gradient, device, repeats)
    model.zero_grad(set_to_none=True)
    return seconds


def optional_import(name):
    """The module, or None if it is not installed (its rows then say so)."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


class CountCalls:
    """Context manager: wrap `owner.attr` (a function) to count its calls, or the columns of its
    matrix argument (`columns_of`), restoring it on exit."""

    def __init__(self, owner, attr, columns_of=None):
        self.owner, self.attr, self.columns_of, self.count = owner, attr, columns_of, 0

    def __enter__(self):
        self.original = getattr(self.owner, self.attr)
        original = self.original

        def wrapped(*args, **kwargs):
            self.count += 1 if self.columns_of is None else self.columns_of(*args, **kwargs)
            return original(*args, **kwargs)
        setattr(self.owner, self.attr, wrapped)
        return self

    def __exit__(self, *exc):
        setattr(self.owner, self.attr, self.original)
        return False


# ----------------------------------------------------------------------------- eigen-solvers


def reference_top_eigenvalue(operator_fn, model, x, y):
    """Float64 reference: ARPACK Lanczos (scipy eigsh, tol 1e-10) on the float64 model's operator
    (`common.hessian_operator` or `common.gauss_newton_operator`), whose every product is checked
    against dense matrices in tests/test_estimators.py."""
    from scipy.sparse.linalg import LinearOperator, eigsh
    model64 = copy.deepcopy(model).double()
    matvec, dim = operator_fn(model64, F.cross_entropy, [(x.double(), y)])
    device = next(model64.parameters()).device
    op = LinearOperator((dim, dim), dtype=np.float64, matvec=lambda v: matvec(
        torch.from_numpy(np.ascontiguousarray(v).reshape(-1)).to(device)).cpu().numpy())
    v0 = np.random.default_rng(0).standard_normal(dim)
    return float(eigsh(op, k=1, which="LA", tol=1e-10, v0=v0, return_eigenvectors=False)[0])


def sharpness_ours(model, x, y, **options):
    info = common.sharpness(model, F.cross_entropy, [(x, y)], return_info=True, **options)
    return info.eigenvalues[0], info.matvecs


def sharpness_pyhessian(model, x, y, seed, **options):
    """PyHessian, by default with its defaults (power iteration, tol 1e-3 on the relative change,
    maxIter 100); `options` go to `eigenvalues`. It leaves the model in eval mode with
    graph-carrying .grad fields: both are undone afterwards."""
    with pyhessian_session(model) as ph:
        torch.manual_seed(seed)  # PyHessian draws its start vector from the global generator
        with CountCalls(ph, "hessian_vector_product") as counter:
            h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)
            eigenvalues, _ = h.eigenvalues(**options)
    return eigenvalues[0], counter.count


@contextlib.contextmanager
def pyhessian_session(model):
    """The pyhessian.hessian module, with the model's .grad fields cleared before and after and
    its train/eval mode restored after (PyHessian switches to eval mode and leaves
    graph-carrying .grad fields)."""
    import pyhessian.hessian  # noqa: F401  (the package re-exports the class under this name)
    was_training = model.training
    model.zero_grad(set_to_none=True)
    try:
        yield sys.modules["pyhessian.hessian"]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def curvlinops_top_eigenvalue(operator_class, model, x, y):
    """curvlinops operator (its defaults, including the determinism check) + scipy eigsh(k=1,
    which="LA", defaults). Counts every product the operator does, the check's included."""
    from scipy.sparse.linalg import eigsh
    params = [p for p in model.parameters() if p.requires_grad]
    with CountCalls(operator_class, "_matmat_batch",
                    columns_of=lambda self, X, y, M: M[0].shape[-1]) as counter:
        op = operator_class(model, nn.CrossEntropyLoss(), params, [(x, y)]).to_scipy()
        value = float(eigsh(op, k=1, which="LA", return_eigenvectors=False)[0])
    return value, counter.count


def sharpness_plain_power(model, x, y, tol, max_iter, seed):
    """Textbook power iteration: every product rebuilds the gradient graph (double backward);
    stops when the Rayleigh quotient changes by less than tol (relative)."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g).to(p) for p in params]
    norm = math.sqrt(sum((t * t).sum().item() for t in v))
    v = [t / norm for t in v]
    previous, products = None, 0
    for _ in range(max_iter):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        hv = torch.autograd.grad(grads, params, v)
        products += 1
        value = sum((a * b).sum() for a, b in zip(hv, v)).item()
        norm = math.sqrt(sum((t * t).sum().item() for t in hv))
        v = [t / norm for t in hv]
        if previous is not None and abs(value - previous) <= tol * abs(value):
            break
        previous = value
    return value, products


def hvp_seconds(model, x, y, device, repeats):
    """Median time of one of our HVPs on the reused graph, and of building that graph."""
    build, (matvec, dim) = timed(
        lambda: common.hessian_operator(model, F.cross_entropy, [(x, y)]), device)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(1)).to(x)
    matvec(v)  # warm-up
    seconds, _ = timed(lambda: matvec(v), device, repeats)
    return seconds, build


def pyhessian_hvp_seconds(model, x, y, device, repeats):
    """Median time of one PyHessian HVP (`hessian_vector_product` on the graph its `hessian`
    object built), the model restored afterwards (`pyhessian_session`)."""
    with pyhessian_session(model) as ph:
        h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)
        g = torch.Generator().manual_seed(1)
        v = [torch.randn(p.shape, generator=g).to(p) for p in h.params]
        ph.hessian_vector_product(h.gradsH, h.params, v)  # warm-up
        seconds, _ = timed(lambda: ph.hessian_vector_product(h.gradsH, h.params, v), device,
                           repeats)
    return seconds


def curvlinops_product_seconds(operator_class, model, x, y, device, repeats):
    params = [p for p in model.parameters() if p.requires_grad]
    op = operator_class(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    v = torch.randn(op.shape[1], generator=torch.Generator().manual_seed(1)).to(x)
    op @ v  # warm-up
    seconds, _ = timed(lambda: op @ v, device, repeats)
    return seconds


# ----------------------------------------------------------------------------- Jacobian norm


def jacobian_power(model, x, tol, max_iter=500, seed=0):
    """Power iteration on each sample's J^T J (J = d softmax(f(x_i)) / dx_i), all samples of x at
    once (eval mode: samples independent); J v by torch.func.jvp, J^T u by the vjp of one forward
    pass. Stops when every sample's norm estimate changes by less than tol (relative).

    Returns (max norm, iterations)."""
    def f(inputs):
        return torch.softmax(model(inputs), dim=1)  # (n, C)

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            _, vjp_fn = torch.func.vjp(f, x)
            g = torch.Generator().manual_seed(seed)
            v = torch.randn(x.shape, generator=g).to(x)
            previous = None
            for it in range(1, max_iter + 1):
                v = v / v.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
                _, jv = torch.func.jvp(f, (x,), (v,))  # (n, C)
                (v,) = vjp_fn(jv)  # J^T J v, (n, *D)
                sigma = jv.norm(dim=1)  # (n,) ||J v|| with ||v|| = 1
                if previous is not None and bool(((sigma - previous).abs()
                                                  <= tol * sigma).all()):
                    break
                previous = sigma
    finally:
        model.train(was_training)
    return sigma.max().item(), it


def jacobian_power_per_sample(model, x, tol, seed=0):
    """The same power iteration run on one sample at a time (the straightforward loop)."""
    results = [jacobian_power(model, x[i:i + 1], tol, seed=seed + i) for i in range(len(x))]
    return max(r[0] for r in results), sum(r[1] for r in results)


def jacobian_reference(model, x):
    """Float64 reference: each sample's full Jacobian by vmap(jacrev), then its largest singular
    value (eval mode, no BN in the benchmark models)."""
    model64 = copy.deepcopy(model).double().eval()

    def f(xi):  # (*D) -> (C,)
        return torch.softmax(model64(xi[None]), dim=1)[0]
    jac = torch.func.vmap(torch.func.jacrev(f))(x.double())  # (n, C, *D)
    return torch.linalg.matrix_norm(jac.flatten(2), ord=2).max().item()


# ----------------------------------------------------------------------------- training loops


class ArrayDataset(torch.utils.data.Dataset):
    """A torchvision-style CIFAR data set over uint8 arrays: PIL image -> ToTensor -> Normalize,
    exactly what torchvision.datasets.CIFAR10 does per item."""

    def __init__(self, images, labels, mean, std):
        import torchvision.transforms as T
        self.images, self.labels = images, labels
        self.transform = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def dataloader_dataset(args, n):
    arrays = common.load_arrays(args.dataset, args.data_root, args.download)
    mean, std = common.standardisation_stats(arrays["x_train"], "channel")
    return ArrayDataset(arrays["x_train"][:n], arrays["y_train"][:n],
                        mean.flatten().tolist(), std.flatten().tolist())


def sgd_epoch_tensors(model, optimizer, x, y, batch_size, generator):
    """One SGD epoch over device tensors: a random permutation, batches are index slices."""
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for s in common.index_chunks(len(x), batch_size):
        idx = order[s]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()


def sgd_epoch_loader(model, optimizer, loader, device):
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()


def full_batch_step_loader(model, optimizer, loader, n, device):
    """One full-batch gradient step accumulated over a DataLoader's batches (the usual way)."""
    optimizer.zero_grad(set_to_none=True)
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        (F.cross_entropy(model(xb), yb) * (len(xb) / n)).backward()
    optimizer.step()


# ----------------------------------------------------------------------------- measurements


def bench_sharpness(model, x, y, args, device, libs):
    """Rows for one model: every method's value, HVPs, seconds and error against the reference."""
    reference = reference_top_eigenvalue(common.hessian_operator, model, x, y)
    methods = {"ours (Lanczos)": lambda: sharpness_ours(model, x, y),
               "ours, gradient start (opt-in)": lambda: sharpness_ours(model, x, y,
                                                                       gradient_start=True),
               # tol bounds the residual, so the eigenvalue error is far below it
               "ours, tol 1e-3": lambda: sharpness_ours(model, x, y, tol=1e-3),
               "plain power (double backward)": lambda: sharpness_plain_power(
                   model, x, y, args.power_tol, args.power_max_iter, args.seed)}
    if libs["pyhessian"]:
        methods["PyHessian"] = lambda: sharpness_pyhessian(model, x, y, args.seed)
        # at PyHessian's default tol its error is ~1e-3; this row shows its cost at our accuracy
        methods["PyHessian, tol 1e-5 (not its default)"] = lambda: sharpness_pyhessian(
            model, x, y, args.seed, tol=1e-5)
    if libs["curvlinops"]:
        methods["curvlinops + eigsh"] = lambda: curvlinops_top_eigenvalue(
            libs["curvlinops"].HessianLinearOperator, model, x, y)
    rows = {}
    for name, fn in methods.items():
        seconds, (value, products) = timed(fn, device, args.trials)
        rows[name] = dict(value=value, hvps=products, seconds=seconds,
                          error=relative_error(value, reference))
    return {"reference": reference, "methods": rows}


def bench_equal_accuracy(model, x, y, args, device, libs, deadline):
    """Ours and PyHessian at equal actual error (equal_accuracy.compare): every run timed here,
    one after the other, on the same model state."""
    import warnings
    reference = reference_top_eigenvalue(common.hessian_operator, model, x, y)

    def run_ours(tol, seed):
        def fn():
            with warnings.catch_warnings():  # a run stopped by max_iter is recorded as such
                warnings.simplefilter("ignore", common.ConvergenceWarning)
                return common.sharpness(model, F.cross_entropy, [(x, y)], tol=tol,
                                        generator=torch.Generator().manual_seed(seed),
                                        return_info=True)
        seconds, info = timed(fn, device, args.trials)
        return dict(value=info.eigenvalues[0], products=info.matvecs, seconds=seconds,
                    converged=bool(info.converged))

    def run_pyhessian(tol, seed):
        seconds, (value, products) = timed(lambda: sharpness_pyhessian(
            model, x, y, seed, tol=tol, maxIter=args.pyhessian_max_iter), device, args.trials)
        return dict(value=value, products=products, seconds=seconds)

    seeds = [args.seed + i for i in range(args.accuracy_seeds)]
    return equal_accuracy.compare(run_ours, run_pyhessian if libs["pyhessian"] else None,
                                  reference, seeds, tuple(sorted(args.ours_tols, reverse=True)),
                                  tuple(sorted(args.pyhessian_tols, reverse=True)),
                                  tuple(sorted(args.accuracy_targets, reverse=True)), deadline)


def equal_accuracy_cost(model, x, y, device, libs, repeats=5):
    """One gradient, one of our HVPs and one PyHessian HVP on the same batch, side by side."""
    cost = dict(gradient_s=gradient_seconds(model, x, y, device, repeats))
    cost["ours_hvp_s"], cost["ours_graph_build_s"] = hvp_seconds(model, x, y, device, repeats)
    if libs["pyhessian"]:
        cost["pyhessian_hvp_s"] = pyhessian_hvp_seconds(model, x, y, device, repeats)
    return cost


def bench_gauss_newton(model, x, y, args, device, libs):
    reference = reference_top_eigenvalue(common.gauss_newton_operator, model, x, y)

    def ours():
        info = common.gauss_newton_norm(model, F.cross_entropy, [(x, y)], return_info=True)
        return info.eigenvalues[0], info.matvecs
    methods = {"ours (Lanczos)": ours}
    if libs["curvlinops"]:
        methods["curvlinops GGN + eigsh"] = lambda: curvlinops_top_eigenvalue(
            libs["curvlinops"].GGNLinearOperator, model, x, y)
    rows = {}
    for name, fn in methods.items():
        seconds, (value, products) = timed(fn, device, args.trials)
        rows[name] = dict(value=value, products=products, seconds=seconds,
                          error=relative_error(value, reference))
    return {"reference": reference, "methods": rows}


def bench_jacobian(model, x, args, device):
    reference = jacobian_reference(model, x)
    methods = {"ours (exact)": lambda: (common.jacobian_norm(model, x), 0),
               "power on J^T J, batched": lambda: jacobian_power(model, x, 1e-3, seed=args.seed),
               "power on J^T J, per sample": lambda: jacobian_power_per_sample(
                   model, x, 1e-3, seed=args.seed)}
    rows = {}
    for name, fn in methods.items():
        seconds, (value, iterations) = timed(fn, device, args.trials)
        rows[name] = dict(value=value, iterations=iterations, seconds=seconds,
                          error=relative_error(value, reference))
    return {"reference": reference, "samples": len(x), "methods": rows}


def bench_cost_per_hvp(model, x, y, args, device, libs):
    grad = gradient_seconds(model, x, y, device, args.trials)
    hvp, build = hvp_seconds(model, x, y, device, args.trials)
    row = dict(gradient_s=grad, ours_hvp_s=hvp, ours_graph_build_s=build,
               ours_hvp_in_gradients=hvp / grad, ours_graph_build_in_gradients=build / grad)
    if libs["curvlinops"]:
        seconds = curvlinops_product_seconds(libs["curvlinops"].HessianLinearOperator, model, x,
                                             y, device, args.trials)
        row.update(curvlinops_hvp_s=seconds, curvlinops_hvp_in_gradients=seconds / grad)
    return row


def bench_training(data, args, device):
    """Images per second: full-batch (ghost-batch) step and SGD epoch, tensors vs DataLoader."""
    n = args.train_size
    x, y = data.x_train[:n], data.y_train[:n]
    dataset = dataloader_dataset(args, n)
    model = build_bench_model("vgg11", args.width, data.num_classes, args.seed, device,
                              batch_norm=True).train()
    optimizer = common.sgd(model, lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed)
    loops = {"full-batch step, tensors (ours)": lambda: common.train_step(
        model, optimizer, F.cross_entropy, x, y, ghost_batch_size=args.chunk_size),
        "SGD epoch, tensors (ours)": lambda: sgd_epoch_tensors(
            model, optimizer, x, y, args.sgd_batch_size, g)}
    for workers in args.workers:
        full = torch.utils.data.DataLoader(dataset, batch_size=args.chunk_size, shuffle=False,
                                           num_workers=workers)
        shuffled = torch.utils.data.DataLoader(dataset, batch_size=args.sgd_batch_size,
                                               shuffle=True, num_workers=workers,
                                               pin_memory=device.type == "cuda")
        loops[f"full-batch step, DataLoader (workers={workers})"] = (
            lambda loader=full: full_batch_step_loader(model, optimizer, loader, n, device))
        loops[f"SGD epoch, DataLoader (workers={workers})"] = (
            lambda loader=shuffled: sgd_epoch_loader(model, optimizer, loader, device))
    sgd_epoch_tensors(model, optimizer, x[:args.sgd_batch_size * 2], y[:args.sgd_batch_size * 2],
                      args.sgd_batch_size, g)  # warm-up
    rows = {}
    for name, fn in loops.items():
        seconds, _ = timed(fn, device, args.trials)
        rows[name] = dict(seconds=seconds, images_per_s=n / seconds)
    return {"images": n, "model": f"vgg11 (BN, width {args.width:g})", "loops": rows}


def train_on_batch(model, x, y, steps, lr):
    """Full-batch gradient descent on (x, y): sharpness rises towards 2 / lr (progressive
    sharpening), the regime in which the paper tracks it. Returns the final loss and accuracy."""
    optimizer = common.sgd(model, lr)
    for _ in range(steps):
        loss, accuracy = common.train_step(model, optimizer, F.cross_entropy, x, y)
    optimizer.zero_grad(set_to_none=True)
    return dict(steps=steps, lr=lr, loss=loss, accuracy=accuracy)


# ----------------------------------------------------------------------------- summary


def machine_info(device, libs):
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    from importlib import metadata
    for name, distribution in (("pyhessian", "pyhessian"), ("curvlinops", "curvlinops-for-pytorch")):
        info[name] = metadata.version(distribution) if libs[name] else "not installed"
    import scipy
    info["scipy"] = scipy.__version__
    return info


def check_targets(results):
    """Each target: measured value, threshold, pass/fail (None where not measured)."""
    out = {}
    for model, r in results["models"].items():
        for key, state in (("sharpness", "init"), ("sharpness_trained", "trained")):
            s = r.get(key, {}).get("methods", {})
            ours = s.get("ours (Lanczos)")
            if ours and "PyHessian" in s:
                speedup = s["PyHessian"]["seconds"] / ours["seconds"]
                out[f"{model} ({state}): sharpness speedup vs PyHessian (>= 3x), error <= 1e-4"] = dict(
                    value=speedup, error=ours["error"], baseline_error=s["PyHessian"]["error"],
                    met=bool(
                        speedup >= TARGETS["sharpness_speedup_vs_pyhessian"]
                        and ours["error"] <= TARGETS["sharpness_error"]))
        cost = r.get("cost_per_hvp")
        if cost:
            out[f"{model}: our HVP in gradients (<= 2.5)"] = dict(
                value=cost["ours_hvp_in_gradients"],
                met=bool(cost["ours_hvp_in_gradients"] <= TARGETS["hvp_in_gradients"]))
        j = r.get("jacobian", {}).get("methods", {})
        if j:
            ours_j = j["ours (exact)"]
            for baseline in ("batched", "per sample"):
                b = j[f"power on J^T J, {baseline}"]
                speedup = b["seconds"] / ours_j["seconds"]
                out[f"{model}: Jacobian norm speedup vs power ({baseline}) (>= 20x), exact"] = dict(
                    value=speedup, error=ours_j["error"],
                    met=bool(speedup >= TARGETS["jacobian_speedup_vs_power"]
                             and ours_j["error"] <= 1e-5))
    if "equal_accuracy" in results:
        out.update(equal_accuracy.targets(results["equal_accuracy"]))
    t = results.get("training")
    if t:
        loops = t["loops"]
        for kind in ("full-batch step", "SGD epoch"):
            ours = loops[f"{kind}, tensors (ours)"]["images_per_s"]
            best = max(v["images_per_s"] for k, v in loops.items()
                       if k.startswith(kind) and "DataLoader" in k)
            out[f"{kind}: tensors vs best DataLoader (>= 2x is a GPU target; this is "
                f"{results['machine']['device']})"] = dict(
                value=ours / best, met=bool(ours / best >= TARGETS["training_speedup_vs_dataloader"])
                if results["machine"]["device"].startswith("cuda") else None)
    return out


def fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def markdown(results):
    m, c = results["machine"], results["config"]
    lines = ["# Benchmarks", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
             f"device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}; torch {m['torch']}, "
             f"python {m['python']}, scipy {m['scipy']}, pyhessian {m['pyhessian']}, "
             f"curvlinops {m['curvlinops']}; {m['date']}.",
             f"Data: {c['dataset']}, first {c['batch_size']} training images (channel-standardised) "
             f"for the curvature estimators, {c['jacobian_size']} for the Jacobian norm. "
             f"VGG11/ResNet18 width {c['width']:g}, no BN. Times: median of {c['trials']} runs. "
             f"Errors are relative, against float64 references (ARPACK Lanczos tol 1e-10 on the "
             f"float64 model; float64 jacrev + SVD for the Jacobian).", ""]
    rerun = results.get("sharpness_rerun")
    if rerun:  # the sharpness sections of a later run (--sections sharpness) merged in
        lines += [f"Sharpness sections: from a later run ({rerun['date']}, pyhessian "
                  f"{rerun['pyhessian']}, curvlinops {rerun['curvlinops']}), on a more loaded "
                  f"machine: compare times within a table only. {rerun.get('note', '')}", ""]
    for name, r in results["models"].items():
        lines += [f"## {name} ({r['parameters']:,} parameters)", ""]
        cost = r.get("cost_per_hvp")
        if cost:
            extra = (f"; curvlinops HVP {fmt(cost['curvlinops_hvp_in_gradients'])} gradients"
                     if "curvlinops_hvp_in_gradients" in cost else "")
            lines += [f"One gradient: {cost['gradient_s'] * 1e3:.1f} ms. Our HVP (graph reused): "
                      f"{cost['ours_hvp_s'] * 1e3:.1f} ms = **{cost['ours_hvp_in_gradients']:.2f} "
                      f"gradients**; building the graph: {cost['ours_graph_build_in_gradients']:.2f} "
                      f"gradients{extra}.", ""]
        titles = {"sharpness": "Sharpness at initialisation",
                  "gauss_newton": "Gauss-Newton norm at initialisation"}
        if "trained" in r:
            t = r["trained"]
            titles["sharpness_trained"] = (
                f"Sharpness after {t['steps']} full-batch GD steps on the batch, lr {t['lr']:g} "
                f"(loss {t['loss']:.3f}, accuracy {t['accuracy']:.2f}; 2/lr = {2 / t['lr']:g})")
        for section, title in titles.items():
            s = r.get(section)
            if not s:
                continue
            count = "products" if section == "gauss_newton" else "hvps"
            ours_t = s["methods"]["ours (Lanczos)"]["seconds"]
            lines += [f"{title} (reference {s['reference']:.8g})", "",
                      f"| method | value | {count} | seconds | x our time | rel. error |",
                      "|---|---|---|---|---|---|"]
            for meth, row in s["methods"].items():
                lines.append(f"| {meth} | {row['value']:.7g} | {row[count]} | {row['seconds']:.2f} "
                             f"| {row['seconds'] / ours_t:.2f} | {row['error']:.1e} |")
            lines.append("")
        j = r.get("jacobian")
        if j:
            ours_t = j["methods"]["ours (exact)"]["seconds"]
            lines += [f"Jacobian norm, max over {j['samples']} samples (reference "
                      f"{j['reference']:.8g})", "",
                      "| method | value | power iterations | seconds | x our time | rel. error |",
                      "|---|---|---|---|---|---|"]
            for meth, row in j["methods"].items():
                lines.append(f"| {meth} | {row['value']:.7g} | {row['iterations']} | "
                             f"{row['seconds']:.3f} | {row['seconds'] / ours_t:.1f} | "
                             f"{row['error']:.1e} |")
            lines.append("")
    t = results.get("training")
    if t:
        lines += [f"## Training loops: {t['model']}, {t['images']} images", "",
                  "| loop | seconds | images / s |", "|---|---|---|"]
        for name, row in t["loops"].items():
            lines.append(f"| {name} | {row['seconds']:.2f} | {row['images_per_s']:.0f} |")
        lines.append("")
    if "equal_accuracy" in results:
        lines += equal_accuracy.markdown(results["equal_accuracy"])
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, row in results["targets"].items():
        err = f" (our error {row['error']:.1e}" if "error" in row else ""
        if "baseline_error" in row:
            err += f"; PyHessian's {row['baseline_error']:.1e}"
        if "note" in row:
            err += f"; {row['note']}"
        err += ")" if err else ""
        met = {True: "yes", False: "**no**", None: "not measurable here"}[row["met"]]
        lines.append(f"| {name} | {row['value']:.2f}{err} | {met} |")
    lines.append("")
    if not results["machine"]["device"].startswith("cuda"):
        lines += ["GPU: not measured (no GPU was available for this run); the GPU training-loop "
                  "target and a GPU-hours projection need a CUDA run of this script.", ""]
    lines += [f"Wall time of the whole benchmark: {results['wall_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def run(args, device):
    libs = {"pyhessian": optional_import("pyhessian"), "curvlinops": optional_import("curvlinops")}
    data = load_images(args, device)
    results = {"machine": machine_info(device, libs),
               "config": {k: v for k, v in vars(args).items() if k != "plot_only"},
               "models": {}}
    x, y = data.x_train[:args.batch_size], data.y_train[:args.batch_size]
    xj = data.x_train[:args.jacobian_size]
    ea, ea_seconds = None, 0.0
    if "equal_accuracy" in args.sections:
        keys = ("dataset", "batch_size", "width", "trained_steps", "trained_lr", "ours_tols",
                "pyhessian_tols", "accuracy_targets", "pyhessian_max_iter", "trials", "threads")
        ea = results["equal_accuracy"] = {
            "machine": results["machine"], "models": {},
            "config": dict({k: getattr(args, k) for k in keys},
                           seeds=[args.seed + i for i in range(args.accuracy_seeds)])}
        ea_start = time.perf_counter()

        def deadline():
            return time.perf_counter() - ea_start > 60 * args.accuracy_budget
    bar = common.progress(total=len(args.models) + 1, disable=args.no_progress, desc="bench")
    for name in args.models:
        model = build_bench_model(name, args.width, data.num_classes, args.seed, device)
        r = results["models"][name] = {"parameters": parameter_count(model)}
        gradient_seconds(model, x, y, device, 1)  # warm-up (allocator, kernels)
        if ea is not None:
            start = time.perf_counter()
            e = ea["models"][name] = {"parameters": r["parameters"],
                                      "cost": equal_accuracy_cost(model, x, y, device, libs)}
            e["init"] = bench_equal_accuracy(model, x, y, args, device, libs, deadline)
            ea_seconds += time.perf_counter() - start
        if "sharpness" in args.sections:
            r["cost_per_hvp"] = bench_cost_per_hvp(model, x, y, args, device, libs)
            r["sharpness"] = bench_sharpness(model, x, y, args, device, libs)
        if "gauss_newton" in args.sections:
            r["gauss_newton"] = bench_gauss_newton(model, x, y, args, device, libs)
        if "jacobian" in args.sections:
            r["jacobian"] = bench_jacobian(model, xj, args, device)
        if args.trained_steps and ("sharpness" in args.sections or ea is not None):
            r["trained"] = train_on_batch(model, x, y, args.trained_steps, args.trained_lr)
            if "sharpness" in args.sections:
                r["sharpness_trained"] = bench_sharpness(model, x, y, args, device, libs)
            if ea is not None:
                start = time.perf_counter()
                e["trained_state"] = r["trained"]
                e["trained"] = bench_equal_accuracy(model, x, y, args, device, libs, deadline)
                ea_seconds += time.perf_counter() - start
        bar.update()
    if "training" in args.sections:
        results["training"] = bench_training(data, args, device)
    bar.update()
    bar.close()
    if ea is not None:
        ea["wall_s"] = ea_seconds
    return results


def merged(saved, new, sections):
    """The saved results with the sections of a later run (--merge) in place of theirs."""
    if "equal_accuracy" in sections:
        saved["equal_accuracy"] = new["equal_accuracy"]
    if "sharpness" in sections:
        for name, r in new["models"].items():
            saved["models"].setdefault(name, {}).update(
                {k: r[k] for k in SHARPNESS_KEYS if k in r})
        saved["sharpness_rerun"] = dict(new["machine"], note=SHARPNESS_NOTE)
    return saved


def saved_results(path):
    """The results.json of an earlier run, or a one-line error (exit status 2) naming the file."""
    try:
        return common.load_json(path)
    except (OSError, ValueError) as e:
        common.fail(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0]}): "
                    f"run without --plot-only / --merge to write it again")


def main(args):
    out = Path(args.out)
    if args.plot_only:
        results = saved_results(out / "results.json")
    else:
        # read before the run, so that a damaged file stops it at once, not after the run
        saved = saved_results(out / "results.json") if (
            args.merge and (out / "results.json").exists()) else None
        device = common.resolve_device(args.device)
        if args.width is None:
            args.width = 1.0 if device.type == "cuda" else 0.125
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        results = run(args, device)
        results["wall_s"] = time.perf_counter() - start
        if saved is not None:
            results = merged(saved, results, args.sections)
        results["targets"] = check_targets(results)
        common.save_json(out / "results.json", results)
    results["targets"] = check_targets(results)  # derived: --plot-only recomputes them
    text = markdown(results)
    common.atomic_write(out / "RESULTS.md", lambda f: f.write(text), mode="w")
    print(text)
    return results


if __name__ == "__main__":
    main(parse_args())
