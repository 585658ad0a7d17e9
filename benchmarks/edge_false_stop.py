"""A false Lanczos stop on a real model, and the product floor of the `guarantee` that removes
it: ResNet18 (width 1/16, BN) at the edge of stability, fullbatch.py's lr-0.02 unsmoothed run of
trial 2 (Figure 11) after 40 iterations, its sharpness on the run's 125 measured images.

Its top two Hessian eigenvalues are about 597 and 497. From some random starts the residual stop
and its 3-product verification report convergence at the second (the committed Figure 11 run
from `sharpness`'s default start, seed 0, measured 497.0 there, converged, after 9 products).
Each seed is measured at the run's tol (1e-2) without the guarantee (`guarantee=None`) and with
the default (eps, delta) = (0.1, 1e-3); a false stop is a converged value more than tol below
the reference (tol 1e-6, from the largest value found).

    python benchmarks/edge_false_stop.py --data-root ../shared/data    # ~6 min on one thread

Writes benchmarks/edge_false_stop.json (dim, guaranteed products, the reference, each seed's
value, products and convergence under both settings, the false stops).
"""
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import fullbatch  # noqa: E402
from common.estimators import (GUARANTEE, ConvergenceWarning, _guaranteed_products,  # noqa: E402
                               sharpness)


def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "edge_false_stop.json"))
    args = parser.parse_args(argv)
    common.check_positive(args, "seeds", "iterations")
    return args


def trained_model(args):
    """fullbatch.py's ResNet18 lr-0.02 trial-2 run after `iterations` GD steps, and its
    measured images, with the committed run's flags."""
    fb = fullbatch.parse_args(["--data-root", args.data_root, "--train-size", "250",
                               "--ghost-batch-size", "125", "--measure-size", "125",
                               "--models", "resnet18", "--width", "0.0625", "--lrs", "0.02",
                               "--no-gradient-check"])
    data = fullbatch.load_inputs(fb, torch.device("cpu"))
    config = fullbatch.unsmoothed_config(fb, "resnet18", 0.02, 2)
    model = fullbatch.make_model(config, data.num_classes, torch.device("cpu"))
    optimizer = common.sgd(model, config["lr"])
    loss_fn = common.cross_entropy(0.0)
    model.train()
    for _ in range(args.iterations):
        optimizer.zero_grad(set_to_none=True)
        common.ghost_batch_gradient(model, loss_fn, data.x_train, data.y_train, 125)
        optimizer.step()
    return model, loss_fn, [fullbatch.measurement_subset(data, config)]


def measured(model, loss_fn, batches, seeds, guarantee):
    rows = []
    for seed in range(seeds):
        start = time.perf_counter()
        info = sharpness(model, loss_fn, batches, tol=1e-2, max_iter=200, return_info=True,
                         generator=torch.Generator().manual_seed(seed), guarantee=guarantee)
        rows.append(dict(seed=seed, value=info.eigenvalues[0], products=info.matvecs,
                         converged=info.converged, seconds=time.perf_counter() - start))
    return rows


def main(args):
    model, loss_fn, batches = trained_model(args)
    dim = sum(p.numel() for p in model.parameters())
    runs = {"none": measured(model, loss_fn, batches, args.seeds, None),
            "default": measured(model, loss_fn, batches, args.seeds, GUARANTEE)}
    best = max(r["value"] for rows in runs.values() for r in rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = sharpness(model, loss_fn, batches, tol=1e-6, max_iter=300, return_info=True)
    ref = max(best, reference.eigenvalues[0])
    false = {name: [r["seed"] for r in rows if r["converged"] and r["value"] < ref * (1 - 1e-2)]
             for name, rows in runs.items()}
    out = dict(dim=dim, guarantee=GUARANTEE, guaranteed_products=_guaranteed_products(dim, GUARANTEE),
               reference=ref, reference_converged=reference.converged,
               reference_error=reference.errors[0], runs=runs, false_stops=false,
               torch=torch.__version__, threads=torch.get_num_threads())
    common.save_json(args.out, out)
    for name, rows in runs.items():
        products = sorted(r["products"] for r in rows)
        print(f"guarantee {name}: false stops {len(false[name])} of {len(rows)} (seeds "
              f"{false[name]}), products {products[0]}-{products[-1]}")
    print(f"reference {ref:.4f} (dim {dim}, guaranteed products {out['guaranteed_products']})")


if __name__ == "__main__":
    main(parse_args())
