"""DP-SGD: per-example clipping against optax (exact arithmetic, float64), the noise's
statistics and its reproducibility by seed, and dpsgd without noise against optax.contrib."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_breadth_common import jax, jnp, optax

import funcopt as fo

_RNG = np.random.default_rng(5)
B = 6
G = {"w": _RNG.normal(size=(B, 4, 3)) * 2, "b": _RNG.normal(size=(B, 3)), "s": _RNG.normal(size=(B,))}
G["w"][2] = 0.0
G["b"][2] = 0.0
G["s"][2] = 0.0  # an all-zero example: 0/0 counts as unclipped


def _t(tree):
    return {k: torch.tensor(v) for k, v in tree.items()}


def _j(tree):
    return {k: jnp.asarray(v) for k, v in tree.items()}


@pytest.mark.parametrize("clip", [0.0, 0.5, 2.0, 1e9, math.inf])
def test_global_clip_against_optax_and_numpy(clip):
    got, n = fo.per_example_global_norm_clip(_t(G), clip)
    want, nj = optax.per_example_global_norm_clip(_j(G), clip)
    norms = np.sqrt(sum((v.reshape(B, -1) ** 2).sum(1) for v in G.values()))
    with np.errstate(divide="ignore", invalid="ignore"):
        mult = np.nan_to_num(np.minimum(clip / norms, 1.0), nan=1.0)
    for k in G:
        np.testing.assert_allclose(got[k].numpy(), np.asarray(want[k]), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(got[k].numpy(), np.tensordot(mult, G[k], axes=1), rtol=1e-13,
                                   atol=1e-15)
    assert int(n) == int(nj) == int((mult < 1).sum())


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("clip", [0.3, 1.5, math.inf])
def test_layer_clip_against_optax(clip, uniform):
    got, n = fo.per_example_layer_norm_clip(_t(G), clip, uniform)
    want, nj = optax.per_example_layer_norm_clip(_j(G), clip, uniform)
    for k in G:
        np.testing.assert_allclose(got[k].numpy(), np.asarray(want[k]), rtol=1e-13, atol=1e-15)
        assert int(n[k]) == int(nj[k])
    if clip == 0.3:
        assert all(int(c) > 0 for c in n.values())


def test_clip_rejects_unbatched_and_bad_norms():
    with pytest.raises(ValueError, match="leading batch axis"):
        fo.per_example_global_norm_clip({"a": torch.ones(3, 2), "b": torch.ones(4)}, 1.0)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        fo.per_example_global_norm_clip(_t(G), -1.0)
    with pytest.raises(ValueError, match="global_l2_norm_clip"):
        fo.per_example_layer_norm_clip(_t(G), -1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        fo.differentially_private_aggregate(1.0, -0.5)
    with pytest.raises(TypeError, match="key"):
        fo.differentially_private_aggregate(1.0, 1.0, key=1.5)


def test_aggregate_noise_statistics_and_seed():
    g = {"w": torch.randn(4, 300, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    clip, sigma = 0.5, 2.0
    tx = fo.differentially_private_aggregate(clip, sigma, key=7)
    s = tx.init({"w": g["w"][0]})
    u1, s1 = tx.update(g, s)
    clipped, _ = fo.per_example_global_norm_clip(g, clip)
    noise = (u1["w"] * 4 - clipped["w"]) / (clip * sigma)
    assert abs(float(noise.mean())) < 5 / math.sqrt(noise.numel())
    assert abs(float(noise.std()) - 1.0) < 0.01
    again, _ = tx.update(g, s)
    assert torch.equal(again["w"], u1["w"])  # same seed and step: same noise
    u2, _ = tx.update(g, s1)
    other, _ = fo.differentially_private_aggregate(clip, sigma, key=8).update(g, s._replace(
        key=torch.tensor(8)))
    n2 = (u2["w"] * 4 - clipped["w"]) / (clip * sigma)
    n3 = (other["w"] * 4 - clipped["w"]) / (clip * sigma)
    assert abs(float((noise * n2).mean())) < 0.02 and abs(float((noise * n3).mean())) < 0.02


def test_dpsgd_without_noise_against_optax():
    w0 = _RNG.normal(size=(3,))
    x, y = _RNG.normal(size=(8, 3)), _RNG.normal(size=(8,))

    def loss_t(w, xi, yi):
        return (torch.tanh(xi @ w["w"]) - yi) ** 2

    def loss_j(w, xi, yi):
        return (jnp.tanh(xi @ w["w"]) - yi) ** 2

    psg = fo.func.per_sample_grads(loss_t)
    psg_j = jax.vmap(jax.grad(loss_j), in_axes=(None, 0, 0))
    tx = fo.dpsgd(0.1, 0.3, 0.0, seed=1, momentum=0.9, nesterov=True)
    ref = optax.contrib.dpsgd(0.1, 0.3, 0.0, seed=1, momentum=0.9, nesterov=True)
    p, pj = {"w": torch.tensor(w0)}, {"w": jnp.asarray(w0)}
    s, sj = tx.init(p), ref.init(pj)
    for _ in range(20):
        u, s = tx.update(psg(p, torch.tensor(x), torch.tensor(y)), s, p)
        uj, sj = ref.update(psg_j(pj, jnp.asarray(x), jnp.asarray(y)), sj, pj)
        p, pj = fo.apply_updates(p, u), optax.apply_updates(pj, uj)
        np.testing.assert_allclose(p["w"].numpy(), np.asarray(pj["w"]), rtol=1e-10)
    assert np.abs(p["w"].numpy() - w0).max() > 1e-2


def test_aggregate_is_pure_and_its_state_round_trips(tmp_path):
    """The contract on per-example inputs: inputs untouched, the state saves with
    weights_only=True and the run continues with the same numbers, and it compiles."""
    g = _t(G)
    before = {k: v.clone() for k, v in g.items()}
    tx = fo.dpsgd(0.1, 1.0, 0.5, seed=3, momentum=0.9)
    params = {k: v[0].clone() for k, v in g.items()}
    s = tx.init(params)
    _, s = tx.update(g, s, params)
    assert all(torch.equal(g[k], before[k]) for k in g)
    torch.save(s, tmp_path / "s.pt")
    s2 = torch.load(tmp_path / "s.pt", weights_only=True)
    u1, _ = tx.update(g, s, params)
    u2, _ = tx.update(g, s2, params)
    u3, _ = torch.compile(tx.update, fullgraph=True)(g, s2, params)
    for k in g:
        assert torch.equal(u1[k], u2[k]) and u1[k].shape == params[k].shape
        torch.testing.assert_close(u3[k], u1[k], rtol=1e-12, atol=1e-14)
