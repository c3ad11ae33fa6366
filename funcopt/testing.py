"""Checks and hypothesis strategies for testing transforms.

Use them in your own test suite::

    from hypothesis import given, settings
    import funcopt as fo
    from funcopt.testing import check_transform, pytrees

    @settings(max_examples=20, deadline=None)
    @given(pytrees())
    def test_my_transform(params):
        check_transform(fo.chain(my_transform(), fo.scale(-0.1)), params)

:func:`pytrees` needs ``hypothesis`` (``pip install funcopt[test]``); the checks need only torch.
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import optree
import torch

from funcopt.base import GradientTransformation, PyTree

__all__ = [
    "pytrees",
    "tensors",
    "random_like",
    "assert_trees_equal",
    "assert_trees_close",
    "check_state",
    "check_transform",
]


# --------------------------------------------------------------------------- comparisons


def _describe(path: tuple) -> str:
    return "root" if not path else "".join(f"[{p!r}]" for p in path)


def _leaves_with_paths(tree: PyTree) -> tuple[list[tuple], list[Any], Any]:
    paths, leaves, treedef = optree.tree_flatten_with_path(tree)
    return paths, leaves, treedef


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        both_nan = torch.isnan(a) & torch.isnan(b)
        return bool(((a == b) | both_nan).all())
    return bool(torch.equal(a, b))


def assert_trees_equal(a: PyTree, b: PyTree, what: str = "trees") -> None:
    """Assert same structure and bit-identical leaves (NaN equals NaN), naming the first difference."""
    pa, la, ta = _leaves_with_paths(a)
    _, lb, tb = _leaves_with_paths(b)
    if ta != tb:
        raise AssertionError(f"{what}: tree structures differ:\n  {ta}\n  {tb}")
    for path, x, y in zip(pa, la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.device != y.device or not _same_values(x, y):
                raise AssertionError(
                    f"{what}: leaf {_describe(path)} differs "
                    f"({x.dtype} {tuple(x.shape)} on {x.device} vs "
                    f"{y.dtype} {tuple(y.shape)} on {y.device})"
                )
        elif x != y:
            raise AssertionError(f"{what}: leaf {_describe(path)} differs: {x!r} vs {y!r}")


def assert_trees_close(
    a: PyTree, b: PyTree, rtol: float = 1e-6, atol: float = 1e-8, what: str = "trees"
) -> None:
    """Assert same structure and ``|a - b| <= atol + rtol |b|`` leaf by leaf (compared in float64)."""
    pa, la, ta = _leaves_with_paths(a)
    _, lb, tb = _leaves_with_paths(b)
    if ta != tb:
        raise AssertionError(f"{what}: tree structures differ:\n  {ta}\n  {tb}")
    for path, x, y in zip(pa, la, lb):
        x64 = torch.as_tensor(x).detach().to("cpu", torch.float64)
        y64 = torch.as_tensor(y).detach().to("cpu", torch.float64)
        if x64.shape != y64.shape:
            raise AssertionError(
                f"{what}: leaf {_describe(path)} shapes differ: {tuple(x64.shape)} vs "
                f"{tuple(y64.shape)}"
            )
        if not torch.allclose(x64, y64, rtol=rtol, atol=atol, equal_nan=True):
            err = (x64 - y64).abs().max().item()
            raise AssertionError(
                f"{what}: leaf {_describe(path)} differs by up to {err:.3e} "
                f"(rtol={rtol}, atol={atol})"
            )


def random_like(tree: PyTree, seed: int = 0, scale: float = 1.0) -> PyTree:
    """A tree of standard-normal values (times ``scale``) shaped, typed and placed like ``tree``."""
    gen = torch.Generator().manual_seed(seed)

    def draw(x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return x.clone()
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64) * scale
        return v.to(device=x.device, dtype=x.dtype)

    return optree.tree_map(draw, tree)


def _clone(tree: PyTree) -> PyTree:
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


# --------------------------------------------------------------------------- state checks


def check_state(state: PyTree, who: str = "state") -> None:
    """Assert ``state`` is a tuple/NamedTuple (or, as for ``named_chain``, a dict) tree whose
    leaves are all tensors and whose 0-d integer leaves (step counters) are int64."""
    if not isinstance(state, (tuple, dict)):
        raise AssertionError(
            f"{who} is a {type(state).__name__}; a state must be a tuple or NamedTuple "
            "(use EmptyState() for no state)"
        )
    paths, leaves, _ = _leaves_with_paths(state)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise AssertionError(
                f"{who} leaf {_describe(path)} is a {type(leaf).__name__}, not a tensor; "
                "keep counters and hyperparameters as 0-d tensors so the state saves and compiles"
            )
        if leaf.ndim == 0 and not leaf.is_floating_point() and leaf.dtype not in (
            torch.int64, torch.bool
        ):
            raise AssertionError(
                f"{who} leaf {_describe(path)} is a 0-d {leaf.dtype} counter; "
                "make step counters with base.step_counter (0-d int64)"
            )


def _spec(tree: PyTree) -> tuple:
    leaves, treedef = optree.tree_flatten(tree)
    return treedef, [(tuple(x.shape), x.dtype, x.device) for x in leaves]


def _check_same_spec(before: PyTree, after: PyTree, what: str) -> None:
    (ta, la), (tb, lb) = _spec(before), _spec(after)
    if ta != tb:
        raise AssertionError(f"{what}: tree structure changed:\n  before: {ta}\n  after:  {tb}")
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            raise AssertionError(
                f"{what}: leaf #{i} changed (shape, dtype, device) from {x} to {y}"
            )


def _roundtrip(state: PyTree) -> PyTree:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        return torch.load(buf, weights_only=True)
    except Exception:  # NamedTuple classes are not on the weights_only allow-list
        buf.seek(0)
        return torch.load(buf, weights_only=False)


# --------------------------------------------------------------------------- the main check


def _run(tx, grads_seq, state, params, extra, seed):
    """Run ``tx`` over ``grads_seq`` with a fixed RNG; return the updates and final state."""
    outs = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for g in grads_seq:
            upd, state = tx.update(g, state, params, **extra)
            outs.append(upd)
            params = optree.tree_map(
                lambda p, u: p + u.to(p.dtype) if p.is_floating_point() else p, params, upd
            )
    return outs, state


def check_transform(
    tx: GradientTransformation, params: PyTree, grads: PyTree | None = None, steps: int = 3,
    **extra: Any,
) -> PyTree:
    """Run ``tx`` for ``steps`` steps and assert the contract; return the final state.

    Asserts: the updates have the structure, shapes, dtypes and devices of the gradients; the
    inputs (params, gradients, state) are never mutated; the state is a tuple/NamedTuple tree
    of tensors with 0-d int64 step counters; its structure, shapes and dtypes are stable across
    steps; and a ``torch.save``/``torch.load`` round trip of the state mid-run continues with
    bit-identical updates and state. ``grads`` defaults to seeded normal noise shaped like
    ``params`` (a different draw each step); ``extra`` goes to every ``update`` call.
    Raises AssertionError with a message naming what broke.
    """
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"check_transform needs a GradientTransformation, got {type(tx).__name__}")
    if steps < 2:
        raise ValueError(f"steps={steps}: need at least 2 to check a mid-run checkpoint")
    if grads is None:
        grads_seq = [random_like(params, seed=s + 1) for s in range(steps)]
    else:
        _check_same_spec(params, grads, "grads vs params")
        grads_seq = [grads] * steps
    params0 = _clone(params)
    grads0 = [_clone(g) for g in grads_seq]

    state = tx.init(params)
    assert_trees_equal(params, params0, "init mutated params")
    check_state(state, "init state")

    half = steps // 2
    states, p = [state], params
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        for i, g in enumerate(grads_seq[:half]):
            state_before, p_before = _clone(state), _clone(p)
            upd, state = tx.update(g, state, p, **extra)
            assert_trees_equal(p, p_before, f"update step {i} mutated params")
            assert_trees_equal(grads_seq[i], grads0[i], f"update step {i} mutated the gradients")
            assert_trees_equal(states[-1], state_before, f"update step {i} mutated the state")
            _check_same_spec(g, upd, f"step {i} updates vs gradients")
            check_state(state, f"state after step {i}")
            _check_same_spec(states[0], state, f"state after step {i} vs init state")
            states.append(state)
            p = optree.tree_map(
                lambda a, u: a + u.to(a.dtype) if a.is_floating_point() else a, p, upd
            )
        assert_trees_equal(params, params0, "update mutated params")

    rest = grads_seq[half:]
    loaded = _roundtrip(state)
    assert_trees_equal(loaded, state, "state after torch.save/torch.load")
    if _spec(loaded) != _spec(state) or type(loaded) is not type(state):
        raise AssertionError("torch.save/torch.load changed the state's types or structure")
    out_a, state_a = _run(tx, rest, state, p, extra, seed=99)
    out_b, state_b = _run(tx, rest, loaded, p, extra, seed=99)
    for i, (ua, ub) in enumerate(zip(out_a, out_b)):
        _check_same_spec(rest[i], ua, f"step {half + i} updates vs gradients")
        assert_trees_equal(ua, ub, f"updates at step {half + i} after a save/load round trip")
    assert_trees_equal(state_a, state_b, "final state after a save/load round trip")
    _check_same_spec(states[0], state_a, "final state vs init state")
    check_state(state_a, "final state")
    for i, (g, g0) in enumerate(zip(grads_seq, grads0)):
        assert_trees_equal(g, g0, f"update mutated the gradients of step {i}")
    assert_trees_equal(params, params0, "update mutated params")
    return state_a


# --------------------------------------------------------------------------- hypothesis strategies


class Pair(NamedTuple):
    """A NamedTuple node used by :func:`pytrees`."""

    first: Any
    second: Any


def _hypothesis():
    try:
        import hypothesis.strategies as st
    except ImportError as e:  # pragma: no cover
        raise ImportError(
            "funcopt.testing.pytrees needs hypothesis: pip install funcopt[test]"
        ) from e
    return st


def tensors(dtypes=(torch.float32, torch.float64), max_ndim: int = 4, max_side: int = 3,
            device: str | torch.device = "cpu"):
    """A hypothesis strategy of tensors with 0..``max_ndim`` dims of 1..``max_side`` elements,
    a dtype from ``dtypes`` and seeded standard-normal values."""
    st = _hypothesis()
    dtypes = tuple(dtypes)

    @st.composite
    def draw(draw_):
        shape = draw_(st.lists(st.integers(1, max_side), min_size=0, max_size=max_ndim))
        dtype = draw_(st.sampled_from(dtypes))
        seed = draw_(st.integers(0, 2**31 - 1))
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)

    return draw()


def pytrees(dtypes=(torch.float32, torch.float64), max_leaves: int = 6, max_ndim: int = 4,
            max_side: int = 3, device: str | torch.device = "cpu"):
    """A hypothesis strategy of random parameter pytrees: nested dicts, lists, tuples and
    NamedTuples (:class:`Pair`) of 0-d to ``max_ndim``-d tensors (each side 1..``max_side``)
    with dtypes drawn from ``dtypes``. Every tree has at least one leaf and at most
    about ``max_leaves``."""
    st = _hypothesis()
    leaf = tensors(dtypes, max_ndim, max_side, device)
    keys = st.text(alphabet="abcdefgh", min_size=1, max_size=3)

    def nodes(children):
        return st.one_of(
            st.dictionaries(keys, children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.tuples(children, children).map(lambda t: Pair(*t)),
        )

    return st.recursive(leaf, nodes, max_leaves=max_leaves)
