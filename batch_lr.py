"""Appendix B.2 (Section 6.2), Figures 3, 4 and 12-19: constant learning rate x batch size.

VGG11 (BN, no dropout) and ResNet18 on CIFAR-10 and CIFAR-100, standardised per RGB channel, are
trained by plain SGD at constant learning rates 0.1, 0.01, 0.001 with batch sizes 64, 128, 256,
512, 1024 and weight decay 1e-4, 5 trials each. The loss on the full training set is measured
every 100 iterations; training stops once the mean of the last 10 such losses is below 0.01
(CIFAR-10) or 0.02 (CIFAR-100). At the end: training and test loss, generalisation gap
|test - train|, sharpness, Gauss-Newton norm and softmax Jacobian norm on 2000 training
examples drawn with the model's seed. The paper's finding: larger learning rates and smaller batches give smaller
sharpness, Jacobian norm and gap, except ResNet18 at lr 0.1 (Jacobian falls while the gap rises).

Paper's run, all cells in one process:
    python batch_lr.py --data-root DATA
Paper's sweep: 2 models x 2 data sets x 3 lr x 5 batch sizes x 5 trials = 300 cells, one per
Slurm array task (see slurm/batch_lr.sbatch):
    python batch_lr.py --list-grid                        # the cells
    python batch_lr.py --grid-index $SLURM_ARRAY_TASK_ID  # one cell
    python batch_lr.py --plot-only                        # figures + correlations from all cells
GPU cost (measured on one H100 with the GPU machine's torch, fp32; benchmarks/gpu/): a ResNet18 cell at batch
128 ran 400 iterations, with the full-training-set loss every 100, in 7.9 s (20 ms per iteration,
half of it the loss evaluations) and its end-of-training measurements in 7.2 s. The cost of a
cell is set by the iterations it needs to reach the target loss, which were not measured at
paper scale: a cell needing 20 000 iterations costs about 7 minutes, and the 300 cells of the
default grid at that average would take about 35 H100-hours (the small learning rates and large
batches need far more iterations than that).
Smoke run (seconds): python batch_lr.py --smoke  (the data sets present under --data-root, else a
synthetic stand-in of CIFAR-10, said on the terminal and in the plot titles)

Writes, under --out (default results/batch_lr; with --smoke results/batch_lr_smoke_<data sets>,
e.g. results/batch_lr_smoke_cifar10 or results/batch_lr_smoke_synthetic-cifar10):
    <model=..._dataset=..._lr=..._batch_size=..._trial=...-hash>/{config,metrics,result}.json
    plots/fig12..15_<model>_<dataset>_vs_lr.{png,pdf}      metric vs lr, line style per batch
    plots/fig16..19_<model>_<dataset>_vs_batch.{png,pdf}   metric vs batch, line style per lr
        (ResNet18 on CIFAR-10: fig03_fig12_..._vs_lr, fig04_fig16_..._vs_batch)
    plots/correlations.json    Kendall tau(gap, Jacobian norm), tau(gap, sharpness),
                               tau(gap, Gauss-Newton norm), tau(gap, Lip of the Jacobian)
                               per sweep
Figure 3 is the ResNet18/CIFAR-10 vs-lr figure (fig12), Figure 4 its vs-batch one (fig16): their
files carry both numbers.

Choices where the paper is silent (a careful reading, not the authors' code):
- "SGD" is read as plain SGD (momentum 0; --momentum to change), one random permutation per
  epoch cut into batches, the incomplete last batch dropped.
- The full-training-set loss is measured in eval mode (BN running statistics), without weight
  decay. A cell that has not met the target after --max-iterations stops there and is marked
  reached_target = false (the paper gives no cap; the default is generous).
- Sharpness: BN in train mode over ghost batches of the cell's own batch size (the statistics
  the model was trained with); Lanczos to relative error --eig-tol. Jacobian: eval mode.
- The mechanism of the ResNet18 reversal (Section 6.2: skip connections plus a large constant lr
  raise the Lipschitz constant of the Jacobian, not its norm) is checked by a lower estimate of
  Lip(J) of the softmax output on the same training examples (common.jacobian_lipschitz:
  max over 64 pairs of ||J(x) - J(x')||_2 / ||x - x'||, x' another training image or a point
  1/3, 1/10 or 1/30 of the way to it; eval mode; about 1 s a cell for the width-1/8 VGG11 and
  width-1/16 ResNet18 on one CPU thread), recorded as jacobian_lipschitz.
- Trial t uses seed --seed + t for the initialisation, the batch order and the measurement
  subset, in every (lr, batch) cell.
"""
import math
import time

import torch

import common

LIPSCHITZ_PAIRS = 64  # pairs of the end-of-training jacobian_lipschitz estimate
PAPER_TARGETS = {"cifar10": 0.01, "cifar100": 0.02}  # stopping loss per data set (B.2)
# Figure numbers of the paper, by (model, data set) and x axis.
FIGURES = {("resnet18", "cifar10"): 12, ("resnet18", "cifar100"): 13,
           ("vgg11", "cifar10"): 14, ("vgg11", "cifar100"): 15}
MAIN_FIGURES = {12: 3, 16: 4}  # appendix figure -> the main-text figure that shows it
METRIC_LABELS = {"gap": "generalisation gap", "jacobian": "Jacobian norm (softmax)",
                 "sharpness": "sharpness", "train_loss": "training loss",
                 "test_accuracy": "test accuracy", "iterations": "iterations",
                 "jacobian_lipschitz": "Lip(Jacobian) lower estimate"}
CORRELATED = ("jacobian", "sharpness", "gauss_newton", "jacobian_lipschitz")  # Kendall tau(gap, each)
RUN_KEYS = ("model", "dataset", "lr", "batch_size", "trial")
FIGURE_FLAGS = """\
Figures (files under <--out>/plots; the defaults give all eight, --plot-only redraws):
  Figure 3 / 12 (vs lr), Figure 4 / 16 (vs batch)   --models resnet18 --datasets cifar10
  Figures 13, 17                                    --models resnet18 --datasets cifar100
  Figures 14, 18                                    --models vgg11 --datasets cifar10
  Figures 15, 19                                    --models vgg11 --datasets cifar100
  e.g. fig03_fig12_resnet18_cifar10_vs_lr.png, fig04_fig16_resnet18_cifar10_vs_batch.png"""


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    parser = common.make_parser(__doc__, trials=5, out="results/batch_lr", figures=FIGURE_FLAGS)
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg11"],
                        choices=list(common.MODELS))
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "cifar100"],
                        choices=list(common.DATASETS))
    parser.add_argument("--lrs", nargs="+", type=common.finite_float, default=[0.1, 0.01, 0.001])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    parser.add_argument("--weight-decay", type=common.finite_float, default=1e-4)
    parser.add_argument("--momentum", type=common.finite_float, default=0.0)
    parser.add_argument("--eval-every", type=int, default=100,
                        help="iterations between full-training-set losses")
    parser.add_argument("--window", type=int, default=10,
                        help="stop when the mean of the last WINDOW such losses is below target")
    parser.add_argument("--target-loss", type=common.finite_float, default=None,
                        help="stopping loss (default: 0.01 for CIFAR-10, 0.02 for CIFAR-100)")
    parser.add_argument("--max-iterations", type=int, default=500_000,
                        help="safety cap on iterations per cell")
    parser.add_argument("--width", type=common.finite_float, default=1.0, help="channel multiplier of the model")
    parser.add_argument("--train-size", type=int, default=None,
                        help="train on N training images drawn at random with --seed (default: all)")
    parser.add_argument("--test-size", type=int, default=None, help="test on N test images drawn at random with --seed (default: all)")
    common.add_grid_flags(parser, measure_size=2000)
    common.add_plot_from_flag(parser)
    smoke = dict(out="results/batch_lr_smoke", datasets=["present"], models=["vgg11"], lrs=[0.1, 0.01], batch_sizes=[16, 32],
                 trials=1, train_size=64, test_size=64, measure_size=16, width=0.125, eval_every=4,
                 window=2, max_iterations=8, eig_tol=3e-2, eig_max_iter=30)
    args = common.parse_with_smoke(parser, argv, smoke)
    validate(args)
    return args


def validate(args):
    common.check_width(args)
    common.check_positive(args, "lrs", "batch_sizes", "eval_every", "window", "max_iterations",
                          "width", "measure_size", "eig_tol", "eig_max_iter")
    common.check(args.checkpoint_seconds >= 0,
                 f"--checkpoint-seconds must be non-negative, got {args.checkpoint_seconds}")
    common.check(args.weight_decay >= 0, f"--weight-decay must be non-negative, got {args.weight_decay}")
    common.check(0 <= args.momentum < 1, f"--momentum must lie in [0, 1), got {args.momentum}")
    common.check(args.target_loss is None or args.target_loss > 0,
                 f"--target-loss must be positive, got {args.target_loss}")
    for name in ("train_size", "test_size"):
        value = getattr(args, name)
        common.check(value is None or value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.train_size is not None:
        common.check(args.measure_size <= args.train_size,
                     f"--measure-size ({args.measure_size}) must not exceed --train-size ({args.train_size})")
        common.check(max(args.batch_sizes) <= args.train_size,
                     f"--batch-sizes must not exceed --train-size ({args.train_size})")
    common.check_grid_index(args, grid_cells(args))
    for dataset in args.datasets:
        common.check_common(args, dataset=None if args.list_grid else dataset)


def target_loss(args, dataset):
    if args.target_loss is not None:
        return args.target_loss
    return PAPER_TARGETS[dataset.removeprefix("synthetic-")]


def grid_cells(args):
    """One resolved config per (model, data set, lr, batch size, trial): the sweep's cells."""
    return [dict(cell, seed=args.seed + cell["trial"], weight_decay=args.weight_decay,
                 momentum=args.momentum, eval_every=args.eval_every, window=args.window,
                 target_loss=target_loss(args, cell["dataset"]), max_iterations=args.max_iterations,
                 width=args.width, train_size=args.train_size, test_size=args.test_size, data_seed=args.seed,
                 measure_size=args.measure_size, eig_tol=args.eig_tol,
                 eig_max_iter=args.eig_max_iter, standardise="channel")
            for cell in common.grid(model=args.models, dataset=args.datasets, lr=args.lrs,
                                    batch_size=args.batch_sizes, trial=list(range(args.trials)))]


# ----------------------------------------------------------------------------- data, model


def load_cell_data(config, args, device):
    """A cell's data set on the device, standardised per channel (whole-training-split
    statistics); --train-size / --test-size subsets drawn at random with --seed."""
    return common.load_data(config["dataset"], args.data_root, device=device,
                            standardise="channel", train_size=config["train_size"],
                            train_seed=config["data_seed"], test_size=config["test_size"],
                            test_seed=config["data_seed"], download=args.download)


def make_model(config, num_classes, device):
    """A cell's model, initialised from the cell's seed."""
    torch.manual_seed(config["seed"])
    return common.build_model(config["model"], num_classes=num_classes,
                              batch_norm=config.get("batch_norm", True),
                              width=config["width"]).to(device)


# ----------------------------------------------------------------------------- training loop


class BatchStream:
    """Endless minibatch indices: a fresh permutation each epoch, incomplete last batch dropped.
    Its state (generator, current permutation, position) goes into checkpoints."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches, self.position = [], 0

    def next(self):
        if self.position >= len(self.batches):
            self.batches = common.shuffled_batches(self.n, self.batch_size, self.generator, drop_last=True)
            self.position = 0
        self.position += 1
        return self.batches[self.position - 1]

    def state(self):
        return {"generator": self.generator.get_state(), "batches": self.batches, "position": self.position}

    def restore(self, state):
        self.generator.set_state(state["generator"])
        self.batches, self.position = state["batches"], state["position"]


def train(config, args, data, device):
    """Trains one cell until the target loss (or resumes it, or skips it if saved); returns it."""
    run = common.Run(args.out, config, RUN_KEYS, checkpoint_seconds=args.checkpoint_seconds)
    if run.done:
        return run.load()
    model = make_model(config, data.num_classes, device)
    optimizer = common.sgd(model, config["lr"], config["momentum"], config["weight_decay"])
    loss_fn = common.cross_entropy()
    first = slice(0, config["batch_size"])
    common.gradient_check_or_fail(args, model, loss_fn, data.x_train[first], data.y_train[first])
    stream = BatchStream(len(data.x_train), config["batch_size"], config["seed"])
    state = run.begin(device)
    step, elapsed = 0, 0.0
    if state:
        step = common.restore_training_state(state, model, optimizer)
        stream.restore(state["stream"])
        elapsed = state["seconds"]
    losses = [m["train_loss"] for m in run.metrics]
    evaluated = run.metrics[-1]["step"] if run.metrics else -1  # a checkpoint follows a loss
    started, reached = time.monotonic() - elapsed, False
    label = " ".join(f"{k}={config[k]}" for k in RUN_KEYS)
    bar = common.progress(total=config["max_iterations"], initial=step, desc=label,
                          disable=args.no_progress)
    while True:
        if step % config["eval_every"] == 0 and step != evaluated:  # full training set, pre-step
            loss, accuracy = common.evaluate(model, loss_fn, data.x_train, data.y_train, 1000)
            run.log(step, train_loss=loss, train_accuracy=accuracy)
            losses.append(loss)
            recent = losses[-config["window"]:]
            if not math.isfinite(loss):
                bar.close()
                return diverged(run, step)
            reached = len(recent) == config["window"] and sum(recent) / len(recent) < config["target_loss"]
            if reached or step >= config["max_iterations"]:
                break
            run.checkpoint(lambda: common.training_state(step, model, optimizer, stream=stream.state(),
                                                         seconds=time.monotonic() - started))
        idx = stream.next().to(device)
        loss, _ = common.train_step(model, optimizer, loss_fn, data.x_train[idx], data.y_train[idx])
        if not math.isfinite(loss):
            bar.close()
            return diverged(run, step)
        step += 1
        bar.update()
    bar.close()
    seconds = time.monotonic() - started
    summary = common.end_of_training_metrics(model, loss_fn, data, config["seed"],
                                            measure_size=config["measure_size"],
                                            ghost_batch_size=config["batch_size"],
                                            eig_tol=config["eig_tol"],
                                            eig_max_iter=config["eig_max_iter"],
                                            gauss_newton=True, lipschitz_pairs=LIPSCHITZ_PAIRS)
    run.finish("finished", iterations=step, reached_target=reached, train_seconds=seconds,
               jacobian_lipschitz_pairs=LIPSCHITZ_PAIRS,
               measure_seconds=time.monotonic() - started - seconds, **summary)
    return run.load()


def diverged(run, step):
    run.finish("diverged", iterations=step)
    return run.load()


# ----------------------------------------------------------------------------- plotting


def plot(args, runs):
    """Per (model, data set): metrics against lr (line style per batch size) and against batch
    size (line style per lr); and the Kendall correlations of each sweep."""
    paths, correlations = [], {}
    for model in args.models:
        for dataset in args.datasets:
            mine = [r for r in runs if r["config"]["model"] == model and r["config"]["dataset"] == dataset]
            if not mine:
                continue
            name = f"{model}_{dataset}"
            correlations[name] = common.sweep_correlations(mine, against=CORRELATED, within="lr")
            number = FIGURES.get((model, dataset.removeprefix("synthetic-")))
            for x_key, style_key, offset, suffix in (("lr", "batch_size", 0, "vs_lr"),
                                                     ("batch_size", "lr", 4, "vs_batch")):
                reduced = not (args.width == 1 and args.train_size is None)
                title = (f"{model}, {common.dataset_label(dataset)}, "
                         f"{common.scale_label(args, reduced)}")
                fig = sweep_figure(mine, x_key, style_key, title, correlations[name])
                prefix = figure_prefix(number + offset) if number else ""
                stem = f"{prefix}{name}_{suffix}"
                paths += common.save_figure(fig, f"{args.out}/plots/{stem}",
                                            settings=[r["config"] for r in mine])
    common.save_json(f"{args.out}/plots/correlations.json", correlations)
    return paths, correlations


def figure_prefix(number):
    """"figNN_" for appendix figure NN, led by the main-text figure showing it: "fig03_fig12_"."""
    main = MAIN_FIGURES.get(number)
    return (f"fig{main:02d}_" if main else "") + f"fig{number}_"


def sweep_figure(runs, x_key, style_key, title, correlation):
    labels = {"lr": "learning rate", "batch_size": "batch size"}
    fig, axes = common.new_figure(2, 4)
    fig.delaxes(axes[1, 3])  # 7 panels
    for ax, (metric, label) in zip(axes.flat, METRIC_LABELS.items()):
        common.plot_sweep(ax, runs, x_key, style_key, metric, style_label=labels[style_key],
                          log_x=True, log_y=metric in ("sharpness", "iterations",
                                                       "jacobian_lipschitz"),
                          xlabel=labels[x_key], ylabel=label)
    common.legend_below(fig, common.labelled_handles(fig.axes))
    trials = len({r["config"]["trial"] for r in runs})
    within = ", ".join(f"{lr}: {w['tau_gap_jacobian']:.2f} / {w['tau_gap_sharpness']:.2f}"
                       for lr, w in correlation["per_lr"].items())
    fig.suptitle(f"{title}: end of training, mean ± std over {trials} trials\nKendall τ(gap, "
                 f"Jacobian) = {correlation['tau_gap_jacobian']:.2f}, τ(gap, sharpness) = "
                 f"{correlation['tau_gap_sharpness']:.2f}, τ(gap, Lip(Jacobian)) = "
                 f"{correlation.get('tau_gap_jacobian_lipschitz', math.nan):.2f} over "
                 f"{correlation['n']} cells\n"
                 f"within one lr, τ(gap, Jacobian) / τ(gap, sharpness): {within}")
    return fig


# ----------------------------------------------------------------------------- main


def train_pending(args, cells):
    """Trains every cell selected by --grid-index (all if absent) that is not finished yet,
    keeping one data set on the device at a time."""
    device = common.resolve_device(args.device)
    pending = common.pending_runs(args.out, common.selected_cells(args, cells), RUN_KEYS)
    data = {}
    for config in pending:
        if config["dataset"] not in data:
            data = {config["dataset"]: load_cell_data(config, args, device)}
        train(config, args, data[config["dataset"]], device)


def main(args):
    common.unpack_plot_from(args)
    cells = grid_cells(args)
    if args.list_grid:
        common.print_grid(cells, RUN_KEYS)
        return
    if not args.plot_only:
        train_pending(args, cells)
        if args.grid_index is not None:
            return  # an array task: plotting is for --plot-only once the array is done
    runs = common.saved_runs_or_fail(args.out, cells, RUN_KEYS)
    common.save_runs_summary(runs, f"{args.out}/plots/runs.json")
    print(f"{len(runs)} of {len(cells)} cells finished")
    paths, correlations = plot(args, runs)
    for name, c in correlations.items():
        print(f"{name}: Kendall tau(gap, Jacobian) = {c['tau_gap_jacobian']:.3f}, "
              f"tau(gap, sharpness) = {c['tau_gap_sharpness']:.3f}, "
              f"tau(gap, Gauss-Newton) = {c['tau_gap_gauss_newton']:.3f}, tau(gap, Lip(Jacobian)) = "
              f"{c['tau_gap_jacobian_lipschitz']:.3f} over {c['n']} cells")
        for lr, w in c["per_lr"].items():
            print(f"  lr {lr}: tau(gap, Jacobian) = {w['tau_gap_jacobian']:.3f}, "
                  f"tau(gap, sharpness) = {w['tau_gap_sharpness']:.3f} over {w['n']} cells")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(main, parse_args)
