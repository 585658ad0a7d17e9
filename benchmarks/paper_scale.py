"""Per-step costs at the paper's scale, to project each appendix section's GPU-hours.

For VGG11 and ResNet18 (width 1, BN) on 50 000 CIFAR-shaped training images it times:
  - one full-batch gradient-descent step by ghost batches (fullbatch.py: 10 x 5000);
  - one sharpness estimate (Lanczos, BN in train mode) on the 2500-example measurement subset,
    and one Jacobian norm of the softmaxed model on the same subset (fullbatch.py, vgg_sgd.py);
  - one SGD epoch at batch 128 with momentum (vgg_sgd.py, train_regularisers.py, batch_lr.py);
  - the end-of-training measurements of the sweeps (sharpness and Gauss-Newton norm on 1000
    examples in ghost batches of 128, Jacobian norm on 1000).
A real data subset (e.g. a few thousand CIFAR-10 images) is tiled to --train-size examples:
the timings depend on shapes, not pixels.

Run:  python3 benchmarks/paper_scale.py --device cuda --data-root <folder>
Writes: <out>/paper_scale.json (every timing, the device, torch version) and prints a table.
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def parse_args(argv=None):
    parser = common.make_parser(__doc__, trials=1, out="results/paper_scale")
    parser.add_argument("--dataset", default="cifar10", choices=list(common.DATASETS))
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet18"],
                        choices=list(common.MODELS))
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--train-size", type=int, default=50000)
    parser.add_argument("--ghost-batch-size", type=int, default=5000)
    parser.add_argument("--measure-size", type=int, default=2500)
    parser.add_argument("--sgd-batch-size", type=int, default=128)
    parser.add_argument("--sgd-steps", type=int, default=100,
                        help="SGD steps timed; the epoch time is scaled from them")
    parser.add_argument("--eig-tol", type=float, default=1e-3)
    smoke = dict(out="results/paper_scale_smoke", dataset="synthetic-cifar10", width=0.0625,
                 train_size=256, ghost_batch_size=64, measure_size=64, sgd_batch_size=32,
                 sgd_steps=4)
    args = common.parse_with_smoke(parser, argv, smoke)
    common.check_positive(args, "width", "train_size", "ghost_batch_size", "measure_size",
                          "sgd_batch_size", "sgd_steps", "eig_tol")
    common.check_common(args, dataset=args.dataset)
    return args


def synchronise(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device):
    """Wall time of fn() after one warm-up call, with the device synchronised."""
    fn()
    synchronise(device)
    start = time.perf_counter()
    out = fn()
    synchronise(device)
    return time.perf_counter() - start, out


def tiled(x, n):
    """The first n rows of x repeated along the batch dimension."""
    reps = -(-n // len(x))
    return x.repeat(reps, *[1] * (x.dim() - 1))[:n]


def time_model(name, data, args, device):
    model = common.build_model(name, num_classes=data.num_classes, width=args.width).to(device)
    x = tiled(data.x_train, args.train_size)  # (N, 3, 32, 32)
    y = tiled(data.y_train, args.train_size)
    loss_fn = common.cross_entropy(0.0)
    optimizer = common.sgd(model, lr=1e-4)  # tiny lr: the timed steps barely move the model
    model.train()
    row = {"model": name, "parameters": sum(p.numel() for p in model.parameters())}

    row["full_batch_step_s"], _ = seconds(lambda: common.train_step(
        model, optimizer, loss_fn, x, y, ghost_batch_size=args.ghost_batch_size), device)

    xm, ym = x[:args.measure_size], y[:args.measure_size]
    ghost = [(xm[s], ym[s]) for s in common.index_chunks(len(xm), args.ghost_batch_size)]
    row["sharpness_s"], info = seconds(lambda: common.sharpness(
        model, loss_fn, ghost, tol=args.eig_tol, return_info=True), device)
    row["sharpness_products"] = info.matvecs
    row["jacobian_s"], _ = seconds(lambda: common.jacobian_norm(model, xm), device)

    sgd = common.sgd(model, lr=1e-4, momentum=0.9, weight_decay=5e-4)
    b = args.sgd_batch_size

    def sgd_steps():
        for i in range(args.sgd_steps):
            s = slice((i * b) % (len(x) - b), (i * b) % (len(x) - b) + b)
            sgd.zero_grad(set_to_none=True)
            loss_fn(model(x[s]), y[s]).backward()
            sgd.step()
    steps_s, _ = seconds(sgd_steps, device)
    row["sgd_epoch_s"] = steps_s / args.sgd_steps * (args.train_size // b)

    xe, ye = x[:1000], y[:1000]
    ghost_e = [(xe[s], ye[s]) for s in common.index_chunks(len(xe), b)]
    row["end_metrics_s"], _ = seconds(lambda: (
        common.sharpness(model, loss_fn, ghost_e, tol=args.eig_tol),
        common.gauss_newton_norm(model, loss_fn, ghost_e, tol=args.eig_tol),
        common.jacobian_norm(model, xe)), device)
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
    return row


def main(args):
    device = common.resolve_device(args.device)
    data = common.load_data(args.dataset, args.data_root, device=device, standardise="component",
                            download=args.download)
    rows = []
    for name in args.models:
        try:
            rows.append(time_model(name, data, args, device))
        except torch.OutOfMemoryError as error:  # record it and go on with the next model
            rows.append({"model": name, "error": f"out of memory: {str(error).splitlines()[0]}"})
        print(json.dumps(rows[-1]), flush=True)
    result = {"config": vars(args), "device": str(device), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "rows": rows}
    common.save_json(Path(args.out) / "paper_scale.json", result)


if __name__ == "__main__":
    main(parse_args())
