"""Appendix C.3, Figure 32 and Tables 1-2: flatness is not smoothness in coordinate networks.

Replicates Section 8 of Ramasinghe et al. (ICML 2023): four-layer MLPs with Gaussian or ReLU
activations regress 8 points (1-D input, 1-D output), once from a high-frequency and once from a
low-frequency initialisation, by gradient descent with momentum 0.9 and lr 1e-4 for 10 000
epochs (Gaussian) or 100 000 epochs (ReLU), 10 trials each. Reported per (activation,
initialisation), mean +- std over trials: the input-output Jacobian norm over the training
points, the sharpness (top Hessian eigenvalue of the training loss) and the first layer's weight
norm; plus the fitted functions (Figure 32). The paper's finding: the smooth ReLU fits are flatter
than the oscillating ones, while for Gaussian nets the smooth fits are sharper, and have a far
smaller first-layer weight norm.

Paper's run:
    python coordinate_network.py
Cost: not timed on a GPU; 35 minutes on 2 shared CPU cores, most of it the two 100 000-epoch
ReLU settings (plots/README.md). The 10 trials of a setting train together as one batched
network (torch.func.stack_module_state + vmap over the same MLP the estimators then measure).
Smoke run (seconds): python coordinate_network.py --smoke

Writes, under --out (default results/coordinate_network; ..._smoke with --smoke):
    <activation=..._init=...-hash>/{config,metrics,result}.json   one per setting, all trials
    plots/fig32_fits.{png,pdf}        the fitted functions over the data
    plots/tables.md, plots/tables.csv Tables 1 (Gaussian) and 2 (ReLU): mean +- std

Choices where the paper is silent (a careful reading, not the authors' code):
- Network: 1 -> 256 -> 256 -> 256 -> 1, four linear layers, the activation after the first three.
  Gaussian activation exp(-z^2 / (2 sigma^2)) with sigma = 0.1.
- Data: x_i = -1 + 2i/7 (i = 0..7) and y_i = sin(pi x_i). On these points sin(6 pi x) equals
  sin(pi x) exactly (6 pi - pi = 5 pi aliases on the spacing 2/7), so the sin(6 pi x)
  pretraining below already interpolates the data, at high frequency: the two initialisations
  are two interpolants of the same 8 points.
- Loss: mean squared error over the 8 points; one epoch = one full-batch step.
- High-frequency init: Gaussian net, PyTorch default (the paper's). ReLU net: PyTorch default,
  then pretrained with Adam (lr 1e-4, PyTorch defaults otherwise) on sin(6 pi x) at 128 evenly
  spaced points of [-1, 1] for 5000 full-batch steps (the paper gives neither points nor steps).
- Low-frequency init: ReLU net, PyTorch default (the paper's). Gaussian net ("a wide Gaussian
  distribution"): the first layer's weights and biases drawn from N(0, 0.1^2), the later layers
  PyTorch default. Every first-layer unit exp(-(w x + b)^2 / (2 sigma^2)) is then a Gaussian bump
  of width sigma / |w| ~ 1 in input space, as wide as the data, so the network starts smooth;
  under the default init (|w| up to 1) the bumps are ~10 times narrower.
- Jacobian norm: max over the 8 training points of |df/dx| (no softmax: regression). Sharpness:
  Lanczos on the training loss. First-layer weight norm: Frobenius norm of the (256, 1) weight
  (equal to its spectral norm, a single column).
- Per-layer Jacobian norms (C.3's claim: a small first layer forces larger Jacobians in the
  higher layers): for f = f_L o ... o f_1 (f_l: linear layer l, then its activation), the
  spectral norm of the Jacobian of f_L o ... o f_l with respect to layer l's input, max over the
  training points (`layer_jacobians`; layer 1 is the input-output Jacobian norm).
- Trial t uses seed --seed + t; a trial whose loss turns non-finite is recorded as diverged and
  left out of the table.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

import common

SETTINGS = [("gaussian", "high"), ("gaussian", "low"), ("relu", "high"), ("relu", "low")]
EPOCHS = {"gaussian": 10_000, "relu": 100_000}
QUANTITIES = {"jacobian": "Jacobian norm", "sharpness": "sharpness",
              "first_layer_norm": "First layer weight norm", "loss": "final training loss"}
RUN_KEYS = ("activation", "init")
FIGURE_FLAGS = """\
Figure and tables (files under <--out>/plots; the defaults give all, --plot-only redraws):
  Figure 32   the defaults (a panel per activation)    fig32_fits.png
  Table 1     --activations gaussian                   tables.md, tables.csv
  Table 2     --activations relu                       tables.md, tables.csv"""


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    parser = common.make_parser(__doc__, trials=10, out="results/coordinate_network",
                                figures=FIGURE_FLAGS)
    parser.add_argument("--activations", nargs="+", default=["gaussian", "relu"],
                        help="MLP activations (a table each)",
                        choices=["gaussian", "relu"])
    parser.add_argument("--hidden-width", type=int, default=256,
                        help="units per hidden layer")
    parser.add_argument("--sigma", type=common.finite_float, default=0.1,
                        help="Gaussian activation width")
    parser.add_argument("--lr", type=common.finite_float, default=1e-4)
    parser.add_argument("--momentum", type=common.finite_float, default=0.9)
    parser.add_argument("--gaussian-epochs", type=int, default=EPOCHS["gaussian"],
                        help="full-batch epochs of the Gaussian networks")
    parser.add_argument("--relu-epochs", type=int, default=EPOCHS["relu"],
                        help="full-batch epochs of the ReLU networks")
    parser.add_argument("--low-freq-std", type=common.finite_float, default=0.1,
                        help="std of the Gaussian net's low-frequency first layer")
    parser.add_argument("--pretrain-steps", type=int, default=5000,
                        help="Adam steps fitting sin(6 pi x) for the ReLU high-frequency init")
    parser.add_argument("--pretrain-lr", type=common.finite_float, default=1e-4,
                        help="Adam learning rate of the high-frequency ReLU pretraining")
    parser.add_argument("--pretrain-points", type=int, default=128,
                        help="points of sin(6 pi x) the high-frequency ReLU init is pretrained on")
    parser.add_argument("--log-every", type=int, default=100, help="epochs between loss records")
    common.add_plot_from_flag(parser)
    smoke = dict(out="results/coordinate_network_smoke", trials=2, hidden_width=16,
                 gaussian_epochs=100,
                 relu_epochs=150, pretrain_steps=100, log_every=50)
    args = common.parse_with_smoke(parser, argv, smoke)
    common.check_positive(args, "hidden_width", "sigma", "lr", "gaussian_epochs", "relu_epochs",
                          "low_freq_std", "pretrain_steps", "pretrain_lr", "pretrain_points",
                          "log_every")
    common.check(0 <= args.momentum < 1, f"--momentum must lie in [0, 1), got {args.momentum}")
    common.check_common(args)
    return args


def run_configs(args):
    """One resolved config per (activation, initialisation); each run holds all trials."""
    configs = []
    for activation, init in SETTINGS:
        if activation not in args.activations:
            continue
        config = dict(activation=activation, init=init, trials=args.trials, seed=args.seed,
                      width=args.hidden_width, depth=4, lr=args.lr, momentum=args.momentum,
                      epochs=args.gaussian_epochs if activation == "gaussian" else args.relu_epochs,
                      log_every=args.log_every)
        if activation == "gaussian":
            config["sigma"] = args.sigma
            if init == "low":
                config["low_freq_std"] = args.low_freq_std
        if activation == "relu" and init == "high":
            config.update(pretrain_steps=args.pretrain_steps, pretrain_lr=args.pretrain_lr,
                          pretrain_points=args.pretrain_points)
        configs.append(config)
    return configs


# ----------------------------------------------------------------------------- data


def training_points():
    """The 8 points: x (8, 1) evenly spaced on [-1, 1], y = sin(pi x) (8, 1)."""
    x = torch.linspace(-1, 1, 8).unsqueeze(1)
    return x, torch.sin(math.pi * x)


def pretraining_points(n):
    """sin(6 pi x) at n evenly spaced points of [-1, 1]: the ReLU high-frequency target."""
    x = torch.linspace(-1, 1, n).unsqueeze(1)
    return x, torch.sin(6 * math.pi * x)


# ----------------------------------------------------------------------------- model


def make_model(config, seed):
    """One trial's MLP at its initialisation (before any pretraining)."""
    torch.manual_seed(seed)
    model = common.MLP(1, 1, width=config["width"], depth=config["depth"],
                       activation=config["activation"], sigma=config.get("sigma", 0.1))
    if config["activation"] == "gaussian" and config["init"] == "low":
        common.INITS["normal"](model.linears()[0], config["low_freq_std"])
    return model


class Trials:
    """The trials of one setting as a single batched network: every parameter stacked along a
    leading trial dimension, evaluated by vmap over the same MLP the estimators measure."""

    def __init__(self, config, device):
        self.config = config
        models = [make_model(config, config["seed"] + t) for t in range(config["trials"])]
        params, _ = stack_module_state(models)  # name -> (T, *shape), requires grad
        self.params = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}
        self.base = models[0].to("meta")  # structure only

        def one(p, x):
            return functional_call(self.base, p, (x,))
        self._forward = vmap(one, in_dims=(0, None))

    def __call__(self, x):
        """(N, 1) inputs -> (T, N, 1) outputs of every trial."""
        return self._forward(self.params, x)

    def losses(self, x, y):
        """(T,) mean squared error of each trial."""
        return (self(x) - y).square().mean((1, 2))

    def model(self, t):
        """Trial t as a standalone MLP (a copy) for the estimators."""
        model = make_model(self.config, 0)
        model.load_state_dict({k: v[t].detach().cpu() for k, v in self.params.items()})
        return model.to(next(iter(self.params.values())).device)


# ----------------------------------------------------------------------------- training loop


def train(config, args, device):
    """Pretrains (ReLU high-frequency only) and trains all trials of one setting, resuming from
    a checkpoint if there is one; returns the loaded run."""
    run = common.Run(args.out, config, RUN_KEYS)
    if run.done:
        return run.load()
    trials = Trials(config, device)
    x, y = (t.to(device) for t in training_points())
    common.gradient_check_or_fail(args, trials.model(0), F.mse_loss, x, y)  # trial 0 as a plain MLP
    phases = [("train", config["epochs"])]
    if "pretrain_steps" in config:
        phases.insert(0, ("pretrain", config["pretrain_steps"]))
    state = run.begin(device)
    if state:
        with torch.no_grad():
            for k, v in trials.params.items():
                v.copy_(state["params"][k])
        phases = phases[[p for p, _ in phases].index(state["phase"]):]  # skip finished phases
    for phase, steps in phases:
        alive = run_phase(run, trials, phase, steps, config, x, y, state, args.no_progress)
        state = None
        if not alive:
            break  # every trial diverged
    summary = table_and_fit_values(trials, x, y)
    diverged = [t for t, loss in enumerate(summary["loss"]) if not math.isfinite(loss)]
    status = "diverged" if len(diverged) == config["trials"] else "finished"
    run.finish(status, diverged_trials=diverged, **summary)
    return run.load()


def run_phase(run, trials, phase, steps, config, x, y, state, no_progress):
    """Pretraining (Adam on sin(6 pi x)) or training (SGD with momentum on the 8 points) of all
    trials at once, from `state` if resuming this phase; returns whether any trial is finite."""
    if phase == "pretrain":
        x, y = (t.to(x.device) for t in pretraining_points(config["pretrain_points"]))
        optimizer = torch.optim.Adam(trials.params.values(), lr=config["pretrain_lr"])
    else:
        optimizer = torch.optim.SGD(trials.params.values(), lr=config["lr"], momentum=config["momentum"])
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    label = f"{config['activation']}/{config['init']} {phase}"
    for step in common.progress(range(start, steps), desc=label, initial=start, total=steps,
                                disable=no_progress):
        optimizer.zero_grad(set_to_none=True)
        losses = trials.losses(x, y)  # (T,)
        losses.sum().backward()  # the trials are independent: each gets its own gradient
        optimizer.step()
        if step % config["log_every"] == 0 or step == steps - 1:
            run.log(step, **{f"{phase}_loss": losses.detach().cpu()})
            if not torch.isfinite(losses).any():
                return False
            run.checkpoint(lambda: {"phase": phase, "step": step + 1, "optimizer": optimizer.state_dict(),
                                    "params": {k: v.detach().cpu() for k, v in trials.params.items()}})
    return True


# ----------------------------------------------------------------------------- measurements


def table_and_fit_values(trials, x, y, grid_points=401):
    """Per trial: final loss, Jacobian norm over the training points, sharpness, first-layer
    weight norm; and the fitted function on a grid of [-1, 1] for Figure 32."""
    grid = torch.linspace(-1, 1, grid_points, device=x.device).unsqueeze(1)
    out = {k: [] for k in ("loss", "jacobian", "sharpness", "sharpness_converged",
                           "sharpness_matvecs", "first_layer_norm", "layer_jacobians")}
    with torch.no_grad():
        out["loss"] = trials.losses(x, y).cpu().tolist()
        out["fit"] = trials(grid)[..., 0].cpu().tolist()  # (T, grid_points)
    out["grid"] = grid[:, 0].cpu().tolist()
    for t in range(trials.config["trials"]):
        model = trials.model(t)
        finite = math.isfinite(out["loss"][t])
        out["jacobian"].append(common.jacobian_norm(model, x, softmax=False) if finite else math.nan)
        row = (common.eigenvalue_with_convergence(common.sharpness, "sharpness", model,
                                                  F.mse_loss, [(x, y)]) if finite
               else {"sharpness": math.nan, "sharpness_converged": None, "sharpness_matvecs": None})
        for k in ("sharpness", "sharpness_converged", "sharpness_matvecs"):
            out[k].append(row[k])
        out["first_layer_norm"].append(model.linears()[0].weight.norm().item())
        out["layer_jacobians"].append(layer_jacobians(model, x) if finite
                                      else [math.nan] * len(model.linears()))
    return out


def layer_jacobians(model, x):
    """[max over x of ||d f(x) / d h_l||_2 for each linear layer l]: the Jacobian of the rest
    of the MLP (layer l onward) with respect to layer l's input h_l = (layers before l)(x)."""
    layers, norms = list(model), []
    for i, module in enumerate(layers):
        if isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                h = torch.nn.Sequential(*layers[:i])(x)  # (N, fan_in of layer l)
            norms.append(common.jacobian_norm(torch.nn.Sequential(*layers[i:]), h, softmax=False))
    return norms


def layer_quantities(runs):
    """{"layer_jacobian_<l>": label} for the layers of the runs that recorded layer_jacobians
    (none for runs saved before they were measured)."""
    depth = max((len(v) for r in runs for v in r["result"].get("layer_jacobians", [])), default=0)
    return {f"layer_jacobian_{l}": f"Jacobian norm from layer {l}'s input"
            for l in range(1, depth + 1)}


def quantity(result, q, t):
    """Trial t's value of table quantity q."""
    if q.startswith("layer_jacobian_"):
        return result["layer_jacobians"][t][int(q.rsplit("_", 1)[1]) - 1]
    return result[q][t]


def table_rows(runs):
    """(activation, init, quantity, mean, std, n) over the trials that did not diverge."""
    rows = []
    for run in runs:
        res, cfg = run["result"], run["config"]
        keep = [t for t in range(cfg["trials"]) if t not in res["diverged_trials"]]
        for q in [*QUANTITIES, *layer_quantities([run])]:
            values = np.array([quantity(res, q, t) for t in keep], dtype=np.float64)
            rows.append((cfg["activation"], cfg["init"], q, values.mean() if len(values) else math.nan,
                         values.std() if len(values) else math.nan, len(values)))
    return rows


# ----------------------------------------------------------------------------- saving


def write_tables(args, runs, stem):
    """Tables 1 (Gaussian) and 2 (ReLU) as markdown (mean +- std) and one CSV, atomically."""
    rows = table_rows(runs)
    csv = "activation,init,quantity,mean,std,n\n" + "".join(
        f"{a},{i},{q},{m:.6g},{s:.6g},{n}\n" for a, i, q, m, s, n in rows)
    common.atomic_write(f"{stem}.csv", lambda f: f.write(csv), mode="w")
    md = [f"# Appendix C.3 tables: mean ± std over trials (std with ddof 0)\n",
          f"Command: `python coordinate_network.py{' --smoke' if args.smoke else ''}`. "
          "Data: 8 points x_i = -1 + 2i/7, y_i = sin(pi x_i). Four linear layers of width "
          f"{runs[0]['config']['width']}; Gaussian activation sigma = {args.sigma:g}. "
          "High frequency: Gaussian net PyTorch default init; ReLU net default init pretrained "
          f"on sin(6 pi x) (Adam, {args.pretrain_steps} steps). Low frequency: Gaussian net first "
          f"layer N(0, {args.low_freq_std:g}^2), later layers default; ReLU net default init. "
          f"SGD lr {args.lr:g}, momentum {args.momentum:g}. Jacobian norm: max |df/dx| over the "
          "8 points; sharpness: top Hessian eigenvalue of the MSE loss; first-layer norm: "
          "Frobenius norm of the first weight matrix. Jacobian norm from layer l's input: max "
          "over the 8 points of the spectral norm of d f / d (layer l's input), layer 1 = "
          "the Jacobian norm.\n"]
    for number, activation in ((1, "gaussian"), (2, "relu")):
        mine = {(i, q): (m, s, n) for a, i, q, m, s, n in rows if a == activation}
        if not mine:
            continue
        epochs = next(r["config"]["epochs"] for r in runs if r["config"]["activation"] == activation)
        md.append(f"\n## Table {number}: {activation} network ({epochs} epochs)\n\n"
                  "| Norm | High freq. | Low freq. |\n|---|---|---|\n")
        for q, name in {**QUANTITIES, **layer_quantities(runs)}.items():
            cells = [f"{mine[i, q][0]:.4g} ± {mine[i, q][1]:.2g} (n={mine[i, q][2]})"
                     if (i, q) in mine else "not run" for i in ("high", "low")]
            md.append(f"| {name} | {cells[0]} | {cells[1]} |\n")
    loose = [f"{r['config']['activation']}/{r['config']['init']} trial {t}" for r in runs
             for t, c in enumerate(r["result"].get("sharpness_converged", [])) if c is False]
    if loose:
        md.append(f"\nSharpness not converged (Lanczos stopped at max_iter): {', '.join(loose)}\n")
    common.atomic_write(f"{stem}.md", lambda f: f.write("".join(md)), mode="w")
    return [f"{stem}.md", f"{stem}.csv"]


# ----------------------------------------------------------------------------- plotting


def plot_fits(runs, stem, subtitle=None):
    """Figure 32: one panel per activation, the data and every trial's fit (trial 0 bold),
    line style (solid: high-frequency init, dashed: low-frequency) per initialisation;
    `subtitle` names the data and scale."""
    x, y = training_points()
    activations = [a for a in ("gaussian", "relu") if any(r["config"]["activation"] == a for r in runs)]
    fig, axes = common.new_figure(1, len(activations), panel_size=(4.5, 3.2))
    for ax, activation in zip(axes[0], activations):
        for i, init in enumerate(("high", "low")):
            for run in (r for r in runs if r["config"]["activation"] == activation and r["config"]["init"] == init):
                res = run["result"]
                for t, fit in enumerate(res["fit"]):
                    ax.plot(res["grid"], fit, color=f"C{i}", linestyle=common.LINESTYLES[i],
                            linewidth=1.6 if t == 0 else 0.6, alpha=1.0 if t == 0 else 0.35,
                            label=f"{init}-frequency init (bold: trial 0; thin: the other "
                                  f"trials)" if t == 0 else None)
        ax.plot(x[:, 0], y[:, 0], "ko", markersize=5, label="the 8 training points", zorder=3)
        ax.set_title(f"{activation} network")
        ax.set_xlabel("x")
        ax.set_ylabel("network output f(x)")
        ax.set_ylim(-2.5, 2.5)
        ax.set_xticks(np.linspace(-1, 1, 5))  # the default 9 ticks' labels run together
        ax.grid(alpha=0.3)
    common.legend_below(fig, common.labelled_handles(fig.axes))
    if subtitle:
        fig.suptitle(subtitle)
    return common.save_figure(fig, stem, settings=[r["config"] for r in runs])


# ----------------------------------------------------------------------------- main


def main(args):
    common.unpack_plot_from(args)
    configs = run_configs(args)
    if not args.plot_only:
        device = common.resolve_device(args.device)
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(1)  # matrices of 8 x 256: extra threads only cost synchronisation
        try:
            for config in common.pending_runs(args.out, configs, RUN_KEYS):
                train(config, args, device)
        finally:
            torch.set_num_threads(threads)
    runs = common.saved_runs_or_fail(args.out, configs, RUN_KEYS)
    common.save_runs_summary(runs, f"{args.out}/plots/runs.json")
    scale = common.scale_label(args, args.hidden_width != 256)
    paths = plot_fits(runs, f"{args.out}/plots/fig32_fits",
                      subtitle=f"8 points of sin(pi x) (our choice: the paper does not give "
                               f"its points), {scale}")
    paths += write_tables(args, runs, f"{args.out}/plots/tables")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(main, parse_args)
