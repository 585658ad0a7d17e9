"""Data parallelism on CPU (gloo, 2 processes on 127.0.0.1): the estimators with each rank
holding part of the batches match one process holding all of them within float64 rounding,
the shared ghost-batch gradient matches one process (gradients and BN running statistics), and
`fullbatch.py --smoke` under torchrun matches one process within float32 rounding."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from common.estimators import (gauss_newton_norm, gauss_newton_operator, hessian_operator,
                               jacobian_norm, sharpness)
from common.training import ghost_batch_gradient

pytestmark = pytest.mark.slow  # every test launches two processes

ROOT = Path(__file__).resolve().parent.parent
SIZES = [7, 5, 6, 4, 3]  # rank 0 takes the first 2 batches (12 examples), rank 1 the other 3
SPLIT = 2
X_SPLIT = 9  # jacobian_norm: rank 0 takes 9 of the 25 inputs, rank 1 16
RTOL = 1e-10


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models():
    """float64 models: an MLP with BatchNorm (train mode when measured) and a small CNN with
    BatchNorm2d, identical in every process (fixed seed); BN running statistics not trivial."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8),
                              torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(16, 3)).double()
    for m in (mlp, cnn):
        for bn in m.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    return {"mlp": mlp, "cnn": cnn}


def _data():
    g = torch.Generator().manual_seed(1)
    x = {"mlp": torch.randn(sum(SIZES), 3, 2, 2, generator=g, dtype=torch.float64),
         "cnn": torch.randn(sum(SIZES), 3, 4, 4, generator=g, dtype=torch.float64)}
    y = torch.randint(0, 3, (sum(SIZES),), generator=g)
    v = torch.randn(1000, generator=g, dtype=torch.float64)
    return x, y, v


def _batches(x, y):
    bounds = torch.tensor([0] + SIZES).cumsum(0).tolist()
    return [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _measure(batches, x_jac, group):
    """Every estimator on each model, given this process's batches / Jacobian inputs."""
    x, y, v = _data()
    out = {}
    for name, model in _models().items():
        loss = F.cross_entropy
        mine = batches(x[name], y)
        dim = sum(p.numel() for p in model.parameters())
        out[name] = {
            "sharpness": sharpness(model, loss, mine, tol=1e-9, max_iter=60,
                                   process_group=group),
            "sharpness_k2": sharpness(model, loss, mine, k=2, tol=1e-9, max_iter=60,
                                      process_group=group),
            "sharpness_power": sharpness(model, loss, mine, method="power", tol=1e-3,
                                         max_iter=20, process_group=group),
            "gauss_newton": gauss_newton_norm(model, loss, mine, tol=1e-9, max_iter=60,
                                              process_group=group),
            "hv": hessian_operator(model, loss, mine, process_group=group)[0](v[:dim]),
            "hv_rebuilt": hessian_operator(model, loss, mine, reuse_graph=False,
                                           process_group=group)[0](v[:dim]),
            "gv": gauss_newton_operator(model, loss, mine, process_group=group)[0](v[:dim]),
            "jacobian": jacobian_norm(model, x_jac(x[name]), batch_size=4, process_group=group),
            "jacobian_logits": jacobian_norm(model, x_jac(x[name]), softmax=False,
                                             process_group=group),
        }
    return out


def _step(model, x, y, group):
    """One shared ghost-batch gradient (3 uneven ghost batches of 10 over the ranks)."""
    model.train()
    loss, accuracy = ghost_batch_gradient(model, F.cross_entropy, x, y, 10, group)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return {"loss": loss, "accuracy": accuracy,
            "grads": [p.grad.clone() for p in model.parameters()],
            "running": [t.clone() for m in bns for t in (m.running_mean, m.running_var,
                                                          m.num_batches_tracked)]}


def _steps(group):
    x, y, _ = _data()
    return {name: _step(model, x[name], y, group) for name, model in _models().items()}


def _worker(rank, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        group = dist.group.WORLD
        cut = lambda items, k: items[:k] if rank == 0 else items[k:]  # noqa: E731
        result = {
            "split": _measure(lambda x, y: cut(_batches(x, y), SPLIT),
                              lambda x: cut(x, X_SPLIT), group),
            # rank 1 holds no batch and no input: the uneven extreme
            "one_rank": _measure(lambda x, y: cut(_batches(x, y), len(SIZES)),
                                 lambda x: cut(x, len(x)), group),
            "step": _steps(group),
            # no process_group: local, although the group is initialised
            "local": _measure(lambda x, y: cut(_batches(x, y), SPLIT),
                              lambda x: cut(x, X_SPLIT), None)["mlp"]["sharpness"],
        }
        torch.save(result, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(path)), nprocs=2, join=True)
    return [torch.load(path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_estimators_match_one_process(ranks):
    reference = _measure(lambda x, y: _batches(x, y), lambda x: x, None)
    worst = 0.0
    for case in ("split", "one_rank"):
        for r, result in enumerate(ranks):
            for name, values in reference.items():
                for key, want in values.items():
                    rel = _rel(result[case][name][key], want)
                    assert rel <= RTOL, (case, r, name, key, rel)
                    worst = max(worst, rel)
    print(f"estimators, 2 ranks vs 1 process: max relative difference {worst:.2e}")


def test_without_group_the_estimators_stay_local(ranks):
    x, y, _ = _data()
    batches = _batches(x["mlp"], y)
    for r, cut in enumerate((batches[:SPLIT], batches[SPLIT:])):
        want = sharpness(_models()["mlp"], F.cross_entropy, cut, tol=1e-9, max_iter=60)
        assert ranks[r]["local"] == pytest.approx(want, rel=RTOL)


def test_shared_ghost_batch_gradient_matches_one_process(ranks):
    reference = _steps(None)
    worst = 0.0
    for result in ranks:
        for name, want in reference.items():
            got = result["step"][name]
            assert got["loss"] == pytest.approx(want["loss"], rel=RTOL)
            assert got["accuracy"] == want["accuracy"]
            for a, b in zip(got["grads"] + got["running"], want["grads"] + want["running"]):
                worst = max(worst, _rel(a, b))
    assert worst <= RTOL
    print(f"ghost-batch step, 2 ranks vs 1 process: max relative difference {worst:.2e}")


def test_share_splits_unevenly(monkeypatch):
    import common.distributed as cd
    monkeypatch.setattr(cd, "world_size", lambda group=None: 3)
    shares = []
    for r in range(3):
        monkeypatch.setattr(cd, "rank", lambda group=None, r=r: r)
        shares.append(cd.share(7, "group"))
    assert shares == [(0, 3), (3, 5), (5, 7)]
    monkeypatch.setattr(cd, "world_size", lambda group=None: 4)
    assert cd.share(2, "group") == (2, 2)  # rank 2 of 4: no item


@pytest.mark.slow
def test_fullbatch_smoke_two_ranks_matches_one_process(tmp_path):
    # 3 uneven ghost batches (24, 24, 16) per step, 2 measurement ghost batches (24, 16)
    flags = ["--smoke", "--trials", "1", "--smoothings", "0", "--ghost-batch-size", "24",
             "--measure-size", "40", "--max-iterations", "2", "--measure-every", "1",
             "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launch in (("one", []), ("two", ["-m", "torch.distributed.run", "--nnodes=1",
                                              "--nproc_per_node=2", "--master_addr=127.0.0.1",
                                              f"--master_port={_free_port()}"])):
        subprocess.run([sys.executable, *launch, str(ROOT / "fullbatch.py"), *flags,
                        "--out", str(tmp_path / out)], cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=300)
    runs = sorted(p.name for p in (tmp_path / "one").iterdir() if p.name != "plots")
    assert runs and runs == sorted(p.name for p in (tmp_path / "two").iterdir()
                                   if p.name != "plots")  # same config hashes
    worst = 0.0
    for run in runs:
        one = json.loads((tmp_path / "one" / run / "metrics.json").read_text())
        two = json.loads((tmp_path / "two" / run / "metrics.json").read_text())
        assert [sorted(m) for m in one] == [sorted(m) for m in two]
        for a, b in zip(one, two):
            for key, value in a.items():
                if isinstance(value, float):
                    worst = max(worst, abs(value - b[key]) / max(abs(value), 1e-30))
                else:
                    assert value == b[key], (run, key)
        meta = json.loads((tmp_path / "two" / run / "config.json").read_text())
        assert meta["world_size"] == 2
    assert worst <= 1e-5
    print(f"fullbatch --smoke, 2 ranks vs 1 process: max relative difference {worst:.2e}")
