"""Muon against a float64 transcription of the reference (github.com/KellerJordan/Muon)."""

import pytest
import torch

import funcopt as fo
from funcopt.base import apply_updates
from funcopt.transforms.muon import muon, newton_schulz, scale_by_muon


def _ns_reference(g, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    if g.size(0) > g.size(1):
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if g.size(0) > g.size(1) else x


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (6, 6)])
def test_newton_schulz_matches_reference(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(newton_schulz(g), _ns_reference(g), rtol=1e-10, atol=1e-12)
    # it approximately orthogonalises: singular values near 1 (the quintic's band is ~0.7-1.2)
    s = torch.linalg.svdvals(newton_schulz(g))
    assert float(s.min()) > 0.5 and float(s.max()) < 1.3


def test_muon_steps_match_transcription():
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(6, 4, generator=gen, dtype=torch.float64),
              "k": torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)}
    lr, mu, wd = 0.02, 0.95, 0.1
    tx = muon(lr, beta=mu, weight_decay=wd)
    state = tx.init(params)
    ref = {k: v.clone() for k, v in params.items()}
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}
    for _ in range(10):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
        u, state = tx.update(grads, state, params)
        params = apply_updates(params, u)
        for k in ref:
            bufs[k] = mu * bufs[k] + (1 - mu) * grads[k]
            d = (1 - mu) * grads[k] + mu * bufs[k]
            o = _ns_reference(d.reshape(d.shape[0], -1)).reshape(d.shape)
            o = o * max(1, d.shape[0] / d[0].numel()) ** 0.5
            ref[k] = ref[k] * (1 - lr * wd) - lr * o
    for k in ref:
        torch.testing.assert_close(params[k], ref[k], rtol=1e-9, atol=1e-12)


def test_vectors_go_to_adamw():
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(4, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    tx = muon(other=fo.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-10, weight_decay=0.0))
    ref = torch.nn.Parameter(params["b"].clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
    state = tx.init(params)
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        u, state = tx.update(grads, state, params)
        params = apply_updates(params, u)
        ref.grad = grads["b"].clone()
        opt.step()
    torch.testing.assert_close(params["b"], ref.detach(), rtol=1e-5, atol=1e-6)


def test_errors_and_purity():
    with pytest.raises(ValueError, match="1-d parameter"):
        scale_by_muon().init({"b": torch.zeros(3)})
    tx = scale_by_muon(mu_dtype=torch.bfloat16)
    p = {"w": torch.randn(3, 4)}
    g = {"w": torch.randn(3, 4)}
    g0 = g["w"].clone()
    u, s = tx.update(g, tx.init(p), p)
    assert torch.equal(g["w"], g0) and u["w"].dtype == torch.float32
    assert s.momentum[0].dtype == torch.bfloat16


def test_muon_passes_its_newton_schulz_dtype_through():
    """``muon(ns_dtype=torch.bfloat16)`` orthogonalises in bfloat16: its matrix update is
    ``-lr * sqrt(rows / cols) * newton_schulz(nesterov momentum, dtype=bfloat16)`` (first step:
    momentum 0, so the Nesterov blend is ``(1 - beta) g + beta (1 - beta) g``), unlike the
    float32 default."""
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(8, 5, generator=g)}
    grads = {"w": torch.randn(8, 5, generator=g)}
    beta, lr = 0.9, 0.02
    blend = (1 - beta) * grads["w"] + beta * (1 - beta) * grads["w"]
    for dtype in (torch.bfloat16, None):
        tx = muon(lr, beta=beta, ns_dtype=dtype)
        u, _ = tx.update(grads, tx.init(params), params)
        want = -lr * (8 / 5) ** 0.5 * newton_schulz(blend, dtype=dtype)
        torch.testing.assert_close(u["w"], want, rtol=1e-6, atol=1e-7)
    bf16 = muon(lr, beta=beta, ns_dtype=torch.bfloat16)
    f32 = muon(lr, beta=beta)
    diff = (bf16.update(grads, bf16.init(params), params)[0]["w"]
            - f32.update(grads, f32.init(params), params)[0]["w"]).abs().max()
    assert diff > 1e-5  # the dtype really changed the computation


def test_default_is_the_reference_with_aux_adamw():
    """``muon()``'s numbers, on a matrix and a vector, against the float64 transcription above
    (beta 0.95, Nesterov, 5 steps, eps 1e-7, lr 0.02) and torch.optim.AdamW (lr 3e-4, betas
    (0.9, 0.95), eps 1e-10, no decay)."""
    gen = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64),
              "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    tx = muon()
    state = tx.init(params)
    w, buf = params["w"].clone(), torch.zeros(5, 3, dtype=torch.float64)
    b = torch.nn.Parameter(params["b"].clone())
    opt = torch.optim.AdamW([b], lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
    for _ in range(4):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
        u, state = tx.update(grads, state, params)
        params = apply_updates(params, u)
        buf = 0.95 * buf + 0.05 * grads["w"]
        w = w - 0.02 * _ns_reference(0.05 * grads["w"] + 0.95 * buf) * (5 / 3) ** 0.5
        b.grad = grads["b"].clone()
        opt.step()
    torch.testing.assert_close(params["w"], w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(params["b"], b.detach(), rtol=1e-9, atol=1e-12)


def test_ns_coeffs_and_eps_reach_newton_schulz():
    g = torch.Generator().manual_seed(5)
    p = {"w": torch.randn(6, 4, generator=g, dtype=torch.float64)}
    grads = {"w": torch.randn(6, 4, generator=g, dtype=torch.float64)}
    coeffs, eps = (2.0, -1.5, 0.5), 1e-3
    tx = scale_by_muon(beta=0.0, nesterov=False, ns_steps=3, ns_coeffs=coeffs, eps=eps)
    u, _ = tx.update(grads, tx.init(p), p)
    want = newton_schulz(grads["w"], 3, eps, coeffs) * (6 / 4) ** 0.5
    torch.testing.assert_close(u["w"], want, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(u["w"], newton_schulz(grads["w"], 3) * (6 / 4) ** 0.5)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"ns_coeffs": (1.0, 2.0)}, TypeError, "ns_coeffs"),
    ({"ns_coeffs": (1.0, float("nan"), 2.0)}, ValueError, r"ns_coeffs\[b\]"),
    ({"beta": 1.0}, ValueError, "beta"), ({"eps": -1.0}, ValueError, "eps"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        muon(**kwargs)


@pytest.mark.parametrize("removed", ["adam_learning_rate", "adam_b1", "adam_b2", "adam_eps",
                                     "adam_weight_decay", "momentum"])
def test_removed_keywords_are_type_errors(removed):
    """The AdamW numbers travel inside ``other=fo.adamw(...)``; the momentum is ``beta``."""
    with pytest.raises(TypeError, match=removed):
        muon(0.02, **{removed: 0.5})
