"""Input layout and the start-of-run gradient check: the data path hands the networks contiguous
(N, C, H, W) images, on which float32 gradients and Hessian-vector products of every network a
committed run trains agree with float64 to float32 rounding (with 1 and 2 threads, in a
subprocess: the channels-last oneDNN fault also corrupted the heap); the gradient check passes on
a sound model, leaves it unchanged, and stops a script (exit 2, one line) whose backward is wrong.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import common
from common.training import gradient_check

ROOT = Path(__file__).resolve().parents[1]


def test_loader_augmentation_and_mixup_give_contiguous_images():
    data = common.load_data("synthetic-cifar10", train_size=8, test_size=8)
    assert data.x_train.shape == (8, 3, 32, 32)
    assert data.x_train.is_contiguous() and data.x_test.is_contiguous()
    g = torch.Generator().manual_seed(0)
    channels_last = data.x_train.contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    assert common.augment(channels_last, 0.5, g).is_contiguous()
    assert common.mixup(channels_last, data.y_train, 0.4, 10, g)[0].is_contiguous()


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_float32_gradients_and_hvps_on_the_data_path_match_float64(threads):
    """Float32 on the data path's inputs against float64 on contiguous ones, for each network,
    within 10x the float32 rounding of the same model (float32 on contiguous inputs against
    float64) plus 1e-5. Real CIFAR-10 with REPRO_DATA set, else its synthetic stand-in."""
    real = os.environ.get("REPRO_DATA")
    dataset, root = ("cifar10", real) if real else ("synthetic-cifar10", "data")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "layout_child.py"), str(threads),
                           dataset, root, "16"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"child died ({done.returncode}): {done.stderr[-2000:]}"
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 8
    bad = {f"{config} {what}": f"{err:.1e} (rounding {rounding:.1e})"
           for config, quantities in errors.items()
           for what, (err, rounding) in quantities.items() if err > 10 * rounding + 1e-5}
    assert not bad, f"float32 off beyond rounding with {threads} thread(s): {bad}"


class _ScaleGradient(torch.autograd.Function):
    """Identity whose backward triples the gradient for float32 only (as a faulty float32
    kernel would; the float64 reference is unaffected)."""

    @staticmethod
    def forward(ctx, x):
        ctx.float32 = x.dtype == torch.float32
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 3 if ctx.float32 else grad


class Faulty(nn.Module):
    """Wraps a layer: its output's gradient is wrong in float32, so its parameters' are."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return _ScaleGradient.apply(self.inner(x))


def _batch(n=16):
    data = common.load_data("synthetic-cifar10", train_size=n, test_size=1)
    return data.x_train, data.y_train


def test_gradient_check_passes_and_leaves_the_model_unchanged():
    x, y = _batch()
    torch.manual_seed(0)
    model = common.build_model("vgg11", width=1 / 16).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = gradient_check(model, common.cross_entropy(), x, y)
    assert result.passed and result.error < 1e-4, result
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_gradient_check_names_the_faulty_layer_and_the_flag_skips_it():
    x, y = _batch()
    torch.manual_seed(0)
    model = common.build_model("vgg11", width=1 / 16)
    model.features[0] = Faulty(model.features[0])
    result = gradient_check(model, common.cross_entropy(), x, y)
    assert not result.passed and result.worst.startswith("features.0.inner.")
    assert result.worst_error == pytest.approx(2, rel=1e-3)  # 3 g against g
    skip = argparse.Namespace(no_gradient_check=True)
    common.gradient_check_or_fail(skip, model, common.cross_entropy(), x, y)  # returns


FAULTY_RUN = """
import sys
sys.argv = ["vgg_sgd.py"] + sys.argv[1:]
sys.path[:0] = [{root!r}, {tests!r}]
import common, vgg_sgd
from test_layout import Faulty
build = vgg_sgd.make_model
def faulty(*args):
    model = build(*args)
    model.features[0] = Faulty(model.features[0])
    return model
vgg_sgd.make_model = faulty
common.run_main(vgg_sgd.main, vgg_sgd.parse_args)
"""


@pytest.mark.slow
def test_script_with_a_faulty_backward_stops_with_one_line(tmp_path):
    code = FAULTY_RUN.format(root=str(ROOT), tests=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, "-c", code, "--smoke", "--no-progress",
                           "--dataset", "synthetic-cifar10", "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "gradient check failed" in lines[0], lines
    assert "features.0.inner." in lines[0]


@pytest.mark.parametrize("script", ["fullbatch", "batch_lr", "train_regularisers", "vgg_sgd",
                                    "small_network", "coordinate_network"])
def test_every_training_script_lists_the_flag(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        __import__(script).parse_args(["--help"])
    assert exit_.value.code == 0 and "--no-gradient-check" in capsys.readouterr().out
