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
    "check_vmap",
    "check_compile",
    "check_hyperparameter_grad",
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
    """``torch.save`` then ``torch.load(weights_only=True)``: funcopt registers its state
    classes as safe globals, so no fallback to an unrestricted load is needed (or taken)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        return torch.load(buf, weights_only=True)
    except Exception as e:
        lines = [x.strip() for x in str(e).splitlines() if "GLOBAL" in x or "Unsupported" in x]
        raise AssertionError(
            "the state does not load with torch.load(..., weights_only=True): "
            f"{(lines or str(e).splitlines() or [''])[0]}\nRegister your state classes with "
            "torch.serialization.add_safe_globals([...]) and keep every leaf a tensor") from e


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


def _check_refuses_bad_shape(tx: GradientTransformation, params: PyTree, extra: Any) -> None:
    """An update whose first leaf has the wrong shape must raise ValueError/TypeError."""
    paths, leaves, treedef = _leaves_with_paths(params)
    if not leaves:
        return
    bad = [leaves[0].unsqueeze(-1).expand(*leaves[0].shape, 2).clone()] + list(leaves[1:])
    try:
        tx.update(optree.tree_unflatten(treedef, bad), tx.init(params), params, **extra)
    except (ValueError, TypeError):
        return
    except Exception as e:
        raise AssertionError(
            f"gradients whose leaf {_describe(paths[0])} has shape {tuple(bad[0].shape)} (the "
            f"parameter: {tuple(leaves[0].shape)}) failed with {type(e).__name__}, not a "
            "ValueError naming the leaf; check leaves with funcopt.engine.leaves") from e
    raise AssertionError(
        f"gradients whose leaf {_describe(paths[0])} has shape {tuple(bad[0].shape)} (the "
        f"parameter: {tuple(leaves[0].shape)}) were accepted; check leaves with "
        "funcopt.engine.leaves")


def check_transform(
    tx: GradientTransformation, params: PyTree, grads: PyTree | None = None, steps: int = 3,
    *, vmap: bool = True, compile: bool = True, shapes: bool = True, **extra: Any,
) -> PyTree:
    """Run ``tx`` for ``steps`` steps and assert the contract; return the final state.

    Asserts: the updates have the structure, shapes, dtypes and devices of the gradients; the
    inputs (params, gradients, state) are never mutated; the state is a tuple/NamedTuple tree
    of tensors with 0-d int64 step counters; its structure, shapes and dtypes are stable across
    steps; and a ``torch.save``/``torch.load`` round trip of the state mid-run continues with
    bit-identical updates and state (a ``weights_only=True`` load, no fallback). With
    ``shapes`` (default), gradients of a wrong shape must raise ValueError/TypeError; with
    ``vmap`` (default), :func:`check_vmap`; with ``compile`` (default), :func:`check_compile`.
    ``grads`` defaults to seeded normal noise shaped like ``params`` (a different draw each
    step); ``extra`` goes to every ``update`` call. For a hyperparameter's derivative through
    the updates see :func:`check_hyperparameter_grad`. Raises AssertionError with a message
    naming what broke.
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
    if shapes:
        _check_refuses_bad_shape(tx, params, extra)
    if vmap:
        check_vmap(tx, params, **extra)
    if compile:
        check_compile(tx, params, **extra)
    return state_a


# --------------------------------------------------------------------------- torch.func and compile


def _tol(tree: PyTree) -> tuple[float, float]:
    """(rtol, atol) for comparing two computations of the same step in the tree's dtypes."""
    dtypes = {x.dtype for x in optree.tree_leaves(tree)}
    if dtypes <= {torch.float64}:
        return 1e-5, 1e-9
    if dtypes <= {torch.float32, torch.float64}:
        return 1e-4, 1e-6
    return 5e-2, 1e-2


def _steps(tx, params, grads_seq, extra):
    state = tx.init(params)
    for g in grads_seq:
        upd, state = tx.update(g, state, params, **extra)
        params = optree.tree_map(lambda a, u: a + u.to(a.dtype), params, upd)
    return params, state


def check_vmap(tx: GradientTransformation, params: PyTree, problems: int = 3, steps: int = 3,
               **extra: Any) -> None:
    """Assert that ``torch.func.vmap`` over ``problems`` independent problems (params, gradients
    and state with a leading batch dimension) gives a Python loop's numbers.

    Random draws use ``vmap(..., randomness="same")`` and the same seed for every problem of
    the loop. ``extra`` is passed unbatched to every update.
    """
    batch = problems
    stacked = optree.tree_map(lambda x: torch.stack(
        [x * (1.0 + 0.5 * i) if x.is_floating_point() else x for i in range(batch)]), params)
    grads = [optree.tree_map(lambda x, s=s: torch.stack(
        [v for v in random_like(x.unsqueeze(0).expand(batch, *x.shape).contiguous(),
                                seed=s + 11)]), params) for s in range(steps)]

    treedef = optree.tree_structure(params)

    def one(p_leaves, *g_leaves):  # flat lists in and out: vmap sees tensors only
        p, state = _steps(tx, optree.tree_unflatten(treedef, p_leaves),
                          [optree.tree_unflatten(treedef, g) for g in g_leaves], extra)
        return optree.tree_leaves(p), optree.tree_leaves(state)

    flat_grads = [optree.tree_leaves(g) for g in grads]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        got = torch.func.vmap(one, randomness="same")(optree.tree_leaves(stacked), *flat_grads)
    rtol, atol = _tol(params)
    for i in range(batch):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            want = one([x[i] for x in optree.tree_leaves(stacked)],
                       *[[x[i] for x in g] for g in flat_grads])
        assert_trees_close(optree.tree_map(lambda x, i=i: x[i], got), want, rtol=rtol,
                           atol=atol, what=f"vmap vs a loop, problem {i} (params, state)")


def check_compile(tx: GradientTransformation, params: PyTree, steps: int = 4,
                  **extra: Any) -> None:
    """Assert that ``torch.compile(tx.update, fullgraph=True)`` traces, gives the eager
    numbers, and compiles nothing new after the second step (a recompile every step would
    cost seconds each). Uses a counting backend that runs the graph eagerly."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(tx.update, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    grads_seq = [random_like(params, seed=s + 21) for s in range(steps)]
    state_e = state_c = tx.init(params)
    p_e = p_c = params
    rtol, atol = _tol(params)
    frames = []
    for i, g in enumerate(grads_seq):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            u_e, state_e = tx.update(g, state_e, p_e, **extra)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            u_c, state_c = compiled(g, state_c, p_c, **extra)
        assert_trees_close(u_c, u_e, rtol=rtol, atol=atol, what=f"compiled update, step {i}")
        p_e = optree.tree_map(lambda a, u: a + u.to(a.dtype), p_e, u_e)
        p_c = optree.tree_map(lambda a, u: a + u.to(a.dtype), p_c, u_c)
        frames.append(counter.frame_count)
    if frames[-1] != frames[1]:
        raise AssertionError(
            f"torch.compile recompiled after the second step (graphs compiled after each "
            f"step: {frames}); keep counters and hyperparameters 0-d tensors, not Python numbers")


def check_hyperparameter_grad(make: Any, value: float, params: PyTree, steps: int = 3,
                              rtol: float = 1e-4, **extra: Any) -> None:
    """Assert that the derivative of a loss after ``steps`` unrolled updates of ``make(h)``
    with respect to the hyperparameter ``h`` (a 0-d float64 tensor) matches central finite
    differences: a hyperparameter given as a tensor must keep its graph through ``update``.

    The loss is ``sum((theta - 1)^2)`` of the final parameters, with the gradient of the
    same loss as the updates' input (a quadratic, so it is smooth in ``h``).
    """
    p64 = optree.tree_map(lambda x: x.detach().to(torch.float64), params)

    def loss(p):
        return sum(((x - 1.0) ** 2).sum() for x in optree.tree_leaves(p))

    def unrolled(h):
        tx = make(h)
        p, state = p64, tx.init(p64)
        for _ in range(steps):
            g = torch.func.grad(loss)(p)
            upd, state = tx.update(g, state, p, **extra)
            p = optree.tree_map(lambda a, u: a + u, p, upd)
        return loss(p)

    h = torch.tensor(float(value), dtype=torch.float64)
    got = float(torch.func.grad(unrolled)(h))
    eps = 1e-6 * max(1.0, abs(float(value)))
    want = float((unrolled(h + eps) - unrolled(h - eps)) / (2 * eps))
    if not abs(got - want) <= rtol * abs(want) + 1e-8:
        raise AssertionError(
            f"d loss / d hyperparameter through {steps} updates is {got:.6g}, finite differences "
            f"give {want:.6g}: the hyperparameter lost its graph (read on the host, or detached)")


# --------------------------------------------------------------------------- hypothesis strategies


class Pair(NamedTuple):
    """A NamedTuple node used by :func:`pytrees`."""

    first: Any
    second: Any


torch.serialization.add_safe_globals([Pair])  # trees of Pair nodes load with weights_only=True


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
