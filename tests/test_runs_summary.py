"""save_runs_summary: the numbers behind a figure in one JSON file beside it."""
import json
import math

import torch

import common


def test_summary_holds_each_runs_config_result_metrics_and_provenance(tmp_path):
    for trial in range(2):
        run = common.Run(tmp_path, {"lr": 0.1, "trial": trial, "seed": 7 + trial}, keys=["trial"])
        run.begin()
        run.log(0, loss=2.5 - trial, sharpness=math.nan)
        run.finish("finished", final_loss=1.0 + trial)
    runs = common.load_saved(tmp_path, [{"lr": 0.1, "trial": t, "seed": 7 + t} for t in range(2)],
                             ["trial"])
    common.save_runs_summary(runs, tmp_path / "plots" / "runs.json")
    saved = json.loads((tmp_path / "plots" / "runs.json").read_text())
    assert [r["config"]["trial"] for r in saved] == [0, 1]
    assert [r["result"]["final_loss"] for r in saved] == [1.0, 2.0]
    assert saved[1]["metrics"] == [{"step": 0, "loss": 1.5, "sharpness": None}]
    assert saved[0]["seed"] == 7 and saved[0]["torch"] and saved[0]["device"] == "cpu"
    assert saved[0]["threads"] == torch.get_num_threads()
    assert saved[0]["name"].startswith("trial=0-")


def test_unpacked_summary_loads_as_the_saved_runs(tmp_path):
    for trial in range(2):
        run = common.Run(tmp_path / "a", {"lr": 0.1, "trial": trial, "seed": trial}, keys=["trial"])
        run.begin()
        run.log(0, loss=2.5 - trial, sharpness=math.nan)
        run.finish("finished", final_loss=1.0 + trial)
    configs = [{"lr": 0.1, "trial": t, "seed": t} for t in range(2)]
    common.save_runs_summary(common.load_saved(tmp_path / "a", configs, ["trial"]), tmp_path / "runs.json")
    assert common.unpack_runs_summary(tmp_path / "runs.json", tmp_path / "b") == 2
    assert common.unpack_runs_summary(tmp_path / "runs.json", tmp_path / "b") == 0  # kept, not rewritten
    runs = common.load_saved(tmp_path / "b", configs, ["trial"])
    assert [r["result"]["final_loss"] for r in runs] == [1.0, 2.0]
    assert math.isnan(runs[1]["metrics"][0]["sharpness"]) and runs[1]["metrics"][0]["loss"] == 1.5


def test_unpacking_refuses_what_is_not_a_runs_summary(tmp_path):
    import pytest
    (tmp_path / "x.json").write_text(json.dumps({"groups": []}))
    (tmp_path / "y.json").write_text(json.dumps([{"name": "../up", "config": {}, "result": {}, "metrics": []}]))
    for name in ("x.json", "y.json"):
        with pytest.raises(ValueError):
            common.unpack_runs_summary(tmp_path / name, tmp_path / "out")
    assert not (tmp_path / "up").exists()
