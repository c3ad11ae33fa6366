"""Properties of every optimizer in a table and of the combinators, checked with hypothesis.

The table names optimizers by their funcopt alias; an alias that does not exist (yet) is
skipped with its name, so the table fills itself as optimizers are added.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import funcopt as fo
from funcopt import schedules as S
from funcopt.testing import assert_trees_close, assert_trees_equal, check_transform, pytrees

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# name -> (learning rate on the quadratic, learning rate on Rosenbrock, extra kwargs)
TABLE = {
    "sgd": (0.05, 2e-3, {}),
    "adam": (0.05, 0.02, {}),
    "adamw": (0.05, 0.02, {"weight_decay": 1e-4}),
    "nadam": (0.05, 0.02, {}),
    "amsgrad": (0.05, 0.02, {}),
    "adamax": (0.05, 0.1, {}),
    "rmsprop": (0.01, 1e-2, {}),
    "adagrad": (0.5, 1.0, {}),
    "lion": (0.01, 5e-3, {}),
    "laprop": (0.05, 0.02, {}),
    "adopt": (0.05, 0.1, {}),
    "schedule_free_adamw": (0.05, 0.02, {}),
    "schedule_free_sgd": (0.05, 2e-3, {}),
}
NAMES = sorted(TABLE)
# arguments that are functions, not schedules (inject_hyperparams must pass them through)
STATIC = {"adopt": ("clip_value_fn",)}
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def build(name, lr=None, **overrides):
    factory = getattr(fo, name, None)
    if factory is None:
        pytest.skip(f"fo.{name} does not exist yet")
    lr_quad, _, kwargs = TABLE[name]
    return factory(lr_quad if lr is None else lr, **{**kwargs, **overrides})


def finite(tree):
    return bool(fo.tree_check_finite(tree))


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6, **SETTINGS)
@given(params=pytrees(dtypes=DTYPES, max_leaves=4))
def test_contract(name, params):
    """Structure/shape/dtype kept, inputs unchanged, state saves and continues identically."""
    check_transform(build(name), params)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=3, **SETTINGS)
@given(params=pytrees(max_leaves=3))
def test_works_in_chain_and_under_inject_hyperparams(name, params):
    tx = build(name)
    check_transform(fo.chain(fo.identity(), tx), params)
    injected = fo.inject_hyperparams(getattr(fo, name), static_args=STATIC.get(name, ()))(TABLE[name][0], **TABLE[name][2])
    check_transform(injected, params)
    # the injected transform gives the plain one's numbers
    g = fo.testing.random_like(params, seed=5)
    u1, _ = tx.update(g, tx.init(params), params)
    u2, _ = injected.update(g, injected.init(params), params)
    assert_trees_close(u2, u1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_structure_is_a_clear_error(name):
    tx = build(name)
    params = {"a": torch.ones(3), "b": torch.ones(2)}
    state = tx.init(params)
    with pytest.raises(ValueError, match="structure|leaves"):
        tx.update({"a": torch.ones(3), "b": torch.ones(2), "c": torch.ones(1)}, state, params)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6, **SETTINGS)
@given(lr=st.floats(-1.0, 10.0, allow_nan=False), scale=st.floats(0.0, 1e6))
def test_fuzzed_hyperparameters_never_crash_or_leak_nan(name, lr, scale):
    """A learning rate is either refused with ValueError when built, or gives finite updates
    for finite gradients (of any size) over a few steps."""
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    try:
        tx = build(name, lr=lr)
    except ValueError:
        return
    state = tx.init(params)
    for i in range(3):
        g = fo.testing.random_like(params, seed=i, scale=scale)
        u, state = tx.update(g, state, params)
        assert finite(u), f"{name}(lr={lr}) returned non-finite updates for gradient scale {scale}"
        params = fo.apply_updates(params, u)


def run_steps(tx, x, loss_and_grad, steps):
    state = tx.init(x)
    for _ in range(steps):
        value, g = loss_and_grad(x)
        u, state = tx.update(g, state, x, value=value)
        x = fo.apply_updates(x, u)
    return x


H = torch.tensor([1.0, 3.0, 10.0, 0.5], dtype=torch.float64)


def quadratic(p):
    """``0.5 sum h x^2`` and its gradient (closed form: these loops run 600 steps each)."""
    x = p["x"]
    return 0.5 * (H * x * x).sum(), {"x": H * x}


def rosenbrock(p):
    """``(1 - a)^2 + 100 (b - a^2)^2`` and its gradient."""
    a, b = p["x"]
    r = b - a * a
    grad = torch.stack([-2 * (1 - a) - 400 * a * r, 200 * r])
    return (1 - a) ** 2 + 100 * r * r, {"x": grad}


def test_closed_form_gradients_match_autograd():
    x = {"x": torch.tensor([-1.5, 2.0, 0.3, -0.7], dtype=torch.float64)}
    for f, p in ((quadratic, x), (rosenbrock, {"x": x["x"][:2]})):
        value, g = f(p)
        auto = torch.func.grad(lambda q, f=f: f(q)[0])(p)
        torch.testing.assert_close(g["x"], auto["x"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_a_quadratic(name):
    x0 = {"x": torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)}
    x = run_steps(build(name), x0, quadratic, 600)
    loss, loss0 = float(quadratic(x)[0]), float(quadratic(x0)[0])
    assert loss < 1e-3 * loss0, f"{name}: loss {loss:.3e}"


@pytest.mark.parametrize("name", NAMES)
def test_progress_on_rosenbrock(name):
    x0 = {"x": torch.tensor([-1.5, 2.0], dtype=torch.float64)}
    x = run_steps(build(name, lr=TABLE[name][1]), x0, rosenbrock, 1000)
    loss, loss0 = float(rosenbrock(x)[0]), float(rosenbrock(x0)[0])
    assert loss < 0.2 * loss0, f"{name}: loss {loss:.3e}"


# --------------------------------------------------------------------------- combinators


def affine(a, b):
    """``u -> a u + b g0`` with a counter: a small stateful transform for algebraic checks."""

    def init(params):
        return (fo.step_counter(params),)

    def update(updates, state, params=None, **extra):
        u, treedef = fo.engine.leaves(updates, params, "affine")  # checked leaves
        out = fo.tree_unflatten(treedef, [(a * x + b).to(x.dtype) for x in u])
        return out, (fo.increment(state[0]),)

    return fo.GradientTransformation(init, update)


@settings(max_examples=20, **SETTINGS)
@given(params=pytrees(dtypes=DTYPES))
def test_empty_chain_is_identity(params):
    g = fo.testing.random_like(params, seed=3)
    u, s = fo.chain().update(g, fo.chain().init(params), params)
    assert s == () and all(x is y for x, y in zip(fo.tree_leaves(u), fo.tree_leaves(g)))
    check_transform(fo.chain(), params)


@settings(max_examples=20, **SETTINGS)
@given(params=pytrees(dtypes=(torch.float64,)),
       coef=st.lists(st.floats(-3, 3, allow_nan=False), min_size=6, max_size=6))
def test_chain_is_associative(params, coef):
    a, b, c = affine(*coef[:2]), affine(*coef[2:4]), affine(*coef[4:])
    if hasattr(fo, "scale_by_adam"):
        b = fo.chain(b, fo.scale_by_adam())
    left, right = fo.chain(a, fo.chain(b, c)), fo.chain(fo.chain(a, b), c)
    g = fo.testing.random_like(params, seed=1)
    sl, sr = left.init(params), right.init(params)
    for _ in range(3):
        ul, sl = left.update(g, sl, params)
        ur, sr = right.update(g, sr, params)
        assert_trees_equal(ul, ur)


@settings(max_examples=20, **SETTINGS)
@given(params=pytrees(dtypes=(torch.float64,)), s=st.floats(-1e3, 1e3, allow_nan=False),
       a=st.floats(-10, 10, allow_nan=False), b=st.floats(-10, 10, allow_nan=False))
def test_scale_is_linear(params, s, a, b):
    if not hasattr(fo, "scale"):
        pytest.skip("fo.scale does not exist yet")
    tx = fo.scale(s)
    g1, g2 = fo.testing.random_like(params, seed=1), fo.testing.random_like(params, seed=2)
    mix = fo.tree_add(fo.tree_scale(g1, a), fo.tree_scale(g2, b))
    apply = lambda g: tx.update(g, tx.init(params), params)[0]
    expected = fo.tree_add(fo.tree_scale(apply(g1), a), fo.tree_scale(apply(g2), b))
    assert_trees_close(apply(mix), expected, rtol=1e-9, atol=1e-9 * (1 + abs(s)) * 20)
    assert_trees_close(apply(g1), fo.tree_scale(g1, s), rtol=1e-15, atol=0)


@settings(max_examples=25, **SETTINGS)
@given(params=pytrees(dtypes=DTYPES), data=st.data())
def test_apply_if_finite_never_lets_nan_through(params, data):
    inner = build("adam") if hasattr(fo, "adam") else affine(1.0, 0.0)
    tx = fo.apply_if_finite(inner)
    state = tx.init(params)
    n_leaves = len(fo.tree_leaves(params))
    for i in range(4):
        g = fo.testing.random_like(params, seed=i)
        bad = data.draw(st.sets(st.integers(0, n_leaves - 1), max_size=n_leaves))
        value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        leaves, treedef = fo.tree_flatten(g)
        leaves = [x.flatten().index_fill(0, torch.tensor([0]), value).view(x.shape)
                  if j in bad else x for j, x in enumerate(leaves)]
        u, state = tx.update(fo.tree_unflatten(treedef, leaves), state, params)
        assert finite(u) and finite(state.inner_state)
        assert bool(state.last_finite) == (not bad)


@settings(max_examples=20, **SETTINGS)
@given(params=pytrees(dtypes=(torch.float64,), max_leaves=4), k=st.integers(1, 4))
def test_multi_steps_equals_one_step_on_the_mean(params, k):
    inner = fo.chain(affine(0.5, 0.1), fo.scale_by_adam()) if hasattr(fo, "scale_by_adam") \
        else affine(0.5, 0.1)
    tx = fo.multi_steps(inner, k)
    grads = [fo.testing.random_like(params, seed=i) for i in range(k)]
    state = tx.init(params)
    for i, g in enumerate(grads):
        u, state = tx.update(g, state, params)
        if i < k - 1:
            assert all(torch.equal(x, torch.zeros_like(x)) for x in fo.tree_leaves(u))
    mean = fo.tree_scale(grads[0], 0.0)
    for g in grads:
        mean = fo.tree_add(mean, g, alpha=1.0 / k)
    ref, ref_state = inner.update(mean, inner.init(params), params)
    # the running mean and the plain mean differ by rounding, which Adam's 1/sqrt(v) amplifies
    assert_trees_close(u, ref, rtol=1e-6, atol=1e-8)
    assert_trees_close(state.inner_state, ref_state, rtol=1e-6, atol=1e-8)


@settings(max_examples=20, **SETTINGS)
@given(params=pytrees(max_leaves=3))
def test_combinators_keep_the_contract(params):
    inner = affine(0.5, 0.0)
    for tx in (fo.masked(inner, True), fo.partition({"a": inner}, "a"), fo.multi_steps(inner, 2),
               fo.apply_if_finite(inner), fo.flatten(inner), fo.inject_hyperparams(affine)(0.5, 0.1),
               fo.conditionally_transform(inner, lambda s: s % 2 == 0)):
        check_transform(tx, params, steps=4)


@pytest.mark.parametrize("make", [
    lambda: fo.masked(affine(1.0, 0.0), {"a": True, "b": False}),
    lambda: fo.partition({"x": affine(1.0, 0.0)}, {"a": "x", "b": "x"}),
    lambda: fo.multi_steps(affine(1.0, 0.0), 2),
    lambda: fo.flatten(affine(1.0, 0.0)),
])
def test_combinators_reject_mismatched_trees(make):
    tx = make()
    params = {"a": torch.ones(3), "b": torch.ones(2)}
    state = tx.init(params)
    with pytest.raises((ValueError, TypeError)):
        tx.update({"a": torch.ones(3), "b": torch.ones(2), "c": torch.ones(1)}, state, params)


# --------------------------------------------------------------------------- schedules


@settings(max_examples=30, **SETTINGS)
@given(v0=st.floats(0, 10), v1=st.floats(0, 10), steps=st.integers(1, 1000),
       warm=st.integers(0, 100), power=st.floats(0.1, 4), t=st.integers(0, 3000),
       alpha=st.floats(0, 1), rate=st.floats(0.01, 0.999))
def test_schedules_stay_within_bounds(v0, v1, steps, warm, power, t, alpha, rate):
    lo, hi = min(v0, v1), max(v0, v1)
    tol = 1e-6 * (1 + hi)
    checks = [
        (S.linear(v0, v1, steps), lo, hi),
        (S.polynomial(v0, v1, power, steps), lo, hi),
        (S.cosine_decay(v0, steps, alpha), alpha * v0, v0),
        (S.warmup_cosine_decay(v0, v1, warm, warm + steps, end_value=0.0), 0.0, hi),
        (S.exponential_decay(v0, steps, rate, end_value=v0 * alpha), v0 * alpha, v0),
        (S.linear_onecycle(steps + 10, v1), v1 / 25 / 1e4, v1),
        (S.inverse_sqrt(v0, warm), 0.0, v0),
        (S.palm_beta2(power), 0.0, 1.0),
        (S.piecewise_constant(v0, {steps: alpha}), v0 * alpha, v0),
    ]
    for sched, low, high in checks:
        for step in (t, torch.tensor(t)):
            v = float(sched(step))
            assert low - tol <= v <= high + tol, (sched, step, v, low, high)
