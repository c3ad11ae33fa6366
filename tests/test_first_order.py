"""First-order transforms, clipping, weight decay and aliases: optax and heavyball references,
float64 transcriptions of the papers, the contract, and errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import funcopt as fo
from funcopt.testing import check_transform, pytrees

SHAPES = {"a": (), "b": (5,), "c": (3, 4), "d": (2, 1, 3, 2)}


def _tree(dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
            for k, s in SHAPES.items()}


def _run(tx, params, grads_seq):
    state = tx.init(params)
    for g in grads_seq:
        upd, state = tx.update(g, state, params)
        params = fo.apply_updates(params, upd)
    return params


def _grads(n, dtype=torch.float32, seed=1, scale=1.0):
    return [_tree(dtype, seed + i, scale) for i in range(n)]


# --------------------------------------------------------------------------- optax references

optax = pytest.importorskip("optax")
jnp = pytest.importorskip("jax.numpy")


def _run_optax(tx, params, grads_seq):
    to_j = lambda t: {k: jnp.asarray(v.numpy()) for k, v in t.items()}
    p = to_j(params)
    state = tx.init(p)
    for g in grads_seq:
        upd, state = tx.update(to_j(g), state, p)
        p = optax.apply_updates(p, upd)
    return {k: torch.from_numpy(np.asarray(v).copy()) for k, v in p.items()}


MASK = {"a": False, "b": True, "c": True, "d": False}

OPTAX_CASES = {
    "adam_eps_root": (lambda: fo.adam(1e-2, eps_root=1e-8), lambda: optax.adam(1e-2, eps_root=1e-8)),
    "nadam": (lambda: fo.nadam(1e-2), lambda: optax.nadam(1e-2)),
    "adamw_mask": (lambda: fo.adamw(1e-2, weight_decay=0.1, mask=MASK),
                   lambda: optax.adamw(1e-2, weight_decay=0.1, mask=MASK)),
    "adamw_mask_fn": (lambda: fo.adamw(1e-2, weight_decay=0.1, mask=lambda p: MASK),
                      lambda: optax.adamw(1e-2, weight_decay=0.1, mask=lambda p: MASK)),
    "adamax": (lambda: fo.adamax(1e-2), lambda: optax.adamax(1e-2)),
    "rmsprop": (lambda: fo.rmsprop(1e-2), lambda: optax.rmsprop(1e-2)),
    "rmsprop_centered_nesterov": (
        lambda: fo.rmsprop(1e-2, centered=True, momentum=0.9, nesterov=True),
        lambda: optax.rmsprop(1e-2, centered=True, momentum=0.9, nesterov=True)),
    "rmsprop_bias_correction": (
        lambda: fo.rmsprop(1e-2, eps_in_sqrt=False, bias_correction=True, initial_scale=0.1),
        lambda: optax.rmsprop(1e-2, eps_in_sqrt=False, bias_correction=True, initial_scale=0.1)),
    "adagrad": (lambda: fo.adagrad(0.1), lambda: optax.adagrad(0.1)),
    "sgd_nesterov": (lambda: fo.sgd(0.05, 0.9, nesterov=True), lambda: optax.sgd(0.05, 0.9, True)),
    "lion": (lambda: fo.lion(1e-3, weight_decay=0.1), lambda: optax.lion(1e-3, weight_decay=0.1)),
    "adopt": (lambda: fo.adopt(1e-2), lambda: optax.contrib.adopt(1e-2)),
    "adopt_nesterov_noclip": (lambda: fo.adopt(1e-2, nesterov=True, use_clipping=False),
                              lambda: optax.contrib.adopt(1e-2, nesterov=True, use_clipping=False)),
    "ema": (lambda: fo.chain(fo.ema(0.8), fo.scale(-0.1)),
            lambda: optax.chain(optax.ema(0.8), optax.scale(-0.1))),
    "clip": (lambda: fo.chain(fo.clip(0.5), fo.scale(-0.1)),
             lambda: optax.chain(optax.clip(0.5), optax.scale(-0.1))),
    "clip_by_block_rms": (lambda: fo.chain(fo.clip_by_block_rms(0.7), fo.scale(-0.1)),
                          lambda: optax.chain(optax.clip_by_block_rms(0.7), optax.scale(-0.1))),
    "clip_by_global_norm": (lambda: fo.chain(fo.clip_by_global_norm(1.5), fo.scale(-0.1)),
                            lambda: optax.chain(optax.clip_by_global_norm(1.5), optax.scale(-0.1))),
    "keep_params_nonnegative": (
        lambda: fo.chain(fo.scale(-0.5), fo.keep_params_nonnegative()),
        lambda: optax.chain(optax.scale(-0.5), optax.keep_params_nonnegative())),
    "sign_schedule": (lambda: fo.chain(fo.scale_by_sign(), fo.scale_by_schedule(lambda t: -0.1 / (1 + t))),
                      lambda: optax.chain(optax.scale_by_sign(),
                                          optax.scale_by_schedule(lambda t: -0.1 / (1 + t)))),
}


@pytest.mark.parametrize("name", sorted(OPTAX_CASES))
def test_matches_optax(name):
    make_fo, make_optax = OPTAX_CASES[name]
    params = _tree()
    if name == "keep_params_nonnegative":
        params = {k: v.abs() for k, v in params.items()}
    grads = _grads(20)
    ours = _run(make_fo(), params, grads)
    ref = _run_optax(make_optax(), params, grads)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=k: f"{name}, leaf {k}: {m}")
    assert any(not torch.equal(ours[k], params[k]) for k in params)


# --------------------------------------------------------------------------- float64 transcriptions


def _lion_paper(p, grads, lr, b1, b2, wd):
    p = {k: v.clone() for k, v in p.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    for g in grads:
        for k in p:
            c = b1 * m[k] + (1 - b1) * g[k]
            p[k] = p[k] - lr * (torch.sign(c) + wd * p[k])
            m[k] = b2 * m[k] + (1 - b2) * g[k]
    return p


def _laprop_paper(p, grads, lr, b1, b2, eps):
    """Ziyin et al. 2020, Algorithm 1."""
    p = {k: v.clone() for k, v in p.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    n = {k: torch.zeros_like(v) for k, v in p.items()}
    for t, g in enumerate(grads, start=1):
        for k in p:
            n[k] = b2 * n[k] + (1 - b2) * g[k] ** 2
            n_hat = n[k] / (1 - b2**t)
            m[k] = b1 * m[k] + (1 - b1) * g[k] / (torch.sqrt(n_hat) + eps)
            p[k] = p[k] - lr * m[k] / (1 - b1**t)
    return p


def _adopt_paper(p, grads, lr, b1, b2, eps, clip=lambda t: t**0.25):
    """Taniguchi et al. 2024, Algorithm 2 (clipped to [-c_t, c_t], c_t = t^(1/4) by default)."""
    p = {k: v.clone() for k, v in p.items()}
    v = {k: grads[0][k] ** 2 for k in p}
    m = {k: torch.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads[1:], start=1):
        for k in p:
            x = g[k] / torch.clamp(torch.sqrt(v[k]), min=eps)
            m[k] = b1 * m[k] + (1 - b1) * torch.clamp(x, -clip(t), clip(t))
            p[k] = p[k] - lr * m[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
    return p


def _adagrad_norm_paper(p, grads, lr, b0_sq):
    """Ward, Wu, Bottou 2019, Algorithm 1."""
    p = {k: v.clone() for k, v in p.items()}
    b_sq = b0_sq
    for g in grads:
        b_sq = b_sq + sum(float((g[k] ** 2).sum()) for k in p)
        for k in p:
            p[k] = p[k] - lr / math.sqrt(b_sq) * g[k]
    return p


PAPER_CASES = {
    "lion": (fo.lion(3e-3, 0.9, 0.99, weight_decay=0.1),
             lambda p, g: _lion_paper(p, g, 3e-3, 0.9, 0.99, 0.1)),
    "laprop": (fo.laprop(1e-2, 0.9, 0.99, eps=0.0),
               lambda p, g: _laprop_paper(p, g, 1e-2, 0.9, 0.99, 0.0)),
    "adopt": (fo.adopt(1e-2, 0.9, 0.999, eps=1e-6),
              lambda p, g: _adopt_paper(p, g, 1e-2, 0.9, 0.999, 1e-6)),
    # c_t = 0.5 + t/100 clips most coordinates: the clamp itself is exercised
    "adopt_tight_clip": (fo.adopt(1e-2, 0.9, 0.999, eps=1e-6, clip_value_fn=lambda t: 0.5 + t / 100),
                         lambda p, g: _adopt_paper(p, g, 1e-2, 0.9, 0.999, 1e-6,
                                                   clip=lambda t: 0.5 + t / 100)),
    "adagrad_norm": (fo.adagrad_norm(0.5, initial_accumulator_value=0.01, eps=0.0),
                     lambda p, g: _adagrad_norm_paper(p, g, 0.5, 0.01)),
}


@pytest.mark.parametrize("name", sorted(PAPER_CASES))
def test_matches_paper_float64(name):
    tx, paper = PAPER_CASES[name]
    params, grads = _tree(torch.float64), _grads(40, torch.float64, scale=0.3)
    ours, ref = _run(tx, params, grads), paper(params, grads)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-10, atol=1e-12)


def test_laprop_matches_heavyball():
    heavyball = pytest.importorskip("heavyball")
    heavyball.utils.compile_mode = None
    params, grads = _tree(), _grads(30)
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = heavyball.LaProp(list(ref.values()), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for g in grads:
        for k, p in ref.items():
            p.grad = g[k].clone()
        opt.step()
    ours = _run(fo.laprop(1e-2, 0.9, 0.99, 1e-8), params, grads)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k].detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the contract

ALL = {
    "scale": lambda: fo.scale(0.5), "scale_by_schedule": lambda: fo.scale_by_schedule(lambda t: 1 / (1 + t)),
    "lr": lambda: fo.scale_by_learning_rate(0.1),
    "lr_schedule": lambda: fo.scale_by_learning_rate(lambda t: 0.1 * 0.9**t),
    "sign": fo.scale_by_sign, "trace": lambda: fo.trace(0.9, nesterov=True, dampening=0.1),
    "ema": lambda: fo.ema(0.9), "adam": fo.scale_by_adam,
    "adam_nesterov_bf16mu": lambda: fo.scale_by_adam(nesterov=True, mu_dtype=torch.bfloat16),
    "amsgrad": lambda: fo.scale_by_adam(amsgrad=True), "nadam_torch": fo.scale_by_nadam,
    "adamax": fo.scale_by_adamax, "rms_centered": lambda: fo.scale_by_rms(centered=True),
    "adagrad": fo.scale_by_adagrad, "adagrad_norm": fo.scale_by_adagrad_norm,
    "lion": fo.scale_by_lion, "laprop": fo.scale_by_laprop, "adopt": fo.scale_by_adopt,
    "clip": lambda: fo.clip(0.1), "clip_by_global_norm": lambda: fo.clip_by_global_norm(0.5),
    "clip_by_block_rms": lambda: fo.clip_by_block_rms(0.5),
    "keep_params_nonnegative": fo.keep_params_nonnegative,
    "add_noise": lambda: fo.add_noise(0.1, 0.55, seed=3),
    "add_decayed_weights": lambda: fo.add_decayed_weights(1e-2),
    "sgd": lambda: fo.sgd(0.1, 0.9, weight_decay=1e-3), "adamw": lambda: fo.adamw(1e-3),
    "lion_alias": lambda: fo.lion(1e-3), "adopt_alias": lambda: fo.adopt(1e-3),
}


@pytest.mark.parametrize("name", sorted(ALL))
@settings(max_examples=8, deadline=None)
@given(params=pytrees(max_leaves=4))
def test_contract(name, params):
    check_transform(ALL[name](), params)


def test_bf16_params_keep_dtype():
    params = _tree(torch.bfloat16)
    for name, make in ALL.items():
        tx = make()
        state = tx.init(params)
        for g in _grads(3, torch.bfloat16):
            upd, state = tx.update(g, state, params)
            for k in params:
                assert upd[k].dtype == torch.bfloat16, (name, k)
                assert torch.isfinite(upd[k].float()).all(), (name, k)


def test_mu_dtype_is_kept_and_close_to_full_precision():
    params, grads = _tree(), _grads(10)
    tx = fo.adam(1e-2, mu_dtype=torch.bfloat16)
    state = tx.init(params)
    assert all(m.dtype == torch.bfloat16 for m in state[0].mu)
    low, full = _run(tx, params, grads), _run(fo.adam(1e-2), params, grads)
    for k in params:
        torch.testing.assert_close(low[k], full[k], rtol=0, atol=5e-3)


# --------------------------------------------------------------------------- clipping / decay


@pytest.mark.parametrize("scale", [0.0, 0.01, 10.0])
def test_clip_by_global_norm_direct(scale):
    g = _tree(torch.float64, seed=5, scale=scale)
    norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
    upd, _ = fo.clip_by_global_norm(1.0).update(g, fo.EmptyState())
    factor = 1.0 if norm <= 1.0 else 1.0 / norm
    for k in g:
        torch.testing.assert_close(upd[k], g[k] * factor, rtol=1e-12, atol=0)
    out_norm = math.sqrt(sum(float((v**2).sum()) for v in upd.values()))
    assert out_norm <= 1.0 + 1e-12


def test_add_decayed_weights_mask():
    params, g = _tree(torch.float64), _tree(torch.float64, seed=9)
    for mask in (MASK, lambda p: MASK):
        tx = fo.add_decayed_weights(0.3, mask)
        upd, _ = tx.update(g, tx.init(params), params)
        for k in params:
            want = g[k] + 0.3 * params[k] if MASK[k] else g[k]
            torch.testing.assert_close(upd[k], want, rtol=1e-14, atol=0)


def test_add_decayed_weights_schedule():
    params, g = _tree(torch.float64), _tree(torch.float64, seed=9)
    tx = fo.add_decayed_weights(lambda t: 0.1 * (t + 1))
    state = tx.init(params)
    for step in range(3):
        upd, state = tx.update(g, state, params)
        torch.testing.assert_close(upd["c"], g["c"] + 0.1 * (step + 1) * params["c"])


def test_add_noise_statistics_and_determinism():
    params = {"w": torch.zeros(200_000, dtype=torch.float64)}
    eta, gamma = 0.5, 0.55
    tx = fo.add_noise(eta, gamma, seed=7)
    state = tx.init(params)
    draws = []
    for t in range(1, 4):
        upd, state = tx.update(params, state)
        sd = math.sqrt(eta / t**gamma)
        x = upd["w"] / sd
        assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02
        assert abs(float((x**4).mean()) - 3) < 0.1  # Gaussian kurtosis
        draws.append(upd["w"])
    assert float(torch.corrcoef(torch.stack(draws[:2]))[0, 1]).__abs__() < 0.02
    again, _ = tx.update(params, tx.init(params))
    other, _ = fo.add_noise(eta, gamma, seed=8).update(params, tx.init(params)._replace(key=torch.tensor(8)))
    assert torch.equal(again["w"], draws[0]) and not torch.equal(other["w"], draws[0])


# --------------------------------------------------------------------------- learning rate


def test_learning_rate_lives_in_state():
    params, g = _tree(torch.float64), _tree(torch.float64, seed=2)
    tx = fo.scale_by_learning_rate(0.1)
    state = tx.init(params)
    assert state.learning_rate.ndim == 0 and state.learning_rate.is_floating_point()
    upd, state = tx.update(g, state)
    torch.testing.assert_close(upd["c"], -0.1 * g["c"])
    upd, state = tx.update(g, state._replace(learning_rate=torch.tensor(0.02, dtype=torch.float64)))
    torch.testing.assert_close(upd["c"], -0.02 * g["c"])
    sched = fo.scale_by_learning_rate(lambda t: 0.5 / (1 + t), flip_sign=False)
    s = sched.init(params)
    for t in range(3):
        upd, s = sched.update(g, s)
        torch.testing.assert_close(upd["c"], 0.5 / (1 + t) * g["c"])
        assert float(s.learning_rate) == pytest.approx(0.5 / (1 + t))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make, words", [
    (lambda: fo.sgd(-0.1), "learning_rate"),
    (lambda: fo.adam(-1e-3), "learning_rate"),
    (lambda: fo.scale_by_adam(b1=1.0), "b1"),
    (lambda: fo.scale_by_adam(b2=-0.1), "b2"),
    (lambda: fo.scale_by_adam(eps=-1.0), "eps"),
    (lambda: fo.scale_by_rms(decay=1.5), "decay"),
    (lambda: fo.scale_by_lion(b2=float("nan")), "b2"),
    (lambda: fo.scale_by_adopt(eps=0.0), "eps"),
    (lambda: fo.clip_by_global_norm(0.0), "max_norm"),
    (lambda: fo.clip_by_block_rms(-1.0), "threshold"),
    (lambda: fo.add_decayed_weights(-1e-2), "weight_decay"),
    (lambda: fo.sgd(0.1, nesterov=True), "momentum"),
    (lambda: fo.nadam(0.1, eps_root=1e-8, momentum_decay=4e-3), "eps_root"),
])
def test_bad_hyperparameters_raise(make, words):
    with pytest.raises((ValueError, TypeError), match=words):
        make()


def test_type_errors():
    with pytest.raises(TypeError, match="scale_by_schedule"):
        fo.scale(lambda t: 0.1)
    with pytest.raises(TypeError, match="number"):
        fo.adam("0.1")
    with pytest.raises(TypeError, match="seed"):
        fo.add_noise(0.1, 0.5, seed=1.5)


@pytest.mark.parametrize("tx", [fo.add_decayed_weights(1e-2), fo.keep_params_nonnegative(),
                                fo.adamw(1e-3)], ids=["decay", "nonneg", "adamw"])
def test_missing_params_raise(tx):
    params = _tree()
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(params, tx.init(params))


def test_bad_mask_raises():
    params = _tree()
    tx = fo.add_decayed_weights(0.1, {"a": True})
    with pytest.raises(ValueError, match="mask"):
        tx.update(params, tx.init(params), params)
    tx = fo.add_decayed_weights(0.1, {k: torch.tensor(True) for k in params})
    with pytest.raises(TypeError, match="Python bools"):
        tx.update(params, tx.init(params), params)


# --------------------------------------------------------------------------- mismatched trees

PER_LEAF_STATE = {
    "trace": lambda: fo.trace(0.9), "ema": lambda: fo.ema(0.9), "adam": fo.scale_by_adam,
    "nadam_torch": fo.scale_by_nadam, "adamax": fo.scale_by_adamax,
    "rms": lambda: fo.scale_by_rms(centered=True), "adagrad": fo.scale_by_adagrad,
    "lion": fo.scale_by_lion, "laprop": fo.scale_by_laprop, "adopt": fo.scale_by_adopt,
}


@pytest.mark.parametrize("name", sorted(PER_LEAF_STATE))
def test_updates_that_do_not_match_the_state_are_a_clear_error(name):
    """Without params to compare against, the per-leaf state catches a wrong tree."""
    tx = PER_LEAF_STATE[name]()
    state = tx.init(_tree())
    extra = {**_tree(), "e": torch.ones(2)}
    with pytest.raises(ValueError, match="5 leaves but the state holds 4"):
        tx.update(extra, state)
    with pytest.raises(ValueError, match="different tree structures"):
        tx.update(extra, state, _tree())


# --------------------------------------------------------------------------- edge cases


def test_adagrad_entries_with_no_gradient_yet_get_zero_update():
    """eps = 0 and s_0 = 0: a coordinate whose gradients were all 0 gets 0, not 0/0 = NaN
    (optax's rule); the others get g / sqrt(sum g^2) (float64 transcription)."""
    params = _tree(torch.float64)
    grads = [{k: torch.where(torch.arange(v.numel()).view(v.shape) % 2 == 0, v, 0.0)
              for k, v in g.items()} for g in _grads(5, torch.float64)]
    tx = fo.scale_by_adagrad(0.0, 0.0)
    state, total = tx.init(params), {k: torch.zeros_like(v) for k, v in params.items()}
    for g in grads:
        upd, state = tx.update(g, state)
        for k in params:
            total[k] = total[k] + g[k] ** 2
            want = torch.where(total[k] > 0, g[k] / total[k].sqrt(), 0.0)
            torch.testing.assert_close(upd[k], want, rtol=1e-14, atol=0)


def test_add_noise_is_independent_across_leaves():
    params = {"a": torch.zeros(50_000, dtype=torch.float64),
              "b": torch.zeros(50_000, dtype=torch.float64)}
    upd, _ = fo.add_noise(1.0, 0.0).update(params, fo.add_noise(1.0, 0.0).init(params))
    assert abs(float(torch.corrcoef(torch.stack([upd["a"], upd["b"]]))[0, 1])) < 0.03
    for v in upd.values():
        assert abs(float(v.std()) - 1) < 0.03


def test_adopt_in_float16_stays_finite_and_first_step_is_zero():
    g = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(4, 3, generator=g).half()}
    tx = fo.adopt(1e-2)
    state = tx.init(p)
    for step in range(3):
        grads = {"w": torch.randn(4, 3, generator=g).half()}
        u, state = tx.update(grads, state, p)
        assert u["w"].dtype == torch.float16 and torch.isfinite(u["w"]).all()
        assert all(torch.isfinite(t).all() for t in fo.tree_leaves(state))
        if step == 0:
            assert torch.equal(u["w"], torch.zeros_like(u["w"]))
        p = fo.apply_updates(p, u)
