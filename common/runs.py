"""Runs: one directory per run with its resolved config, metrics and result, atomic saving,
checkpoints and resume, and loading saved runs for plotting (`--plot-only`)."""
import hashlib
import json
import math
import os
import pickle
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

def atomic_write(path, write, mode="wb"):
    """Writes a file by `write(f)` on a temporary file next to it, then os.replace: readers see
    the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name opened with "x" (not mkstemp, whose files are private 0600): the file gets
    # the permissions any other file written here would get.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _jsonable(obj):
    """Non-finite floats become None (strict JSON has no NaN); tensors and numpy become lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_json(path, obj):
    """Atomically writes obj as JSON (NaN and inf stored as null)."""
    text = json.dumps(_jsonable(obj), indent=1, allow_nan=False)
    atomic_write(path, lambda f: f.write(text + "\n"), mode="w")


def load_json(path):
    with open(path) as f:
        return json.load(f)


def save_torch(path, obj):
    atomic_write(path, lambda f: torch.save(obj, f))


def config_hash(config):
    """8 hex digits identifying a resolved config (key order does not matter)."""
    text = json.dumps(_jsonable(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_name(config, keys):
    """Directory name of a run: the `keys` settings readable, then a hash of the whole config,
    e.g. "activation=relu_scale=0.5_trial=0-3f2a9c1e". Two configs differing anywhere (say a
    smoke run and the paper's run) never share a directory. Keys absent from the config are
    left out: a setting added to a script after runs were saved, absent while off, leaves those
    runs' names (and hashes) as they were."""
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    readable = "_".join(f"{k}={fmt(config[k])}" for k in keys if k in config)
    # "+" is kept: 1e+06 and 1e-06 must not share a name.
    readable = "".join(c if c.isalnum() or c in "=._+-" else "-" for c in readable)
    return f"{readable}-{config_hash(config)}"


class DamagedRun(Exception):
    """A run folder holds a file that cannot be read (e.g. truncated by a full disk)."""

    def __init__(self, path, reason):
        self.path, self.reason = Path(path), reason
        super().__init__(f"damaged results file {self.path} ({reason}): rerun with --restart to "
                         f"move {self.path.parent} aside and start that run again")


# Set by the scripts' --restart flag: damaged run folders are moved aside instead of refused.
RESTART_DAMAGED = False

# What the interrupt message reports: the last step logged by any run of this process.
PROGRESS = {"step": None}


def _read(path, load):
    """load(path), or DamagedRun naming the file if it cannot be read."""
    try:
        return load(path)
    except (OSError, ValueError, EOFError, RuntimeError, KeyError, TypeError,
            pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedRun(path, f"{type(e).__name__}: {reason}"[:200]) from None


def load_checkpoint(path):
    """A checkpoint file's contents, read with torch.load(weights_only=True): tensors and plain
    data (numbers, strings, None, lists, tuples, dicts, OrderedDicts) only, on the CPU.

    A pickle can run any code while it loads, so a file holding anything else, such as one
    planted in a results folder, is refused as DamagedRun and nothing in it is run.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. about the pickle protocol: errors stay one line
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        held = f"it holds {found.group(1)}, " if found else ""
        raise DamagedRun(path, f"refused by torch.load(weights_only=True): {held}not only "
                               f"tensors and plain data") from None
    except Exception as e:  # weights_only ran nothing from the file: any failure is a bad file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedRun(path, f"{type(e).__name__}: {reason}"[:200]) from None


def move_aside(run_dir):
    """Renames a damaged run folder to `<name>.damaged-<time>` (never deletes); returns the new
    path."""
    run_dir = Path(run_dir)
    target = run_dir.with_name(f"{run_dir.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    while target.exists():
        target = target.with_name(target.name + "x")
    os.replace(run_dir, target)
    print(f"moved damaged run {run_dir} aside to {target}")
    return target


def pending_runs(out, configs, keys):
    """The configs whose runs are not finished yet; prints "<run>: already finished, skipping"
    for each of the others."""
    pending = []
    for config in configs:
        run = Run(out, config, keys)
        if run.done:
            print(f"{run.dir.name}: already finished, skipping")
        else:
            pending.append(config)
    return pending


class Run:
    """One run's directory: config.json, metrics.json, checkpoint.pt while running, result.json
    when over (finished or diverged). All writes are atomic.

    Use:
        run = Run(out, config, keys=("activation", "trial"))
        if run.done: return run.load()           # finished earlier: skip
        state = run.begin()                      # None, or the last checkpoint's state
        ... run.log(step, loss=...); run.checkpoint(lambda: {...}) ...
        run.finish("finished" or "diverged", **summary)

    With writer=False (every rank but the main one of a torchrun job) nothing is written:
    `begin` only reads the checkpoint, `checkpoint` and `finish` do nothing.
    """

    def __init__(self, out, config, keys, checkpoint_seconds=300.0, writer=True):
        self.config = dict(config)
        self.writer = writer
        self.dir = Path(out) / run_name(self.config, keys)
        self.metrics = []
        self.checkpoint_seconds = checkpoint_seconds
        self._last_checkpoint = time.monotonic()

    @property
    def done(self):
        """Whether the run is saved (result.json). A saved run whose files cannot be read raises
        DamagedRun, or with --restart (RESTART_DAMAGED) is moved aside and counts as not done."""
        if not (self.dir / "result.json").exists():
            return False
        try:
            load_run(self.dir)
        except DamagedRun:
            if not RESTART_DAMAGED:
                raise
            move_aside(self.dir)
            return False
        return True

    def begin(self, device="cpu", **record):
        """Creates the directory and config.json (resolved config, seed, torch version, device,
        and `record`, e.g. world_size: outside the config, so not in the hash); returns the last
        checkpoint's state dict, restoring the metrics logged up to it, or None. A damaged run
        raises DamagedRun, or with --restart is moved aside and begun afresh."""
        try:
            return self._begin(device, record)
        except DamagedRun:
            if not RESTART_DAMAGED:
                raise
            move_aside(self.dir)
            self.metrics = []
            return self._begin(device, record)

    def _begin(self, device, record):
        if self.writer:
            self._write_meta(device, record)
        self._last_checkpoint = time.monotonic()
        path = self.dir / "checkpoint.pt"
        if not path.exists():
            return None
        saved = load_checkpoint(path)
        rows = saved.get("metrics") if isinstance(saved, dict) else None
        if not (isinstance(rows, list) and "state" in saved
                and all(isinstance(m, dict) and "step" in m for m in rows)):
            raise DamagedRun(path, "not a checkpoint of this project")
        self.metrics = saved["metrics"]
        PROGRESS["step"] = self.metrics[-1]["step"] if self.metrics else None
        return saved["state"]

    def _write_meta(self, device, record):
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"config": self.config, "seed": self.config.get("seed"), "torch": torch.__version__,
                "device": str(device), "threads": torch.get_num_threads(),
                "python": sys.version.split()[0], "argv": sys.argv, **record, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if (self.dir / "config.json").exists():  # resuming: keep the first record, note the restart
            old = _read(self.dir / "config.json", load_json)
            meta = {**old, "resumed": old.get("resumed", []) + [
                {"device": str(device), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), **record,
                 "at": meta["started"]}]}
        save_json(self.dir / "config.json", meta)

    def log(self, step, **metrics):
        """Records metrics measured at `step` (floats; NaN is kept as None, as JSON stores it)."""
        self.metrics.append({"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}})
        PROGRESS["step"] = int(step)

    def checkpoint(self, state, force=False):
        """Saves state() (e.g. model and optimizer state dicts, next step) with the metrics so far,
        if `checkpoint_seconds` have passed since the last save or force; returns whether it did."""
        if not self.writer:
            return False
        if not force and time.monotonic() - self._last_checkpoint < self.checkpoint_seconds:
            return False
        save_torch(self.dir / "checkpoint.pt", {"state": state(), "metrics": self.metrics})
        save_json(self.dir / "metrics.json", self.metrics)
        self._last_checkpoint = time.monotonic()
        return True

    def finish(self, status="finished", **summary):
        """Writes metrics.json and result.json (status: "finished" or "diverged", plus summary);
        the checkpoint is then deleted. A rerun skips a run with result.json."""
        if not self.writer:
            return
        save_json(self.dir / "metrics.json", self.metrics)
        save_json(self.dir / "result.json", {"status": status, **summary,
                                             "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        (self.dir / "checkpoint.pt").unlink(missing_ok=True)

    def load(self):
        return load_run(self.dir)


def training_state(next_step, model, optimizer=None, **extra):
    """What a checkpoint needs to continue a run exactly: the next step, model and optimizer
    state dicts, torch's RNG state, and any extra items: tensors and plain data only (numbers,
    strings, None, lists, tuples, dicts), as checkpoints are read with weights_only=True."""
    return {"step": next_step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": torch.get_rng_state(), **extra}


def restore_training_state(state, model, optimizer=None):
    """Loads a `training_state` into model and optimizer; returns the step to continue from."""
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"]


def load_run(run_dir):
    """A saved run as {"dir", "config", "meta", "metrics", "result"}; NaN stored as null comes
    back as NaN in metrics."""
    run_dir = Path(run_dir)
    meta = _read(run_dir / "config.json", load_json)
    metrics = _read(run_dir / "metrics.json", load_json) if (run_dir / "metrics.json").exists() else []
    result = _read(run_dir / "result.json", load_json) if (run_dir / "result.json").exists() else None
    for path, value, kind in (("config.json", meta, dict), ("metrics.json", metrics, list),
                              ("result.json", result, (dict, type(None)))):
        if not isinstance(value, kind) or (path == "config.json" and "config" not in value):
            raise DamagedRun(run_dir / path, "unexpected content")
    if not all(isinstance(m, dict) for m in metrics):
        raise DamagedRun(run_dir / "metrics.json", "unexpected content")
    metrics = [{k: (math.nan if v is None else v) for k, v in m.items()} for m in metrics]
    return {"dir": run_dir, "config": meta["config"], "meta": meta, "metrics": metrics, "result": result}


def load_saved(out, configs, keys):
    """The saved runs (finished or diverged) of these configs, in order; runs not saved (yet)
    are left out. Plotting reads results through this alone, so `--plot-only` needs no training."""
    runs = [Run(out, config, keys) for config in configs]
    return [run.load() for run in runs if run.done]


# What a runs summary keeps of each run's config.json beside its config, result and metrics.
SUMMARY_META = ("seed", "torch", "device", "threads", "world_size")


def save_runs_summary(runs, path):
    """Writes loaded runs (name, config, result, metrics, seed, torch, device, CPU threads) as one
    JSON file beside the figures, so the numbers behind a committed figure are committed with it."""
    save_json(path, [{"name": Path(r["dir"]).name, "config": r["config"], "result": r["result"],
                      "metrics": r["metrics"], **{k: r["meta"].get(k) for k in SUMMARY_META}}
                     for r in runs])


def metric_series(run, name):
    """(steps, values) numpy arrays of one metric of a loaded run, NaN where it was not finite."""
    rows = [m for m in run["metrics"] if name in m]
    steps = np.array([m["step"] for m in rows], dtype=np.int64)
    values = np.array([math.nan if m[name] is None else m[name] for m in rows], dtype=np.float64)
    return steps, values



def unpack_runs_summary(path, out):
    """Writes the runs of a saved runs summary (the runs.json of save_runs_summary, e.g. a
    committed plots/**/*runs.json) as run folders under `out`: config.json, metrics.json and
    result.json, which is what load_saved and so `--plot-only` read. Folders with a result.json
    already there are left alone. Returns the number of runs written; ValueError if the file is
    not such a summary."""
    runs = load_json(path)
    fields = {"name", "config", "result", "metrics"}
    if not (isinstance(runs, list) and runs and all(isinstance(r, dict) and fields <= r.keys() for r in runs)):
        raise ValueError("not a runs summary (a list of runs with name, config, result and metrics)")
    written = 0
    for r in runs:
        if not isinstance(r["name"], str) or Path(r["name"]).name != r["name"] or r["name"] in ("", ".", ".."):
            raise ValueError(f"run name {r['name']!r} is not a folder name")
        run_dir = Path(out) / r["name"]
        if (run_dir / "result.json").exists():
            continue
        meta = {"config": r["config"], **{k: r[k] for k in SUMMARY_META if r.get(k) is not None},
                "unpacked_from": str(path)}
        save_json(run_dir / "config.json", meta)
        save_json(run_dir / "metrics.json", r["metrics"])
        save_json(run_dir / "result.json", r["result"])  # last: a folder with it is a saved run
        written += 1
    return written
