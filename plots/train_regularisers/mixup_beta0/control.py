"""Why mixup with beta = 0 trains differently from no mixup: two controls at the reduced
Figure 21 scale (plots/README.md, "Mixup beta = 0").

beta = 0 draws theta ~ Bernoulli(1/2) (the paper's definition), so every example of a batch is
replaced by itself or by its partner, unmixed: a resample of the batch. The controls separate the
two things that path changes:
    resample_hard  the same resampled batches, with integer labels (no soft-target loss)
    theta0_soft    the same random draws, theta = 0 (no resampling), with soft one-hot targets

Usage: python plots/train_regularisers/mixup_beta0/control.py VARIANT DATA OUT
"""
import sys
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import common  # noqa: E402
import train_regularisers as tr  # noqa: E402

variant, data_root, out = sys.argv[1:4]
mixup = common.mixup


def resample_hard(x, labels, beta, num_classes, generator):
    mixed, targets = mixup(x, labels, beta, num_classes, generator)
    return mixed, targets.argmax(1)  # the same resampled batch, integer labels


def theta0_soft(x, labels, beta, num_classes, generator):
    mixup(x, labels, beta, num_classes, generator)  # the same random draws
    return x, F.one_hot(labels, num_classes).to(x.dtype)


common.mixup = {"resample_hard": resample_hard, "theta0_soft": theta0_soft}[variant]
args = tr.parse_args(f"--datasets cifar10 --models vgg11 --batch-norm with --data-root {data_root} "
                     "--lrs 0.1 0.05 --trials 1 --epochs 12 --milestones 7 10 --train-size 2000 "
                     "--test-size 2000 --width 0.125 --measure-size 256 --eig-tol 1e-3 --no-progress "
                     f"--sweeps mixup --mixup-betas 0 --out {out}".split())
tr.train_pending(args, tr.grid_cells(args))
