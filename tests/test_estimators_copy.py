"""common/estimators.py copied alone into an empty folder works there, against dense float64
truth built in a subprocess that cannot see the rest of the repository."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ESTIMATORS = Path(__file__).resolve().parent.parent / "common" / "estimators.py"

CHECK = textwrap.dedent('''
    import sys
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from estimators import gauss_newton_norm, jacobian_norm, sharpness
    assert "common" not in sys.modules
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(3, (12,))
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def unflat(v):
        out, i = [], 0
        for s in shapes:
            n = s.numel()
            out.append(v[i:i + n].view(s))
            i += n
        return out

    def logits(v, xs):
        w1, b1, w2, b2 = unflat(v)
        return F.softplus(xs @ w1.T + b1) @ w2.T + b2

    loss = lambda v: F.cross_entropy(logits(v, x), y, label_smoothing=0.1)
    hessian = torch.autograd.functional.hessian(loss, flat)
    jac = torch.autograd.functional.jacobian(lambda v: logits(v, x), flat)  # (N, C, P)
    p = torch.softmax(logits(flat, x), 1)  # (N, C)
    # Hessian of smoothed cross entropy in the logits: diag(p) - p p^T, per example, / N
    hz = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    gn = torch.einsum("ncp,ncd,ndq->pq", jac, hz, jac) / len(x)
    per_sample = [torch.linalg.matrix_norm(torch.autograd.functional.jacobian(
        lambda xi: torch.softmax(model(xi[None]), 1)[0], x[i]), ord=2) for i in range(len(x))]
    fn = lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1)
    checks = {
        "sharpness": (sharpness(model, fn, [(x[:5], y[:5]), (x[5:], y[5:])], tol=1e-10),
                      torch.linalg.eigvalsh(hessian)[-1].item()),
        "gauss_newton": (gauss_newton_norm(model, fn, [(x[:7], y[:7]), (x[7:], y[7:])], tol=1e-10),
                         torch.linalg.eigvalsh(gn)[-1].item()),
        "jacobian": (jacobian_norm(model, x), max(per_sample).item()),
    }
    for name, (got, want) in checks.items():
        assert abs(got - want) <= 1e-8 * abs(want), (name, got, want)

    class Keyed(nn.Module):  # keyword inputs, dict outputs, as HuggingFace models
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, features):
            return {"logits": self.inner(features)}
    keyed = [({"features": x[:7]}, y[:7]), ({"features": x[7:]}, y[7:])]
    got = gauss_newton_norm(Keyed(model), fn, keyed, output_fn=lambda o: o["logits"], tol=1e-10)
    assert abs(got - checks["gauss_newton"][1]) <= 1e-8 * checks["gauss_newton"][1], got
    print("ok", {k: v[0] for k, v in checks.items()})
''')


@pytest.mark.slow  # a fresh Python importing torch: about 4 s
def test_estimators_file_alone_matches_dense_float64_truth(tmp_path):
    shutil.copy(ESTIMATORS, tmp_path / "estimators.py")
    (tmp_path / "check.py").write_text(CHECK)
    done = subprocess.run([sys.executable, "check.py"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PATH": "", "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


def test_estimators_file_imports_only_torch_and_the_standard_library():
    imports = [line.split()[1].split(".")[0] for line in ESTIMATORS.read_text().splitlines()
               if line.startswith(("import ", "from "))]
    assert set(imports) <= {"collections", "contextlib", "dataclasses", "inspect", "math",
                            "warnings", "torch"}, imports
    assert "copy this file" in ESTIMATORS.read_text().lower()


def test_estimators_file_cites_no_readme_and_never_recommends_group_world():
    """A copied file has no README beside it; and torch.distributed.group.WORLD is None before
    init_process_group (a silently local value), so the docstrings name it only as that
    warning and recommend "world"."""
    text = ESTIMATORS.read_text()
    assert "README" not in text
    docs = [line for line in text.splitlines() if "group.WORLD" in line and "=" not in line]
    assert docs and all("is None" in line for line in docs), docs
    assert 'pass "world"' in text and 'prefer "world"' in text
