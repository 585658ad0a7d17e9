"""Section 4 (Theory): Theorems 4.4-4.6 and Ansatz 3.1 measured on synthetic data.

Data are the distributions of Theorem 4.4: the uniform distribution on the unit cube [0,1]^d
("cube") and its pushforward by a Lipschitz immersion g: R^d -> R^D ("immersion": a fixed random
network d -> H -> D with smooth leaky-ReLU activations and full-column-rank weights). Targets
come from a fixed random teacher network: "regression" (mean squared error on its standardised
output) and "classification" (argmax of its K logits, cross entropy). Small tanh students are
trained by full-batch Adam on N training points; test data are fresh draws.

- Theorem 4.5 (Figure thm45): for each base student, sup_x ||Jf(x)||_2 over the support is
  estimated by the max over a pool of --pool-size fresh points refined by projected gradient
  ascent on the latent z in [0,1]^d; then sup - max_N over --draws random N-subsets of the pool,
  for N on a log grid, against N (log-log), and P[max_N <= sup - eps] (left side of Eq. (8))
  against its right side (1 - h(eps / Lip(Jf)))^N with h from the proof of Theorem 4.4, with h
  from the measured mass of balls around the maximiser, and exactly (1 - p_eps)^N from the pool.
- Theorem 4.6 (Figure thm46): a family of students varying label smoothing, weight decay, width
  and training length (one factor at a time around the base run); generalisation gap
  |train loss - test loss| against the sample-max Jacobian norm, against sharpness and against
  the sample-max logit Jacobian the bound uses, Kendall tau of each; the probability bound of
  Eq. (10) with Lip(Jf), h and C' estimated, and by how much it is vacuous.
- Ansatz 3.1 (Figure ansatz): Kendall tau between sharpness and Jacobian norm over the
  --checkpoints measurements of each run.

Full run (the defaults):
    OMP_NUM_THREADS=1 python theory.py
Cost: CPU only (--device is ignored: the models are tiny). 2 tasks x 2 distributions x 4 trials
x 15 family members = 240 students, 16 of them (the base runs) with the Theorem 4.5 analysis on
10^6 points. Measured here on one core (OMP_NUM_THREADS=1) of 2 cores shared with other jobs
(load average 4-7): 29.8 min wall, as 7.1 min of a first start with --trials 6, stopped, then
22.7 min of this command resuming it; one trial of everything took 3.6 min wall (3.1 CPU-min).
Resumable per student (a rerun skips saved students; an interrupted one restarts: seconds).
Smoke run (seconds): python theory.py --smoke
Redraw only: python theory.py --plot-only

Writes, under --out (default results/theory; results/theory_smoke with --smoke):
    kind=data_distribution=...-hash/{config,metrics,result}.json   concentration constant C,
        Lip(g) of the immersion, ball masses (one per distribution)
    task=..._distribution=..._variant=..._trial=...-hash/{config,metrics,result}.json  a student:
        metrics = checkpoints (step, train loss, sharpness, Jacobian); result = final numbers,
        Lip(Jf), the Eq. (10) bound, and (base students) the Theorem 4.5 curves
    plots/thm45.{png,pdf}, plots/thm46.{png,pdf}, plots/ansatz.{png,pdf}
    plots/theory_summary.json, plots/theory_table.md   every number quoted in the README

Choices (ours; the paper has no experiment for Section 4):
- Jacobians. "jacobian" (the quantity correlated with the gap and with sharpness) is the
  paper's: common.jacobian_norm of softmax(f) for classification, of the raw output for
  regression (no softmax there). The theorems are applied to the network output before the
  softmax (logits / raw output) for both tasks, because the cost c must be Lipschitz in what f
  outputs: cross entropy on logits has Lip <= sqrt(2), squared error has Lip 2 max|f - y| over
  the data (measured). Cross entropy of softmax probabilities is not Lipschitz near p = 0.
- Students are tanh MLPs: Theorem 4.5 needs a C^2 model with Lipschitz derivatives (a ReLU
  net's Jacobian is piecewise constant and its Lipschitz constant infinite).
- Label smoothing for regression shrinks targets towards their training mean,
  y_s = (1 - s) y + s mean(y): like label smoothing, it brings targets closer together.
- Weight decay is decoupled (AdamW). The loss, gap and sharpness use the training cost c
  (smoothed targets, no weight-decay term), on the training set and on the test set alike.
- Lip(Jf) is a sample maximum of ||Jf(x) - Jf(x')||_2 / ||x - x'|| over nearby pairs, so it
  is a lower estimate; h is evaluated with it. C is fitted on the input distribution X from the
  tails of |u(x) - E u| for random 1-Lipschitz u (linear and distance functions) and
  C' = C / Lip(c)^2 (the paper writes C / Lip(c); the exponent needs the square).
- Theorem 4.6 holds for a fixed f and a fresh sample; here it is evaluated at the training
  sample of the trained f, as the paper's use of it implies (train/test are both reported).
"""
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap

import common

TASKS = ("regression", "classification")
DISTRIBUTIONS = ("cube", "immersion")
RUN_KEYS = ("task", "distribution", "variant", "trial")
DATA_KEYS = ("kind", "distribution")
VARIANT_COLORS = {"base": "k", "smoothing": "C0", "weight_decay": "C1", "width": "C2", "steps": "C3"}


FIGURE_FLAGS = """\
Figures (not the paper's: it has no experiment for Section 4; files under <--out>/plots):
  Theorem 4.5   the defaults (--thm45 base or all)    thm45.png
  Theorem 4.6   the defaults                          thm46.png (alone, from a saved summary:
                                                      --plot-summary theory_summary.json)
  Ansatz 3.1    the defaults                          ansatz.png"""


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    parser = common.make_parser(__doc__, trials=4, out="results/theory", gradient_check=False,
                                figures=FIGURE_FLAGS)
    a = parser.add_argument
    a("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="target types")
    a("--distributions", nargs="+", default=list(DISTRIBUTIONS), choices=DISTRIBUTIONS,
      help="input distributions of Theorem 4.4")
    a("--latent-dim", type=int, default=2, help="d: dimension of the cube")
    a("--ambient-dim", type=int, default=16, help="D >= d: output dimension of the immersion")
    a("--immersion-width", type=int, default=16, help="hidden width H of the immersion, d <= H <= D")
    a("--immersion-slope", type=common.finite_float, default=0.2,
      help="negative-side slope of the smooth leaky ReLU, in (0, 1]")
    a("--teacher-width", type=int, default=32, help="hidden width of the teacher network")
    a("--num-classes", type=int, default=4, help="classes of the classification task")
    a("--target-noise", type=common.finite_float, default=0.3,
      help="regression: std of Gaussian noise added to the standardised targets")
    a("--label-noise", type=common.finite_float, default=0.1,
      help="classification: probability that a label is replaced by a uniformly random one")
    a("--data-seed", type=int, default=0, help="seed of the immersion, teacher and test set")
    a("--train-size", type=int, default=200, help="N: training points per student")
    a("--test-size", type=int, default=20000, help="fresh test points")
    a("--width", type=int, default=64, help="student hidden width (base run)")
    a("--depth", type=int, default=3, help="student linear layers")
    a("--lr", type=common.finite_float, default=3e-3, help="Adam learning rate")
    a("--steps", type=int, default=2000, help="full-batch Adam steps (base run)")
    a("--smoothings", nargs="+", type=common.finite_float, default=[0.05, 0.1, 0.2, 0.4],
      help="family: label smoothing values in [0, 1] (regression: shrinkage to the mean)")
    a("--weight-decays", nargs="+", type=common.finite_float, default=[0.1, 0.3, 1.0],
      help="family: AdamW (decoupled) weight decays")
    a("--widths", nargs="+", type=int, default=[16, 32, 128, 256], help="family: student widths")
    a("--step-variants", nargs="+", type=int, default=[125, 500, 8000], help="family: training lengths")
    a("--checkpoints", type=int, default=8, help="measurements (log-spaced) during each run")
    a("--thm45", default="base", choices=["base", "all", "none"],
      help="which students get the Theorem 4.5 pool analysis")
    a("--pool-size", type=int, default=1000000, help="fresh points for the sup and the draws")
    a("--max-sample-size", type=int, default=100000, help="largest N of the sample-max grid")
    a("--draws", type=int, default=200, help="random N-subsets per N")
    a("--eps-fractions", nargs="+", type=common.finite_float, default=[0.01, 0.03, 0.1],
      help="Eq. (8) eps as fractions of the estimated sup, in (0, 1)")
    a("--ascent-starts", type=int, default=32, help="projected-ascent starts (half the pool's top)")
    a("--ascent-steps", type=int, default=100, help="projected-ascent steps")
    a("--ascent-lr", type=common.finite_float, default=0.02, help="ascent step length in latent units")
    a("--lip-pairs", type=int, default=50000, help="point pairs for Lip(Jf) and Lip(g)")
    a("--test-functions", type=int, default=64, help="random 1-Lipschitz functions for C")
    a("--eig-tol", type=common.finite_float, default=1e-4, help="relative tolerance of sharpness")
    a("--plot-summary", metavar="SUMMARY_JSON", default=None,
      help="only redraw thm46, from a saved theory_summary.json (e.g. plots/theory/)")
    smoke = dict(out="results/theory_smoke", trials=1, tasks=["classification"],
                 distributions=["immersion"], train_size=64, test_size=2000, width=16,
                 steps=60, smoothings=[0.2], weight_decays=[0.1], widths=[8], step_variants=[20],
                 checkpoints=4, pool_size=4000, max_sample_size=400, draws=20, ascent_starts=4,
                 ascent_steps=10, lip_pairs=1000, test_functions=8, eig_tol=1e-3)
    args = common.parse_with_smoke(parser, argv, smoke)
    check_args(args)
    return args


def check_args(args):
    """One-line errors (exit 2) for bad values, before anything is written."""
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        common.check(all(not isinstance(v, float) or math.isfinite(v) for v in values),
                     f"--{name.replace('_', '-')} must be finite, got {value}")
    common.check_positive(args, "latent_dim", "ambient_dim", "immersion_width", "teacher_width",
                          "train_size", "test_size", "width", "depth", "lr", "steps", "widths",
                          "step_variants", "pool_size", "max_sample_size", "draws",
                          "eps_fractions", "ascent_starts", "ascent_steps", "ascent_lr",
                          "lip_pairs", "test_functions", "eig_tol")
    common.check_unit_interval(args, "smoothings", "immersion_slope", "eps_fractions", "label_noise")
    common.check(args.target_noise >= 0, f"--target-noise must be non-negative, got {args.target_noise}")
    common.check(args.immersion_slope > 0, "--immersion-slope must be positive")
    common.check(max(args.eps_fractions) < 1, "--eps-fractions must be below 1")
    common.check(all(w >= 0 for w in args.weight_decays), "--weight-decays must be non-negative")
    common.check(args.latent_dim <= args.immersion_width <= args.ambient_dim,
                 "need --latent-dim <= --immersion-width <= --ambient-dim (an immersion)")
    common.check(args.num_classes >= 2, f"--num-classes must be at least 2, got {args.num_classes}")
    common.check(args.checkpoints >= 2, f"--checkpoints must be at least 2, got {args.checkpoints}")
    common.check(args.data_seed >= 0, f"--data-seed must be non-negative, got {args.data_seed}")
    common.check(args.max_sample_size <= args.pool_size,
                 "--max-sample-size must not exceed --pool-size")
    common.check(args.max_sample_size >= 10, "--max-sample-size must be at least 10")
    common.check_common(args)


def data_config(args, distribution):
    """Everything that defines a distribution (and its teacher): part of every run's config."""
    cfg = dict(distribution=distribution, latent_dim=args.latent_dim, data_seed=args.data_seed,
               target_noise=args.target_noise, label_noise=args.label_noise,
               teacher_width=args.teacher_width, num_classes=args.num_classes)
    if distribution == "immersion":
        cfg.update(ambient_dim=args.ambient_dim, immersion_width=args.immersion_width,
                   immersion_slope=args.immersion_slope)
    return cfg


def family(args):
    """(variant, overrides) of the Theorem 4.6 family: base, then one factor at a time."""
    out = [("base", {})]
    out += [("smoothing", {"smoothing": s}) for s in args.smoothings if s != 0]
    out += [("weight_decay", {"weight_decay": w}) for w in args.weight_decays if w != 0]
    out += [("width", {"width": w}) for w in args.widths if w != args.width]
    out += [("steps", {"steps": s}) for s in args.step_variants if s != args.steps]
    return out


def run_configs(args):
    """One resolved config per (task, distribution, family member, trial)."""
    configs = []
    for task in args.tasks:
        for dist in args.distributions:
            for variant, over in family(args):
                for trial in range(args.trials):
                    cfg = dict(task=task, variant=variant, trial=trial, seed=args.seed + trial,
                               **data_config(args, dist), train_size=args.train_size,
                               test_size=args.test_size, width=args.width, depth=args.depth,
                               lr=args.lr, steps=args.steps, smoothing=0.0, weight_decay=0.0,
                               checkpoints=args.checkpoints, eig_tol=args.eig_tol,
                               lip_pairs=args.lip_pairs)
                    cfg.update(over)
                    cfg["value"] = cfg.get(variant) if variant != "base" else None
                    if args.thm45 == "all" or (args.thm45 == "base" and variant == "base"):
                        cfg.update(pool_size=args.pool_size, max_sample_size=args.max_sample_size,
                                   draws=args.draws, eps_fractions=args.eps_fractions,
                                   ascent_starts=args.ascent_starts, ascent_steps=args.ascent_steps,
                                   ascent_lr=args.ascent_lr)
                    configs.append(cfg)
    return configs


def data_configs(args):
    return [dict(kind="data", **data_config(args, d), pool_size=args.pool_size,
                 lip_pairs=args.lip_pairs, test_functions=args.test_functions,
                 ascent_starts=args.ascent_starts, ascent_steps=args.ascent_steps,
                 ascent_lr=args.ascent_lr) for d in args.distributions]


# ----------------------------------------------------------------------------- data


def smooth_leaky_relu(u, slope, beta=4.0):
    """slope u + (1 - slope) softplus_beta(u): derivative in (slope, 1), so a smooth, 1-Lipschitz
    diffeomorphism of R (a smoothed leaky ReLU)."""
    return slope * u + (1 - slope) * F.softplus(u, beta=beta)


def orthonormal_columns(rows, cols, gen):
    """(rows, cols) matrix with orthonormal columns (rows >= cols): full column rank, norm 1."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class Immersion(torch.nn.Module):
    """g(z) = W2 sigma(W1 z + b1) + b2, d -> H -> D, W1 = 2 Q1, W2 = Q2 with orthonormal columns:
    Jg(z) = W2 diag(sigma') W1 is injective everywhere (a product of injective maps, sigma' > 0),
    Lip(g) <= 2. b1 centres the bends of sigma on the cube."""

    def __init__(self, d, hidden, ambient, slope, gen):
        super().__init__()
        self.slope = slope
        self.w1 = 2.0 * orthonormal_columns(hidden, d, gen)  # (H, d)
        self.w2 = orthonormal_columns(ambient, hidden, gen)  # (D, H)
        for w in (self.w1, self.w2):
            if torch.linalg.matrix_rank(w.double()) != w.shape[1]:
                raise RuntimeError("immersion weight is not of full column rank")
        self.b1 = -self.w1 @ torch.full((d,), 0.5) + 0.5 * torch.randn(hidden, generator=gen)
        self.b2 = torch.zeros(ambient)

    def forward(self, z):  # (N, d) -> (N, D)
        w1, w2, b1, b2 = (t.to(z.dtype) for t in (self.w1, self.w2, self.b1, self.b2))
        return smooth_leaky_relu(z @ w1.T + b1, self.slope) @ w2.T + b2


class Distribution:
    """The data distribution: z ~ U[0,1]^d, x = embed(z) (identity for the cube)."""

    def __init__(self, cfg):
        gen = torch.Generator().manual_seed(cfg["data_seed"])
        self.name, self.latent_dim = cfg["distribution"], cfg["latent_dim"]
        if self.name == "immersion":
            self.embed = Immersion(cfg["latent_dim"], cfg["immersion_width"], cfg["ambient_dim"],
                                   cfg["immersion_slope"], gen)
            self.input_dim = cfg["ambient_dim"]
        else:
            self.embed = torch.nn.Identity()
            self.input_dim = cfg["latent_dim"]
        self.teacher = make_teacher(self.input_dim, cfg, gen)

    def latents(self, n, seed):
        return torch.rand(n, self.latent_dim, generator=torch.Generator().manual_seed(seed))

    def inputs(self, n, seed):  # (n, D)
        return self.embed(self.latents(n, seed))


def make_teacher(input_dim, cfg, gen):
    """Fixed random tanh network input -> (1 + K) outputs: output 0 the regression target,
    outputs 1..K the class logits; standardised on 20000 reference points so that the
    regression target has mean 0, std 1 and the classes are roughly balanced."""
    teacher = common.MLP(input_dim, 1 + cfg["num_classes"], width=cfg["teacher_width"], depth=3,
                         activation="tanh")
    with torch.no_grad():
        for i, linear in enumerate(teacher.linears()):
            # gain 3 on the first layer: a few oscillations across the cube, tanh not saturated
            gain = 3.0 if i == 0 else 1.5
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * gain / linear.in_features ** 0.5)
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=gen))
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def teacher_targets(dist, x, reference):
    """(regression (N, 1) standardised, class labels (N,)) of the teacher at x."""
    ref = dist.teacher(reference)
    mean, std = ref.mean(0), ref.std(0)
    out = (dist.teacher(x) - mean) / std
    return out[:, :1], out[:, 1:].argmax(1)


def noisy(cfg, regression, labels, seed):
    """Targets with noise: Gaussian (regression) or uniformly resampled labels (classification),
    so that a long-trained student overfits and the generalisation gap varies."""
    gen = torch.Generator().manual_seed(seed)
    regression = regression + cfg["target_noise"] * torch.randn(regression.shape, generator=gen)
    flip = torch.rand(labels.shape, generator=gen) < cfg["label_noise"]
    labels = torch.where(flip, torch.randint(cfg["num_classes"], labels.shape, generator=gen), labels)
    return regression, labels


def make_data(cfg, dist):
    """Training set (trial's seed), test set (data seed) and noisy targets, smoothed as the run
    says: x_train (N, D), y_train (N, 1) or (N,), x_test, y_test likewise."""
    reference = dist.inputs(20000, cfg["data_seed"] + 7)
    x_train = dist.inputs(cfg["train_size"], 1000 + cfg["seed"])  # (N, D)
    x_test = dist.inputs(cfg["test_size"], cfg["data_seed"] + 13)
    r_tr, c_tr = noisy(cfg, *teacher_targets(dist, x_train, reference), 2000 + cfg["seed"])
    r_te, c_te = noisy(cfg, *teacher_targets(dist, x_test, reference), cfg["data_seed"] + 17)
    if cfg["task"] == "classification":
        return x_train, c_tr, x_test, c_te
    s, mean = cfg["smoothing"], r_tr.mean()
    return x_train, (1 - s) * r_tr + s * mean, x_test, (1 - s) * r_te + s * mean


def training_cost(cfg):
    """The cost c as a batch-mean loss_fn(outputs, targets)."""
    if cfg["task"] == "classification":
        return common.cross_entropy(cfg["smoothing"])
    return F.mse_loss


# ----------------------------------------------------------------------------- model


def make_model(cfg, dist):
    torch.manual_seed(cfg["seed"])
    out = cfg["num_classes"] if cfg["task"] == "classification" else 1
    return common.MLP(dist.input_dim, out, width=cfg["width"], depth=cfg["depth"], activation="tanh")


# ----------------------------------------------------------------------------- training


def checkpoint_steps(steps, k):
    """k measurement steps, 0 and `steps` included, log-spaced in between."""
    inner = np.unique(np.round(np.geomspace(1, steps, k - 1)).astype(int))
    return sorted({0, *inner.tolist(), steps})


def train(cfg, args, dists, data_runs):
    """Trains (or skips, if saved) one student, measuring at checkpoints, then runs the final
    measurements; returns the loaded run. Students take seconds, so a rerun redoes an
    unfinished one from scratch."""
    run = common.Run(args.out, cfg, RUN_KEYS)
    if run.done:
        return run.load()
    dist = dists[cfg["distribution"]]
    x, y, x_test, y_test = make_data(cfg, dist)
    model, loss_fn = make_model(cfg, dist), training_cost(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    run.begin("cpu")
    marks = set(checkpoint_steps(cfg["steps"], cfg["checkpoints"]))
    for step in range(cfg["steps"] + 1):
        if step in marks:
            run.log(step, **measure_training(model, loss_fn, cfg, x, y))
        if step == cfg["steps"]:
            break
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if not math.isfinite(loss.item()):
            run.finish("diverged", step=step)
            return run.load()
        loss.backward()
        opt.step()
    data = data_runs[cfg["distribution"]]["result"]
    run.finish("finished", **final_measurements(model, loss_fn, cfg, dist, data, x, y, x_test, y_test))
    return run.load()


# ----------------------------------------------------------------------------- measurements


def measure_training(model, loss_fn, cfg, x, y):
    """Train loss, sharpness and the paper's Jacobian norm (softmax for classification)."""
    with torch.no_grad():
        loss = loss_fn(model(x), y).item()
    return {"loss": loss, "sharpness": common.sharpness(model, loss_fn, [(x, y)], tol=cfg["eig_tol"]),
            "jacobian": common.jacobian_norm(model, x, softmax=cfg["task"] == "classification")}


def jacobians(fn, x):
    """(N, C, D) Jacobians of a batch map fn: (n, D) -> (n, C) at each row of x (N, D);
    differentiable with respect to x."""
    return vmap(jacrev(lambda xi: fn(xi.unsqueeze(0)).squeeze(0)))(x)


def spectral_norms(fn, x, chunk=8192):
    """(N,) ||J fn(x_i)||_2, in chunks (memory: chunk * C * D numbers)."""
    return torch.cat([torch.linalg.matrix_norm(jacobians(fn, x[i:i + chunk]), ord=2)
                      for i in range(0, len(x), chunk)])


def projected_ascent(value_fn, z0, steps, lr):
    """Projected gradient ascent of value_fn (n, d) -> (n,) over [0,1]^d from each row of z0:
    normalised gradient steps of linearly decaying length, clamped to the cube. Returns
    (best value per start (n,), its z (n, d)); the best never falls below the start's value."""
    z = z0.detach().clone()
    best_val, best_z = torch.full((len(z),), -math.inf), z.clone()
    for k in range(steps + 1):
        z.requires_grad_(True)
        val = value_fn(z)
        better = val.detach() > best_val
        best_val = torch.where(better, val.detach(), best_val)
        best_z[better] = z.detach()[better]
        if k == steps:
            break
        (grad,) = torch.autograd.grad(val.sum(), z)
        step = lr * (1 - k / steps) * grad / (grad.norm(dim=1, keepdim=True) + 1e-12)
        z = (z.detach() + step).clamp(0.0, 1.0)  # the projection onto [0,1]^d
    return best_val, best_z


def estimate_sup(value_fn, z_pool, values, starts, steps, lr, seed=0):
    """sup of value_fn over the cube: max of the pool values (N,) refined by projected ascent
    from the pool's top starts // 2 points and random others. Returns (sup, argmax z, pool max)."""
    top = z_pool[values.topk(max(1, starts // 2)).indices]
    rand = torch.rand(starts - len(top), z_pool.shape[1], generator=torch.Generator().manual_seed(seed))
    best, best_z = projected_ascent(value_fn, torch.cat([top, rand]), steps, lr)
    i = int(best.argmax())
    pool_max = float(values.max())
    if best[i] < pool_max:  # cannot happen for a top start, but be safe
        return pool_max, z_pool[values.argmax()], pool_max
    return float(best[i]), best_z[i], pool_max


@torch.no_grad()  # torch.func.jacrev still differentiates inside; nothing else needs a graph
def jacobian_lipschitz(fn, embed, latent_dim, pairs, seed):
    """Lower estimate of Lip(Jf) on the support: max over random pairs of
    ||Jf(x) - Jf(x')||_2 / ||x - x'||, x' = embed(z + r u) at latent distances r = 0.3 .. 0.003
    (nearby pairs find the local slopes), in float64 so small differences are exact enough."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.rand(pairs, latent_dim, generator=gen, dtype=torch.float64)
    u = torch.randn(pairs, latent_dim, generator=gen, dtype=torch.float64)
    r = torch.tensor([0.3, 0.1, 0.03, 0.01, 0.003], dtype=torch.float64)[torch.arange(pairs) % 5]
    z2 = (z + r[:, None] * u / u.norm(dim=1, keepdim=True)).clamp(0, 1)
    x, x2 = embed(z), embed(z2)
    dx = (x - x2).norm(dim=1)
    keep = dx > 1e-9
    num = torch.cat([torch.linalg.matrix_norm(jacobians(fn, x[i:i + 4096]) - jacobians(fn, x2[i:i + 4096]), ord=2)
                     for i in range(0, pairs, 4096)])
    return float((num[keep] / dx[keep]).max())


def h_theory(t, latent_dim, lip_embed):
    """h of Theorem 4.4's proof: 2^-d V_d min(t / Lip(g), 1)^d (the mass of a ball at a corner)."""
    d = latent_dim
    volume = math.pi ** (d / 2) / math.gamma(d / 2 + 1)
    return 2.0 ** -d * volume * np.minimum(np.asarray(t, dtype=np.float64) / lip_embed, 1.0) ** d


def h_ball(t, radii, masses):
    """h from the measured probability mass of the ball of radius t around the maximiser."""
    return np.interp(t, radii, masses, left=0.0, right=masses[-1])


def sample_size_grid(max_n):
    return sorted({int(round(v)) for v in np.geomspace(10, max_n, 13)})


def thm45(model_fn, cfg, dist, lip_jf, lip_embed):
    """Theorem 4.5 on one model: sup estimate, sample-max draws and both sides of Eq. (8)."""
    z_pool = dist.latents(cfg["pool_size"], cfg["data_seed"] + 101 + cfg["seed"])  # (P, d)
    x_pool = dist.embed(z_pool)  # (P, D)
    with torch.no_grad():
        norms = spectral_norms(model_fn, x_pool)  # (P,)
    sup, z_star, pool_max = estimate_sup(lambda z: spectral_norms(model_fn, dist.embed(z)), z_pool,
                                         norms, cfg["ascent_starts"], cfg["ascent_steps"], cfg["ascent_lr"])
    grid = sample_size_grid(cfg["max_sample_size"])
    maxima = sample_maxima(norms, grid, cfg["draws"], seed=cfg["seed"])  # (draws, len(grid))
    gaps = sup - maxima
    with torch.no_grad():
        x_star = dist.embed(z_star[None].float())  # (1, D)
        dist_to_star = (x_pool - x_star).norm(dim=1).sort().values.numpy()
    radii = np.geomspace(max(dist_to_star[0], 1e-6), dist_to_star[-1], 200)
    masses = np.searchsorted(dist_to_star, radii, side="right") / len(dist_to_star)
    n = np.array(grid, dtype=np.float64)
    eq8 = []
    for frac in cfg["eps_fractions"]:
        eps = frac * sup
        t = eps / lip_jf
        p_direct = float((norms.numpy() > sup - eps).mean())
        eq8.append(dict(eps_fraction=frac, eps=eps, t=t,
                        lhs=(maxima <= sup - eps).mean(0),
                        rhs_theory=(1 - h_theory(t, dist.latent_dim, lip_embed)) ** n,
                        rhs_ball=(1 - h_ball(t, radii, masses)) ** n,
                        rhs_direct=(1 - p_direct) ** n))
    monotone = bool(np.all(np.diff(maxima, axis=1) >= 0))
    return dict(sup=sup, pool_max=pool_max, ascent_gain=sup - pool_max, sample_sizes=grid,
                gap_q10=np.quantile(gaps, 0.1, 0), gap_median=np.median(gaps, 0),
                gap_q90=np.quantile(gaps, 0.9, 0), gap_mean=gaps.mean(0), eq8=eq8,
                maxima_monotone=monotone, maxima_below_sup=bool(maxima.max() <= sup),
                ball_radii=radii, ball_masses=masses)


def sample_maxima(norms, grid, draws, seed):
    """(draws, len(grid)) max of the first N of a random permutation of the pool, per N: each
    row is one nested sequence of samples, so it is non-decreasing in N."""
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((draws, len(grid)))
    idx = torch.tensor(grid) - 1
    for r in range(draws):
        perm = torch.randperm(len(norms), generator=gen)[:grid[-1]]
        out[r] = norms[perm].cummax(0).values[idx].numpy()
    return out


def final_measurements(model, loss_fn, cfg, dist, data, x, y, x_test, y_test):
    """Losses, gap, sharpness, Jacobians, Lip(Jf), the Eq. (10) bound and (if configured) the
    Theorem 4.5 analysis of the finished student."""
    model.eval()
    with torch.no_grad():
        train_loss, test_loss = loss_fn(model(x), y).item(), loss_fn(model(x_test), y_test).item()
        out_test = model(x_test)
    res = dict(train_loss=train_loss, test_loss=test_loss, gap=abs(train_loss - test_loss),
               **{k: v for k, v in measure_training(model, loss_fn, cfg, x, y).items() if k != "loss"})
    if cfg["task"] == "classification":
        res["test_accuracy"] = (out_test.argmax(1) == y_test).float().mean().item()
    model64 = copy.deepcopy(model).double()
    res["lip_jf"] = jacobian_lipschitz(model64, dist.embed, dist.latent_dim, cfg["lip_pairs"], cfg["seed"])
    with torch.no_grad():
        res["max_jf_train"] = float(spectral_norms(model, x).max())  # logits / raw output
    # Lip(c) in f's output: cross entropy on logits (gradient softmax - q); squared error on the
    # range met on the test set.
    res["lip_cost"] = (math.sqrt(2.0) if cfg["task"] == "classification"
                       else float(2 * (out_test - y_test).abs().max()))
    res["bound"] = eq10(res, cfg, dist, data)
    if "pool_size" in cfg:
        res["thm45"] = thm45(model, cfg, dist, res["lip_jf"], data["lip_embed"])
    return res


def eq10_failure(eps, delta, n, m, lip_jf, c_prime, h):
    """The two failure terms of Eq. (10): (1 - h(delta / Lip Jf))^N + 2 exp(-N C' eps^2 / (M + delta)^2)."""
    return (1 - h(delta / lip_jf)) ** n + 2 * np.exp(-n * c_prime * eps ** 2 / (m + delta) ** 2)


def eq10(res, cfg, dist, data):
    """Eq. (10) at eps = the measured gap, the best delta on a grid: its failure probability
    (vacuous when >= 1), the smallest eps with failure < 1 and < 0.05, and the N that would make
    it non-vacuous at the measured gap."""
    n, m, lip_jf = cfg["train_size"], res["max_jf_train"], res["lip_jf"]
    c_prime = data["concentration_C"] / res["lip_cost"] ** 2

    def h(t):
        return h_theory(t, dist.latent_dim, data["lip_embed"])

    deltas = m * np.geomspace(1e-4, 1e3, 400)
    fail = eq10_failure(res["gap"], deltas, n, m, lip_jf, c_prime, h)
    i = int(np.argmin(fail))

    def eps_needed(level):  # solve 2 exp(-N C' eps^2 / (M + delta)^2) = level - first term
        room = level - (1 - h(deltas / lip_jf)) ** n
        needed = (m + deltas) * np.sqrt(np.log(2 / np.maximum(room, 1e-300)) / (n * c_prime))
        eps = np.where(room > 0, needed, np.inf)
        return float(eps.min())

    n_needed = next((int(k) for k in np.unique(np.geomspace(n, 1e12, 400).astype(np.int64))
                     if eq10_failure(res["gap"], deltas, k, m, lip_jf, c_prime, h).min() < 1), None)
    return dict(eps=res["gap"], c_prime=c_prime, best_delta=float(deltas[i]),
                failure=float(fail[i]), vacuous=bool(fail[i] >= 1), probability=float(1 - fail[i]),
                eps_nonvacuous=eps_needed(1.0), eps_95=eps_needed(0.05), n_nonvacuous=n_needed)


def concentration_constant(x, functions, seed, min_tail=50):
    """C of Definition 4.3 fitted on a sample x (P, D): the largest C with the empirical tail
    P[|u(x) - E u| >= eps] <= 2 exp(-C eps^2) for every eps (tail counts >= min_tail) and every
    random 1-Lipschitz u: half linear u(x) = <v, x>, |v| = 1, half distances u(x) = |x - a|."""
    gen = torch.Generator().manual_seed(seed)
    worst = math.inf
    for k in range(functions):
        if k % 2 == 0:
            v = torch.randn(x.shape[1], generator=gen, dtype=x.dtype)
            u = x @ (v / v.norm())
        else:
            u = (x - x[torch.randint(len(x), (1,), generator=gen)]).norm(dim=1)
        dev = (u - u.mean()).abs().sort(descending=True).values.double().numpy()  # (P,)
        counts = np.arange(min_tail, len(dev) + 1)
        eps, tail = dev[counts - 1], counts / len(dev)
        ok = eps > 0
        worst = min(worst, float(np.min(-np.log(tail[ok] / 2) / eps[ok] ** 2)))
    return worst


def measure_data(cfg, args, dist):
    """The data run: C, Lip(g) (1 for the cube) and an injectivity check of the immersion."""
    run = common.Run(args.out, cfg, DATA_KEYS)
    if run.done:
        return run.load()
    run.begin("cpu")
    z = dist.latents(cfg["pool_size"], cfg["data_seed"] + 55)
    with torch.no_grad():
        x = dist.embed(z)
    res = dict(concentration_C=concentration_constant(x, cfg["test_functions"], cfg["data_seed"]),
               lip_embed=1.0, min_singular_embed=1.0, min_distance_ratio=1.0)
    if cfg["distribution"] == "immersion":
        jac = jacobians(dist.embed, z)  # (P, D, d)
        svals = torch.linalg.svdvals(jac)  # (P, d)
        lip, _, _ = estimate_sup(lambda zz: torch.linalg.matrix_norm(jacobians(dist.embed, zz), ord=2), z,
                                 svals[:, 0], cfg["ascent_starts"], cfg["ascent_steps"], cfg["ascent_lr"])
        z1, z2 = z[: cfg["lip_pairs"]], dist.latents(cfg["lip_pairs"], cfg["data_seed"] + 56)
        with torch.no_grad():
            ratio = (dist.embed(z1) - dist.embed(z2)).norm(dim=1) / (z1 - z2).norm(dim=1)
        res.update(lip_embed=lip, min_singular_embed=float(svals[:, -1].min()),
                   min_distance_ratio=float(ratio.min()))
    run.finish("finished", **res)
    return run.load()


# ----------------------------------------------------------------------------- saving


def finished(runs):
    return [r for r in runs if r["result"]["status"] == "finished"]


def group(runs, task, dist):
    return [r for r in finished(runs) if r["config"]["task"] == task and r["config"]["distribution"] == dist]


def ansatz_tau(run):
    """Kendall tau of sharpness against Jacobian norm over one run's checkpoints."""
    _, s = common.metric_series(run, "sharpness")
    _, j = common.metric_series(run, "jacobian")
    return common.kendall_tau(s, j)


def summarise(args, runs):
    """Every number quoted in the README, per (task, distribution)."""
    out = {"command": "python theory.py" + (" --smoke" if args.smoke else ""), "groups": []}
    for task in args.tasks:
        for dist in args.distributions:
            mine = group(runs, task, dist)
            if not mine:
                continue
            r = [m["result"] for m in mine]
            b = [x["bound"] for x in r]
            g = dict(task=task, distribution=dist, n=len(mine),
                     tau_gap_jacobian=common.kendall_tau([x["gap"] for x in r], [x["jacobian"] for x in r]),
                     tau_gap_sharpness=common.kendall_tau([x["gap"] for x in r], [x["sharpness"] for x in r]),
                     tau_gap_max_jf=common.kendall_tau([x["gap"] for x in r], [x["max_jf_train"] for x in r]),
                     bound_vacuous=sum(x["vacuous"] for x in b),
                     bound_failure_median=float(np.median([x["failure"] for x in b])),
                     eps_nonvacuous_over_gap_median=float(np.median(
                         [x["eps_nonvacuous"] / max(x["eps"], 1e-12) for x in b])),
                     runs=[])
            for m in mine:
                c, x = m["config"], m["result"]
                row = dict(variant=c["variant"], value=c["value"], trial=c["trial"],
                           ansatz_tau=ansatz_tau(m), **{k: x[k] for k in (
                               "train_loss", "test_loss", "gap", "jacobian", "sharpness", "max_jf_train",
                               "lip_jf", "lip_cost")}, bound=x["bound"])
                if "thm45" in x:
                    t = x["thm45"]
                    row["thm45"] = {k: t[k] for k in ("sup", "pool_max", "ascent_gain", "sample_sizes",
                                                        "gap_median", "maxima_monotone", "maxima_below_sup")}
                g["runs"].append(row)
            taus = [row["ansatz_tau"] for row in g["runs"]]
            g["ansatz_tau_median"] = float(np.nanmedian(taus)) if taus else math.nan
            g["ansatz_tau_positive"] = int(np.sum(np.array(taus) > 0))
            out["groups"].append(g)
    return out


def write_table(summary, data_runs, path):
    """Markdown: data constants, Kendall taus, the bound, Theorem 4.5 gaps, per-run details."""
    lines = ["# Section 4: measured numbers\n",
             f"Command: `{summary['command']}`\n",
             "\n## Data constants\n\n| distribution | C (concentration) | Lip(g) | min singular value of Jg "
             "| min distance ratio g(z), g(z') over z, z' |\n|---|---|---|---|---|\n"]
    for d in data_runs:
        x = d["result"]
        lines.append(f"| {d['config']['distribution']} | {x['concentration_C']:.3g} | {x['lip_embed']:.3g} | "
                     f"{x['min_singular_embed']:.3g} | {x['min_distance_ratio']:.3g} |\n")
    lines.append("\n## Theorem 4.6 and Ansatz 3.1 per group\n\n| task | distribution | n | tau(gap, Jacobian) "
                 "| tau(gap, sharpness) | tau(gap, max logit-Jf) | Eq.(10) vacuous | median failure prob. "
                 "| median eps_nonvacuous / gap | Ansatz tau median (positive / n) |\n" + "|---" * 10 + "|\n")
    for g in summary["groups"]:
        lines.append(f"| {g['task']} | {g['distribution']} | {g['n']} | {g['tau_gap_jacobian']:.3f} | "
                     f"{g['tau_gap_sharpness']:.3f} | {g['tau_gap_max_jf']:.3f} | {g['bound_vacuous']}/{g['n']} | "
                     f"{g['bound_failure_median']:.3g} | {g['eps_nonvacuous_over_gap_median']:.3g} | "
                     f"{g['ansatz_tau_median']:.2f} ({g['ansatz_tau_positive']}/{g['n']}) |\n")
    lines.append("\n## Theorem 4.5: median sup - max_N over draws (base runs)\n\n")
    for g in summary["groups"]:
        for row in (r for r in g["runs"] if "thm45" in r):
            t = row["thm45"]
            pairs = ", ".join(f"N={n}: {v:.3g}" for n, v in zip(t["sample_sizes"], t["gap_median"]))
            lines.append(f"- {g['task']}/{g['distribution']} trial {row['trial']}: sup {t['sup']:.4g} "
                         f"(pool max {t['pool_max']:.4g}, ascent +{t['ascent_gain']:.3g}); {pairs}\n")
    lines.append("\n## Per run\n\n| task | dist | variant | value | trial | train | test | gap | Jacobian | "
                 "sharpness | max Jf | Lip Jf | failure | eps_nonvac | N_nonvac | Ansatz tau |\n"
                 "|" + "---|" * 16 + "\n")
    for g in summary["groups"]:
        for r in g["runs"]:
            b = r["bound"]
            lines.append(f"| {g['task'][:5]} | {g['distribution']} | {r['variant']} | {r['value']} | "
                         f"{r['trial']} | {r['train_loss']:.3g} | {r['test_loss']:.3g} | {r['gap']:.3g} | "
                         f"{r['jacobian']:.3g} | {r['sharpness']:.3g} | {r['max_jf_train']:.3g} | "
                         f"{r['lip_jf']:.3g} | {b['failure']:.3g} | "
                         f"{b['eps_nonvacuous']:.3g} | {b['n_nonvacuous']} | {r['ansatz_tau']:.2f} |\n")
    common.atomic_write(path, lambda f: f.write("".join(lines)), mode="w")
    return path


# ----------------------------------------------------------------------------- plotting


def plot_thm45(runs, stem):
    """Per (task, distribution) row: sup - max_N against N (median, 10-90% band, one line per
    trial), and P[max_N <= sup - eps] with the right sides of Eq. (8)."""
    rows = [(c, d) for c in TASKS for d in DISTRIBUTIONS
            if any("thm45" in r["result"] for r in group(runs, c, d))]
    if not rows:
        return []
    fig, axes = common.new_figure(len(rows), 2, panel_size=(4.4, 3.0))
    for (task, dist), (ax1, ax2) in zip(rows, axes):
        mine = [r for r in group(runs, task, dist) if "thm45" in r["result"]]
        for k, run in enumerate(mine):
            t = run["result"]["thm45"]
            n = t["sample_sizes"]
            ax1.plot(n, t["gap_median"], color=f"C{k}", label=f"trial {run['config']['trial']}")
            ax1.fill_between(n, np.maximum(t["gap_q10"], 1e-12), np.maximum(t["gap_q90"], 1e-12),
                             color=f"C{k}", alpha=0.2)  # log axis: keep a zero gap drawable
        ax1.set(xscale="log", yscale="log", xlabel="sample size N",
                ylabel=common.wrapped("sup ||Jf|| - max_N ||Jf(x_i)||"),
                title=f"{task} / {dist}: Thm 4.5")
        t = mine[0]["result"]["thm45"]
        for k, e in enumerate(t["eq8"]):
            ax2.plot(t["sample_sizes"], e["lhs"], "o-", color=f"C{k}", markersize=3,
                     label=f"eps = {e['eps_fraction']:g} sup")
            ax2.plot(t["sample_sizes"], e["rhs_theory"], "--", color=f"C{k}")
            ax2.plot(t["sample_sizes"], e["rhs_ball"], ":", color=f"C{k}")
        ax2.plot([], [], "k--", label="RHS, h of Thm 4.4")
        ax2.plot([], [], "k:", label="RHS, h = ball mass")
        ax2.set(xscale="log", xlabel="sample size N", ylabel="P[max_N <= sup - eps]", ylim=(-0.03, 1.03),
                title=f"Eq. (8), trial {mine[0]['config']['trial']}")
        for ax in (ax1, ax2):
            common.log_tick_labels(ax)
            ax.grid(alpha=0.3)
    common.legend_below(fig, common.labelled_handles(axes[:, 0]),
                        common.labelled_handles(axes[:, 1]), fontsize="x-small")
    return common.save_figure(fig, stem, dpi=150)


def plot_thm46(summary, stem):
    """Per (task, distribution) row, from the summary alone: the gap against the paper's
    Jacobian norm (classification: also the logit Jacobian the bound uses, hollow), against
    sharpness, and the eps at which Eq. (10) stops being vacuous against the measured gap;
    coloured by the factor the run varies."""
    groups = summary["groups"]
    fig, axes = common.new_figure(len(groups), 3, panel_size=(4.3, 3.0))
    for g, (ax_j, ax_s, ax_b) in zip(groups, axes):
        softmax = g["task"] == "classification"
        for variant, color in VARIANT_COLORS.items():
            mine = [r for r in g["runs"] if r["variant"] == variant]
            if not mine:
                continue
            gap = [r["gap"] for r in mine]
            ax_j.scatter([r["jacobian"] for r in mine], gap, color=color, s=14,
                         label=f"run varies: {variant}")
            if softmax:
                ax_j.scatter([r["max_jf_train"] for r in mine], gap, facecolors="none", edgecolors=color, s=14)
            ax_s.scatter([r["sharpness"] for r in mine], gap, color=color, s=14)
            eps = [math.nan if r["bound"]["eps_nonvacuous"] is None else r["bound"]["eps_nonvacuous"] for r in mine]
            ax_b.scatter(gap, eps, color=color, s=14)  # None: not found or inf, stored as JSON null
        name, n = f"{g['task']}/{g['distribution']}", g["n"]
        jac_title = (f"tau {g['tau_gap_jacobian']:.2f} softmax, {g['tau_gap_max_jf']:.2f} logits"
                     if softmax else f"tau = {g['tau_gap_jacobian']:.2f}")
        ax_j.set(xlabel="max-sample Jacobian norm" + (" (softmax; hollow: logits)" if softmax else " (raw output)"),
                 title=f"{name}: {jac_title} (n={n})")
        ax_s.set(xlabel="sharpness", title=f"{name}: tau = {g['tau_gap_sharpness']:.2f} (n={n})")
        lo, hi = ax_b.get_xlim()
        ax_b.plot([lo, hi], [lo, hi], "k:", linewidth=0.8, label="eps = measured gap")
        ax_b.set(xlabel="|train - test| loss",
                 ylabel=common.wrapped("least eps with Eq. (10) non-vacuous"),
                 title=f"{name}: vacuous for {g['bound_vacuous']}/{n}")
        for ax in (ax_j, ax_s, ax_b):
            ax.set(xscale="log", yscale="log")
            common.log_tick_labels(ax)
            ax.title.set_fontsize("medium")
            ax.grid(alpha=0.3)
        for ax in (ax_j, ax_s):
            ax.set_ylabel("|train - test| loss")
    common.legend_below(fig, common.labelled_handles(axes.flat), fontsize="x-small")
    return common.save_figure(fig, stem, dpi=150)


def plot_ansatz(runs, summary, stem):
    """Per group: each run's trajectory in the (Jacobian, sharpness) plane, and the histogram
    of per-run Kendall taus."""
    groups = summary["groups"]
    fig, axes = common.new_figure(len(groups), 2, panel_size=(4.2, 3.0))
    for g, (ax1, ax2) in zip(groups, axes):
        for r in group(runs, g["task"], g["distribution"]):
            _, s = common.metric_series(r, "sharpness")
            _, j = common.metric_series(r, "jacobian")
            ax1.plot(j, s, "-", color=VARIANT_COLORS[r["config"]["variant"]], alpha=0.5, linewidth=0.8, marker=".")
        for variant, color in VARIANT_COLORS.items():  # the colour legend: the factor each run varies
            ax1.plot([], [], "-", color=color, marker=".", label=f"run varies: {variant}")
        ax1.set(xscale="log", yscale="log", xlabel="Jacobian norm", ylabel="sharpness",
                title=f"{g['task']}/{g['distribution']}: checkpoints")
        ax2.hist([row["ansatz_tau"] for row in g["runs"]], bins=np.linspace(-1, 1, 21), color="grey")
        ax2.set(xlabel="Kendall tau(sharpness, Jacobian) per run", ylabel="runs",
                title=f"median {g['ansatz_tau_median']:.2f}, {g['ansatz_tau_positive']}/{g['n']} positive")
        common.log_tick_labels(ax1)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
    common.legend_below(fig, common.labelled_handles(axes.flat), fontsize="x-small")
    return common.save_figure(fig, stem, dpi=150)


# ----------------------------------------------------------------------------- main


def main(args):
    if args.plot_summary:  # thm46 needs only the summary: redraw it from a saved one
        try:
            summary = common.load_json(args.plot_summary)
        except (OSError, ValueError):
            summary = None
        if not (isinstance(summary, dict) and "groups" in summary):
            common.fail(f"--plot-summary {args.plot_summary}: not a theory_summary.json")
        for path in plot_thm46(summary, f"{args.out}/plots/thm46"):
            print(f"wrote {path}")
        return
    configs, dconfigs = run_configs(args), data_configs(args)
    if not args.plot_only:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: extra threads only cost synchronisation
        try:
            dists = {c["distribution"]: Distribution(c) for c in dconfigs}
            data_runs = {c["distribution"]: measure_data(c, args, dists[c["distribution"]]) for c in dconfigs}
            for cfg in common.progress(configs, desc="students", disable=args.no_progress):
                train(cfg, args, dists, data_runs)
        finally:
            torch.set_num_threads(threads)
    data_runs = common.saved_runs_or_fail(args.out, dconfigs, DATA_KEYS)
    runs = common.saved_runs_or_fail(args.out, configs, RUN_KEYS)
    summary = summarise(args, runs)
    plots = f"{args.out}/plots"
    common.save_json(f"{plots}/theory_summary.json", summary)
    paths = [f"{plots}/theory_summary.json", write_table(summary, data_runs, f"{plots}/theory_table.md")]
    paths += plot_thm45(runs, f"{plots}/thm45") + plot_thm46(summary, f"{plots}/thm46")
    paths += plot_ansatz(runs, summary, f"{plots}/ansatz")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(main, parse_args)
