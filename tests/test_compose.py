"""Combinators against optax and hand-written float64 references.

The inner transforms here are defined in this file (a momentum step and a scaling), so the
combinators are tested independently of the transform library.
"""

from typing import NamedTuple

import numpy as np
import pytest
import torch

import funcopt as fo
from funcopt.testing import assert_trees_close, check_transform, random_like

optax = pytest.importorskip("optax")
jnp = pytest.importorskip("jax.numpy")


class MomState(NamedTuple):
    count: torch.Tensor
    mu: object


torch.serialization.add_safe_globals([MomState])  # a state class loads with weights_only=True


def momentum(lr=0.1, beta=0.9):
    """``mu <- beta mu + g``; ``u = -lr mu`` (optax.sgd(lr, momentum=beta))."""

    def init(params):
        return MomState(fo.step_counter(params), fo.tree_zeros_like(params))

    def update(updates, state, params=None, **extra):
        # the leaf engine: checked leaves, and ops that also run under torch.func.vmap
        g, treedef = fo.engine.leaves(updates, params, "momentum", fo.tree_leaves(state.mu))
        mu = fo.engine.ops.add(fo.engine.ops.mul(fo.tree_leaves(state.mu), beta), g)
        return (fo.tree_unflatten(treedef, fo.engine.ops.mul(mu, -lr)),
                MomState(fo.increment(state.count), fo.tree_unflatten(treedef, mu)))

    return fo.GradientTransformation(init, update)


def times(s):
    def update(updates, state, params=None, **extra):
        u, treedef = fo.engine.leaves(updates, params, "times")
        return fo.tree_unflatten(treedef, [x * s for x in u]), state

    return fo.GradientTransformation(lambda p: fo.EmptyState(), update)


def params64():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 2, generator=g, dtype=torch.float64),
            "b": torch.randn(2, generator=g, dtype=torch.float64),
            "layers": [torch.randn(4, generator=g, dtype=torch.float64), torch.randn((), dtype=torch.float64, generator=g)]}


def grads_seq(params, n, seed=1):
    return [random_like(params, seed=seed + i) for i in range(n)]


def run(tx, params, grads, **extra):
    state, outs = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params, **extra)
        outs.append(u)
        params = fo.apply_updates(params, u)
    return outs, state, params


def to_jax(tree):
    return fo.tree_map(lambda x: jnp.asarray(x.numpy()), tree)


def from_jax(tree):
    import jax
    return jax.tree_util.tree_map(lambda x: torch.from_numpy(np.asarray(x).copy()), tree)


# --------------------------------------------------------------------------- chains


def test_chain_and_named_chain_agree():
    p = params64()
    gs = grads_seq(p, 4)
    a, _, _ = run(fo.chain(momentum(), times(2.0)), p, gs)
    tx = fo.named_chain(("mom", momentum()), ("x2", times(2.0)))
    b, state, _ = run(tx, p, gs)
    assert list(state) == ["mom", "x2"] and int(state["mom"].count) == 4
    for x, y in zip(a, b):
        fo.testing.assert_trees_equal(x, y)
    check_transform(tx, p)
    with pytest.raises(ValueError, match="distinct"):
        fo.named_chain(("a", times(1.0)), ("a", times(2.0)))


def test_chain_rejects_non_transforms():
    with pytest.raises(TypeError, match="GradientTransformation"):
        fo.chain(momentum)


def test_identity_and_set_to_zero():
    p = params64()
    g = random_like(p, 3)
    u, _ = fo.identity().update(g, fo.identity().init(p))
    fo.testing.assert_trees_equal(u, g)
    z, _ = fo.set_to_zero().update(g, fo.EmptyState())
    assert all(torch.equal(x, torch.zeros_like(x)) for x in fo.tree_leaves(z))
    check_transform(fo.identity(), p)
    check_transform(fo.set_to_zero(), p)


# --------------------------------------------------------------------------- masked / partition


@pytest.mark.parametrize("mask_kind", ["tree", "prefix", "callable"])
def test_masked_matches_inner_on_the_subtree(mask_kind):
    p = params64()
    gs = grads_seq(p, 3)
    mask = {"tree": {"w": True, "b": False, "layers": [True, False]},
            "prefix": {"w": True, "b": False, "layers": True},
            "callable": lambda t: fo.tree_map(lambda x: x.ndim >= 1, t)}[mask_kind]
    chosen = {"tree": ["w", ("layers", 0)], "prefix": ["w", ("layers", 0), ("layers", 1)],
              "callable": ["w", "b", ("layers", 0)]}[mask_kind]

    def pick(tree):
        return [tree[k] if isinstance(k, str) else tree[k[0]][k[1]] for k in chosen]

    outs, state, _ = run(fo.masked(momentum(), mask), p, gs)
    ref, _, _ = run(momentum(), pick(p), [pick(g) for g in gs])
    for o, r, g in zip(outs, ref, gs):
        assert_trees_close(pick(o), r, rtol=0, atol=0)
        # the unmasked leaves pass through unchanged
        all_keys = ["w", "b", ("layers", 0), ("layers", 1)]
        for k in all_keys:
            if k not in chosen:
                get = (lambda t, k=k: t[k]) if isinstance(k, str) else (lambda t, k=k: t[k[0]][k[1]])
                assert torch.equal(get(o), get(g))
    assert len(fo.tree_leaves(state.inner_state.mu)) == len(chosen)
    check_transform(fo.masked(momentum(), mask), p)


def test_masked_wrong_structure_is_a_clear_error():
    p = params64()
    with pytest.raises(ValueError, match="mask"):
        fo.masked(momentum(), {"w": True, "nope": False}).init(p)


def test_partition_matches_separate_transforms():
    p = params64()
    gs = grads_seq(p, 3)
    labels = {"w": "mom", "b": "frozen", "layers": ["x", "mom"]}
    tx = fo.partition({"mom": momentum(0.2, 0.5), "frozen": fo.set_to_zero(), "x": times(-3.0)},
                      labels)
    outs, state, _ = run(tx, p, gs)
    ref, _, _ = run(momentum(0.2, 0.5), [p["w"], p["layers"][1]],
                    [[g["w"], g["layers"][1]] for g in gs])
    for o, r, g in zip(outs, ref, gs):
        assert_trees_close([o["w"], o["layers"][1]], r, rtol=0, atol=0)
        assert torch.equal(o["b"], torch.zeros_like(g["b"]))
        assert torch.equal(o["layers"][0], -3.0 * g["layers"][0])
    assert set(state.inner_states) == {"mom", "frozen", "x"}
    check_transform(tx, p)
    # labels from a callable
    tx2 = fo.partition({"a": times(2.0), "b": times(0.0)},
                       lambda t: fo.tree_map(lambda x: "a" if x.ndim == 2 else "b", t))
    out, _ = tx2.update(gs[0], tx2.init(p), p)
    assert torch.equal(out["w"], 2 * gs[0]["w"]) and torch.equal(out["b"], 0 * gs[0]["b"])


def test_partition_unknown_label_is_a_clear_error():
    with pytest.raises(ValueError, match="no transform"):
        fo.partition({"a": times(1.0)}, {"w": "a", "b": "zzz", "layers": "a"}).init(params64())


# --------------------------------------------------------------------------- multi_steps


@pytest.mark.parametrize("k", [1, 3])
def test_multi_steps_matches_optax(k):
    p = params64()
    gs = grads_seq(p, 3 * k + 1)
    outs, state, _ = run(fo.multi_steps(momentum(0.1, 0.9), k), p, gs)
    ms = optax.MultiSteps(optax.sgd(0.1, momentum=0.9), every_k_schedule=k)
    jp = to_jax(p)
    s = ms.init(jp)
    for g, o in zip(gs, outs):
        ju, s = ms.update(to_jax(g), s, jp)
        assert_trees_close(o, from_jax(ju), rtol=1e-5, atol=1e-6)  # optax runs in float32
        jp = optax.apply_updates(jp, ju)
    assert int(state.gradient_step) == int(s.gradient_step)
    assert int(state.mini_step) == int(s.mini_step)
    check_transform(fo.multi_steps(momentum(), k), p, steps=4)


def test_multi_steps_schedule_and_bad_k():
    p = params64()
    gs = grads_seq(p, 6)
    # k = 1 for the first gradient step, then 2
    outs, state, _ = run(fo.multi_steps(times(1.0), lambda step: torch.where(step < 1, 1, 2)),
                         p, gs)
    nonzero = [any(bool(x.abs().sum() > 0) for x in fo.tree_leaves(o)) for o in outs]
    assert nonzero == [True, False, True, False, True, False]
    assert_trees_close(outs[2], fo.tree_scale(fo.tree_add(gs[1], gs[2]), 0.5), rtol=1e-14)
    with pytest.raises(ValueError, match="every_k_schedule"):
        fo.multi_steps(times(1.0), 0)


# --------------------------------------------------------------------------- apply_if_finite


def poison(tree):
    return fo.tree_map(lambda x: torch.full_like(x, float("nan")), tree)


@pytest.mark.parametrize("max_errors", [None, 1, 3])
def test_apply_if_finite(max_errors):
    p = params64()
    gs = grads_seq(p, 8)
    bad = {1, 3, 4, 5}
    seq = [poison(g) if i in bad else g for i, g in enumerate(gs)]
    tx = fo.apply_if_finite(momentum(), max_errors)
    outs, state, _ = run(tx, p, seq)
    if max_errors is None:
        # identical to the inner transform run on the finite gradients only
        ref, _, _ = run(momentum(), p, [g for i, g in enumerate(gs) if i not in bad])
        it = iter(ref)
        for i, o in enumerate(outs):
            if i in bad:
                assert all(torch.equal(x, torch.zeros_like(x)) for x in fo.tree_leaves(o))
            else:
                assert_trees_close(o, next(it), rtol=0, atol=0)
        assert int(state.total_notfinite) == 4 and int(state.notfinite_count) == 0
        assert bool(state.last_finite)
        return
    # with max_consecutive_errors: optax's counters and its pass-through rule
    ref = optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), max_errors)
    jp, s = to_jax(p), ref.init(to_jax(p))
    for g, o in zip(seq, outs):
        ju, s = ref.update(to_jax(g), s, jp)
        assert_trees_close(o, from_jax(ju), rtol=1e-5, atol=1e-6)  # optax runs in float32
    if max_errors >= 3:  # no NaN got through: the counters agree with optax's
        assert int(state.total_notfinite) == int(s.total_notfinite) == 4
        assert int(state.notfinite_count) == int(s.notfinite_count) == 0
    else:  # NaN got through into the inner state, as optax's rule says it should
        assert not bool(fo.tree_check_finite(state.inner_state))


def test_apply_if_finite_checks_inner_output():
    p = params64()
    # finite gradients whose inner update overflows: skipped, never returned
    tx = fo.apply_if_finite(times(1e308))
    g = fo.tree_map(lambda x: torch.full_like(x, 10.0), p)
    u, s = tx.update(g, tx.init(p), p)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in fo.tree_leaves(u))
    assert int(s.total_notfinite) == 1
    check_transform(fo.apply_if_finite(momentum()), p)


# --------------------------------------------------------------------------- inject_hyperparams


def test_inject_hyperparams_schedules_and_writes():
    p = params64()
    gs = grads_seq(p, 5)
    sched = fo.schedules.linear(0.1, 0.5, 4)
    tx = fo.inject_hyperparams(momentum)(lr=sched, beta=0.9)
    state = tx.init(p)
    assert set(state.hyperparams) == {"lr", "beta"}
    assert state.hyperparams["beta"].dtype == torch.float64 and state.hyperparams["beta"].ndim == 0
    # reference: the momentum recursion in float64 with lr = sched(t)
    mu = fo.tree_zeros_like(p)
    for t, g in enumerate(gs[:3]):
        u, state = tx.update(g, state, p)
        mu = fo.tree_add(fo.tree_scale(mu, 0.9), g)
        # tensor-step schedules compute in float32
        assert_trees_close(u, fo.tree_scale(mu, -sched(t)), rtol=1e-7)
        assert float(state.hyperparams["lr"]) == pytest.approx(sched(t), rel=1e-7)
    # writing a numeric hyperparameter changes the next update
    state.hyperparams["beta"] = torch.tensor(0.0, dtype=torch.float64)
    u, state = tx.update(gs[3], state, p)
    assert_trees_close(u, fo.tree_scale(gs[3], -sched(3)), rtol=1e-7)
    check_transform(tx, p)


def test_inject_hyperparams_static_args():
    seen = {}

    def factory(s, flag=True, name="x"):
        seen.update(s=s, flag=flag, name=name)
        return times(s)

    tx = fo.inject_hyperparams(factory, static_args=("name",))(2.0, flag=False, name="y")
    state = tx.init(params64())
    assert set(state.hyperparams) == {"s"}
    tx.update(params64(), state)
    assert isinstance(seen["s"], torch.Tensor) and seen["flag"] is False and seen["name"] == "y"


# --------------------------------------------------------------------------- flatten


def test_flatten_matches_unflattened_mixed_dtypes():
    p = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(5),
         "c": [torch.randn(2, 2, dtype=torch.float64), torch.randn(())]}
    gs = grads_seq(p, 3)
    a, _, pa = run(fo.chain(momentum(), times(0.5)), p, gs)
    b, state, pb = run(fo.flatten(fo.chain(momentum(), times(0.5))), p, gs)
    for x, y in zip(a, b):
        fo.testing.assert_trees_equal(x, y)
    fo.testing.assert_trees_equal(pa, pb)
    flat_mu = fo.tree_leaves(state[0].mu)
    assert [m.ndim for m in flat_mu] == [1, 1] and sorted(m.numel() for m in flat_mu) == [6, 16]
    check_transform(fo.flatten(momentum()), p)


def test_flatten_passes_flat_storage_through_without_copy():
    """Params and grads already stored flat (fo.ravel) reach the inner transform as they are;
    the numbers equal the inner transform run on the flat buffers directly."""
    seen = []

    def probe_update(u, s, params=None):
        seen.append((u[0].data_ptr(), params[0].data_ptr()))
        return u, s

    probe = fo.GradientTransformation(lambda p: (), probe_update)
    p, unravel = fo.ravel({"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)})
    g = torch.randn_like(p)
    fo.flatten(probe).update(g, fo.flatten(probe).init(p), p)
    assert seen == [(g.data_ptr(), p.data_ptr())]
    gs = [torch.randn_like(p) for _ in range(3)]
    a, _, pa = run(fo.adamw(1e-2, weight_decay=0.1), p, gs)
    b, _, pb = run(fo.flatten(fo.adamw(1e-2, weight_decay=0.1)), p, gs)
    for x, y in zip(a, b):
        fo.testing.assert_trees_equal(x, y)
    fo.testing.assert_trees_equal(pa, pb)
    assert pb.data_ptr() != p.data_ptr()  # still pure: new parameters, inputs untouched


# --------------------------------------------------------------------------- conditionally_transform


@pytest.mark.parametrize("as_tensor", [False, True])
def test_conditionally_transform(as_tensor):
    p = params64()
    gs = grads_seq(p, 6)
    even = (lambda s: s % 2 == 0) if as_tensor else (lambda s: int(s) % 2 == 0)
    outs, state, _ = run(fo.conditionally_transform(momentum(), even), p, gs)
    ref, _, _ = run(momentum(), p, gs[0::2])
    for i, o in enumerate(outs):
        assert_trees_close(o, ref[i // 2] if i % 2 == 0 else gs[i], rtol=0, atol=0)
    assert int(state.step) == 6 and int(state.inner_state.count) == 3
    check_transform(fo.conditionally_transform(momentum(), even), p)


# --------------------------------------------------------------------------- lookahead


def lookahead_reference(p0, grad_fn, lr, k, alpha, steps):
    """The paper's nested loops in float64: k fast SGD steps, then phi += alpha (theta - phi)."""
    slow = {n: v.clone() for n, v in p0.items()}
    fast = {n: v.clone() for n, v in p0.items()}
    for t in range(steps):
        g = grad_fn(fast)
        fast = {n: fast[n] - lr * g[n] for n in fast}
        if (t + 1) % k == 0:
            slow = {n: slow[n] + alpha * (fast[n] - slow[n]) for n in slow}
            fast = {n: v.clone() for n, v in slow.items()}
    return fast, slow


@pytest.mark.parametrize("k", [1, 3])
def test_lookahead_matches_paper_loops(k):
    p0 = {"x": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64),
          "y": torch.tensor(0.5, dtype=torch.float64)}
    scale = {"x": torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64),
             "y": torch.tensor(2.0, dtype=torch.float64)}

    def grad_fn(p):
        return {n: scale[n] * p[n] for n in p}

    tx = fo.lookahead(momentum(0.1, 0.0), sync_period=k, slow_step_size=0.5)
    params = fo.LookaheadParams.init_synced(p0)
    state = tx.init(params)
    for _ in range(7):
        u, state = tx.update(grad_fn(params.fast), state, params)
        params = fo.apply_updates(params, u)
    fast, slow = lookahead_reference(p0, grad_fn, 0.1, k, 0.5, 7)
    assert_trees_close(params.fast, fast, rtol=1e-12)
    assert_trees_close(params.slow, slow, rtol=1e-12)


def test_lookahead_matches_optax():
    p0 = {"x": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)}
    tx = fo.lookahead(momentum(0.1, 0.9), sync_period=2, slow_step_size=0.3)
    ref = optax.lookahead(optax.sgd(0.1, momentum=0.9), sync_period=2, slow_step_size=0.3)
    params = fo.LookaheadParams.init_synced(p0)
    jparams = optax.LookaheadParams.init_synced(to_jax(p0))
    state, jstate = tx.init(params), ref.init(jparams)
    for _ in range(5):
        u, state = tx.update(fo.tree_scale(params.fast, 2.0), state, params)
        ju, jstate = ref.update(to_jax(fo.tree_scale(params.fast, 2.0)), jstate, jparams)
        assert_trees_close(tuple(u), tuple(from_jax(tuple(ju))), rtol=1e-6, atol=1e-8)
        params = fo.apply_updates(params, u)
        jparams = optax.apply_updates(jparams, ju)


def test_lookahead_needs_lookahead_params():
    tx = fo.lookahead(momentum(), 2, 0.5)
    p = params64()
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))
    with pytest.raises(TypeError, match="LookaheadParams"):
        tx.update(p, tx.init(p), p)
    with pytest.raises(ValueError, match="sync_period"):
        fo.lookahead(momentum(), 0, 0.5)


def test_nested_masked_and_partition_line_up_with_the_remaining_leaves():
    p = {k: torch.ones(2) for k in "abc"}
    inner = fo.masked(fo.scale(10.0), {"a": True, "b": False, "c": True})
    tx = fo.masked(inner, {"a": False, "b": True, "c": True})
    u, _ = tx.update(p, tx.init(p), p)
    assert [float(u[k][0]) for k in "abc"] == [1.0, 1.0, 10.0]
    inner = fo.partition({"x": fo.scale(10.0), "y": fo.scale(3.0)}, {"a": "x", "b": "y", "c": "x"})
    tx = fo.masked(inner, {"a": False, "b": True, "c": True})
    u, _ = tx.update(p, tx.init(p), p)
    assert [float(u[k][0]) for k in "abc"] == [1.0, 3.0, 10.0]
    w = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    tx = fo.masked(fo.muon(1e-2), {"w": True, "b": False})  # muon is itself a partition
    u, _ = tx.update(w, tx.init(w), w)
    assert torch.equal(u["b"], w["b"]) and not torch.equal(u["w"], w["w"])


def test_injected_learning_rate_changes_the_next_update_of_an_alias():
    p, g = {"w": torch.ones(3)}, {"w": torch.ones(3)}
    tx = fo.inject_hyperparams(fo.adam)(learning_rate=1e-3)
    state = tx.init(p)
    u, state = tx.update(g, state, p)
    assert float(u["w"][0]) < 0
    hp = dict(state.hyperparams)
    hp["learning_rate"] = torch.zeros_like(hp["learning_rate"])
    u, state = tx.update(g, state._replace(hyperparams=hp), p)
    assert torch.equal(u["w"], torch.zeros(3))


def test_inject_hyperparams_keeps_function_arguments_and_expands_kwargs():
    p = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    g = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    def with_kwargs(learning_rate, **kwargs):  # a factory that takes **kwargs
        return fo.adamw(learning_rate, **kwargs)

    for factory in (fo.adopt, fo.psgd_kron, with_kwargs):  # adopt has clip_value_fn
        tx = fo.inject_hyperparams(factory)(learning_rate=1e-2)
        state = tx.init(p)
        u, state = tx.update(g, state, p)
        assert "learning_rate" in state.hyperparams
        assert all(torch.isfinite(x).all() for x in fo.tree_leaves(u))
    tx = fo.inject_hyperparams(with_kwargs)(learning_rate=1e-2, weight_decay=0.5)
    assert float(tx.init(p).hyperparams["weight_decay"]) == 0.5  # a **kwargs value is injected
    tx = fo.inject_hyperparams(fo.levenberg_marquardt)(lambda q: q["b"] - 1.0)
    with pytest.raises(ValueError, match="static_args"):
        tx.init(p)
