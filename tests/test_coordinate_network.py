"""coordinate_network.py (Appendix C.3): batched trials, smoke run, tables, resume, errors."""
import csv
import math
import pytest
import torch

import common
import coordinate_network as cn
from conftest import Interrupt, assert_one_line_error, interrupt_at_call


def smoke_args(out, *extra):
    return cn.parse_args(["--smoke", "--out", str(out), "--no-progress", *extra])


@pytest.mark.parametrize("activation,init", cn.SETTINGS)
def test_batched_trials_match_their_standalone_models(activation, init):
    config = cn.run_configs(smoke_args("unused"))[cn.SETTINGS.index((activation, init))]
    trials = cn.Trials(config, "cpu")
    x = torch.linspace(-1, 1, 5).unsqueeze(1)
    outputs = trials(x)  # (T, 5, 1)
    for t in range(config["trials"]):
        torch.testing.assert_close(outputs[t], trials.model(t)(x))
        torch.testing.assert_close(trials.model(t).linears()[0].weight,
                                   cn.make_model(config, config["seed"] + t).linears()[0].weight)


def test_the_sin6pi_pretraining_target_interpolates_the_data():
    x, y = cn.training_points()
    torch.testing.assert_close(torch.sin(6 * math.pi * x), y, atol=1e-5, rtol=0)


def test_low_frequency_gaussian_init_has_a_small_first_layer():
    args = smoke_args("unused")
    high, low = cn.run_configs(args)[:2]
    w_high = cn.make_model(high, 0).linears()[0].weight
    w_low = cn.make_model(low, 0).linears()[0].weight
    assert w_low.norm() < w_high.norm() / 3


@pytest.mark.parametrize("activation,init", [("gaussian", "low"), ("relu", "high")])
def test_layer_jacobians_match_jacrev_of_the_composed_layers(activation, init):
    config = cn.run_configs(smoke_args("unused"))[cn.SETTINGS.index((activation, init))]
    model = cn.make_model(config, 3).double()
    x = torch.linspace(-1, 1, 8, dtype=torch.float64).unsqueeze(1)
    linears = model.linears()

    def act(z):  # by hand, not the model's modules
        return torch.exp(-z ** 2 / (2 * config["sigma"] ** 2)) if activation == "gaussian" else z.clamp(min=0)

    def upper(l, h):  # layers l.. of the MLP applied to layer l's input h (fan_in,)
        for k, lin in enumerate(linears[l:], start=l):
            h = torch.nn.functional.linear(h, lin.weight, lin.bias)
            h = act(h) if k + 1 < len(linears) else h
        return h

    def lower(l, v):  # layer l's input
        for lin in linears[:l]:
            v = act(torch.nn.functional.linear(v, lin.weight, lin.bias))
        return v

    got = cn.layer_jacobians(model, x)
    assert len(got) == len(linears) == config["depth"]
    for l in range(len(linears)):
        want = max(torch.linalg.matrix_norm(torch.func.jacrev(lambda h: upper(l, h))(lower(l, xi)),
                                            ord=2).item() for xi in x)
        assert got[l] == pytest.approx(want, rel=1e-8), l
    assert got[0] == pytest.approx(common.jacobian_norm(model, x, softmax=False), rel=1e-12)
    assert len(set(got)) == len(got)  # the layers differ: the check above could fail


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("coordinate_network")
    cn.main(smoke_args(out))
    return out


@pytest.mark.slow
def test_smoke_run_writes_runs_tables_and_figure(smoke_out):
    runs = [common.load_run(d) for d in sorted(smoke_out.iterdir()) if d.name != "plots"]
    assert sorted((r["config"]["activation"], r["config"]["init"]) for r in runs) == sorted(cn.SETTINGS)
    for run in runs:
        res = run["result"]
        assert res["status"] == "finished" and res["diverged_trials"] == []
        for q in ("jacobian", "sharpness", "first_layer_norm", "loss"):
            assert len(res[q]) == 2 and all(math.isfinite(v) and v >= 0 for v in res[q])
        assert len(res["fit"]) == 2 and len(res["fit"][0]) == len(res["grid"])
        depth = run["config"]["depth"]
        assert [len(v) for v in res["layer_jacobians"]] == [depth, depth]
        for t in range(2):
            assert all(math.isfinite(v) and v > 0 for v in res["layer_jacobians"][t])
            assert res["layer_jacobians"][t][0] == pytest.approx(res["jacobian"][t], rel=1e-6)
    depth = runs[0]["config"]["depth"]
    rows = list(csv.DictReader(open(smoke_out / "plots" / "tables.csv")))
    assert len(rows) == 4 * (len(cn.QUANTITIES) + depth) and all(r["n"] == "2" for r in rows)
    assert {r["quantity"] for r in rows} >= {f"layer_jacobian_{l}" for l in range(1, depth + 1)}
    table = (smoke_out / "plots" / "tables.md").read_text()
    assert f"| Jacobian norm from layer {depth}'s input |" in table
    assert "## Table 1: gaussian network" in table and "## Table 2: relu network" in table
    for ext in ("png", "pdf"):
        assert (smoke_out / "plots" / f"fig32_fits.{ext}").stat().st_size > 1000


@pytest.mark.slow
def test_plot_only_regenerates_tables_and_figure(smoke_out):
    for f in (smoke_out / "plots").iterdir():
        f.unlink()
    cn.main(smoke_args(smoke_out, "--plot-only"))
    assert sorted(f.name for f in (smoke_out / "plots").iterdir()) == [
        "fig32_fits.pdf", "fig32_fits.png", "runs.json", "tables.csv", "tables.md"]


@pytest.mark.slow
def test_plot_only_of_runs_without_layer_jacobians(smoke_out, tmp_path):
    import json
    import shutil
    old = tmp_path / "old"
    shutil.copytree(smoke_out, old)
    shutil.rmtree(old / "plots")
    for path in old.glob("*/result.json"):  # as saved before the layer Jacobians were measured
        saved = json.loads(path.read_text())
        del saved["layer_jacobians"]
        path.write_text(json.dumps(saved))
    cn.main(smoke_args(old, "--plot-only"))
    rows = list(csv.DictReader(open(old / "plots" / "tables.csv")))
    assert [r["quantity"] for r in rows[:len(cn.QUANTITIES)]] == list(cn.QUANTITIES)
    assert len(rows) == 4 * len(cn.QUANTITIES)


@pytest.mark.slow
@pytest.mark.parametrize("interrupt_at", [60, 160])  # in pretraining (100 steps), in training
def test_interrupted_run_continues_from_its_checkpoint(tmp_path, monkeypatch, interrupt_at):
    def args(out):
        return smoke_args(out, "--activations", "relu")

    cn.main(args(tmp_path / "reference"))
    configs = cn.run_configs(args(tmp_path))
    reference = common.load_saved(tmp_path / "reference", configs, cn.RUN_KEYS)
    original_init = common.Run.__init__
    monkeypatch.setattr(common.Run, "__init__",
                        lambda self, *a, **k: original_init(self, *a, **{**k, "checkpoint_seconds": 0.0}))
    calls = interrupt_at_call(monkeypatch, cn.Trials, "losses", interrupt_at)
    with pytest.raises(Interrupt):
        cn.main(args(tmp_path / "resumed"))
    assert len(calls) == interrupt_at
    cn.main(args(tmp_path / "resumed"))
    resumed = common.load_saved(tmp_path / "resumed", configs, cn.RUN_KEYS)
    for new, old in zip(resumed, reference):
        assert new["metrics"] == old["metrics"]
        for q in ("loss", "jacobian", "sharpness", "first_layer_norm", "fit"):
            assert new["result"][q] == old["result"][q]


@pytest.mark.parametrize("argv,message", [
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--momentum", "1.5"], "--momentum must lie in [0, 1), got 1.5"),
    (["--activations", "sine"], "invalid choice: 'sine'"),
    (["--trials", "-1"], "--trials must be at least 1, got -1"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, bad_arguments, argv, message):
    bad_arguments(cn, ["--out", tmp_path / "out", *argv], message, tmp_path / "out")


@pytest.mark.slow
def test_rejected_command_line_shows_no_traceback(tmp_path, cli):
    proc = cli.subprocess("coordinate_network.py", ["--out", tmp_path / "out",
                                                    "--gaussian-epochs", "-5"])
    assert proc.code == 2 and proc.out == ""
    assert proc.err == "coordinate_network.py: error: --gaussian-epochs must be positive, got -5\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_plot_only_without_results_is_an_error(tmp_path, cli):
    result = cli.main(cn, ["--smoke", "--out", tmp_path, "--no-progress", "--plot-only"])
    assert_one_line_error(result, "no saved results")
