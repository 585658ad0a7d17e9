"""Command line: the shared flags, `--smoke` defaults, one-line errors with exit status 2, the
device choice and progress bars."""
import argparse
import contextlib
import fractions
import math
import os
import signal
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import runs as _runs
from .data import DATASETS, DataError, check_data_file, dataset_path, is_synthetic, missing_data_message
from .runs import DamagedRun, load_saved, run_name
from .training import gradient_check

SEED_MAX = 2 ** 63 - 1  # torch.Generator.manual_seed takes seeds in [0, 2**63 - 1] here
REAL_DATASETS = ("cifar10", "cifar100")

def fail(msg, prog=None):
    """Prints one line `<prog>: error: <msg>` to stderr and exits with status 2 (no traceback).
    Scripts validate everything with it before writing anything."""
    prog = prog or Path(sys.argv[0]).name
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


# One text per flag name: a flag means the same in every script that takes it. A script passes
# its own help only for flags that are its own.
FLAG_HELP = {
    "--dataset": "data set (synthetic-*: a generated stand-in of the same shapes)",
    "--datasets": "data sets (synthetic-*: generated stand-ins of the same shapes)",
    "--model": "network", "--models": "networks",
    "--lr": "learning rate", "--lrs": "learning rates (a run or line style each)",
    "--smoothings": "label smoothings alpha: targets (1 - alpha) y + alpha / K",
    "--momentum": "heavy-ball momentum of SGD",
    "--weight-decay": "L2 weight decay of SGD",
    "--batch-size": "examples per SGD minibatch", "--batch-sizes": "SGD minibatch sizes",
    "--epochs": "passes over the training set",
    "--width": "channel-width multiplier of the network (1: the paper's)",
    "--train-size": "train on N training images drawn at random with --seed (default: all)",
    "--test-size": "test on N test images drawn at random with --seed (default: all)",
    "--ghost-batch-size": "examples per ghost batch: BatchNorm statistics and gradient chunk",
    "--measure-size": "training images (fixed random subset) for sharpness and Jacobian norm",
    "--eig-tol": "relative error target of the top-eigenvalue (sharpness) estimates",
    "--eig-max-iter": "most Lanczos steps per top-eigenvalue estimate",
    "--checkpoint-seconds": "least seconds between checkpoints of a running run",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's and epilog's line breaks; shows each flag's default once: not for
    flags off by default, not where the help text already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse's own error prints the usage too) and the shared
    help text of FLAG_HELP for flags added without one."""

    def error(self, message):
        fail(message, self.prog)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        group.add_argument = _with_shared_help(group.add_argument)
        return group

    def add_argument(self, *args, **kwargs):
        return _with_shared_help(super().add_argument)(*args, **kwargs)


def _with_shared_help(add_argument):
    def add(*args, **kwargs):
        if kwargs.get("help") is None and args and args[-1] in FLAG_HELP:
            kwargs["help"] = FLAG_HELP[args[-1]]
        return add_argument(*args, **kwargs)
    return add


def paper_command(doc):
    """The "Paper's run" lines of a script's docstring (for --help)."""
    lines = doc.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Paper's")), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")),
               len(lines))
    return "\n".join(lines[start:end])


def finite_float(text):
    """argparse type: a float that is neither inf nor nan (float() accepts both)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def make_parser(doc, *, trials, out, gradient_check=True, figures=None):
    """A parser with the shared flags: --device, --data-root, --out, --trials, --seed, --smoke,
    --plot-only (and --no-gradient-check for scripts that train with `gradient_check_or_fail`).
    Scripts add their own flags (paper settings as defaults) to it.

    --help shows the docstring's first paragraph, then its "Paper's run" lines and, last,
    `figures`: the script's map from flags to the figures they give, lines kept as written."""
    epilog = "\n\n".join(part.strip("\n") for part in (paper_command(doc), figures) if part)
    parser = ArgumentParser(description=doc.strip().split("\n\n")[0], epilog=epilog or None,
                            formatter_class=HelpFormatter)
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
    g.add_argument("--restart", action="store_true",
                   help="move run folders with damaged files aside (to <name>.damaged-<time>) "
                        "and run them again")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if gradient_check:
        g.add_argument("--no-gradient-check", action="store_true",
                       help="skip the start-of-run check of the float32 gradient on one batch "
                            "against a float64 copy of the model (exit 2 if it is off)")
    return parser


def gradient_check_or_fail(args, model, loss_fn, x, y, group=None):
    """The start-of-run gradient check (`training.gradient_check`) on one batch (x, y), unless
    --no-gradient-check: exits 2 with one line naming the worst parameter when the gradient is
    off beyond rounding. Under torch.distributed every rank checks the batch and all stop if any
    fails (each failing rank says so), so no rank waits on the others forever."""
    if getattr(args, "no_gradient_check", False):
        return
    result = gradient_check(model, loss_fn, x, y)
    failed = not result.passed
    if group is not None:
        flag = torch.tensor([float(failed)], device=x.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        if flag.item() > 0 and not failed:
            sys.exit(2)
    if failed:
        where = f" (rank {torch.distributed.get_rank(group)})" if group is not None else ""
        fail(f"gradient check failed{where}: the float32 gradient on one batch is off by "
             f"{result.error:.2g} relative to a reference copy (tolerance {result.tolerance:.2g}); "
             f"worst parameter {result.worst}, relative error {result.worst_error:.2g}. Inputs "
             f"should be contiguous (N, C, H, W); --no-gradient-check skips this check")


def parse_with_smoke(parser, argv, smoke):
    """Parses argv; with --smoke, the `smoke` settings replace the defaults first, so flags given
    explicitly still win (`--smoke --trials 1`).

    A `dataset` / `datasets` smoke setting of "present" means: the real data sets found under
    --data-root (cifar10 first), else the synthetic stand-in of CIFAR-10 (or, with --download,
    CIFAR-10 downloaded), said on the terminal. Where the script reads a data set, the smoke
    `out` folder is named for the data sets used (`results/fullbatch_smoke_cifar10`,
    `..._smoke_synthetic-cifar10`), so real and synthetic smoke runs never share a folder;
    an explicit --out is kept as given.
    """
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**dict(smoke, out=None) if "out" in smoke else smoke)
        args = parser.parse_args(argv)
        for name in ("dataset", "datasets"):
            if getattr(args, name, None) in ("present", ["present"]):
                present = smoke_datasets(args.data_root, args.download)
                setattr(args, name, present[0] if name == "dataset" else present)
        if "out" in smoke and args.out is None:
            args.out = smoke_out(smoke["out"], args)
    return args


def smoke_out(out, args):
    """The smoke run's results folder: `out`, suffixed with the data sets the run reads."""
    datasets = getattr(args, "datasets", None) or [getattr(args, "dataset", None)]
    datasets = [d for d in datasets if d]
    return f"{out}_{'-'.join(datasets)}" if datasets else out


def smoke_datasets(root, download=False):
    """The real data sets present under `root` (those of REAL_DATASETS); if there are none,
    CIFAR-10 to be downloaded when `download` (an explicit --download wins over --smoke's
    stand-in), else the synthetic stand-in of CIFAR-10. Says which on the terminal."""
    present = [d for d in REAL_DATASETS if dataset_path(d, root).exists()]
    if present:
        print(f"--smoke: using {', '.join(present)} from {root}")
        return present
    if download:
        print(f"--smoke --download: no cifar10.npz in {root}: cifar10 will be downloaded")
        return ["cifar10"]
    print(f"--smoke: no cifar10.npz in {root}: using synthetic-cifar10, a synthetic stand-in "
          f"for CIFAR-10 (not real data)")
    return ["synthetic-cifar10"]


def dataset_label(dataset):
    """How plot titles name a data set; synthetic stand-ins say so."""
    names = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
    if is_synthetic(dataset):
        return f"synthetic stand-in for {names[dataset.removeprefix('synthetic-')]} (not real data)"
    return names.get(dataset, dataset)


def scale_label(args, reduced=False):
    """How plot titles name the scale: smoke, paper, or reduced (settings below the paper's)
    with the channel width and training-set size where the script has them, e.g.
    "reduced scale (width 1/8, 4000 training images)"."""
    if args.smoke:
        return "smoke scale"
    if not reduced:
        return "paper scale"
    parts = []
    width = getattr(args, "width", None)
    if width is not None and width != 1:
        parts.append(f"width {fractions.Fraction(width).limit_denominator(64)}")
    train_size = getattr(args, "train_size", None)
    if train_size is not None:
        parts.append(f"{train_size} training images")
    return "reduced scale" + (f" ({', '.join(parts)})" if parts else "")


def check(condition, msg):
    """fail(msg) unless condition."""
    if not condition:
        fail(msg)


def check_common(args, *, dataset=None):
    """Validates the shared flags (and the data set, if the script reads one) before anything is
    written: trials >= 1, seed >= 0, --out not a file, CUDA present if asked for, data present
    (or --download given) unless only plotting."""
    check(args.trials >= 1, f"--trials must be at least 1, got {args.trials}")
    check(0 <= args.seed and args.seed + args.trials - 1 <= SEED_MAX,
          f"--seed must lie in 0..{SEED_MAX - args.trials + 1} (trial t uses seed + t, and "
          f"seeds stop at 2**63 - 1), got {args.seed}")
    check(not Path(args.out).is_file(), f"--out {args.out} is a file, not a folder")
    check_writable(args.out)
    check(args.device != "cuda" or torch.cuda.is_available(), "--device cuda: CUDA is not available")
    _runs.RESTART_DAMAGED = getattr(args, "restart", False)
    if dataset is not None and not (args.plot_only or getattr(args, "plot_from", None)):
        check(dataset in DATASETS, f"unknown data set {dataset!r}")
        path = dataset_path(dataset, args.data_root)
        if not is_synthetic(dataset) and not args.download:
            check(path.exists(), missing_data_message(dataset, args.data_root))
        if not is_synthetic(dataset) and path.exists():
            try:
                check_data_file(path, DATASETS[dataset])
            except DataError as e:
                fail(str(e))


def check_writable(out):
    """fail() unless the folder `out` exists and is writable, or can be made under its nearest
    existing parent, checked without writing anything."""
    path = Path(out).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        fail(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--out {out}: {existing} is not writable; choose another --out")


def check_width(args, narrowest=64):
    """fail() unless --width leaves every layer at least one channel without rounding up: the
    narrowest layer has `narrowest` channels (64 in VGG11 and ResNet18), so width >= 1/64."""
    smallest = 1 / narrowest
    check(args.width >= smallest,
          f"--width must be at least 1/{narrowest} = {smallest:g} (the narrowest layer's "
          f"{narrowest} channels scaled to at least 1), got {args.width:g}")


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


class _Terminated(BaseException):
    """Raised by the SIGTERM handler so that cleanup (finally blocks) runs as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def run_main(main, parse_args):
    """Runs `main(parse_args())` as a script's entry point.

    Ctrl-C and SIGTERM end it with one line, "interrupted at step S; rerun the same command to
    resume", and exit status 130 / 143: the last checkpoint (written atomically) is kept, so the
    rerun resumes from it. Damaged results and unusable data files end with one line (exit 2).
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main(parse_args())
    except (KeyboardInterrupt, _Terminated) as e:
        step = _runs.PROGRESS["step"]
        where = f"at step {step}" if step is not None else "before the first step"
        print(f"{Path(sys.argv[0]).name}: interrupted {where}; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(143 if isinstance(e, _Terminated) else 130)
    except (DamagedRun, DataError) as e:
        fail(str(e))
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


def add_plot_from_flag(parser):
    """--plot-from RUNS_JSON, for the scripts whose figures can be redrawn from a saved runs.json."""
    parser.add_argument("--plot-from", metavar="RUNS_JSON", default=None,
                        help="redraw the figures from a saved runs.json (e.g. a committed "
                             "plots/**/*runs.json), given the flags of the command that made it: "
                             "its runs are unpacked as run folders under --out (folders already "
                             "there are kept), then plotted as with --plot-only")


def unpack_plot_from(args):
    """With --plot-from: unpacks its runs under --out and sets --plot-only; exits 2 with one
    line if the file cannot be read or is not a runs summary."""
    if getattr(args, "plot_from", None) is None:
        return
    try:
        written = _runs.unpack_runs_summary(args.plot_from, args.out)
    except (OSError, ValueError) as e:
        fail(f"--plot-from {args.plot_from}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    args.plot_only = True
    print(f"--plot-from: {written} runs unpacked from {args.plot_from} under {args.out}")
