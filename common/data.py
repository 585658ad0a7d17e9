"""Data: CIFAR-10/100 (or synthetic stand-ins of the same shapes) as standardised tensors on a
device; subsets, standardisation statistics, and the torchvision download behind --download."""
import functools
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .runs import atomic_write

# Data sets are registries from name to number of classes. The real ones load
# `<root>/<name>.npz` (uint8 x_train (N, 32, 32, 3), int64 y_train, x_test, y_test, classes);
# the synthetic ones are stand-ins of the same shapes, used only when asked for by name.
DATASETS = {"cifar10": 10, "cifar100": 100, "synthetic-cifar10": 10, "synthetic-cifar100": 100}
STANDARDISATIONS = ("component", "channel", "none")


ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SHAPE = (32, 32, 3)
LAYOUT = "uint8 images of shape (N, 32, 32, 3), channels last, as torchvision's CIFAR .data"


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the problem."""


@dataclass
class Data:
    """A data set as tensors on one device: images (N, C, H, W) float32, labels (N,) int64."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


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
        try:
            train = cls(tmp, train=True, download=True)
            test = cls(tmp, train=False, download=True)
        except OSError as e:  # URLError, timeouts, DNS failures: all OSError
            raise DataError(f"could not download {name}: no network ({_reason(e)}); place "
                            f"{name}.npz in {Path(root)} (README, Data)") from None
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
    check_data_file(path, DATASETS[name])
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ARRAY_KEYS}
            if "classes" in f:
                arrays["classes"] = f["classes"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # e.g. a corrupt member
        raise DataError(f"data file {path}: cannot be read ({_reason(e)}); replace it "
                        f"(README, Data)") from None
    return arrays


def _reason(error):
    """A short one-line reason of an exception."""
    text = str(getattr(error, "reason", None) or error).splitlines()
    return (text[0] if text and text[0] else type(error).__name__)[:120]


def _array_header(archive, key):
    """(shape, dtype) of `key` in an open npz archive, read from the .npy header alone."""
    with archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
    return shape, dtype


def check_data_file(path, num_classes):
    """Checks a `<name>.npz` data file without decompressing its images: a readable archive with
    x_train, y_train, x_test, y_test; images uint8 (N, 32, 32, 3); labels integer in
    [0, num_classes) and as many as the images, for both splits. Raises DataError naming the
    file and the first problem found."""
    path = Path(path)

    def bad(problem):
        return DataError(f"data file {path}: {problem}")

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise bad(f"not a readable npz archive ({_reason(e)}); replace it "
                  f"(README, Data)") from None
    with archive:
        names = set(archive.namelist())
        missing = [k for k in ARRAY_KEYS if f"{k}.npy" not in names]
        if missing:
            raise bad(f"missing array(s) {', '.join(missing)}; expected {', '.join(ARRAY_KEYS)}")
        for split in ("train", "test"):
            try:
                shape, dtype = _array_header(archive, f"x_{split}")
                with archive.open(f"y_{split}.npy") as f:
                    y = np.lib.format.read_array(f, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise bad(f"x_{split}/y_{split} cannot be read ({_reason(e)})") from None
            if len(shape) == 4 and tuple(shape[1:]) == (3, 32, 32):
                raise bad(f"x_{split} is channels-first {tuple(shape)}; expected {LAYOUT}")
            if tuple(shape[1:]) != IMAGE_SHAPE or len(shape) != 4:
                raise bad(f"x_{split} has shape {tuple(shape)}; expected {LAYOUT}")
            if dtype != np.uint8:
                raise bad(f"x_{split} has dtype {dtype}; expected {LAYOUT} (0..255)")
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                raise bad(f"y_{split} must be a 1-D integer array of class indices, got "
                          f"{y.dtype} of shape {y.shape}")
            if len(y) != shape[0]:
                raise bad(f"x_{split} has {shape[0]} images but y_{split} {len(y)} labels")
            if len(y) and (y.min() < 0 or y.max() >= num_classes):
                raise bad(f"y_{split} holds labels in [{y.min()}, {y.max()}]; expected "
                          f"[0, {num_classes})")


def missing_data_message(name, root):
    return (f"data set {name} not found at {dataset_path(name, root)}: point --data-root at the "
            f"folder holding {name}.npz, or pass --download to fetch it through torchvision")


def to_images(x_uint8):
    """uint8 (N, H, W, C) numpy -> float32 (N, C, H, W) contiguous tensor in [0, 1].

    Contiguous, not a channels-last view of the numpy array: everything computed from it keeps
    its layout, and CPU (oneDNN) convolutions on channels-last float32 inputs with few input
    channels have given wrong weight gradients and corrupted the heap (docs/data.md).
    """
    x_uint8 = x_uint8 if x_uint8.flags.writeable else x_uint8.copy()  # torch wants writable
    return torch.from_numpy(x_uint8).permute(0, 3, 1, 2).contiguous().float().div_(255)


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
        images = (to_images(x[idx]) - mean) / std  # (N, C, H, W) contiguous
        return images.contiguous().to(device), torch.from_numpy(y[idx]).long().to(device)

    x_train, y_train = split(arrays["x_train"], arrays["y_train"], train_size, train_seed)
    x_test, y_test = split(arrays["x_test"], arrays["y_test"], test_size, test_seed)
    return Data(x_train, y_train, x_test, y_test, DATASETS[name])

