"""Per-sample gradients and their fast statistics against loops and materialised vmap."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from funcopt.func.per_sample import (
    batch_grad_and_sq_norms,
    finalize_stats,
    per_sample_grads,
    per_sample_inner_products,
    sample_loss,
    stats_from_per_sample_grads,
)


def ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                           reduction="none").reshape(y.shape).reshape(y.shape[0], -1).sum(1)


class SeqNet(nn.Module):
    """Linear layers on token sequences (b, T, d) plus a LayerNorm (fallback path)."""

    def __init__(self, d_in, hidden, d_out):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(d_in, hidden), nn.LayerNorm(hidden), \
            nn.Linear(hidden, d_out, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(3, 4, 2, stride=2, bias=False), nn.Flatten(),
                        nn.Linear(4 * 3 * 3, 3)).double()
    seq_gram = SeqNet(4, 6, 3).double()      # T=3: T^2 <= d_in d_out -> Gram identity
    seq_wide = SeqNet(2, 2, 3).double()      # T=3, d_in d_out=4 < 9 -> forms dW_i
    return [
        ("mlp", mlp, torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))),
        ("cnn", cnn, torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))),
        ("seq_gram", seq_gram, torch.randn(4, 3, 4, dtype=torch.float64),
         torch.randint(0, 3, (4, 3))),
        ("seq_wide", seq_wide, torch.randn(4, 3, 2, dtype=torch.float64),
         torch.randint(0, 3, (4, 3))),
    ]


def loop_grads(model, params, x, y):
    """Single-sample autograd gradients, one sample at a time."""
    out = {k: [] for k in params}
    for i in range(x.shape[0]):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = ce(functional_call(model, leaves, (x[i:i + 1],)), y[i:i + 1]).sum()
        gs = torch.autograd.grad(loss, list(leaves.values()))
        for k, g in zip(leaves, gs):
            out[k].append(g)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_per_sample_grads_match_python_loop(case, chunk_size):
    _, model, x, y = models()[case]
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = per_sample_grads(sample_loss(model, ce), chunk_size=chunk_size)(params, x, y)
    want = loop_grads(model, params, x, y)
    for k in params:
        assert got[k].shape == (x.shape[0], *params[k].shape)
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", range(4))
def test_fast_sq_norms_match_materialised(case):
    _, model, x, y = models()[case]
    params = {k: v.detach() for k, v in model.named_parameters()}
    g_sum, sq, losses = batch_grad_and_sq_norms(model, ce, params, x, y)
    psg = per_sample_grads(sample_loss(model, ce))(params, x, y)
    want_sq = sum(v.flatten(1).square().sum(1) for v in psg.values())
    torch.testing.assert_close(sq, want_sq, rtol=1e-10, atol=1e-12)
    for k in params:
        torch.testing.assert_close(g_sum[k], psg[k].sum(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses, ce(functional_call(model, params, (x,)), y))
    for v in params.values():  # inputs untouched
        assert not v.requires_grad


@pytest.mark.parametrize("case", range(4))
def test_fast_statistics_match_materialised(case):
    _, model, x, y = models()[case]
    params = {k: v.detach() for k, v in model.named_parameters()}
    psg = per_sample_grads(sample_loss(model, ce))(params, x, y)
    mean_ref, ref = stats_from_per_sample_grads(psg)
    g_sum, sq, _ = batch_grad_and_sq_norms(model, ce, params, x, y)
    mean, stats = finalize_stats(torch.tensor(float(x.shape[0]), dtype=torch.float64),
                                 g_sum, sq.sum())
    p = per_sample_inner_products(sample_loss(model, ce))(mean, params, x, y)
    torch.testing.assert_close(p, torch.cat([v.flatten(1) for v in psg.values()], 1)
                               @ torch.cat([v.flatten() for v in mean_ref.values()]))
    for name in ("count", "grad_sq_norm", "sum_sq_norms"):
        torch.testing.assert_close(getattr(stats, name), getattr(ref, name))
    torch.testing.assert_close(p.sum(), ref.sum_inner)
    torch.testing.assert_close(p.square().sum(), ref.sum_sq_inner)


def test_stats_from_per_sample_grads_float64_transcription():
    torch.manual_seed(1)
    tree = {"a": torch.randn(6, 3, 2, dtype=torch.float64), "b": [torch.randn(6, 4, dtype=torch.float64)]}
    mean, st = stats_from_per_sample_grads(tree)
    flat = torch.cat([tree["a"].reshape(6, -1), tree["b"][0]], 1)
    g = flat.mean(0)
    torch.testing.assert_close(mean["a"], tree["a"].mean(0))
    assert st.count.item() == 6
    torch.testing.assert_close(st.grad_sq_norm, g @ g)
    torch.testing.assert_close(st.sum_sq_norms, sum(flat[i] @ flat[i] for i in range(6)))
    torch.testing.assert_close(st.sum_sq_inner, sum((flat[i] @ g) ** 2 for i in range(6)))
    _, st2 = stats_from_per_sample_grads(tree, inner=False)
    assert st2.sum_inner is None and st2.sum_sq_inner is None


def test_bad_inputs_give_clear_errors():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="in_dims"):
        per_sample_grads(sample_loss(model, ce), in_dims=(0, 0, 0))
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grads(sample_loss(model, ce), chunk_size=0)
    params = dict(model.named_parameters())
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="one loss per sample"):
        batch_grad_and_sq_norms(model, lambda o, t: F.cross_entropy(o, t), params, x, y)
    with pytest.raises(TypeError, match="dict"):
        batch_grad_and_sq_norms(model, ce, list(params.values()), x, y)


def test_float32_stays_float32():
    model = nn.Linear(3, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g, sq, losses = batch_grad_and_sq_norms(model, ce, params, torch.randn(4, 3),
                                            torch.randint(0, 2, (4,)))
    assert sq.dtype == torch.float32 and all(v.dtype == torch.float32 for v in g.values())


@pytest.mark.parametrize("case", [0, 1])
def test_linear_and_conv_layers_use_the_closed_form(case, monkeypatch):
    import funcopt.func.per_sample as ps

    def no_fallback(*args, **kwargs):
        raise AssertionError("the vmap fallback ran for a Linear/Conv2d-only model")

    monkeypatch.setattr(ps, "_fallback_sq_norms", no_fallback)
    _, model, x, y = models()[case]
    params = {k: v.detach() for k, v in model.named_parameters()}
    _, sq, _ = ps.batch_grad_and_sq_norms(model, ce, params, x, y)
    assert sq.shape == (x.shape[0],)


def test_replaced_layer_after_a_call_still_gives_exact_norms():
    import funcopt.func.per_sample as ps

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    ps.batch_grad_and_sq_norms(model, ce, params, x, y)  # fills the layer cache
    model[2] = nn.Sequential(nn.Linear(5, 3, bias=False)).double()[0]  # a new module object
    params = {k: v.detach() for k, v in model.named_parameters()}
    _, sq, _ = ps.batch_grad_and_sq_norms(model, ce, params, x, y)
    want = loop_grads(model, params, x, y)
    ref = sum(v.flatten(1).square().sum(1) for v in want.values())
    torch.testing.assert_close(sq, ref)
