"""Command line: the shared flags, `--smoke` defaults, one-line errors with exit status 2, the
device choice and progress bars."""
import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .data import DATASETS, dataset_path, is_synthetic, missing_data_message
from .runs import load_saved, run_name

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
