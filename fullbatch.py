"""Appendix B.1, Figures 1 and 6-11: progressive sharpening under full-batch gradient descent,
with label smoothing 0, 0.5 and 0.75.

VGG11 (`vgg11_bn` without dropout) and ResNet18 (CIFAR variant) are trained on CIFAR-10,
standardised per component, by full-batch gradient descent approximated by 10 ghost batches of
5000 (each ghost batch normalised by its own BN statistics), at learning rates 0.08, 0.04 and
0.02. The unsmoothed run of each (model, lr, trial) trains until 99% training accuracy; its
iteration count is then the length of the smoothed runs of that (model, lr, trial). Sharpness
(BN in train mode, ghost batches) and the Jacobian norm of the softmaxed model (BN in eval mode)
are measured on a fixed random subset of 2500 training images; the loss is reported as cross
entropy minus the label entropy. 5 trials; mean +- std; line style per smoothing; 2/lr on the
sharpness panel; log y on the Jacobian panel.

Paper's run (all 6 figures; real CIFAR-10 at <data-root>/cifar10.npz):
    python fullbatch.py --data-root /path/to/data
One Slurm task per (model, lr, trial), e.g. array index i -> trial i % 5:
    python fullbatch.py --models vgg11 --lrs 0.08 --trial-index $T
    (the task runs smoothing 0 first, then 0.5 and 0.75 for its iteration count); afterwards
    python fullbatch.py --plot-only
GPU cost (measured on one H100 with the GPU machine's torch, fp32; benchmarks/gpu/paper_scale.json): one
full-batch step over 50 000 images in 10 ghost batches takes 0.68 s (VGG11) / 2.38 s (ResNet18);
one measurement (sharpness to 1e-3 + Jacobian norm on 2500 images) 2.6 s / 8.5 s, timed with
TF32 on (the estimators turn it off: about 1.3x that); peak memory 14 / 35 GiB. A run of T iterations measured every k costs T * (step + measurement / k). The
iteration counts to 99% accuracy were not measured; if they are 2000 / 4000 / 8000 at lr 0.08 /
0.04 / 0.02 (an assumption), the 90 runs take about 53 H100-hours (VGG11) + 182 (ResNet18).
The reduced-scale Figure 1 in plots/fullbatch (VGG11 width 1/8, 500 images, 3 trials, 9 runs of
about 100 iterations) took 11 minutes on 2 shared CPU cores; command in plots/README.md.
Smoke run (seconds): python fullbatch.py --smoke  (CIFAR-10 if --data-root holds it, else a
synthetic stand-in, said on the terminal and in the plot titles)
Data-parallel on K GPUs (or CPU processes):
    torchrun --standalone --nproc_per_node=K fullbatch.py ...
    each step's ghost batches (and the measurements' ghost batches and Jacobian inputs) are
    split across the ranks; rank 0 writes; results as in one process up to float rounding.

Writes, under --out (default results/fullbatch; with --smoke results/fullbatch_smoke_cifar10 or
results/fullbatch_smoke_synthetic-cifar10, by the data set used):
    <model=..._lr=..._smoothing=..._trial=...-hash>/{config,metrics,result}.json  one per run
    plots/fig01_fig06_vgg11_lr0.08.{png,pdf}, fig07_vgg11_lr0.04, ... fig11_resnet18_lr0.02
        (Figure 1 is Figure 6: its file carries both numbers)

Choices where the paper is silent (a careful reading, not the authors' code):
- Iteration t's loss and accuracy are those of the parameters after t updates, measured (in
  train mode, ghost batches) by the gradient pass of update t+1. The unsmoothed run stops at the
  first t with accuracy >= 0.99 (or at --max-iterations, recorded as "target not reached"); that
  t is the smoothed runs' length. Measurements at every --measure-every-th t and at the last t.
- --measure-every 0 (default) means 5, 10 or 20 for lr >= 0.08, >= 0.04, below: runs with a
  smaller lr need about proportionally more iterations, so every run gets a similar number of
  measurements.
- The measurement subset (2500 images) and the initial weights are drawn from the trial's seed
  (--seed + trial), shared by every smoothing and lr of that trial; a --train-subset is drawn
  from --seed and shared by every run.
- Sharpness on the measurement subset is split into ghost batches of --ghost-batch-size (one
  batch of 2500 at paper scale), by Lanczos to relative error --eig-tol.
- Beside the sharpness, the curvature the step feels along the measured top eigenvector v, on
  the same subset and BN mode (common.step_curvature / realised_curvature, float64): the secant
  second difference of the subset loss at h = lr |g.v| (g its gradient), and the curvature the
  update realised, (g_{t+1} - g_t).v / (dtheta.v). A ReLU net's loss is far from quadratic
  along v, so the sharpness (curvature at theta) can sit well above 2/lr while these stay near
  it. Both are drawn as markers on the sharpness panel; g.v, dtheta.v and h are saved to audit.
"""
import math

import torch

import common

PAPER_FIGURES = {("vgg11", 0.08): "fig01_fig06", ("vgg11", 0.04): "fig07", ("vgg11", 0.02): "fig08",
                 ("resnet18", 0.08): "fig09", ("resnet18", 0.04): "fig10",
                 ("resnet18", 0.02): "fig11"}
METRIC_LABELS = {"loss": "cross entropy - label entropy", "sharpness": "sharpness",
                 "jacobian": "Jacobian norm (softmax)"}
RUN_KEYS = ("model", "lr", "smoothing", "trial")
FIGURE_FLAGS = """\
Figures (files under <--out>/plots; the defaults give all six, --plot-only redraws):
  Figure 1 / 6   --models vgg11 --lrs 0.08       fig01_fig06_vgg11_lr0.08.png
  Figure 7       --models vgg11 --lrs 0.04       fig07_vgg11_lr0.04.png
  Figure 8       --models vgg11 --lrs 0.02       fig08_vgg11_lr0.02.png
  Figure 9       --models resnet18 --lrs 0.08    fig09_resnet18_lr0.08.png
  Figure 10      --models resnet18 --lrs 0.04    fig10_resnet18_lr0.04.png
  Figure 11      --models resnet18 --lrs 0.02    fig11_resnet18_lr0.02.png
  Theorem A.1    add --bn-check-batch-sizes 8 32 125 to any of these: figA1_bn_modes.png"""


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    parser = common.make_parser(__doc__, trials=5, out="results/fullbatch", figures=FIGURE_FLAGS)
    parser.add_argument("--dataset", default="cifar10", choices=list(common.DATASETS))
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet18"],
                        choices=list(common.MODELS))
    parser.add_argument("--lrs", nargs="+", type=common.finite_float, default=[0.08, 0.04, 0.02])
    parser.add_argument("--smoothings", nargs="+", type=common.finite_float, default=[0.0, 0.5, 0.75],
                        help="label smoothings; the unsmoothed run (0) sets the others' length")
    parser.add_argument("--trial-index", type=int, default=None,
                        help="run only this trial (0 <= T < --trials), e.g. one Slurm task")
    parser.add_argument("--width", type=common.finite_float, default=1.0, help="channel-width multiplier")
    parser.add_argument("--train-size", type=int, default=None,
                        help="train on N training images drawn at random with --seed "
                             "(default: all 50000)")
    parser.add_argument("--ghost-batch-size", type=int, default=5000,
                        help="examples per ghost batch (BN statistics and gradient chunk)")
    parser.add_argument("--target-accuracy", type=common.finite_float, default=0.99,
                        help="the unsmoothed run stops at this training accuracy")
    parser.add_argument("--max-iterations", type=int, default=20000,
                        help="the unsmoothed run stops here if the target is not reached")
    parser.add_argument("--measure-every", type=int, default=0,
                        help="iterations between measurements; 0: 5/10/20 by learning rate")
    parser.add_argument("--measure-size", type=int, default=2500,
                        help="training images (fixed random subset) for sharpness and Jacobian")
    parser.add_argument("--eig-tol", type=common.finite_float, default=1e-3,
                        help="relative error of the sharpness estimate (Lanczos)")
    parser.add_argument("--eig-max-iter", type=int, default=100, help="most Lanczos steps")
    parser.add_argument("--checkpoint-seconds", type=common.finite_float, default=300.0,
                        help="least time between checkpoints (taken at measurements)")
    parser.add_argument("--bn-check-batch-sizes", nargs="+", type=int, default=None,
                        help="at the last iteration, also take the softmax Jacobian of 16 "
                             "measurement images with BN in train mode in batches of these sizes, "
                             "beside eval mode (Theorem A.1; figA1_bn_modes)")
    common.add_plot_from_flag(parser)
    # --smoke: tiny sizes on synthetic data, in their own folder; options given explicitly win
    smoke = dict(out="results/fullbatch_smoke", dataset="present", models=["vgg11"],
                 lrs=[0.08], trials=2, width=0.0625, train_size=64, ghost_batch_size=32,
                 measure_size=16, max_iterations=4, measure_every=2, eig_tol=1e-2,
                 eig_max_iter=30)
    args = common.parse_with_smoke(parser, argv, smoke)
    common.check_width(args)
    common.check_positive(args, "lrs", "width", "ghost_batch_size", "max_iterations",
                          "measure_size", "eig_tol", "eig_max_iter")
    common.check_unit_interval(args, "smoothings", "target_accuracy")
    common.check(args.measure_every >= 0, f"--measure-every must be non-negative, got {args.measure_every}")
    common.check(args.checkpoint_seconds >= 0,
                 f"--checkpoint-seconds must be non-negative, got {args.checkpoint_seconds}")
    common.check(args.train_size is None or 0 < args.train_size <= 50000,
                 f"--train-size must lie in 1..50000, got {args.train_size}")
    common.check(args.measure_size <= (args.train_size or 50000),
                 f"--measure-size ({args.measure_size}) exceeds the training set ({args.train_size or 50000})")
    common.check(not args.bn_check_batch_sizes or
                 0 < min(args.bn_check_batch_sizes) <= max(args.bn_check_batch_sizes) <= args.measure_size,
                 f"--bn-check-batch-sizes must lie in 1..--measure-size ({args.measure_size}), "
                 f"got {args.bn_check_batch_sizes}")
    common.check(args.trial_index is None or 0 <= args.trial_index < args.trials,
                 f"--trial-index must lie in 0..{args.trials - 1}, got {args.trial_index}")
    common.check_common(args, dataset=args.dataset)
    args.smoothings = sorted(set(args.smoothings))
    return args


def measure_every(args, lr):
    """Iterations between measurements: --measure-every, or 5/10/20 by learning rate."""
    if args.measure_every:
        return args.measure_every
    return 5 if lr >= 0.08 else 10 if lr >= 0.04 else 20


def cells(args):
    """(model, lr, trial) cells to run, in order."""
    trials = [args.trial_index] if args.trial_index is not None else range(args.trials)
    return [(m, lr, t) for m in args.models for lr in args.lrs for t in trials]


def base_config(args, model, lr, trial):
    return dict(dataset=args.dataset, model=model, lr=lr, trial=trial, seed=args.seed + trial,
                data_seed=args.seed, width=args.width, train_size=args.train_size,
                ghost_batch_size=args.ghost_batch_size, measure_every=measure_every(args, lr),
                measure_size=args.measure_size, eig_tol=args.eig_tol,
                eig_max_iter=args.eig_max_iter, standardise="component", batch_norm=True,
                # only when asked for, so other runs keep their folder names
                **({"bn_check_batch_sizes": sorted(args.bn_check_batch_sizes)}
                   if args.bn_check_batch_sizes else {}))


def unsmoothed_config(args, model, lr, trial):
    """The run that trains to the target accuracy; its iteration count is read from its result."""
    return dict(base_config(args, model, lr, trial), smoothing=0.0,
                target_accuracy=args.target_accuracy, max_iterations=args.max_iterations)


def smoothed_config(args, model, lr, trial, smoothing, iterations):
    """A smoothed run of a fixed length: the unsmoothed run's iteration count (in its hash, so a
    different unsmoothed run gives a different directory)."""
    return dict(base_config(args, model, lr, trial), smoothing=smoothing, iterations=iterations,
                target_accuracy=args.target_accuracy, max_iterations=args.max_iterations)


# ----------------------------------------------------------------------------- data


def load_inputs(args, device):
    """Training images standardised per component (statistics of all 50000), --train-size of
    them drawn at random with --seed."""
    return common.load_data(args.dataset, args.data_root, device=device, standardise="component",
                            train_size=args.train_size, train_seed=args.seed, test_size=0,
                            download=args.download)


def measurement_subset(data, config):
    """The fixed random subset for sharpness and Jacobian, drawn from the trial's seed."""
    idx = common.subset_indices(len(data.x_train), config["measure_size"], seed=config["seed"])
    idx = idx.to(data.x_train.device)
    return data.x_train[idx], data.y_train[idx]  # (M, 3, 32, 32), (M,)


# ----------------------------------------------------------------------------- model


def make_model(config, num_classes, device):
    torch.manual_seed(config["seed"])  # same initial weights for every smoothing and lr of a trial
    return common.build_model(config["model"], num_classes=num_classes, width=config["width"],
                              batch_norm=config["batch_norm"]).to(device)


# ----------------------------------------------------------------------------- training loop


def train(config, args, data, device, group=None):
    """Trains one run (resuming from its checkpoint, or skipping it if saved); returns it loaded.

    Per iteration t: the gradient pass at the current parameters gives loss and accuracy of t;
    then, if t is the last iteration (fixed length, or the target accuracy reached) or a
    measurement iteration, sharpness, Jacobian norm and the step-scale curvature along the top
    eigenvector are measured at the same parameters; then the update is applied unless t is the
    last, and the curvature it realised along that eigenvector is added to t's row. With a
    torchrun `group` the ranks share the ghost batches and the measurements; rank 0 alone
    writes, every rank resumes from its checkpoint.
    """
    run = common.Run(args.out, config, RUN_KEYS, checkpoint_seconds=args.checkpoint_seconds,
                     writer=common.is_main(group))
    if run.done:
        return run.load()
    model = make_model(config, data.num_classes, device)
    optimizer = common.sgd(model, config["lr"])
    loss_fn = common.cross_entropy(config["smoothing"])
    first = slice(0, config["ghost_batch_size"])  # the first ghost batch
    common.gradient_check_or_fail(args, model, loss_fn, data.x_train[first], data.y_train[first], group)
    x_measure, y_measure = measurement_subset(data, config)
    state = run.begin(device, world_size=common.world_size(group))
    start = common.restore_training_state(state, model, optimizer) if state else 0
    fixed = config.get("iterations")
    last = fixed if fixed is not None else config["max_iterations"]
    label = f"{config['model']} lr={config['lr']:g} s={config['smoothing']:g} trial={config['trial']}"
    bar = common.progress(total=last + 1, initial=start, desc=label,
                          disable=args.no_progress or not common.is_main(group))
    model.train()
    for step in range(start, last + 1):
        # The gradient pass and the update are apart (not one common.train_step): sharpness and
        # Jacobian of iteration t are measured between them, at the parameters the loss saw.
        optimizer.zero_grad(set_to_none=True)
        loss, accuracy = common.ghost_batch_gradient(model, loss_fn, data.x_train, data.y_train,
                                                     config["ghost_batch_size"], group)
        row = {"loss": common.excess_loss(loss, config["smoothing"], data.num_classes),
               "accuracy": accuracy}
        if not math.isfinite(loss):
            run.log(step, **row)
            return finish(run, group, "diverged", step=step)
        reached = fixed is None and accuracy >= config["target_accuracy"]
        final = reached or step == last
        pending = None
        if final or step % config["measure_every"] == 0:
            point, pending = common.progressive_sharpening_metrics(
                model, loss_fn, x_measure, y_measure, ghost_batch_size=config["ghost_batch_size"],
                tol=config["eig_tol"], max_iter=config["eig_max_iter"], process_group=group,
                step_lr=config["lr"])
            row.update(point)
        if not final:
            optimizer.step()
            if pending is not None:  # the curvature along the top eigenvector this step realised
                row.update(common.realised_curvature(
                    model, loss_fn, x_measure, y_measure, pending,
                    ghost_batch_size=config["ghost_batch_size"], process_group=group))
        run.log(step, **row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3g}", acc=f"{accuracy:.3f}")
        if final:
            break
        if "sharpness" in row:
            run.checkpoint(lambda: common.training_state(step + 1, model, optimizer))
    bar.close()
    if config.get("bn_check_batch_sizes"):
        extra = {"bn_jacobian": common.bn_mode_jacobian_norms(
            model, x_measure, config["bn_check_batch_sizes"], samples=min(16, len(x_measure)),
            seed=config["seed"])}
    else:
        extra = {}
    return finish(run, group, "finished", iterations=step, final_loss=row["loss"],
                  final_accuracy=accuracy, **extra,
                  reached_target=(accuracy >= config["target_accuracy"]) if fixed is None else None)


def finish(run, group, status, **summary):
    """Rank 0 writes the result; the others wait for it before reading the run back."""
    run.finish(status, **summary)
    common.barrier(group)
    return run.load()


def iterations_of(unsmoothed):
    """The smoothed runs' length: the unsmoothed run's final iteration (None if it diverged)."""
    result = unsmoothed["result"] if unsmoothed else None
    return result["iterations"] if result and result["status"] == "finished" else None


# ----------------------------------------------------------------------------- runs


def cell_configs(args, model, lr, trial):
    """The configs of one cell known so far: the unsmoothed run and, once its iteration count is
    saved, the smoothed runs."""
    first = unsmoothed_config(args, model, lr, trial)
    run = common.Run(args.out, first, RUN_KEYS)
    iterations = iterations_of(run.load()) if run.done else None
    smoothed = [smoothed_config(args, model, lr, trial, s, iterations)
                for s in args.smoothings if s > 0] if iterations is not None else []
    return [first] + smoothed


def run_cell(args, data, device, model, lr, trial, group=None):
    """The unsmoothed run first (it sets the length), then each smoothed run."""
    first = unsmoothed_config(args, model, lr, trial)
    iterations = iterations_of(train(first, args, data, device, group))
    if iterations is None:
        if common.is_main(group):
            print(f"{model} lr={lr:g} trial={trial}: unsmoothed run diverged; smoothed runs skipped")
        return
    for s in args.smoothings:
        if s > 0:
            train(smoothed_config(args, model, lr, trial, s, iterations), args, data, device, group)


def check_unsmoothed_saved(args):
    """Without smoothing 0 in --smoothings, the smoothed runs need the saved unsmoothed result."""
    if 0.0 in args.smoothings or args.plot_only:
        return
    for model, lr, trial in cells(args):
        run = common.Run(args.out, unsmoothed_config(args, model, lr, trial), RUN_KEYS)
        common.check(run.done, f"no saved unsmoothed run for {model} lr={lr:g} trial={trial} "
                               f"under {args.out}: include 0 in --smoothings to train it first")


def requested_configs(args):
    """The configs of every requested setting (all trials; smoothed ones once their unsmoothed
    run is saved), for plotting."""
    return [config for model in args.models for lr in args.lrs for trial in range(args.trials)
            for config in cell_configs(args, model, lr, trial)
            if config["smoothing"] in args.smoothings]


# ----------------------------------------------------------------------------- plotting


def plot(args, runs):
    """One figure per (model, lr): loss, sharpness (with 2/lr and the step-scale curvatures as
    markers) and Jacobian norm (log y), a line style per smoothing, mean +- std over trials."""
    paths = []
    for model in args.models:
        for lr in args.lrs:
            mine = [r for r in runs if r["config"]["model"] == model and r["config"]["lr"] == lr]
            if not mine:
                continue
            trials = len({r["config"]["trial"] for r in mine})
            reduced = not (args.width == 1 and args.train_size is None)
            scale = f", width {args.width:g}, {args.train_size or 50000} images" if reduced else ""
            fig, panels = common.plot_runs(mine, list(METRIC_LABELS), "smoothing",
                                           labels=METRIC_LABELS, style_label="smoothing",
                                           log_metrics=("jacobian",), legend=False,
                                           title=f"{model}, full-batch GD, lr {lr:g}{scale}: "
                                                 f"mean ± std over {trials} trials\n"
                                                 f"{common.dataset_label(args.dataset)}, "
                                                 f"{common.scale_label(args, reduced)}")
            marks = common.plot_step_curvatures(panels["sharpness"], mine, "smoothing",
                                                two_over_lr=2 / lr)
            common.legend_below(fig, common.labelled_handles(panels.values()) + marks)
            stem = f"{PAPER_FIGURES.get((model, lr), 'fig')}_{model}_lr{lr:g}"
            paths += common.save_figure(fig, f"{args.out}/plots/{stem}",
                                        settings=[r["config"] for r in mine])
    checked = [r for r in runs if r["result"].get("bn_jacobian")]
    if checked:
        paths += common.save_figure(bn_modes_figure(checked), f"{args.out}/plots/figA1_bn_modes",
                                    settings=[r["config"] for r in checked])
    return paths


def bn_modes_figure(runs):
    """Theorem A.1 on the trained models: the relative difference between each sample's
    train-mode (batch statistics) and eval-mode softmax Jacobian norm against the batch size,
    a line per run: a colour and line style per smoothing, a marker per trial."""
    fig, axes = common.new_figure(1, 2, panel_size=(4.2, 3.4))
    smoothings = sorted({r["config"]["smoothing"] for r in runs})
    trials = sorted({r["config"]["trial"] for r in runs})
    for r in sorted(runs, key=lambda r: (r["config"]["smoothing"], r["config"]["trial"])):
        checks = r["result"]["bn_jacobian"]
        sizes = sorted(int(b) for b in checks if b != "eval")
        color = f"C{smoothings.index(r['config']['smoothing'])}"
        for ax, key in zip(axes[0], ("max_relative_difference", "relative_difference_of_max")):
            ax.plot(sizes, [checks[str(b)][key] for b in sizes], color=color,
                    marker="osD^v<>"[trials.index(r["config"]["trial"]) % 7], markersize=5,
                    linestyle=common.LINESTYLES[smoothings.index(r["config"]["smoothing"])],
                    label=f"smoothing {r['config']['smoothing']:g}, trial {r['config']['trial']}")
    for ax, title in zip(axes[0], ("max over samples of |train - eval| / eval",
                                   "|max train - max eval| / max eval")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size in train mode")
        ax.set_ylabel("relative difference")
        ax.set_title(title, fontsize="small")
        ax.grid(alpha=0.3)
    common.legend_below(fig, common.labelled_handles(axes[0]), fontsize="x-small")
    c = runs[0]["config"]
    lrs = ", ".join(f"{lr:g}" for lr in sorted({r["config"]["lr"] for r in runs}))
    scale = (f"{c['model']}, width {c['width']:g}, {c['train_size'] or 50000} training images, "
             f"ghost batches of {c['ghost_batch_size']}, full-batch GD at lr {lrs}")
    fig.suptitle(f"Theorem A.1: softmax Jacobian norm, BN train mode vs eval mode (16 samples)\n"
                 f"{scale}, {common.dataset_label(c['dataset'])}")
    return fig


# ----------------------------------------------------------------------------- main


def unreached_lines(args, runs):
    """What to say of the unsmoothed runs that stopped at --max-iterations short of the target
    accuracy: their names, and with --smoke that this is expected."""
    unreached = [common.run_name(r["config"], RUN_KEYS) for r in runs
                 if r["result"].get("reached_target") is False]
    if not unreached:
        return []
    lines = [f"target accuracy not reached within --max-iterations: {', '.join(unreached)}"]
    if args.smoke:
        lines.append(f"(expected at smoke scale: {args.max_iterations} iterations are far too few "
                     f"to reach {args.target_accuracy:g} training accuracy; a smoke run only "
                     f"checks that everything runs)")
    return lines


def main(args):
    common.unpack_plot_from(args)
    check_unsmoothed_saved(args)
    if not args.plot_only:
        group, device = common.init_from_env(common.resolve_device(args.device))
        data = None
        for model, lr, trial in cells(args):
            configs = cell_configs(args, model, lr, trial)
            pending = common.pending_runs(args.out, configs, RUN_KEYS)
            if pending:  # the smoothed configs appear once the unsmoothed run is saved
                data = data or load_inputs(args, device)
                run_cell(args, data, device, model, lr, trial, group)
        if not common.is_main(group):  # rank 0 alone reads back and plots
            return
    runs = common.saved_runs_or_fail(args.out, requested_configs(args), RUN_KEYS)
    common.save_runs_summary(runs, f"{args.out}/plots/runs.json")
    for line in unreached_lines(args, runs):
        print(line)
    for path in plot(args, runs):
        print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(main, parse_args)
