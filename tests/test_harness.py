"""Tests for the harness in common: data, MLPs, ghost-batch training, runs, CLI, plotting."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import Exit, assert_one_line_error

# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def synthetic():
    return common.synthetic_arrays(10, n_train=3000, n_test=500)


@pytest.mark.parametrize("mode,dims", [("component", (0,)), ("channel", (0, 2, 3))])
def test_standardisation_statistics(synthetic, mode, dims):
    mean, std = common.standardisation_stats(synthetic["x_train"], mode)
    x = common.to_images(synthetic["x_train"]).double()  # (N, C, H, W)
    assert mean.shape == std.shape == ((1, 3, 32, 32) if mode == "component" else (1, 3, 1, 1))
    z = (x - mean.double()) / std.double()
    assert z.mean(dims).abs().max() < 1e-5
    assert (z.std(dims, unbiased=False) - 1).abs().max() < 1e-5


@pytest.mark.slow  # the standardisation statistics of 50 000 synthetic images: about 3 s
def test_load_data_standardises_with_the_whole_training_split():
    arrays = common.synthetic_arrays(100)  # what load_data("synthetic-cifar100") reads
    mean, std = common.standardisation_stats(arrays["x_train"], "channel")
    first = common.load_data("synthetic-cifar100", standardise="channel", train_size=100, test_size=0)
    assert first.x_train.shape == (100, 3, 32, 32) and first.x_train.dtype == torch.float32
    assert first.num_classes == 100 and len(first.x_test) == 0
    expected = (common.to_images(arrays["x_train"][:100]) - mean) / std
    torch.testing.assert_close(first.x_train, expected)
    drawn = common.load_data("synthetic-cifar100", standardise="channel", train_size=100,
                             train_seed=1, test_size=0)
    idx = common.subset_indices(50000, 100, seed=1)
    torch.testing.assert_close(drawn.x_train, (common.to_images(arrays["x_train"][idx]) - mean) / std)
    assert torch.equal(drawn.y_train, torch.from_numpy(arrays["y_train"][idx]))


def test_subset_indices():
    assert torch.equal(common.subset_indices(10, 4), torch.arange(4))
    assert torch.equal(common.subset_indices(10), torch.arange(10))
    a, b = common.subset_indices(1000, 50, seed=0), common.subset_indices(1000, 50, seed=0)
    assert torch.equal(a, b) and len(a.unique()) == 50
    assert not torch.equal(a, common.subset_indices(1000, 50, seed=1))


def test_missing_real_data_is_an_error_not_a_substitute(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        common.load_arrays("cifar10", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_npz_layout_is_read(tmp_path, synthetic):
    small = {k: v[:20] if k != "classes" else v for k, v in synthetic.items()}
    np.savez(tmp_path / "cifar10.npz", **small)
    data = common.load_data("cifar10", tmp_path, standardise="none")
    assert torch.equal(data.y_train, torch.tensor(small["y_train"]))
    assert torch.allclose(data.x_train[3], torch.tensor(small["x_train"][3]).permute(2, 0, 1) / 255)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("activation", list(common.ACTIVATIONS))
@pytest.mark.parametrize("init", list(common.INITS))
def test_mlp_shapes(activation, init):
    model = common.MLP(3 * 4 * 4, 5, width=7, depth=3, activation=activation, init=init, init_std=0.3)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 5)
    assert [tuple(l.weight.shape) for l in model.linears()] == [(7, 48), (7, 7), (5, 7)]


def test_mlp_default_init_bound_and_normal_std():
    torch.manual_seed(0)
    first = common.MLP(400, 3, width=300).linears()[0]
    assert first.weight.abs().max() <= 1 / math.sqrt(400)
    wide = common.MLP(1, 1, width=4000, depth=2, init="normal", init_std=2.0).linears()[0]
    assert abs(wide.weight.std().item() - 2.0) < 0.1


def test_unknown_registry_names_are_errors():
    with pytest.raises(ValueError, match="unknown activation"):
        common.MLP(4, 2, activation="swish")
    with pytest.raises(ValueError, match="unknown init"):
        common.MLP(4, 2, init="orthogonal")


# ----------------------------------------------------------------------------- training


def test_ghost_batch_gradient_equals_full_batch_gradient():
    torch.manual_seed(0)
    model = common.MLP(12, 4, width=9, depth=3, activation="tanh").double()
    x, y = torch.randn(23, 12, dtype=torch.float64), torch.randint(0, 4, (23,))
    loss_fn = common.cross_entropy(0.3)
    loss_fn(model(x), y).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, acc = common.ghost_batch_gradient(model, loss_fn, x, y, ghost_batch_size=5)  # 5,5,5,5,3
    for p, g in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert loss == pytest.approx(loss_fn(model(x), y).item(), rel=1e-12)
    assert acc == (model(x).argmax(1) == y).double().mean().item()


def test_ghost_batches_use_their_own_batch_norm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    common.ghost_batch_gradient(model, F.cross_entropy, x, y, ghost_batch_size=4)
    ghost = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for s in (slice(0, 4), slice(4, 8)):
        (F.cross_entropy(model(x[s]), y[s]) / 2).backward()
    for p, g in zip(model.parameters(), ghost):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("smoothing,classes", [(0.0, 10), (0.5, 10), (0.75, 100), (1.0, 3)])
def test_label_entropy_is_the_minimum_of_smoothed_cross_entropy(smoothing, classes):
    y = torch.arange(classes)
    q = (1 - smoothing) * F.one_hot(y, classes).double() + smoothing / classes
    best = F.cross_entropy(q.clamp_min(1e-300).log(), y, label_smoothing=smoothing)
    assert best.item() == pytest.approx(common.label_entropy(smoothing, classes), abs=1e-9)


def test_regression_targets_give_no_accuracy():
    model = nn.Linear(1, 1)
    _, acc = common.ghost_batch_gradient(model, F.mse_loss, torch.randn(5, 1), torch.randn(5, 1))
    assert acc is None


# ----------------------------------------------------------------------------- runs


def test_run_names_are_readable_and_config_specific():
    a = common.run_name({"activation": "relu", "scale": 0.5, "iters": 300}, ["activation", "scale"])
    b = common.run_name({"activation": "relu", "scale": 0.5, "iters": 3}, ["activation", "scale"])
    assert a.startswith("activation=relu_scale=0.5-") and a != b


def test_save_load_round_trip(tmp_path):
    config = {"activation": "tanh", "scale": 1.5, "seed": 3, "lr": 0.2}
    run = common.Run(tmp_path, config, keys=["activation", "scale"])
    assert run.begin(device="cpu") is None
    run.log(0, loss=2.3, sharpness=1.0)
    run.log(10, loss=float("nan"), sharpness=np.float32(2.5), curve=torch.tensor([1.0, 2.0]))
    run.finish("diverged", step=10)
    loaded = common.load_run(run.dir)
    assert loaded["config"] == config
    assert loaded["meta"]["seed"] == 3 and loaded["meta"]["torch"] == torch.__version__
    assert loaded["meta"]["device"] == "cpu"
    assert loaded["result"]["status"] == "diverged"
    steps, loss = common.metric_series(loaded, "loss")
    assert steps.tolist() == [0, 10] and loss[0] == 2.3 and math.isnan(loss[1])
    assert loaded["metrics"][1]["curve"] == [1.0, 2.0]
    json.loads((run.dir / "metrics.json").read_text())  # strict JSON: no NaN literals
    assert not (run.dir / "checkpoint.pt").exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    common.save_json(path, {"a": 1})

    def broken(f):
        f.write("partial")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        common.atomic_write(path, broken, mode="w")
    assert common.load_json(path) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    common.save_json(tmp_path / "a.json", {})
    (tmp_path / "b.json").write_text("{}")
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "b.json").stat().st_mode


class Interrupt(Exception):
    pass


def toy_run(out, steps=12, interrupt_at=None):
    """A tiny classification run written the way the scripts write theirs."""
    config = {"steps": steps, "seed": 0}
    run = common.Run(out, config, keys=["steps"], checkpoint_seconds=0.0)
    if run.done:
        return run.load(), 0
    torch.manual_seed(0)
    model = common.MLP(6, 3, width=5, depth=2)
    optimizer = common.sgd(model, lr=0.1, momentum=0.9)
    x, y = torch.randn(20, 6, generator=torch.Generator().manual_seed(1)), torch.arange(20) % 3
    state = run.begin()
    start = common.restore_training_state(state, model, optimizer) if state else 0
    executed = 0
    for step in range(start, steps):
        if step == interrupt_at:
            raise Interrupt
        loss, acc = common.train_step(model, optimizer, F.cross_entropy, x, y, ghost_batch_size=7)
        run.log(step, loss=loss, noise=torch.rand(()).item())  # RNG use must resume too
        executed += 1
        if step % 4 == 3:
            run.checkpoint(lambda: common.training_state(step + 1, model, optimizer))
    run.finish("finished")
    return run.load(), executed


def test_resume_continues_an_interrupted_run_and_skips_a_finished_one(tmp_path):
    reference, executed = toy_run(tmp_path / "a")
    assert executed == 12
    with pytest.raises(Interrupt):
        toy_run(tmp_path / "b", interrupt_at=10)  # last checkpoint after step 7
    resumed, executed = toy_run(tmp_path / "b")
    assert executed == 4  # steps 8..11 only
    assert resumed["metrics"] == reference["metrics"]
    again, executed = toy_run(tmp_path / "b")
    assert executed == 0 and again["metrics"] == reference["metrics"]


# ----------------------------------------------------------------------------- command line


def parse(argv, tmp_path):
    parser = common.make_parser("test\n", trials=2, out=str(tmp_path / "out"))
    parser.add_argument("--model", choices=["mlp"], default="mlp")
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)
    common.check_positive(args, "lr")
    common.check_common(args, dataset="cifar10")
    return args


@pytest.mark.parametrize("argv,message", [
    (["--model", "vgg99"], "invalid choice: 'vgg99'"),
    (["--lr", "-0.1"], "--lr must be positive, got -0.1"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--lr", "abc"], "invalid float value"),
    ([], "data set cifar10 not found"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        parse(argv + ["--data-root", str(tmp_path / "nowhere")], tmp_path)
    assert_one_line_error(Exit(exc.value.code, "", capsys.readouterr().err), message)
    assert not (tmp_path / "out").exists()


def test_valid_arguments(tmp_path):
    (tmp_path / "d").mkdir()
    small = {k: v[:4] if k != "classes" else v for k, v in common.synthetic_arrays(10).items()}
    np.savez(tmp_path / "d" / "cifar10.npz", **small)  # checked before anything trains
    args = parse(["--data-root", str(tmp_path / "d"), "--device", "cpu"], tmp_path)
    assert args.trials == 2 and common.resolve_device(args.device) == torch.device("cpu")


# ----------------------------------------------------------------------------- plotting


def test_mean_std_over_trials_of_different_lengths():
    steps, mean, std, count = common.mean_std([(np.array([0, 1, 2]), np.array([1.0, 2.0, 3.0])),
                                               (np.array([0, 1]), np.array([3.0, np.nan]))])
    assert steps.tolist() == [0, 1, 2] and mean.tolist() == [2.0, 2.0, 3.0]
    assert std.tolist() == [1.0, 0.0, 0.0] and count.tolist() == [2, 1, 1]


def test_plots_regenerate_from_saved_results(tmp_path):
    for scale in (0.5, 1.0):
        for trial in range(2):
            run = common.Run(tmp_path, {"scale": scale, "trial": trial}, keys=["scale", "trial"])
            run.begin()
            for step in range(0, 30, 10):
                run.log(step, loss=1 / (step + 1 + trial), sharpness=scale * step)
            run.finish()
    runs = [common.load_run(d) for d in sorted(tmp_path.iterdir())]
    fig, panels = common.plot_runs(runs, ["loss", "sharpness"], "scale", log_metrics=("loss",))
    paths = common.save_figure(fig, tmp_path / "plots" / "figure")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:4] == b"%PDF"
    axes = fig.axes
    assert len(axes) == 2 and len(axes[1].lines) == 2
    np.testing.assert_allclose(axes[1].lines[1].get_ydata(), [0.0, 10.0, 20.0])
