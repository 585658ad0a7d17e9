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
# =============================================================================

# (estimators go here)


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


# (VGG11 and ResNet18 go here)


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


# =============================================================================
# 5. Runs
# =============================================================================

def atomic_write(path, write, mode="wb"):
    """Writes a file by `write(f)` on a temporary file next to it, then os.replace: readers see
    the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
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
