"""Appendix C.1, Figures 28 and 29: label smoothing, sharpness, Jacobian norm and output norm
under SGD, over the first epoch (Figure 28) and over 90 epochs (Figure 29).

VGG11 (`vgg11_bn` without dropout) is trained on CIFAR-10, standardised per RGB channel, by
SGD with batch 128 and label smoothing 0, 0.5 and 0.75. On a fixed random subset of 2500
training images we measure the sharpness (BN in train mode, ghost batches of 128), the Jacobian
norm of the softmaxed model (BN in eval mode), beside it the Jacobian norm of the logits (same
subset and mode: Appendix C.1's claim that the vanishing softmax Jacobian stops tracking the
network's Lipschitz constant), the Frobenius norm of the (N, 10) logits and the
loss (cross entropy minus the label entropy): every 5 iterations in the first epoch, then at the
end of every epoch. One run gives both figures.

Paper's run (real CIFAR-10 at <data-root>/cifar10.npz):
    python vgg_sgd.py --data-root /path/to/data
One Slurm task per smoothing: python vgg_sgd.py --smoothings 0.5; then --plot-only.
Figure 28 alone: python vgg_sgd.py --epochs 1
GPU cost (measured on one H100 with the GPU machine's torch, fp32; benchmarks/gpu/paper_scale.json): an SGD
epoch of VGG11 at batch 128 takes 2.5 s and one measurement (sharpness + Jacobian norm on 2500
images) about 2.6 s, so one smoothing's 90 epochs with 78 + 89 measurements take about 12
minutes: the default run (3 smoothings, 1 trial) about 0.6 H100-hours. The reduced-scale
Figure 28 in plots/vgg_sgd (VGG11 width 1/8, one epoch of all 50000 images, measurements every
20 iterations on 250 images) took 4-5 minutes per trial on 2 shared CPU cores; command in
plots/README.md.
Smoke run (seconds): python vgg_sgd.py --smoke  (CIFAR-10 if --data-root holds it, else a
synthetic stand-in, said on the terminal and in the plot titles)

Writes, under --out (default results/vgg_sgd; with --smoke results/vgg_sgd_smoke_cifar10 or
results/vgg_sgd_smoke_synthetic-cifar10, by the data set used):
    <smoothing=..._trial=...-hash>/{config,metrics,result}.json (checkpoint.pt while running;
    a killed run continues from it when the same command is rerun)
    plots/fig28_first_epoch.{png,pdf}, plots/fig29_all_epochs.{png,pdf} (the latter only when
    some run has more than one epoch)

Choices where the paper is silent (a careful reading, not the authors' code):
- Optimiser: plain SGD at a constant learning rate 0.01, no momentum, no weight decay. C.1 gives
  only "SGD with a batch size of 128". No weight decay because the paper says (B.3) that the
  unsmoothed sharpness collapsing to zero, which Figure 29 shows, is what happens without it;
  0.01 is the middle of the constant rates of B.2. --momentum, --weight-decay and --lr change it.
- Smoothings 0, 0.5, 0.75 (those of B.1); 1 trial by default (C.1 gives no count).
- Each epoch is a fresh random permutation (from the trial's seed) cut into batches of 128; a
  last partial batch is dropped, so an epoch is floor(N / 128) iterations (390 at N = 50000).
- Measurement schedule: iteration 0, every --measure-every (5) iterations in the first epoch,
  then every --measure-every-epochs (1) epochs, and the last iteration: 79 + 89 = 168
  measurements over 90 epochs. `train_loss` is the mean minibatch loss since the previous
  measurement (label entropy subtracted).
- Sharpness of the mean loss over the 2500 images in ghost batches of --ghost-batch-size
  (default: the training batch size), so BN sees batches as in training; Lanczos to relative
  error --eig-tol. Loss, accuracy and output norm of the subset are taken in eval mode.
- The measurement subset and the initial weights come from the trial's seed (--seed + trial);
  every smoothing of a trial shares them and the order of the batches.
- 2/lr, the stability bound of full-batch GD (not of SGD), is drawn on the sharpness panels
  for comparison, or named in the legend where it is far above the curves (Figure 28).
- Beside the sharpness, the curvature a step feels along the measured top eigenvector v, on the
  same subset and BN mode (common.step_curvature / realised_curvature, float64): the secant
  second difference of the subset loss at h = lr |g.v| (g its gradient), and the curvature the
  next SGD step realised, (g_{t+1} - g_t).v / (dtheta.v). Both are drawn as markers on the
  sharpness panel; g.v, dtheta.v and h are saved to audit them.
"""
import math

import torch

import common

METRIC_LABELS = {"loss": "cross entropy - label entropy", "sharpness": "sharpness",
                 "jacobian": "Jacobian norm (softmax)", "logit_jacobian": "Jacobian norm (logits)",
                 "output_norm": "output Frobenius norm"}
RUN_KEYS = ("smoothing", "trial")
FIGURE_FLAGS = """\
Figures (files under <--out>/plots; one run gives both, --plot-only redraws):
  Figure 28   the first epoch of any run (alone: --epochs 1)    fig28_first_epoch.png
  Figure 29   the whole run, with --epochs above 1 (default 90)  fig29_all_epochs.png"""


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    parser = common.make_parser(__doc__, trials=1, out="results/vgg_sgd", figures=FIGURE_FLAGS)
    parser.add_argument("--dataset", default="cifar10", choices=list(common.DATASETS))
    parser.add_argument("--model", default="vgg11", choices=list(common.MODELS))
    parser.add_argument("--smoothings", nargs="+", type=common.finite_float, default=[0.0, 0.5, 0.75])
    parser.add_argument("--lr", type=common.finite_float, default=0.01)
    parser.add_argument("--momentum", type=common.finite_float, default=0.0)
    parser.add_argument("--weight-decay", type=common.finite_float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--width", type=common.finite_float, default=1.0, help="channel-width multiplier")
    parser.add_argument("--train-size", type=int, default=None,
                        help="train on N training images drawn at random with --seed "
                             "(default: all 50000)")
    parser.add_argument("--measure-every", type=int, default=5,
                        help="iterations between measurements in the first epoch")
    parser.add_argument("--measure-every-epochs", type=int, default=1,
                        help="epochs between measurements after the first epoch")
    parser.add_argument("--measure-size", type=int, default=2500,
                        help="training images (fixed random subset) for the measurements")
    parser.add_argument("--ghost-batch-size", type=int, default=None,
                        help="ghost batch for the sharpness (default: --batch-size)")
    parser.add_argument("--eig-tol", type=common.finite_float, default=1e-3,
                        help="relative error of the sharpness estimate (Lanczos)")
    parser.add_argument("--eig-max-iter", type=int, default=100, help="most Lanczos steps")
    parser.add_argument("--checkpoint-seconds", type=common.finite_float, default=300.0,
                        help="least time between checkpoints (taken at measurements)")
    common.add_plot_from_flag(parser)
    # --smoke: tiny sizes on synthetic data, in their own folder; options given explicitly win
    smoke = dict(out="results/vgg_sgd_smoke", dataset="present", width=0.0625,
                 train_size=64, batch_size=16, epochs=3, measure_every=2, measure_size=16,
                 eig_tol=1e-2, eig_max_iter=30)
    args = common.parse_with_smoke(parser, argv, smoke)
    if args.ghost_batch_size is None:
        args.ghost_batch_size = args.batch_size
    common.check_width(args)
    common.check_positive(args, "lr", "batch_size", "epochs", "width", "measure_every",
                          "measure_every_epochs", "measure_size", "ghost_batch_size",
                          "eig_tol", "eig_max_iter")
    common.check_unit_interval(args, "smoothings", "momentum")
    common.check(args.weight_decay >= 0, f"--weight-decay must be non-negative, got {args.weight_decay}")
    common.check(args.checkpoint_seconds >= 0,
                 f"--checkpoint-seconds must be non-negative, got {args.checkpoint_seconds}")
    n_train = args.train_size or 50000
    common.check(0 < n_train <= 50000, f"--train-size must lie in 1..50000, got {args.train_size}")
    common.check(args.batch_size <= n_train,
                 f"--batch-size ({args.batch_size}) exceeds the training set ({n_train})")
    common.check(args.measure_size <= n_train,
                 f"--measure-size ({args.measure_size}) exceeds the training set ({n_train})")
    common.check_common(args, dataset=args.dataset)
    args.smoothings = sorted(set(args.smoothings))
    return args


def run_configs(args):
    """One resolved config per (smoothing, trial)."""
    return [dict(dataset=args.dataset, model=args.model, smoothing=s, trial=t, seed=args.seed + t,
                 data_seed=args.seed, lr=args.lr, momentum=args.momentum,
                 weight_decay=args.weight_decay, batch_size=args.batch_size, epochs=args.epochs,
                 width=args.width, train_size=args.train_size,
                 measure_every=args.measure_every, measure_every_epochs=args.measure_every_epochs,
                 measure_size=args.measure_size, ghost_batch_size=args.ghost_batch_size,
                 eig_tol=args.eig_tol, eig_max_iter=args.eig_max_iter, standardise="channel",
                 batch_norm=True)
            for s in args.smoothings for t in range(args.trials)]


# ----------------------------------------------------------------------------- data


def load_inputs(args, device):
    """Training images standardised per RGB channel (statistics of all 50000 images), a
    --train-size of them drawn at random with --seed."""
    return common.load_data(args.dataset, args.data_root, device=device, standardise="channel",
                            train_size=args.train_size, train_seed=args.seed, test_size=0,
                            download=args.download)


def measurement_subset(data, config):
    """The fixed random subset for the measurements, drawn from the trial's seed."""
    idx = common.subset_indices(len(data.x_train), config["measure_size"], seed=config["seed"])
    idx = idx.to(data.x_train.device)
    return data.x_train[idx], data.y_train[idx]  # (M, 3, 32, 32), (M,)


def steps_per_epoch(config, n_train):
    return n_train // config["batch_size"]  # the last partial batch is dropped


# ----------------------------------------------------------------------------- model


def make_model(config, num_classes, device):
    torch.manual_seed(config["seed"])  # same initial weights for every smoothing of a trial
    return common.build_model(config["model"], num_classes=num_classes, width=config["width"],
                              batch_norm=config["batch_norm"]).to(device)


# ----------------------------------------------------------------------------- training loop


def is_measured(step, config, per_epoch, total):
    """Iteration 0, every measure_every in the first epoch, every measure_every_epochs epochs,
    and the last iteration."""
    if step < per_epoch:
        return step % config["measure_every"] == 0
    return step % (per_epoch * config["measure_every_epochs"]) == 0 or step == total


def train(config, args, data, device):
    """Trains one run (resuming from its checkpoint, or skipping it if saved); returns it loaded.

    Iteration `step` is measured at the parameters after `step` updates; the curvature along
    its top eigenvector realised by the next SGD step is added to its row after that step. The
    checkpoint holds model, optimiser, the batch-order generator, the epoch's permutation, the
    running loss and that pending measurement, so a resumed run continues exactly where the
    killed one stopped.
    """
    run = common.Run(args.out, config, RUN_KEYS, checkpoint_seconds=args.checkpoint_seconds)
    if run.done:
        return run.load()
    model = make_model(config, data.num_classes, device)
    optimizer = common.sgd(model, config["lr"], config["momentum"], config["weight_decay"])
    loss_fn = common.cross_entropy(config["smoothing"])
    first = slice(0, config["ghost_batch_size"])  # the first ghost batch
    common.gradient_check_or_fail(args, model, loss_fn, data.x_train[first], data.y_train[first])
    x_measure, y_measure = measurement_subset(data, config)
    n_train = len(data.x_train)
    per_epoch = steps_per_epoch(config, n_train)
    total = per_epoch * config["epochs"]
    order = torch.Generator().manual_seed(config["seed"])  # batch order
    perm, loss_sum, loss_count, pending = None, 0.0, 0, None
    state = run.begin(device)
    start = 0
    if state:
        start = common.restore_training_state(state, model, optimizer)
        order.set_state(state["order"])
        perm, loss_sum, loss_count = state["perm"], state["loss_sum"], state["loss_count"]
        pending = state.get("pending")
    label = f"{config['model']} sgd s={config['smoothing']:g} trial={config['trial']}"
    bar = common.progress(total=total + 1, initial=start, desc=label, disable=args.no_progress)
    model.train()
    for step in range(start, total + 1):
        # a checkpoint is taken right after a measurement: a resumed run has that row already
        if is_measured(step, config, per_epoch, total) and not (state and step == start):
            row, pending = curve_point(model, loss_fn, x_measure, y_measure, config,
                                       data.num_classes)
            if loss_count:
                row["train_loss"] = loss_sum / loss_count
            run.log(step, epoch=step / per_epoch, **row)
            loss_sum, loss_count = 0.0, 0
            bar.set_postfix(loss=f"{row['loss']:.3g}", sharpness=f"{row['sharpness']:.3g}")
            run.checkpoint(lambda: common.training_state(
                step, model, optimizer, order=order.get_state(), perm=perm,
                loss_sum=loss_sum, loss_count=loss_count, pending=pending))
        if step == total:
            break
        if step % per_epoch == 0:
            perm = torch.randperm(n_train, generator=order).to(device)
        batch = perm[(step % per_epoch) * config["batch_size"]:][:config["batch_size"]]
        loss, _ = common.train_step(model, optimizer, loss_fn, data.x_train[batch],
                                    data.y_train[batch])
        if not math.isfinite(loss):
            run.log(step, epoch=step / per_epoch, train_loss=math.nan)
            run.finish("diverged", step=step)
            return run.load()
        if pending is not None:  # the curvature this step realised, into the measured row
            run.metrics[-1].update(realised(model, loss_fn, x_measure, y_measure, pending, config))
            pending = None
        loss_sum += common.excess_loss(loss, config["smoothing"], data.num_classes)
        loss_count += 1
        bar.update(1)
    bar.close()
    final = run.metrics[-1]
    run.finish("finished", iterations=total, steps_per_epoch=per_epoch, final_loss=final["loss"],
               final_sharpness=final["sharpness"])
    return run.load()


# ----------------------------------------------------------------------------- measurements


def curve_point(model, loss_fn, x, y, config, num_classes):
    """One point of the Figure 28/29 curves: sharpness, Jacobian norm, output norm, loss,
    accuracy and the step-scale curvature along the top eigenvector on the measurement subset.

    logit_jacobian: the Jacobian norm of the logits (no softmax) on the same subset, eval mode:
    Appendix C.1 says the softmax Jacobian vanishes as the outputs saturate and then no longer
    follows the network's Lipschitz constant; the logits' Jacobian shows whether it still grows.

    Returns:
        (row, pending): `pending` gives `realised` the curvature after the next SGD step."""
    row, pending = common.progressive_sharpening_metrics(
        model, loss_fn, x, y, ghost_batch_size=config["ghost_batch_size"], tol=config["eig_tol"],
        max_iter=config["eig_max_iter"], with_output_norm=True, step_lr=config["lr"])
    row["logit_jacobian"] = common.jacobian_norm(model, x, softmax=False)
    loss, accuracy = common.evaluate(model, loss_fn, x, y, config["ghost_batch_size"])
    return {"loss": common.excess_loss(loss, config["smoothing"], num_classes),
            "accuracy": accuracy, **row}, pending


def realised(model, loss_fn, x, y, pending, config):
    """The curvature along the measured top eigenvector that the SGD step after a measurement
    realised on the measurement subset (`common.realised_curvature`); NaN stored as None."""
    row = common.realised_curvature(model, loss_fn, x, y, pending,
                                    ghost_batch_size=config["ghost_batch_size"])
    return {k: (None if v is None or not math.isfinite(v) else v) for k, v in row.items()}


# ----------------------------------------------------------------------------- plotting


def within(run, last_step):
    """The run with only its metrics up to `last_step`."""
    return {**run, "metrics": [m for m in run["metrics"] if m["step"] <= last_step]}


def plot(args, runs):
    """Figure 28 (first epoch, every measurement) and, if any run is longer than one epoch,
    Figure 29 (the whole run). A line style per smoothing, mean +- std over trials."""
    per_epoch = runs[0]["result"].get("steps_per_epoch") or steps_per_epoch(
        runs[0]["config"], args.train_size or 50000)
    trials = len({r["config"]["trial"] for r in runs})
    reduced = not (args.width == 1 and args.train_size is None)
    scale = f", width {args.width:g}, {args.train_size or 50000} images" if reduced else ""
    title = f"{args.model}, SGD batch {args.batch_size}, lr {args.lr:g}{scale}: {trials} trial(s)"
    data = f"{common.dataset_label(args.dataset)}, {common.scale_label(args, reduced)}"
    figures = [("fig28_first_epoch", [within(r, per_epoch) for r in runs], "first epoch",
                ("jacobian", "logit_jacobian"))]
    if max(r["config"]["epochs"] for r in runs) > 1:
        figures.append(("fig29_all_epochs", runs, "all epochs",
                        ("jacobian", "logit_jacobian", "output_norm")))
    # runs saved before the logits' Jacobian was measured are drawn without its panel
    metrics = [m for m in METRIC_LABELS if m != "logit_jacobian"
               or any(m in row for r in runs for row in r["metrics"])]
    paths = []
    for stem, shown, span, logs in figures:
        fig, panels = common.plot_runs(shown, metrics, "smoothing",
                                       labels=METRIC_LABELS, style_label="smoothing",
                                       log_metrics=logs, ncols=3, legend=False,
                                       xlabel=f"iteration ({per_epoch} per epoch)",
                                       title=f"{title}, {span}\n{data}")
        marks = common.plot_step_curvatures(panels["sharpness"], shown, "smoothing",
                                            two_over_lr=2 / args.lr)
        common.legend_below(fig, common.labelled_handles(panels.values()) + marks)
        paths += common.save_figure(fig, f"{args.out}/plots/{stem}",
                                    settings=[r["config"] for r in runs])
    return paths


# ----------------------------------------------------------------------------- main


def main(args):
    common.unpack_plot_from(args)
    configs = run_configs(args)
    pending = [] if args.plot_only else common.pending_runs(args.out, configs, RUN_KEYS)
    if pending:
        device = common.resolve_device(args.device)
        data = load_inputs(args, device)
        for config in pending:
            train(config, args, data, device)
    runs = common.saved_runs_or_fail(args.out, configs, RUN_KEYS)
    common.save_runs_summary(runs, f"{args.out}/plots/runs.json")
    for path in plot(args, runs):
        print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(main, parse_args)
