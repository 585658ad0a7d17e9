"""bn_mode_jacobian_norms: train-mode per-sample Jacobians through batch statistics."""
import torch
import torch.nn as nn

import common


def test_without_batchnorm_train_and_eval_jacobians_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(20, 3, 2, 2, dtype=torch.float64)
    out = common.bn_mode_jacobian_norms(model, x, [1, 5], samples=4)
    for b in (1, 5):
        assert out[b]["max_relative_difference"] < 1e-12
        torch.testing.assert_close(torch.tensor(out[b]["train"]), torch.tensor(out["eval"]))


def test_train_mode_jacobian_matches_a_dense_reference_through_batch_statistics():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = common.bn_mode_jacobian_norms(model, x, [10], samples=1, seed=3)
    assert model.training  # flags restored
    for k, v in model.state_dict().items():  # running statistics untouched by the measurement
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    # the same batch the function draws: sample 0 and 9 others (all of x, in some order);
    # batch statistics do not depend on the order, so J_0 is that of x with x_0 moving
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats = False  # batch statistics, running buffers unused

    def g0(x0):
        return torch.softmax(model(torch.cat([x0[None], x[1:]])), 1)[0]

    want = torch.linalg.matrix_norm(torch.autograd.functional.jacobian(g0, x[0]), ord=2).item()
    assert abs(out[10]["train"][0] - want) <= 1e-10 * want
