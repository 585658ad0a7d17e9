"""The estimators on the models users bring (language models on integer tokens, recurrent
networks, regression, a BN CNN with a frozen layer in both BN modes, dict outputs and inputs,
variable-length batches, torch.compile), each against dense float64 truth on a tiny instance,
and their refusals of what they cannot measure.

References: torch.autograd.functional.hessian / jacobian of torch.func.functional_call over the
trainable parameters, every module in eval mode except BN in the mode under test (BN handled
by references.batch_stats_mode, written independently of MeasureMode), math attention."""
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from common.estimators import (MappingInput, gauss_newton_norm, gauss_newton_operator,
                               hessian_operator, jacobian_norm, math_attention, sharpness)
from references import assert_same_state, batch_stats_mode, cnn, flat_function
from references import state_of

TOL = dict(tol=1e-10, max_iter=400)
V, D, T = 5, 4, 3  # vocabulary, width, tokens


# -------------------------------------------------------------------------- models


class TinyGPT(nn.Module):
    """Token + position embeddings, one causal attention block, LayerNorm, and an output head
    tied to the token embedding; (N, T) integer tokens -> (N, T, V) logits."""

    def __init__(self, sdpa=False, max_len=6):
        super().__init__()
        self.sdpa = sdpa
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(max_len, D)
        if sdpa:
            self.qkv = nn.Linear(D, 3 * D)
        else:
            self.attn = nn.MultiheadAttention(D, 2, dropout=0.2, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, tokens):  # (N, T)
        n, t = tokens.shape
        h = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))  # (N, T, D)
        if self.sdpa:
            q, k, v = self.qkv(h).view(n, t, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (N, 2, T, D/2)
            a = a.transpose(1, 2).reshape(n, t, D)
        else:
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tokens.device), 1)
            a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.head(self.norm(h + a))  # (N, T, V)


class Encoder(nn.Module):
    """nn.TransformerEncoder over embedded tokens, mean-pooled, to 3 classes."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        layer = nn.TransformerEncoderLayer(D, 2, 6, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(D, 3)

    def forward(self, tokens):
        return self.head(self.encoder(self.tok(tokens)).mean(1))


class Recurrent(nn.Module):
    """Embedding -> LSTM or GRU -> last hidden state -> 3 classes."""

    def __init__(self, cell):
        super().__init__()
        self.tok = nn.Embedding(V, 3)
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        out, _ = self.rnn(self.tok(tokens))
        return self.head(out[:, -1])


class DictOut(nn.Module):
    """A HuggingFace-style model: keyword inputs, a dict of outputs."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, features, scale=None):
        logits = self.body(features if scale is None else features * scale)
        return {"logits": logits, "hidden": logits.detach()}


def lm_loss(out, y):  # (N, T, V) logits, (N, T) next tokens
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class FlatGPT(nn.Module):
    """TinyGPT whose logits come flattened over positions, (N * T, V), as many training loops
    do; its targets are flattened to (N * T,) too."""

    def __init__(self):
        super().__init__()
        self.gpt = TinyGPT()

    def forward(self, tokens):
        out = self.gpt(tokens)  # (N, T, V)
        return out.reshape(-1, out.shape[-1])


def flat_targets(batches):
    return [(x, y.reshape(-1)) for x, y in batches]


def tokens(sizes, lengths, classes=None, seed=1):
    """Batches of integer tokens; targets the next tokens (classes=None) or class labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, t in zip(sizes, lengths):
        x = torch.randint(V, (n, t), generator=g)
        y = torch.randint(V, (n, t), generator=g) if classes is None else \
            torch.randint(classes, (n,), generator=g)
        out.append((x, y))
    return out


def floats(sizes, shape, seed=1, classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=torch.float64),
             torch.randint(classes, (n,), generator=g)) for n in sizes]


def built(make, seed=0):
    torch.manual_seed(seed)
    return make().double().train()  # train mode: the estimators must switch dropout off


# -------------------------------------------------------------------------- dense references


class reference_mode:
    """Every module in eval mode except BN (batch statistics, no running ones, if bn_train);
    math attention; restored after."""

    def __init__(self, model, bn_train=False):
        self.inner, self.model = batch_stats_mode(model, bn_train), model

    def __enter__(self):
        self.inner.__enter__()
        for m in self.model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.training = False
        self.attention = math_attention()
        self.attention.__enter__()

    def __exit__(self, *exc):
        self.attention.__exit__(*exc)
        self.inner.__exit__(*exc)


def call(model, params, x, output_fn):
    args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
    out = functional_call(model, params, args, kwargs)
    return out if output_fn is None else output_fn(out)


def examples(x):
    """A batch's weight: its examples (sequences, not tokens)."""
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def dense_hessian(model, loss_fn, batches, bn_train=False, output_fn=None):
    flat0, unflat = flat_function(model, trainable_only=True)
    total = sum(examples(x) for x, _ in batches)

    def loss(flat):
        return sum(examples(x) / total * loss_fn(call(model, unflat(flat), x, output_fn), y)
                   for x, y in batches)
    with reference_mode(model, bn_train):
        return hessian(loss, flat0)


def dense_gauss_newton(model, loss_fn, batches, bn_train=False, output_fn=None):
    flat0, unflat = flat_function(model, trainable_only=True)
    total = sum(examples(x) for x, _ in batches)
    g = torch.zeros(len(flat0), len(flat0), dtype=torch.float64)
    with reference_mode(model, bn_train):
        for x, y in batches:
            f = lambda flat: call(model, unflat(flat), x, output_fn)  # noqa: E731
            z0 = f(flat0).detach()
            jac = jacobian(f, flat0).reshape(z0.numel(), -1)
            hz = hessian(lambda z: loss_fn(z, y), z0).reshape(z0.numel(), z0.numel())
            g += examples(x) / total * jac.T @ hz @ jac
    return g


def dense_jacobian_norm(model, x, output_fn=None):
    def g(xi):
        out = model(xi[None])
        out = out if output_fn is None else output_fn(out)
        return torch.softmax(out[0], -1).reshape(-1)
    with reference_mode(model):
        return max(torch.linalg.matrix_norm(jacobian(g, xi).reshape(-1, xi.numel()), 2).item()
                   for xi in x)


def top(matrix):
    return torch.linalg.eigvalsh(matrix)[-1].item()


def rel(a, b):
    return abs(a - b) / abs(b)


# -------------------------------------------------------------------------- values


CASES = {  # name: (model, loss_fn, batches); batches of unequal sizes (and lengths)
    "gpt-multihead-attention": (lambda: built(TinyGPT), lm_loss, tokens((4, 2), (3, 5))),
    "gpt-sdpa-causal": (lambda: built(lambda: TinyGPT(sdpa=True)), lm_loss,
                        tokens((4, 2), (3, 5))),
    "gpt-flattened-positions": (lambda: built(FlatGPT), F.cross_entropy,
                                flat_targets(tokens((4, 2), (3, 5)))),
    "transformer-encoder": (lambda: built(Encoder), F.cross_entropy, tokens((3, 2), (3, 4), 3)),
    "lstm": (lambda: built(lambda: Recurrent(nn.LSTM)), F.cross_entropy,
             tokens((3, 2), (4, 2), 3)),
    "gru": (lambda: built(lambda: Recurrent(nn.GRU)), F.cross_entropy,
            tokens((3, 2), (4, 2), 3)),
    "mse-regression": (lambda: built(lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(),
                                                           nn.Linear(6, 2))),
                       nn.MSELoss(), [(x, torch.randn(len(x), 2, dtype=torch.float64))
                                      for x, _ in floats((5, 3), (4,))]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sharpness_and_gauss_newton_match_dense(name):
    make, loss_fn, batches = CASES[name]
    model = make()
    before = state_of(model)
    assert rel(sharpness(model, loss_fn, batches, **TOL),
               top(dense_hessian(model, loss_fn, batches))) < 1e-7
    assert rel(gauss_newton_norm(model, loss_fn, batches, **TOL),
               top(dense_gauss_newton(model, loss_fn, batches))) < 1e-7
    assert_same_state(model, before)


def test_variable_length_batches_weigh_by_examples():
    """Batches of 4 sequences of 3 tokens and 2 of 5 count 4:2 (examples, not tokens)."""
    model, (a, b) = built(TinyGPT), tokens((4, 2), (3, 5))
    hv, dim = hessian_operator(model, lm_loss, [a, b])
    ha, hb = (hessian_operator(model, lm_loss, [batch])[0] for batch in (a, b))
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(hv(v), (4 * ha(v) + 2 * hb(v)) / 6, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_bn_cnn_with_frozen_layer_in_both_bn_modes(bn_mode):
    model = cnn().train()
    model.features[0].requires_grad_(False)  # a frozen first convolution
    batches = floats((4, 3), (2, 4, 4))
    before = state_of(model)
    train = bn_mode == "train"
    got = sharpness(model, F.cross_entropy, batches, bn_mode=bn_mode, **TOL)
    want = top(dense_hessian(model, F.cross_entropy, batches, train))
    assert rel(got, want) < 1e-7
    got = gauss_newton_norm(model, F.cross_entropy, batches, bn_mode=bn_mode, **TOL)
    assert rel(got, top(dense_gauss_newton(model, F.cross_entropy, batches, train))) < 1e-7
    assert_same_state(model, before)


def test_bn_modes_differ():
    model, batches = cnn(), floats((4,), (2, 4, 4))
    assert rel(sharpness(model, F.cross_entropy, batches, bn_mode="train", tol=1e-8),
               sharpness(model, F.cross_entropy, batches, bn_mode="eval", tol=1e-8)) > 1e-3


def test_channels_last_inputs_measure_as_contiguous():
    model, batches = cnn(), floats((4, 3), (2, 4, 4))
    last = [(x.to(memory_format=torch.channels_last), y) for x, y in batches]
    assert not last[0][0].is_contiguous()
    for f in (sharpness, gauss_newton_norm):
        assert f(model, F.cross_entropy, last, tol=1e-8) == f(model, F.cross_entropy, batches,
                                                             tol=1e-8)
    assert jacobian_norm(model, last[0][0]) == jacobian_norm(model, batches[0][0])


def test_dict_outputs_with_output_fn_and_dict_inputs():
    model = built(DictOut)
    plain = [(x, y) for x, y in floats((4, 3), (5,))]
    keyed = [({"features": x, "scale": torch.full((len(x), 1), 2.0, dtype=torch.float64)}, y)
             for x, y in plain]
    logits = lambda out: out["logits"]  # noqa: E731
    before = state_of(model)
    for batches in (plain, keyed):
        want = top(dense_hessian(model, F.cross_entropy, batches, output_fn=logits))
        assert rel(sharpness(model, F.cross_entropy, batches, output_fn=logits, **TOL),
                   want) < 1e-7
        assert rel(sharpness(model, lambda out, y: F.cross_entropy(out["logits"], y), batches,
                             **TOL), want) < 1e-7
        want = top(dense_gauss_newton(model, F.cross_entropy, batches, output_fn=logits))
        assert rel(gauss_newton_norm(model, F.cross_entropy, batches, output_fn=logits, **TOL),
                   want) < 1e-7
    x = plain[0][0]
    assert rel(jacobian_norm(model, x, output_fn=logits), dense_jacobian_norm(model, x, logits)) \
        < 1e-9
    assert_same_state(model, before)
    # the two input conventions differ (scale 2): the dict really reached model(**x)
    assert sharpness(model, F.cross_entropy, keyed, output_fn=logits, tol=1e-8) != \
        pytest.approx(sharpness(model, F.cross_entropy, plain, output_fn=logits, tol=1e-8))


def test_jacobian_norm_of_sequence_outputs():
    """(N, T, C) outputs: softmax over C, the Jacobian of all T*C outputs of a sample."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, 6, dropout=0.1, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(D, 3)).double()
    x = floats((4,), (T, D))[0][0]  # (4, T, D) -> (4, T, 3)
    want = dense_jacobian_norm(model, x)
    assert rel(jacobian_norm(model, x), want) < 1e-9
    assert rel(jacobian_norm(model, x, method="power", tol=1e-12, max_iter=2000), want) < 1e-6


def test_compiled_module_is_measured_through_its_original():
    model, batches = built(Encoder), tokens((3, 2), (3, 4), 3)
    compiled = torch.compile(model, backend="eager")
    assert compiled._orig_mod is model
    assert sharpness(compiled, F.cross_entropy, batches, tol=1e-8) == \
        sharpness(model, F.cross_entropy, batches, tol=1e-8)
    assert gauss_newton_norm(compiled, F.cross_entropy, batches, tol=1e-8) == \
        gauss_newton_norm(model, F.cross_entropy, batches, tol=1e-8)
    x = floats((3,), (4,))[0][0]
    mlp = built(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    assert jacobian_norm(torch.compile(mlp, backend="eager"), x) == jacobian_norm(mlp, x)


def test_weight_decay_inside_loss_fn():
    """sharpness includes a parameter term of loss_fn (its Hessian wd * I adds wd);
    gauss_newton_norm refuses it rather than leave it out."""
    model = built(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    batches, wd = floats((5, 3), (4,)), 0.3

    def with_decay(out, y):
        return F.cross_entropy(out, y) + wd / 2 * sum((p ** 2).sum() for p in model.parameters())
    got = sharpness(model, with_decay, batches, **TOL)
    assert rel(got, top(dense_hessian(model, F.cross_entropy, batches)) + wd) < 1e-7
    with pytest.raises(ValueError, match="loss_fn depends on the model's parameters"):
        gauss_newton_norm(model, with_decay, batches)


# -------------------------------------------------------------------------- refusals


def small():
    return built(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))


SUM_LOSSES = {
    "module": nn.CrossEntropyLoss(reduction="sum"),
    "partial": functools.partial(F.cross_entropy, reduction="sum"),
    "function": lambda out, y: F.cross_entropy(out, y, reduction="sum"),
}


@pytest.mark.parametrize("kind", list(SUM_LOSSES))
@pytest.mark.parametrize("estimator", [sharpness, gauss_newton_norm])
def test_sum_reduced_losses_are_refused(kind, estimator):
    match = "sums over the examples" if kind == "function" else "reduction='sum'"
    with pytest.raises(ValueError, match=match):
        estimator(small(), SUM_LOSSES[kind], floats((4,), (4,)))


def test_mean_losses_pass_the_sum_check():
    """Weighted, smoothed and KL (batchmean) losses are batch means: accepted."""
    model, batches = small(), floats((4,), (4,))
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    for loss_fn in (nn.CrossEntropyLoss(weight=w), nn.CrossEntropyLoss(label_smoothing=0.1),
                    lambda out, y: F.kl_div(F.log_softmax(out, 1), F.one_hot(y, 3).double(),
                                            reduction="batchmean")):
        assert sharpness(model, loss_fn, batches, tol=1e-4) > 0


def uncompiled_state_dict():
    return small().state_dict()


@pytest.mark.parametrize("estimator", ["sharpness", "gauss_newton_norm", "jacobian_norm"])
@pytest.mark.parametrize("model", [lambda x: x, None, "state_dict"])
def test_models_that_are_not_modules_raise_type_error(estimator, model):
    model = uncompiled_state_dict() if model == "state_dict" else model
    batches = floats((4,), (4,))
    call = {"sharpness": lambda: sharpness(model, F.cross_entropy, batches),
            "gauss_newton_norm": lambda: gauss_newton_norm(model, F.cross_entropy, batches),
            "jacobian_norm": lambda: jacobian_norm(model, batches[0][0])}[estimator]
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        call()


B = floats((4,), (4,))
REFUSALS = [  # (call, exception, message)
    (lambda m: sharpness(m, nn.CrossEntropyLoss, B), TypeError, "loss_fn is the class"),
    (lambda m: gauss_newton_norm(m, nn.CrossEntropyLoss, B), TypeError, "loss_fn is the class"),
    (lambda m: sharpness(m, "cross_entropy", B), TypeError, "loss_fn must be a callable"),
    (lambda m: sharpness(m, F.cross_entropy, B, bn_mode="test"), ValueError, "bn_mode"),
    (lambda m: gauss_newton_norm(m, F.cross_entropy, B, bn_mode=None), ValueError, "bn_mode"),
    (lambda m: sharpness(m, F.cross_entropy, B, output_fn="logits"), TypeError, "output_fn"),
    (lambda m: sharpness(m, F.cross_entropy, B[0]), ValueError, r"pass \[\(x, y\)\]"),
    (lambda m: sharpness(m, F.cross_entropy, B[0][0]), TypeError, "batches must be"),
    (lambda m: sharpness(m, F.cross_entropy, [(["a"], B[0][1])]), TypeError, "inputs must be"),
    (lambda m: sharpness(m, F.cross_entropy, B, process_group="world"), ValueError,
     "process_group.*not initialised"),
    (lambda m: gauss_newton_norm(m, F.cross_entropy, B, process_group=object()), ValueError,
     "process_group.*not initialised"),
    (lambda m: jacobian_norm(m, B[0][0], process_group="world"), ValueError, "process_group"),
    (lambda m: sharpness(m, F.cross_entropy, B, process_group="all"), ValueError,
     "process_group"),
    (lambda m: jacobian_norm(m, B[0][0], batch_size=2.5), TypeError, "batch_size"),
    (lambda m: jacobian_norm(m, B[0][0], batch_size=0), ValueError, "batch_size"),
    (lambda m: jacobian_norm(m, B[0][0], tol=0), ValueError, "tol"),
    (lambda m: jacobian_norm(m, B[0][0], max_iter=0), ValueError, "max_iter"),
    (lambda m: jacobian_norm(m, B[0][0].long()), TypeError, "floating-point"),
    (lambda m: jacobian_norm(m, {"features": B[0][0]}), TypeError, "floating-point"),
]


@pytest.mark.parametrize("call, error, match", REFUSALS)
def test_bad_arguments_are_refused_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(small())


@pytest.mark.parametrize("estimator", ["gauss_newton_norm", "jacobian_norm", "operator"])
def test_dict_outputs_without_output_fn_raise_type_error(estimator):
    model, batches = built(DictOut), floats((4,), (5,))
    call = {"gauss_newton_norm": lambda: gauss_newton_norm(model, F.cross_entropy, batches),
            "operator": lambda: gauss_newton_operator(model, F.cross_entropy, batches),
            "jacobian_norm": lambda: jacobian_norm(model, batches[0][0])}[estimator]
    with pytest.raises(TypeError, match="pass output_fn="):
        call()


def test_integer_tokens_refused_by_jacobian_norm_only():
    model, batches = built(lambda: Recurrent(nn.GRU)), tokens((3,), (4,), 3)
    assert sharpness(model, F.cross_entropy, batches, tol=1e-4) > 0
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        jacobian_norm(model, batches[0][0])



class OneMapping(nn.Module):
    """curvlinops' input convention: forward takes one mapping, model(x_dict)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, batch):
        return self.body(batch["features"] * batch["scale"])


def one_mapping_batches():
    return [({"features": x, "scale": torch.full((len(x), 1), 2.0, dtype=torch.float64)}, y)
            for x, y in floats((4, 3), (4,))]


@pytest.mark.parametrize("estimator", [sharpness, gauss_newton_norm, hessian_operator,
                                       gauss_newton_operator])
def test_dict_inputs_to_a_model_of_one_mapping_name_the_convention_and_the_adapter(estimator):
    model, batches = built(OneMapping), one_mapping_batches()
    with pytest.raises(TypeError, match=r"batch 0: .*keyword arguments.*passed as model\(\*\*x\)"
                                        r".*MappingInput\(model\)") as e:
        estimator(model, F.cross_entropy, batches)
    assert "\n" not in str(e.value)


def test_mapping_input_measures_a_model_of_one_mapping_against_dense_truth():
    model, batches = built(OneMapping), one_mapping_batches()
    adapted = MappingInput(model)
    want = top(dense_hessian(adapted, F.cross_entropy, batches))
    assert rel(sharpness(adapted, F.cross_entropy, batches, **TOL), want) < 1e-7
    want = top(dense_gauss_newton(adapted, F.cross_entropy, batches))
    assert rel(gauss_newton_norm(adapted, F.cross_entropy, batches, **TOL), want) < 1e-7


@pytest.mark.parametrize("estimator", [sharpness, gauss_newton_norm])
@pytest.mark.parametrize("make, shape", [(small, (4,)),
                                         (lambda: built(lambda: nn.Sequential(
                                             nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 3))),
                                          (1, 4))])
def test_integer_inputs_to_a_float_model_give_one_line(estimator, make, shape):
    batches = [(torch.randint(5, (6, *shape)), torch.randint(3, (6,)))]
    with pytest.raises(TypeError, match=r"the model refused the integer inputs x \(torch.int64; "
                                        r".*pass x.float\(\)") as e:
        estimator(make(), F.cross_entropy, batches)
    assert "\n" not in str(e.value)
    assert estimator(make(), F.cross_entropy, [(x.double(), y) for x, y in batches]) > 0


class FloatTokens(nn.Module):
    """A wrapper that takes float token ids and casts them for its embedding: its outputs
    depend on x through no differentiable operation."""

    def __init__(self):
        super().__init__()
        self.inner = Recurrent(nn.GRU)

    def forward(self, x):
        return self.inner(x.long())


@pytest.mark.parametrize("method", ["exact", "power"])
def test_float_tokens_cast_inside_the_model_give_one_line_in_jacobian_norm(method):
    model, batches = built(FloatTokens), tokens((3,), (4,), 3)
    assert sharpness(model, F.cross_entropy, batches, tol=1e-4) > 0
    with pytest.raises(ValueError, match="do not depend on x through differentiable operations"
                                         ".*token ids.*no input Jacobian") as e:
        jacobian_norm(model, batches[0][0].double(), method=method)
    assert "\n" not in str(e.value)


def test_jacobian_norm_keeps_logits_that_do_not_depend_on_x():
    """Without softmax, a logit constant in x has a zero Jacobian row, not an error."""
    class HalfConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bias = nn.Linear(4, 2), nn.Parameter(torch.ones(1))

        def forward(self, x):
            return torch.cat([self.lin(x), self.bias.expand(len(x), 1)], 1)
    model, x = built(HalfConstant), floats((5,), (4,))[0][0]
    assert rel(jacobian_norm(model, x, softmax=False, method="exact"),
               torch.linalg.matrix_norm(model.lin.weight.detach(), ord=2).item()) < 1e-12

WORLD = '''
import socket, sys, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
from common.estimators import gauss_newton_norm, jacobian_norm, sharpness
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(3, (6,))
for f in (sharpness, gauss_newton_norm):
    assert f(model, F.cross_entropy, [(x, y)], process_group="world", tol=1e-8) == \\
        f(model, F.cross_entropy, [(x, y)], tol=1e-8)
assert jacobian_norm(model, x, process_group="world") == jacobian_norm(model, x)
dist.destroy_process_group()
print("ok")
'''


@pytest.mark.slow  # a torch.distributed process
def test_world_process_group_after_init_is_the_default_group():
    """process_group="world" once initialised: one gloo process, the same values as local."""
    done = subprocess.run([sys.executable, "-c", WORLD], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "."})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
