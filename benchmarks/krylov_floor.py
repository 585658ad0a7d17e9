"""The fewest Hessian-vector products any stopping rule could use: the error of our Lanczos
chain's top Ritz value after m products (random start, no verification), m = 1..M, against
the float64 reference, on bench.py's models and batch (at initialisation and after 100
full-batch GD steps, lr 0.05).

The Ritz value after m products is the largest Rayleigh quotient over the Krylov space
K_m(A, v), which holds the power iterate A^(m-1) v: from the same start no single-vector method
gets closer in m products. So PyHessian's products at a target error over this floor bound
the speed ratio any stop rule of ours could reach, the verification not counted.

    python benchmarks/krylov_floor.py --data-root ../shared/data      # ~5 min on one thread

Writes benchmarks/krylov_floor.json (per model and state: the reference, each seed's errors
for m = 1..M, the fewest products reaching each target).
"""
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import common  # noqa: E402


def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic-cifar10"])
    parser.add_argument("--models", nargs="+", default=["cnn", "vgg11"],
                        choices=["cnn", "vgg11", "resnet18"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-products", type=int, default=15)
    parser.add_argument("--targets", type=float, nargs="+", default=[1e-3, 1e-4])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "krylov_floor.json"))
    args = parser.parse_args(argv)
    common.check_positive(args, "seeds", "max_products")
    return args


def chain_errors(matvec, dim, reference, m_max, seed):
    """Relative error of the top Ritz value after m = 1..m_max products of one chain (a tol
    below the rounding floor: the solver never claims convergence, so never verifies)."""
    errors = []
    for m in range(1, m_max + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", common.ConvergenceWarning)
            r = common.top_eigenvalues(matvec, dim, tol=1e-12, max_iter=m,
                                       generator=torch.Generator().manual_seed(seed))
        errors.append(bench.relative_error(r.eigenvalues[0], reference))
    return errors


def main(args):
    torch.set_num_threads(1)
    cfg = bench.parse_args(["--dataset", args.dataset, "--data-root", args.data_root])  # its defaults
    width = 0.125 if cfg.width is None else cfg.width  # bench.py's default on a CPU
    data = bench.load_images(cfg, torch.device("cpu"))
    x, y = data.x_train[:cfg.batch_size], data.y_train[:cfg.batch_size]  # (128, 3, 32, 32), (128,)
    out = {"config": vars(args), "torch": torch.__version__, "models": {}}
    for name in args.models:
        model = bench.build_bench_model(name, width, data.num_classes, cfg.seed, torch.device("cpu"))
        for state in ("init", "trained"):
            if state == "trained":
                bench.train_on_batch(model, x, y, cfg.trained_steps, cfg.trained_lr)
            reference = bench.reference_top_eigenvalue(common.hessian_operator, model, x, y)
            matvec, dim = common.hessian_operator(model, torch.nn.functional.cross_entropy,
                                                  [(x, y)])
            errors = {seed: chain_errors(matvec, dim, reference, args.max_products, seed)
                      for seed in range(args.seeds)}
            fewest = {str(t): [next((m + 1 for m, e in enumerate(errs) if e <= t), None)
                               for errs in errors.values()] for t in args.targets}
            out["models"][f"{name} {state}"] = dict(reference=reference, errors=errors,
                                                    fewest_products=fewest)
            print(name, state, f"reference {reference:.6g}", "fewest products per seed:",
                  fewest, flush=True)
    common.save_json(args.out, out)


if __name__ == "__main__":
    main(parse_args())
