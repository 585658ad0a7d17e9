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
