"""The estimators on the models users bring (attention, LayerNorm, GroupNorm, frozen parameters,
dropout), each against dense float64 truth on a tiny instance, and their refusals of bad input.

References: torch.autograd.functional.hessian / jacobian of a functional version of the model
(torch.func.functional_call) in float64, with every module in eval mode and the math attention
backend (the fused kernels have no double backward)."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from common.estimators import (ConvergenceWarning, gauss_newton_norm, jacobian_norm, math_attention,
                               sharpness, top_eigenvalues)
from references import flat_function

TOL = dict(tol=1e-10, max_iter=400)


# -------------------------------------------------------------------------- models


class CausalSelfAttention(nn.Module):
    """Attention written as users write it: F.scaled_dot_product_attention with dropout in
    training and a causal mask; then a linear head."""

    def __init__(self, d=4, heads=2, tokens=3, classes=3):
        super().__init__()
        self.heads, self.p = heads, 0.5
        self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(tokens * d, classes)

    def forward(self, x):  # (N, T, d)
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           dropout_p=self.p if self.training else 0.0,
                                           is_causal=True)
        return self.head((x + a.transpose(1, 2).reshape(n, t, d)).flatten(1))


class MHAModel(nn.Module):
    """nn.MultiheadAttention (attention dropout) used directly, need_weights=False."""

    def __init__(self, d=4, tokens=3, classes=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(tokens * d, classes)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.tanh(a).flatten(1))


def transformer_block():
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.2, batch_first=True)
    return nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 3))


def groupnorm_cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


def layernorm_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(),
                         nn.Dropout(0.5), nn.Linear(8, 3))


def frozen_mlp():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
                          nn.Linear(5, 3))
    model[1].requires_grad_(False)  # a frozen first layer (e.g. a pretrained embedding)
    model[5].bias.requires_grad_(False)
    return model


MODELS = {  # name: (constructor, input shape of one example)
    "transformer-block": (transformer_block, (3, 4)),
    "sdpa-causal-dropout": (CausalSelfAttention, (3, 4)),
    "multihead-attention": (MHAModel, (3, 4)),
    "groupnorm-cnn": (groupnorm_cnn, (2, 3, 3)),
    "layernorm-dropout-mlp": (layernorm_mlp, (2, 3)),
    "frozen-parameters": (frozen_mlp, (2, 3)),
}


def make(name, seed=0):
    build, shape = MODELS[name]
    torch.manual_seed(seed)
    model = build().double().train()  # train mode: the estimators must switch dropout off
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(n, *shape, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (n,), generator=g)) for n in (4, 3)]
    return model, batches


# -------------------------------------------------------------------------- dense references


class reference_mode:
    """Every module in eval mode and math attention, restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = [m.training for m in self.model.modules()]
        self.model.eval()
        self.attention = math_attention()
        self.attention.__enter__()

    def __exit__(self, *exc):
        self.attention.__exit__(*exc)
        for m, t in zip(self.model.modules(), self.flags):
            m.training = t


def trainable(model):
    return flat_function(model, trainable_only=True)


def dense_hessian(model, loss_fn, batches):
    flat0, unflat = trainable(model)
    total = sum(len(x) for x, _ in batches)

    def loss(flat):
        return sum(len(x) / total * loss_fn(functional_call(model, unflat(flat), (x,)), y)
                   for x, y in batches)
    with reference_mode(model):
        return hessian(loss, flat0)


def dense_gauss_newton(model, loss_fn, batches):
    flat0, unflat = trainable(model)
    total = sum(len(x) for x, _ in batches)
    g = torch.zeros(len(flat0), len(flat0), dtype=torch.float64)
    with reference_mode(model):
        for x, y in batches:
            f = lambda flat: functional_call(model, unflat(flat), (x,))  # noqa: E731
            z0 = f(flat0).detach()
            jac = jacobian(f, flat0).reshape(z0.numel(), -1)
            hz = hessian(lambda z: loss_fn(z, y), z0).reshape(z0.numel(), z0.numel())
            g += len(x) / total * jac.T @ hz @ jac
    return g


def dense_jacobian_norm(model, x):
    with reference_mode(model):
        norms = [torch.linalg.matrix_norm(
            jacobian(lambda xi: torch.softmax(model(xi[None])[0], 0), xi).reshape(-1, xi.numel()),
            2) for xi in x]
    return max(norms).item()


def top(matrix):
    return torch.linalg.eigvalsh(matrix)[-1].item()


def rel(a, b):
    return abs(a - b) / abs(b)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


def assert_unchanged(model, before):
    state, flags, grads = before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads


def sdpa_flags():
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled())


# -------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(MODELS))
def test_sharpness_matches_dense_hessian(name):
    model, batches = make(name)
    before, flags = snapshot(model), sdpa_flags()
    got = sharpness(model, F.cross_entropy, batches, **TOL)
    assert rel(got, top(dense_hessian(model, F.cross_entropy, batches))) < 1e-7
    assert_unchanged(model, before)
    assert sdpa_flags() == flags


@pytest.mark.parametrize("name", list(MODELS))
def test_gauss_newton_norm_matches_dense(name):
    model, batches = make(name, seed=3)
    before = snapshot(model)
    got = gauss_newton_norm(model, F.cross_entropy, batches, **TOL)
    assert rel(got, top(dense_gauss_newton(model, F.cross_entropy, batches))) < 1e-7
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", list(MODELS))
def test_jacobian_norm_matches_dense(name):
    model, batches = make(name, seed=5)
    before = snapshot(model)
    x = batches[0][0]  # (N, T, d) for the sequence models: each sample's Jacobian is (C, T*d)
    assert rel(jacobian_norm(model, x), dense_jacobian_norm(model, x)) < 1e-9
    assert_unchanged(model, before)


def test_measurements_are_deterministic_with_dropout_in_train_mode():
    model, batches = make("sdpa-causal-dropout")
    values = {sharpness(model, F.cross_entropy, batches, **TOL) for _ in range(2)}
    assert len(values) == 1
    assert model.training


def test_user_sdpa_backend_choice_is_restored():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model, batches = make("transformer-block")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        inside = sdpa_flags()
        sharpness(model, F.cross_entropy, batches, tol=1e-3)
        jacobian_norm(model, batches[0][0])
        assert sdpa_flags() == inside


def test_bn_running_stats_untouched_with_attention():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.attn = MHAModel()

        def forward(self, x):  # (N, 3, 4): BN over the token axis as channels
            return self.attn(self.bn(x))
    torch.manual_seed(0)
    model = Net().double()
    model(torch.randn(8, 3, 4, dtype=torch.float64))  # non-trivial running statistics
    before = snapshot(model)
    _, batches = make("multihead-attention")
    sharpness(model, F.cross_entropy, batches, tol=1e-4)
    gauss_newton_norm(model, F.cross_entropy, batches, tol=1e-4)
    jacobian_norm(model, batches[0][0])
    assert_unchanged(model, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transformer_block_on_cuda_matches_cpu():
    model, batches = make("transformer-block")
    cpu = sharpness(model, F.cross_entropy, batches, **TOL)
    gpu = sharpness(model.cuda(), F.cross_entropy, [(x.cuda(), y.cuda()) for x, y in batches],
                    **TOL)
    assert rel(gpu, cpu) < 1e-6
    assert rel(jacobian_norm(model, batches[0][0].cuda()),
               jacobian_norm(model.cpu(), batches[0][0])) < 1e-6


# -------------------------------------------------------------------------- refusals


def with_nan(t):
    t = t.clone()
    t.view(-1)[0] = math.nan
    return t


@pytest.mark.parametrize("where", ["inputs", "targets", "parameters"])
@pytest.mark.parametrize("estimator", ["sharpness", "gauss_newton_norm", "jacobian_norm"])
def test_non_finite_values_raise_value_error(where, estimator):
    model, batches = make("layernorm-dropout-mlp")
    x, y = batches[0]
    if where == "targets":
        if estimator == "jacobian_norm":
            pytest.skip("jacobian_norm takes no targets")
        y = F.one_hot(y, 3).double()
        y[0, 0] = math.inf
    if where == "inputs":
        x = with_nan(x)
    if where == "parameters":
        with torch.no_grad():
            model[1].weight[0, 0] = math.inf
    call = {"sharpness": lambda: sharpness(model, F.cross_entropy, [(x, y)]),
            "gauss_newton_norm": lambda: gauss_newton_norm(model, F.cross_entropy, [(x, y)]),
            "jacobian_norm": lambda: jacobian_norm(model, x)}[estimator]
    with pytest.raises(ValueError, match=f"{where}.*NaN or inf"):
        call()


class NoParameters(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :3]


@pytest.mark.parametrize("call", [
    lambda m, b: sharpness(m, F.cross_entropy, b),
    lambda m, b: gauss_newton_norm(m, F.cross_entropy, b),
    lambda m, b: jacobian_norm(m, b[0][0]),
])
def test_model_without_parameters_raises_value_error(call):
    _, batches = make("layernorm-dropout-mlp")
    with pytest.raises(ValueError, match="no parameters"):
        call(NoParameters(), batches)


def test_all_frozen_raises_value_error():
    model, batches = make("frozen-parameters")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sharpness(model, F.cross_entropy, batches)


def test_one_dimensional_outputs_raise_in_jacobian_norm():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 1), nn.Flatten(0)).double()
    with pytest.raises(ValueError, match=r"\(N, C\) outputs"):
        jacobian_norm(model, torch.randn(4, 2, 3, dtype=torch.float64))


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x):
        return self.linear(x.flatten(1)).detach()


@pytest.mark.parametrize("call, match", [
    (lambda m, b: sharpness(m, F.cross_entropy, b), "does not depend"),
    (lambda m, b: gauss_newton_norm(m, F.cross_entropy, b), "do not depend"),
    (lambda m, b: jacobian_norm(m, b[0][0]), "do not depend"),
])
def test_outputs_not_connected_raise_value_error(call, match):
    _, batches = make("layernorm-dropout-mlp")
    with pytest.raises(ValueError, match=match):
        call(Detached().double(), batches)


def test_unconverged_solver_warns():
    model, batches = make("transformer-block")
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        info = sharpness(model, F.cross_entropy, batches, tol=1e-12, max_iter=2, return_info=True)
    assert not info.converged
    with pytest.warns(ConvergenceWarning):
        top_eigenvalues(lambda v: torch.arange(1.0, 51.0) * v, 50, tol=1e-14, max_iter=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        sharpness(model, F.cross_entropy, batches, tol=1e-3, max_iter=100)  # converges: silent


def test_measurements_record_convergence():
    from common.measurements import end_of_training_metrics, progressive_sharpening_metrics
    from common.data import Data
    model, batches = make("layernorm-dropout-mlp")
    x, y = batches[0]
    row = progressive_sharpening_metrics(model, F.cross_entropy, x, y, tol=1e-12, max_iter=2)
    assert row["sharpness_converged"] is False
    data = Data(x, y, x, y, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # recorded, not warned
        out = end_of_training_metrics(model, F.cross_entropy, data, 0, measure_size=4,
                                      ghost_batch_size=4, eig_tol=1e-12, eig_max_iter=2,
                                      gauss_newton=True)
    assert out["sharpness_converged"] is False and out["gauss_newton_converged"] is False
