"""Appendix C.2, Figures 30 (ReLU) and 31 (tanh): scaling the inputs of a small MLP.

Three-layer fully-connected networks of width 200 (PyTorch default initialisation) are trained by
full-batch gradient descent (lr 0.2, 300 iterations, cross entropy) on the first 5000 CIFAR-10
training images, standardised per component, with the inputs then multiplied by 0.5, 1.0 or 1.5;
5 trials per (activation, scale). Sharpness (top Hessian eigenvalue of the training loss) and the
input-output Jacobian norm of the softmaxed model are tracked during training, with loss and
accuracy. The paper's finding: smaller scales give more Jacobian growth but less sharpness growth.

Paper's run (real CIFAR-10 at <data-root>/cifar10.npz):
    python small_network.py --data-root DATA   (DATA: the folder holding cifar10.npz)
Cost: not timed on a GPU; 69 minutes on 2 shared CPU cores with OMP_NUM_THREADS=1 (30 runs of
about 2.3 minutes; plots/README.md).
Smoke run (seconds): python small_network.py --smoke  (CIFAR-10 if --data-root holds it, else a
synthetic stand-in, said on the terminal and in the plot titles)

Writes, under --out (default results/small_network; with --smoke
results/small_network_smoke_cifar10 or results/small_network_smoke_synthetic-cifar10):
    <activation=..._scale=..._trial=...-hash>/{config,metrics,result}.json   one per run
    plots/fig30_relu.{png,pdf}, plots/fig31_tanh.{png,pdf}     mean +- std over trials

Choices where the paper is silent (a careful reading, not the authors' code):
- "Three layer": three linear layers, 3072 -> 200 -> 200 -> 10, activation after the first two.
- Standardisation statistics come from the whole CIFAR-10 training split (the paper: "measured
  across the whole dataset"), then the first 5000 images are taken and scaled.
- Trial t uses seed --seed + t for every scale and activation, so the scales of one trial start
  from the same weights (common random numbers).
- Sharpness and Jacobian norm are measured every 10 iterations (and at 0 and 300) on a fixed
  random 2500 of the 5000 training images, as the paper does for its full-batch runs (B.1);
  sharpness by Lanczos on the mean cross entropy over those images, Jacobian norm as the largest
  spectral norm over them of d softmax(f(x)) / dx, x being the scaled input the network sees.
- Also recorded: the spectral norm of the last hidden layer's feature matrix over the same
  images, the quantity the paper names as the cause (its Df_l).
"""
import math

import torch

import common

PAPER_FIGURES = {"relu": "fig30_relu", "tanh": "fig31_tanh"}
FIGURE_FLAGS = """\
Figures (files under <--out>/plots; the defaults give both, --plot-only redraws):
  Figure 30   --activations relu    fig30_relu.png
  Figure 31   --activations tanh    fig31_tanh.png"""
METRIC_LABELS = {"loss": "training loss", "accuracy": "training accuracy", "sharpness": "sharpness",
                 "jacobian": "Jacobian norm (softmax)", "feature_norm": "last features' spectral norm"}


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    parser = common.make_parser(__doc__, trials=5, out="results/small_network",
                                figures=FIGURE_FLAGS)
    parser.add_argument("--dataset", default="cifar10", choices=list(common.DATASETS))
    parser.add_argument("--activations", nargs="+", default=["relu", "tanh"], help="a figure each",
                        choices=list(common.ACTIVATIONS))
    parser.add_argument("--scales", nargs="+", type=common.finite_float, default=[0.5, 1.0, 1.5],
                        help="factors multiplying the standardised inputs")
    parser.add_argument("--hidden-width", type=int, default=200,
                        help="units per hidden layer")
    parser.add_argument("--depth", type=int, default=3, help="number of linear layers")
    parser.add_argument("--lr", type=common.finite_float, default=0.2)
    parser.add_argument("--iterations", type=int, default=300, help="full-batch gradient steps")
    parser.add_argument("--train-first", type=int, default=5000,
                        help="train on the first N training images (the paper's choice)")
    parser.add_argument("--measure-every", type=int, default=10, help="iterations between measurements")
    parser.add_argument("--measure-size", type=int, default=2500,
                        help="training images (fixed random subset) used for sharpness and Jacobian")
    parser.add_argument("--ghost-batch-size", type=int, default=5000,
                        help="examples per ghost batch of the gradient pass (memory; the MLP has no BN)")
    common.add_plot_from_flag(parser)
    smoke = dict(out="results/small_network_smoke", dataset="present", trials=2, train_first=200,
                 measure_size=100, iterations=6, measure_every=3, hidden_width=32)
    args = common.parse_with_smoke(parser, argv, smoke)
    common.check_positive(args, "scales", "hidden_width", "depth", "lr", "iterations",
                          "train_first",
                          "measure_every", "measure_size", "ghost_batch_size")
    common.check(args.train_first <= 50000, f"--train-first must be at most 50000, got {args.train_first}")
    common.check(args.measure_size <= args.train_first,
                 f"--measure-size ({args.measure_size}) must not exceed --train-first ({args.train_first})")
    common.check_common(args, dataset=args.dataset)
    return args


def run_configs(args):
    """One resolved config per (activation, scale, trial): everything that defines a run."""
    return [dict(dataset=args.dataset, activation=activation, scale=scale, trial=trial,
                 seed=args.seed + trial, width=args.hidden_width, depth=args.depth, lr=args.lr,
                 iterations=args.iterations, train_first=args.train_first,
                 measure_every=args.measure_every, measure_size=args.measure_size,
                 ghost_batch_size=args.ghost_batch_size, standardise="component", init="default")
            for activation in args.activations for scale in args.scales
            for trial in range(args.trials)]


RUN_KEYS = ("activation", "scale", "trial")


# ----------------------------------------------------------------------------- data


def load_inputs(args, device):
    """The first --train-first training images standardised per component, and the fixed subset
    of them used for measurements (indices drawn with seed 0)."""
    data = common.load_data(args.dataset, args.data_root, device=device, standardise="component",
                            train_size=args.train_first, test_size=0, download=args.download)
    measure_idx = common.subset_indices(args.train_first, args.measure_size, seed=0).to(device)
    return data, measure_idx


# ----------------------------------------------------------------------------- model


def make_model(config, num_classes, device):
    torch.manual_seed(config["seed"])
    return common.MLP(3 * 32 * 32, num_classes, width=config["width"], depth=config["depth"],
                      activation=config["activation"], init=config["init"]).to(device)


# ----------------------------------------------------------------------------- training loop


def train(config, args, data, measure_idx, device):
    """Trains one run (or resumes it, or skips it if saved) and returns the loaded run."""
    run = common.Run(args.out, config, RUN_KEYS)
    if run.done:
        return run.load()
    model = make_model(config, data.num_classes, device)
    optimizer = common.sgd(model, config["lr"])
    loss_fn = common.cross_entropy()
    x, y = data.x_train * config["scale"], data.y_train  # (N, 3, 32, 32), (N,)
    first = slice(0, config["ghost_batch_size"])  # None: the whole batch
    common.gradient_check_or_fail(args, model, loss_fn, x[first], y[first])
    state = run.begin(device)
    start = common.restore_training_state(state, model, optimizer) if state else 0
    label = f"{config['activation']} scale={config['scale']:g} trial={config['trial']}"
    for step in common.progress(range(start, config["iterations"] + 1), desc=label,
                                initial=start, total=config["iterations"] + 1, disable=args.no_progress):
        measuring = step % config["measure_every"] == 0 or step == config["iterations"]
        row = curve_point(model, loss_fn, x[measure_idx], y[measure_idx]) if measuring else {}
        if step < config["iterations"]:  # loss and accuracy before this step's update
            loss, accuracy = common.train_step(model, optimizer, loss_fn, x, y,
                                               ghost_batch_size=config["ghost_batch_size"])
        else:
            loss, accuracy = common.evaluate(model, loss_fn, x, y, config["ghost_batch_size"])
        run.log(step, loss=loss, accuracy=accuracy, **row)
        if not math.isfinite(loss):
            run.finish("diverged", step=step)
            return run.load()
        if measuring:
            run.checkpoint(lambda: common.training_state(step + 1, model, optimizer))
    run.finish("finished", final_loss=loss, final_accuracy=accuracy)
    return run.load()


# ----------------------------------------------------------------------------- measurements


def curve_point(model, loss_fn, x, y):
    """One point of the Figure 30/31 curves: sharpness, softmax Jacobian norm and the
    last hidden features' spectral norm on (x, y)."""
    batches = [(x[s], y[s]) for s in common.index_chunks(len(x), 2500)]
    return {**common.eigenvalue_with_convergence(common.sharpness, "sharpness", model, loss_fn,
                                                 batches),
            "jacobian": common.jacobian_norm(model, x, softmax=True),
            "feature_norm": last_feature_norm(model, x)}


@torch.no_grad()
def last_feature_norm(model, x):
    """Spectral norm of the (N, width) matrix of features entering the last linear layer."""
    return torch.linalg.matrix_norm(model.features(x).double(), ord=2).item()


# ----------------------------------------------------------------------------- plotting


def plot(args, runs):
    """One figure per activation (Figures 30 and 31): a panel per quantity, a line style per
    input scale, mean +- std over trials."""
    paths = []
    for activation in args.activations:
        mine = [r for r in runs if r["config"]["activation"] == activation]
        if not mine:
            continue
        trials = len({r["config"]["trial"] for r in mine})
        fig, panels = common.plot_runs(mine, list(METRIC_LABELS), "scale", labels=METRIC_LABELS,
                               style_label="input scale", log_metrics=("loss",), ncols=3,
                               title=f"{activation} MLP, width {args.hidden_width}, lr {args.lr:g}: "
                                     f"mean ± std over {trials} trials\n"
                                     f"{common.dataset_label(args.dataset)}, "
                                     f"{common.scale_label(args, args.train_first != 5000)}")
        ax = panels["sharpness"]
        ax.axhline(2 / args.lr, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate("2 / lr", (1, 2 / args.lr), xycoords=ax.get_yaxis_transform(),
                             xytext=(-3, -3), textcoords="offset points", ha="right", va="top",
                             color="grey", fontsize="small")  # gradient descent's stability limit
        stem = PAPER_FIGURES.get(activation, f"fig_{activation}")
        paths += common.save_figure(fig, f"{args.out}/plots/{stem}",
                                    settings=[r["config"] for r in mine])
    return paths


# ----------------------------------------------------------------------------- main


def main(args):
    common.unpack_plot_from(args)
    configs = run_configs(args)
    pending = [] if args.plot_only else common.pending_runs(args.out, configs, RUN_KEYS)
    if pending:
        device = common.resolve_device(args.device)
        data, measure_idx = load_inputs(args, device)
        for config in pending:
            train(config, args, data, measure_idx, device)
    runs = common.saved_runs_or_fail(args.out, configs, RUN_KEYS)
    common.save_runs_summary(runs, f"{args.out}/plots/runs.json")
    for path in plot(args, runs):
        print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(main, parse_args)
