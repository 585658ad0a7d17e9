"""The estimator section of common.py can be copied whole into another project."""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SOURCE = (Path(__file__).resolve().parent.parent / "common.py").read_text()


def estimator_section():
    start = SOURCE.index("# 1. Estimators")
    end = SOURCE.index("# 2. Data")
    return SOURCE[SOURCE.rindex("\n", 0, start):SOURCE.rindex("# ====", 0, end)]


def test_section_runs_with_only_its_stated_imports():
    section = estimator_section()
    assert not [line for line in section.splitlines() if line.startswith(("import ", "from "))]
    # names the section might borrow from the rest of common.py (np, F, nn, math) are absent
    namespace = {}
    exec("from dataclasses import dataclass, field\nimport torch\n" + section, namespace)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(3, (10,))
    for name in ("sharpness", "gauss_newton_norm"):
        copied = namespace[name](model, F.cross_entropy, [(x, y)])
        assert copied == getattr(common, name)(model, F.cross_entropy, [(x, y)])
    assert namespace["jacobian_norm"](model, x) == common.jacobian_norm(model, x)
    assert namespace["jacobian_norm"](model, x, method="power") > 0

