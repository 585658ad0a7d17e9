"""Sections 6.1 and 6.3, Appendix B.3, Figures 2, 5 and 20-27: regularisers at the end of training.

{CIFAR-10, CIFAR-100} x {VGG11, ResNet18} x {with BN, without BN} trained for 90 epochs with
batch 128, momentum 0.9, weight decay 5e-4 and the learning rate divided by 10 after epochs 50 and
80. One regulariser at a time is swept by its parameter, the others held at "off": weight decay
(Figure 2; includes 0), label smoothing alpha, mixup with theta ~ Beta(beta, beta) (beta = 0 is
Bernoulli(1/2)), data augmentation applied with probability p (4-pixel pad, random crop,
horizontal flip, on the device), SAM with radius rho (rho = 0 is SGD). At the end, on clean data
and without weight decay (label smoothing included): generalisation gap |test - train loss|,
sharpness and Gauss-Newton norm (1000 training examples drawn with the model's seed, BN in train
mode, ghost batches of 128), softmax Jacobian norm (same examples, eval mode), training loss and
accuracy, validation (test-split) accuracy, and the weight norm ||w|| (every trainable
parameter). The paper's finding: every regulariser lowers the Jacobian norm with the gap, while
only SAM lowers sharpness.

Beyond the paper, an intervention (--sweeps jacobian, swept only when named): the loss is
CE + lambda * P, P the random-projection estimate of the mean squared Frobenius norm of the
softmax's input Jacobian [Hoffman et al. 2019] (`common.jacobian_penalty`), swept over lambda
(--jacobian-penalties; lambda = 0 is the baseline cell). Does lowering the Jacobian norm
directly lower the gap, and what does it do to sharpness? A penalised step costs about 4 plain
ones (double backward; measured on one CPU core, VGG11 at width 1/8). A penalty that raises the
training loss lowers the gap by underfitting too; with --match-train-loss each penalised cell
trains on at its last learning rate until its clean training loss is down to its unpenalised
cell's, so the gaps are compared at matched training loss (the end-of-schedule values are kept
as scheduled_<metric>). Where training on does not get there, --measure-each-epoch gives the other
side of the match: run the lambda = 0 cells again with it (into another --out: it is a config key)
and each epoch's end-of-training metrics are logged as epoch_<metric>, so the unpenalised cell can
be read at the epoch where its clean training loss passes a penalised cell's final one.

Paper's run, all cells in one process:
    python train_regularisers.py --data-root DATA
Paper's sweep (one cell per Slurm array task, see slurm/train_regularisers.sbatch):
    python train_regularisers.py --list-grid                        # the cells
    python train_regularisers.py --grid-index $SLURM_ARRAY_TASK_ID  # one cell
    python train_regularisers.py --plot-only                        # figures + correlations
GPU cost (measured on one H100 with the GPU machine's torch, fp32; benchmarks/gpu/): an SGD epoch at batch 128
takes 2.5 s (VGG11) / 4.3 s (ResNet18), a SAM epoch 2.4x that (ResNet18: 10.4 s), the
end-of-training metrics 3.8 s / 7.3 s. A 90-epoch cell is about 4 minutes (VGG11) / 6.5
(ResNet18), 9 / 16 with SAM. The grid has 2 x 2 x 2 x 21 settings (4 + 5 + 5 + 5 + 5 sweep
points, the baseline shared by four sweeps counted once) x 2 initial learning rates x 5 trials =
1680 cells: about 185 H100-hours in all.
Smoke run (seconds): python train_regularisers.py --smoke  (the data sets present under --data-root, else a
synthetic stand-in of CIFAR-10, said on the terminal and in the plot titles)

Writes, under --out (default results/train_regularisers; with --smoke
results/train_regularisers_smoke_<data sets>, e.g. ..._smoke_cifar10 or
..._smoke_synthetic-cifar10):
    <dataset=..._model=..._batch_norm=..._lr=..._<regularisers>_trial=...-hash>/{config,metrics,result}.json
        metrics: per epoch the mean batch loss, the learning rate and the weight norm (with
        --measure-each-epoch also every end-of-training metric, as epoch_<metric>)
    plots/fig20..27_<dataset>_<model>_<bn|no-bn>.{png,pdf}  a row per sweep, a column per metric,
        line style per initial learning rate. Figure 2 is the weight-decay row, Figure 5 the
        other rows of fig23 (ResNet18 with BN on CIFAR-10): its file carries the numbers of
        the rows drawn, fig02_fig05_fig23_cifar10_resnet18_bn with every paper sweep.
    plots/correlations.json   Kendall tau of the gap against Jacobian norm, sharpness and
        Gauss-Newton norm, per (data set, model, BN, sweep), each cell one point

Choices where the paper is silent (a careful reading, not the authors' code):
- Swept values and initial learning rates are not given in the paper; the defaults below are
  ours (--weight-decays, --smoothings, --mixup-betas, --augment-ps, --sam-rhos, --lrs).
- Mixup draws one theta per example and pairs the batch with a random permutation of itself;
  mixup and augmentation are drawn from one CPU torch.Generator seeded with the cell's seed.
- SAM perturbs by rho g / ||g|| over all parameters, leaves BN running statistics alone in the
  perturbed pass, and the momentum/weight-decay step uses the perturbed gradient (Foret et al.).
- One random permutation per epoch, the last incomplete batch kept. Cells whose
  hyperparameters coincide (each sweep's "off" value) are one run, shared by the sweeps.
- A baseline without the regulariser is the weight decay 5e-4 run with every other one off.
- The Jacobian penalty acts on the softmax, not the logits: the sweeps measure the softmax
  Jacobian's spectral norm, which its Frobenius norm bounds within sqrt(K - 1). One random unit
  direction per example and step, drawn from the cell's generator; BN in train mode, so the
  estimate includes the (small) cross-example terms of the batch's Jacobian.
"""
import math
import time

import torch

import common

# Sweep name -> (config key swept, axis label). Outside its sweep a regulariser is off:
# weight decay --weight-decay, smoothing 0, mixup None (not applied), p 0, rho 0, Jacobian
# penalty 0 (the key absent, so the other cells keep the names of runs saved before it existed).
SWEEPS = {"weight_decay": ("weight_decay", "weight decay"),
          "label_smoothing": ("smoothing", "label smoothing α"),
          "mixup": ("mixup_beta", "mixup β"),
          "augmentation": ("augment_p", "augmentation probability p"),
          "sam": ("sam_rho", "SAM radius ρ"),
          "jacobian": ("jacobian_penalty", "Jacobian penalty λ")}
PAPER_SWEEPS = ["weight_decay", "label_smoothing", "mixup", "augmentation", "sam"]
FIGURES = {(d, m, bn): 20 + 4 * i + 2 * j + int(bn) for i, d in enumerate(("cifar10", "cifar100"))
           for j, m in enumerate(("vgg11", "resnet18")) for bn in (False, True)}
# Main-text figures within an appendix figure, by the sweeps (rows) that make them.
MAIN_FIGURES = {23: {2: ["weight_decay"], 5: ["label_smoothing", "mixup", "augmentation", "sam"]}}
METRIC_LABELS = {"gap": "generalisation gap", "sharpness": "sharpness",
                 "gauss_newton": "Gauss-Newton norm", "jacobian": "Jacobian norm (softmax)",
                 "train_loss": "training loss", "test_accuracy": "validation accuracy",
                 "weight_norm": "weight norm ||w||"}
RUN_KEYS = ("dataset", "model", "batch_norm", "lr", "weight_decay", "smoothing", "mixup_beta",
            "augment_p", "sam_rho", "jacobian_penalty", "trial")
BATCH_NORM = {"with": True, "without": False}
FIGURE_FLAGS = """\
Figures (files under <--out>/plots; the defaults give all eight, a row per --sweeps entry):
  Figure 20   --datasets cifar10 --models vgg11 --batch-norm without
  Figure 21   --datasets cifar10 --models vgg11 --batch-norm with
  Figure 22   --datasets cifar10 --models resnet18 --batch-norm without
  Figure 23   --datasets cifar10 --models resnet18 --batch-norm with
      its weight-decay row is Figure 2 (alone: add --sweeps weight_decay), its other rows
      Figure 5 (alone: add --sweeps label_smoothing mixup augmentation sam)
  Figures 24-27   as 20-23 with --datasets cifar100
  e.g. fig02_fig05_fig23_cifar10_resnet18_bn.png; --sweeps jacobian adds a row (not in the paper)"""


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    parser = common.make_parser(__doc__, trials=5, out="results/train_regularisers",
                                figures=FIGURE_FLAGS)
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "cifar100"],
                        choices=list(common.DATASETS))
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet18"], choices=list(common.MODELS))
    parser.add_argument("--batch-norm", nargs="+", default=["without", "with"],
                        choices=list(BATCH_NORM),
                        help="networks with and/or without BatchNorm (a figure each)")
    parser.add_argument("--sweeps", nargs="+", default=PAPER_SWEEPS, choices=list(SWEEPS),
                        help="regularisers to sweep (a figure row each); 'jacobian' (not in the "
                             "paper) is swept only when named")
    parser.add_argument("--lrs", nargs="+", type=common.finite_float, default=[0.1, 0.01],
                        help="initial learning rates (a line style each)")
    parser.add_argument("--weight-decay", type=common.finite_float, default=5e-4,
                        help="outside the weight-decay sweep")
    parser.add_argument("--weight-decays", nargs="+", type=common.finite_float,
                        default=[0.0, 1e-4, 5e-4, 1e-3],
                        help="weight decays of the weight-decay sweep")
    parser.add_argument("--smoothings", nargs="+", type=common.finite_float,
                        default=[0.0, 0.1, 0.2, 0.4, 0.6])
    parser.add_argument("--mixup-betas", nargs="+", type=common.finite_float,
                        default=[0.0, 0.1, 0.2, 0.5, 1.0],
                        help="mixup Beta(beta, beta) parameters (0: Bernoulli(1/2), as in the paper)")
    parser.add_argument("--augment-ps", nargs="+", type=common.finite_float,
                        default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="probabilities of augmenting an image (crop and flip)")
    parser.add_argument("--sam-rhos", nargs="+", type=common.finite_float,
                        default=[0.0, 0.01, 0.02, 0.05, 0.1], help="SAM radii rho (0: plain SGD)")
    parser.add_argument("--jacobian-penalties", nargs="+", type=common.finite_float,
                        default=[0.0, 0.1, 0.3, 1.0],
                        help="strengths lambda of the softmax-Jacobian penalty (0: none)")
    parser.add_argument("--match-train-loss", action="store_true",
                        help="penalised cells of the 'jacobian' sweep train on at the last learning "
                             "rate until their clean training loss is at most their unpenalised "
                             "cell's (which must finish first), so the gap is compared at matched "
                             "training loss; the result keeps the end-of-schedule values as "
                             "scheduled_<metric>")
    parser.add_argument("--match-max-epochs", type=int, default=None,
                        help="most epochs a matched cell trains beyond --epochs (default: --epochs)")
    parser.add_argument("--measure-each-epoch", action="store_true",
                        help="also measure every cell at the end of every epoch (the end-of-training "
                             "metrics, logged as epoch_<metric>): a trajectory, e.g. the lambda = 0 "
                             "cells at any penalised cell's training loss")
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--milestones", nargs="*", type=int, default=[50, 80],
                        help="epochs after which the learning rate is divided by 10")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--momentum", type=common.finite_float, default=0.9)
    parser.add_argument("--width", type=common.finite_float, default=1.0, help="channel multiplier of the model")
    parser.add_argument("--train-size", type=int, default=None,
                        help="train on N training images drawn at random with --seed (default: all)")
    parser.add_argument("--test-size", type=int, default=None, help="test on N test images drawn at random with --seed (default: all)")
    common.add_grid_flags(parser, measure_size=1000)
    common.add_plot_from_flag(parser)
    parser.add_argument("--mixup-control", default="none", choices=list(MIXUP_CONTROLS),
                        help="controls for mixup with beta = 0 (plots/README.md, mixup_beta0): "
                             "resample_hard: mixup's resampled batches with integer labels; "
                             "theta0_soft: the same random draws, theta = 0 (no resampling), "
                             "soft one-hot targets")
    smoke = dict(out="results/train_regularisers_smoke", datasets=["present"], models=["vgg11"], batch_norm=["with"],
                 lrs=[0.05], trials=1, weight_decays=[0.0, 5e-4], smoothings=[0.0, 0.2],
                 mixup_betas=[0.0, 1.0], augment_ps=[0.0, 1.0], sam_rhos=[0.0, 0.05],
                 sweeps=list(SWEEPS), jacobian_penalties=[0.0, 0.1], epochs=2,
                 milestones=[1], train_size=64, test_size=64, batch_size=32, width=0.125,
                 measure_size=16, eig_tol=3e-2, eig_max_iter=30)
    args = common.parse_with_smoke(parser, argv, smoke)
    validate(args)
    return args


def validate(args):
    common.check_width(args)
    common.check_positive(args, "lrs", "epochs", "batch_size", "width", "measure_size", "eig_tol",
                          "eig_max_iter")
    common.check(args.match_max_epochs is None or args.match_max_epochs > 0,
                 f"--match-max-epochs must be positive, got {args.match_max_epochs}")
    common.check(args.checkpoint_seconds >= 0,
                 f"--checkpoint-seconds must be non-negative, got {args.checkpoint_seconds}")
    for name in ("weight_decay", "weight_decays", "mixup_betas", "sam_rhos", "jacobian_penalties"):
        values = getattr(args, name)
        values = values if isinstance(values, list) else [values]
        common.check(all(v >= 0 for v in values),
                     f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    common.check_unit_interval(args, "smoothings", "augment_ps")
    common.check(0 <= args.momentum < 1, f"--momentum must lie in [0, 1), got {args.momentum}")
    common.check(all(0 < m <= args.epochs for m in args.milestones),
                 f"--milestones must lie in [1, --epochs], got {args.milestones}")
    for name in ("train_size", "test_size"):
        value = getattr(args, name)
        common.check(value is None or value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.train_size is not None:
        common.check(args.measure_size <= args.train_size,
                     f"--measure-size ({args.measure_size}) must not exceed --train-size ({args.train_size})")
    common.check_grid_index(args, grid_cells(args))
    for dataset in args.datasets:
        common.check_common(args, dataset=None if args.list_grid else dataset)


SWEPT_VALUES = {"weight_decay": "weight_decays", "label_smoothing": "smoothings",
                "mixup": "mixup_betas", "augmentation": "augment_ps", "sam": "sam_rhos",
                "jacobian": "jacobian_penalties"}


def regularisers(args, key, value):
    """The regulariser settings of a cell whose `key` is `value`, the others off; the Jacobian
    penalty only where it is on (so lambda = 0 is the baseline cell itself)."""
    settings = dict(weight_decay=args.weight_decay, smoothing=0.0, mixup_beta=None, augment_p=0.0,
                    sam_rho=0.0)
    if key != "jacobian_penalty" or value != 0:
        settings[key] = value
    return settings


def sweep_cells(args, sweep, dataset, model, batch_norm):
    """The resolved configs of one sweep of one (data set, model, BN): value x lr x trial."""
    key = SWEEPS[sweep][0]
    return [dict(dataset=dataset, model=model, batch_norm=batch_norm, lr=cell["lr"],
                 **regularisers(args, key, cell["value"]), trial=cell["trial"],
                 seed=args.seed + cell["trial"],
                 epochs=args.epochs, milestones=list(args.milestones), batch_size=args.batch_size,
                 momentum=args.momentum, width=args.width, train_size=args.train_size, data_seed=args.seed,
                 test_size=args.test_size, measure_size=args.measure_size, eig_tol=args.eig_tol,
                 eig_max_iter=args.eig_max_iter,
                 standardise="channel",
                 **({"mixup_control": args.mixup_control} if args.mixup_control != "none" else {}),
                 **matching(args, key, cell["value"]),
                 **({"measure_each_epoch": True} if args.measure_each_epoch else {}))
            for cell in common.grid(value=getattr(args, SWEPT_VALUES[sweep]), lr=args.lrs,
                                    trial=list(range(args.trials)))]


def matching(args, key, value):
    """The config keys of --match-train-loss: on the penalised cells alone (the unpenalised cell
    is the one they are matched to)."""
    if not (args.match_train_loss and key == "jacobian_penalty" and value > 0):
        return {}
    return {"match_train_loss": True, "match_max_epochs": args.match_max_epochs or args.epochs}


def sweeps(args):
    """{(data set, model, BN, sweep): cells} for every sweep asked for."""
    return {(d, m, BATCH_NORM[bn], s): sweep_cells(args, s, d, m, BATCH_NORM[bn])
            for d in args.datasets for m in args.models for bn in args.batch_norm for s in args.sweeps}


def grid_cells(args):
    """Every distinct cell of every sweep (shared baselines once), in a fixed order."""
    return common.unique_configs([c for cells in sweeps(args).values() for c in cells])


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


def learning_rate(config, epoch):
    """The initial rate divided by 10 once for every milestone already passed."""
    return config["lr"] * 0.1 ** sum(epoch >= m for m in config["milestones"])


def regularised_batch(config, x, y, num_classes, generator):
    """The training batch the step sees: augmented with probability p, then mixed up; targets
    are labels (N,) or mixup's probability vectors (N, K)."""
    if config["augment_p"] > 0:
        x = common.augment(x, config["augment_p"], generator)
    if config["mixup_beta"] is not None:
        mixup = MIXUP_CONTROLS[config.get("mixup_control", "none")]
        return mixup(x, y, config["mixup_beta"], num_classes, generator)
    return x, y


def jacobian_penalty(strength, generator):
    """The penalty `train_step` adds to the loss: lambda times the random-projection estimate of
    the softmax Jacobian's squared Frobenius norm (one projection per example, drawn from the
    cell's generator); None when lambda is 0. The softmax, not the logits: the sweeps measure the
    softmax Jacobian's spectral norm, which the Frobenius norm bounds (||J||_2 <= ||J||_F <=
    sqrt(K - 1) ||J||_2), whereas the logits' Jacobian can grow while the softmax saturates."""
    if strength == 0:
        return None
    return lambda outputs, inputs: strength * common.jacobian_penalty(outputs, inputs, generator)


def mixup_resample_hard(x, labels, beta, num_classes, generator):
    """Control: mixup's batch with integer labels, its soft targets' argmax (with beta = 0 each
    example is itself or its partner, so this is the resampled batch, unmixed)."""
    mixed, targets = common.mixup(x, labels, beta, num_classes, generator)
    return mixed, targets.argmax(1)


def mixup_theta0_soft(x, labels, beta, num_classes, generator):
    """Control: mixup's random draws (so the generator moves on as in mixup), then theta = 0:
    the batch itself with one-hot targets through the soft-target loss."""
    common.mixup(x, labels, beta, num_classes, generator)
    return x, torch.nn.functional.one_hot(labels, num_classes).to(x.dtype)


MIXUP_CONTROLS = {"none": common.mixup, "resample_hard": mixup_resample_hard,
                  "theta0_soft": mixup_theta0_soft}


def matched_loss_target(config, args):
    """The clean training loss a penalised cell trains down to with --match-train-loss: the
    final one of its unpenalised cell (the same config with the penalty off); None where the
    cell is not matched. Exits 2 with one line if that cell has not finished yet."""
    if not config.get("match_train_loss"):
        return None
    baseline = {k: v for k, v in config.items()
                if k not in ("jacobian_penalty", "match_train_loss", "match_max_epochs")}
    run = common.Run(args.out, baseline, RUN_KEYS)
    common.check(run.done, f"--match-train-loss: the unpenalised cell {run.dir.name} must finish "
                           f"before {common.run_name(config, RUN_KEYS)} (train it first)")
    return run.load()["result"]["train_loss"]


def train_epoch(config, model, optimizer, loss_fn, data, generator, penalty, device):
    """One epoch of minibatch steps at the epoch's learning rate; the mean batch loss (NaN
    once a step diverges)."""
    total, count = 0.0, 0
    for idx in common.shuffled_batches(len(data.x_train), config["batch_size"], generator):
        idx = idx.to(device)
        x, y = regularised_batch(config, data.x_train[idx], data.y_train[idx], data.num_classes,
                                 generator)
        loss, _ = common.train_step(model, optimizer, loss_fn, x, y, rho=config["sam_rho"],
                                    penalty=penalty)
        if not math.isfinite(loss):
            return loss
        total, count = total + loss * len(idx), count + len(idx)
    return total / count


def measure(config, model, loss_fn, data):
    """The end-of-training metrics of a cell (see common.end_of_training_metrics)."""
    return common.end_of_training_metrics(model, loss_fn, data, config["seed"],
                                          measure_size=config["measure_size"],
                                          ghost_batch_size=config["batch_size"],
                                          eig_tol=config["eig_tol"],
                                          eig_max_iter=config["eig_max_iter"], gauss_newton=True)


def still_above(run, target, epoch):
    """Whether the clean training loss logged at `epoch` is above the matching target."""
    logged = [m["clean_train_loss"] for m in run.metrics if m["step"] == epoch and "clean_train_loss" in m]
    return not logged or logged[-1] > target


def train(config, args, data, device):
    """Trains one cell for its epochs (or resumes it, or skips it if saved); returns it.

    A cell with match_train_loss (a penalised cell of --match-train-loss) is measured at the end
    of its schedule (saved as `scheduled_<metric>`) and then trains on at the last learning rate,
    an epoch at a time, until its clean training loss is at most its unpenalised cell's final
    one, or for match_max_epochs more epochs; the result says whether it got there (`matched`)."""
    run = common.Run(args.out, config, RUN_KEYS, checkpoint_seconds=args.checkpoint_seconds)
    if run.done:
        return run.load()
    target = matched_loss_target(config, args)
    model = make_model(config, data.num_classes, device)
    optimizer = common.sgd(model, config["lr"], config["momentum"], config["weight_decay"])
    loss_fn = common.cross_entropy(config["smoothing"])
    first = slice(0, config["batch_size"])
    common.gradient_check_or_fail(args, model, loss_fn, data.x_train[first], data.y_train[first])
    generator = torch.Generator().manual_seed(config["seed"])
    penalty = jacobian_penalty(config.get("jacobian_penalty", 0.0), generator)
    state = run.begin(device)
    epoch, elapsed = 0, 0.0
    if state:
        epoch = common.restore_training_state(state, model, optimizer)
        generator.set_state(state["generator"])
        elapsed = state["seconds"]
    started = time.monotonic() - elapsed
    last = config["epochs"] + config.get("match_max_epochs", 0)  # the key only on matched cells
    bar = common.progress(desc=f"cell {run.dir.name}", initial=epoch, total=config["epochs"],
                          disable=args.no_progress)
    while epoch < config["epochs"] or (epoch < last and still_above(run, target, epoch)):
        if epoch == config["epochs"] and not any("scheduled_train_loss" in m for m in run.metrics):
            scheduled = measure(config, model, loss_fn, data)  # the cell as its schedule left it
            run.log(epoch, clean_train_loss=scheduled["train_loss"],
                    **{f"scheduled_{k}": v for k, v in scheduled.items()})
            continue
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_epoch(config, model, optimizer, loss_fn, data, generator, penalty, device)
        if not math.isfinite(loss):
            run.log(epoch, batch_loss=loss, lr=lr)
            run.finish("diverged", epoch=epoch)
            return run.load()
        epoch += 1
        # The weight norm per epoch shows whether it grows without weight decay (Sec. 6.1).
        row = dict(batch_loss=loss, lr=lr, weight_norm=common.weight_norm(model))
        if epoch > config["epochs"]:  # matching: the clean loss decides whether to go on
            row["clean_train_loss"] = common.evaluate(model, loss_fn, data.x_train, data.y_train, 1000)[0]
        run.log(epoch, **row)
        if config.get("measure_each_epoch"):  # before the checkpoint, so a resumed run has it
            run.log(epoch, **{f"epoch_{k}": v for k, v in measure(config, model, loss_fn, data).items()})
        bar.update()
        run.checkpoint(lambda: common.training_state(epoch, model, optimizer,
                                                     generator=generator.get_state(),
                                                     seconds=time.monotonic() - started),
                       force=epoch >= config["epochs"])
    bar.close()
    seconds = time.monotonic() - started
    scheduled = {k: v for m in run.metrics for k, v in m.items() if k.startswith("scheduled_")}
    summary = ({k.removeprefix("scheduled_"): v for k, v in scheduled.items()}
               if scheduled and epoch == config["epochs"] else measure(config, model, loss_fn, data))
    if target is not None:
        summary.update(match_target=target, matched=summary["train_loss"] <= target,
                       epochs_trained=epoch, **scheduled)
    status = "finished" if math.isfinite(summary["train_loss"]) else "diverged"
    run.finish(status, train_seconds=seconds, measure_seconds=time.monotonic() - started - seconds,
               **summary)
    return run.load()


# ----------------------------------------------------------------------------- plotting


def symlog_axis(ax, values):
    """An x axis linear up to the smallest positive value and logarithmic above it, ticked at the
    values: penalties spanning decades, 0 included."""
    values = sorted(set(values))
    positive = [v for v in values if v > 0]
    if positive:
        ax.set_xscale("symlog", linthresh=positive[0])
        ax.set_xticks(values, [f"{v:g}" for v in values])


def with_penalty(runs):
    """The runs, each config recording its Jacobian penalty: the key is absent from the configs
    of cells where it is off (so their names and hashes stay those of runs saved before it), and
    is set to 0 here, for the figures and the runs summary."""
    for r in runs:
        r["config"].setdefault("jacobian_penalty", 0.0)
    return runs


def figure_prefix(number, sweeps_drawn):
    """"figNN_" for appendix figure NN, led by the main-text figures among its rows drawn:
    "fig02_fig05_fig23_" for fig23 with the weight-decay row and another paper sweep."""
    mains = [main for main, sweeps in MAIN_FIGURES.get(number, {}).items()
             if set(sweeps) & set(sweeps_drawn)]
    return "".join(f"fig{main:02d}_" for main in mains) + f"fig{number}_"


def plot(args, out):
    """Per (data set, model, BN): a row per sweep, a column per metric, a line style per initial
    learning rate; and the Kendall correlations of every sweep."""
    paths, correlations = [], {}
    groups = {}
    for (dataset, model, bn, sweep), cells in sweeps(args).items():
        runs = with_penalty(common.load_saved(out, cells, RUN_KEYS))
        if runs:
            groups.setdefault((dataset, model, bn), []).append((sweep, runs))
    for (dataset, model, bn), rows in groups.items():
        name = f"{dataset}_{model}_{'bn' if bn else 'no-bn'}"
        fig, axes = common.new_figure(len(rows), len(METRIC_LABELS), panel_size=(3.0, 2.3))
        for row, (sweep, runs) in zip(axes, rows):
            key, xlabel = SWEEPS[sweep]
            tau = correlations[f"{name}_{sweep}"] = common.sweep_correlations(
                runs, against=("jacobian", "sharpness", "gauss_newton"), within="lr")
            for ax, (metric, label) in zip(row, METRIC_LABELS.items()):
                common.plot_sweep(ax, runs, key, "lr", metric, style_label="initial lr",
                                  log_y=sweep == "weight_decay" and metric != "test_accuracy",
                                  xlabel=xlabel, ylabel=label)
                if sweep == "jacobian":
                    symlog_axis(ax, [r["config"][key] for r in runs])
            row[0].set_title(f"τ(gap, Jac) = {tau['tau_gap_jacobian']:.2f}, "
                             f"τ(gap, sharp) = {tau['tau_gap_sharpness']:.2f}", fontsize="small")
        common.legend_below(fig, common.labelled_handles(fig.axes))
        trials = max(len({r["config"]["trial"] for r in runs}) for _, runs in rows)
        reduced = not (args.width == 1 and args.train_size is None)
        fig.suptitle(f"{model} {'with' if bn else 'without'} BN on {common.dataset_label(dataset)}"
                     f", {common.scale_label(args, reduced)}, {args.epochs} epochs of batch "
                     f"{args.batch_size}:\nend of training, weight decay {args.weight_decay:g} "
                     f"outside its own sweep, mean ± std over {trials} trials "
                     f"(τ: Kendall, over cells)")
        number = FIGURES.get((dataset.removeprefix("synthetic-"), model, bn))
        stem = f"{figure_prefix(number, [sweep for sweep, _ in rows])}{name}" if number else name
        paths += common.save_figure(fig, f"{out}/plots/{stem}",
                                    settings=[r["config"] for _, runs in rows for r in runs])
    common.save_json(f"{out}/plots/correlations.json", correlations)
    return paths, correlations


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
    runs = with_penalty(common.saved_runs_or_fail(args.out, cells, RUN_KEYS))
    common.save_runs_summary(runs, f"{args.out}/plots/runs.json")
    print(f"{len(runs)} of {len(cells)} cells finished")
    paths, correlations = plot(args, args.out)
    for name, c in correlations.items():
        print(f"{name}: Kendall tau(gap, Jacobian) = {c['tau_gap_jacobian']:.3f}, "
              f"tau(gap, sharpness) = {c['tau_gap_sharpness']:.3f}, "
              f"tau(gap, Gauss-Newton) = {c['tau_gap_gauss_newton']:.3f} over {c['n']} cells")
        for lr, w in c["per_lr"].items():
            print(f"  initial lr {lr}: tau(gap, Jacobian) = {w['tau_gap_jacobian']:.3f}, "
                  f"tau(gap, sharpness) = {w['tau_gap_sharpness']:.3f} over {w['n']} cells")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(main, parse_args)
