"""Flat parameter storage: ravel/unravel are exact, zero-copy, and a flat step equals the tree step."""

import pytest
import torch
from torch.func import grad

import funcopt as fo


def _tree(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g, dtype=dtype), "b": [torch.randn(4, generator=g, dtype=dtype),
            torch.randn((), generator=g, dtype=dtype)], "c": (torch.randn(2, 1, 2, generator=g, dtype=dtype),)}


def test_round_trip_and_views():
    tree = _tree()
    flat, unravel = fo.ravel(tree)
    assert flat.shape == (12 + 4 + 1 + 4,)
    back = unravel(flat)
    for a, b in zip(fo.tree_leaves(tree), fo.tree_leaves(back)):
        assert torch.equal(a, b) and a.dtype == b.dtype
    for leaf in fo.tree_leaves(back):  # views of the one buffer, no copies
        assert leaf.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    # the original is untouched by writes into the buffer
    flat.add_(1.0)
    assert not torch.equal(fo.tree_leaves(tree)[0], fo.tree_leaves(unravel(flat))[0])


def test_mixed_dtypes_give_one_buffer_per_dtype():
    tree = {"a": torch.ones(3), "b": torch.ones(2, dtype=torch.float64), "c": torch.zeros(4)}
    flat, unravel = fo.ravel(tree)
    assert isinstance(flat, tuple) and [b.dtype for b in flat] == [torch.float32, torch.float64]
    assert [b.numel() for b in flat] == [7, 2]
    back = unravel(flat)
    assert back["b"].dtype == torch.float64 and torch.equal(back["c"], tree["c"])


def test_gradient_wrt_flat_equals_tree_gradient_and_adamw_steps_agree():
    tree = _tree()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(p):
        h = torch.tanh(x @ p["w"].T) @ p["b"][0][:3] * p["b"][1]
        return (h ** 2).sum() + p["c"][0].pow(2).sum()

    flat, unravel = fo.ravel(tree)
    g_tree = grad(loss)(tree)
    g_flat = grad(lambda f: loss(unravel(f)))(flat)
    torch.testing.assert_close(unravel(g_flat), g_tree, rtol=0, atol=1e-14)

    tx = fo.adamw(1e-2, weight_decay=0.1)
    s_tree, s_flat, p_tree, p_flat = tx.init(tree), tx.init(flat), tree, flat
    for _ in range(5):
        u, s_tree = tx.update(grad(loss)(p_tree), s_tree, p_tree)
        p_tree = fo.apply_updates(p_tree, u)
        u, s_flat = tx.update(grad(lambda f: loss(unravel(f)))(p_flat), s_flat, p_flat)
        p_flat = fo.apply_updates(p_flat, u)
    torch.testing.assert_close(unravel(p_flat), p_tree, rtol=1e-12, atol=1e-14)


def test_unravel_rejects_wrong_sizes():
    flat, unravel = fo.ravel(_tree())
    with pytest.raises(ValueError, match="does not match"):
        unravel(torch.zeros(flat.numel() + 1, dtype=flat.dtype))


def test_non_tensor_leaf_is_an_error():
    with pytest.raises(TypeError, match="not a tensor"):
        fo.ravel({"a": torch.ones(2), "b": 3.0})


def test_donated_step_gives_the_pure_numbers_in_the_input_buffers():
    tx = fo.adamw(1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(50, generator=g, dtype=torch.float64)
    grads = [torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4)]

    def step(p, s, grad):
        u, s = tx.update(grad, s, p)
        return fo.apply_updates(p, u), s

    p_pure, s_pure = p0.clone(), tx.init(p0)
    p_don, s_don = p0.clone(), tx.init(p0)
    buf, donated = p_don, fo.donated(step)
    for gt in grads:
        p_pure, s_pure = step(p_pure, s_pure, gt)
        p_don, s_don = donated(p_don, s_don, gt)
    assert p_don is buf  # written in place
    torch.testing.assert_close(p_don, p_pure, rtol=0, atol=0)
    for a, b in zip(fo.tree_leaves(s_don), fo.tree_leaves(s_pure)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_donated_refuses_results_that_alias_other_inputs():
    """A step that keeps the old params in its state, or params and state sharing a tensor,
    cannot be written back in place: donated says so instead of returning other numbers."""
    import pytest

    def keep_old(params, state, g):
        return [p - g for p in params], {"prev": list(params)}

    params = [torch.ones(3), torch.zeros(2)]
    state = {"prev": [torch.empty(3), torch.empty(2)]}
    grads = torch.tensor(1.0)
    pure_p, pure_s = keep_old(params, state, grads)
    torch.testing.assert_close(pure_s["prev"][0], torch.ones(3))
    with pytest.raises(ValueError, match=r"result 2 \(params then state, in tree order\) "
                                         "overlaps input 0"):
        fo.donated(keep_old)(params, state, grads)

    shared = torch.ones(3)
    with pytest.raises(ValueError, match="share memory"):
        fo.donated(lambda p, s: (p * 2, s))(shared, {"m": shared})
    # passing a leaf through unchanged at its own position is fine
    p, s = fo.donated(lambda p, s: (p + 1, s))(torch.zeros(2), {"m": torch.ones(2)})
    torch.testing.assert_close(p, torch.ones(2))


def test_donated_refuses_overlapping_views():
    """Views into one buffer that overlap without starting at the same address."""
    import pytest

    flat = torch.arange(6.0)
    with pytest.raises(ValueError, match="inputs 0 and 1 .* share memory"):
        fo.donated(lambda p, s: (p * 2, {"m": s["m"] + 1}))(flat, {"m": flat[3:]})
    buf = torch.arange(6.0)
    with pytest.raises(ValueError, match="share memory"):
        fo.donated(lambda p, s: ([p[0] * 10, p[1] + 100], s))([buf[0:4], buf[2:6]], ())
    with pytest.raises(ValueError, match="result 1 .* overlaps input 0"):
        fo.donated(lambda p, s: (p + 1, {"tail": p[1:]}))(torch.zeros(4), {"tail": torch.empty(3)})
    with pytest.raises(ValueError, match="overlaps input 0.*another layout"):
        fo.donated(lambda p, s: (p.t(), s))(torch.zeros(3, 3), ())
    # disjoint views of one buffer (fo.ravel storage) are fine, and give the pure numbers
    buf = torch.arange(6.0)
    p, s = fo.donated(lambda p, s: ([x * 2 for x in p], s))([buf[:3], buf[3:]], ())
    assert torch.equal(buf, torch.arange(6.0) * 2) and p[1].data_ptr() == buf[3:].data_ptr()


def test_donated_refuses_results_it_cannot_write_back():
    import pytest

    x = torch.ones(3)
    with pytest.raises(ValueError, match=r"result 0 .* is \(3,\) torch.float64 .* its input \(3,\) "
                                         "torch.float32"):
        fo.donated(lambda p, s: (p.double() + 1e-9, s))(x, ())
    with pytest.raises(ValueError, match=r"is \(\) torch.float32 .* its input \(3,\)"):
        fo.donated(lambda p, s: (p.sum(), s))(x, ())
    with pytest.raises(ValueError, match="state of another tree structure"):
        fo.donated(lambda p, s: (p, {"b": s["a"], "c": s["z"]}))(x, {"a": torch.ones(1), "z": torch.ones(1)})
    with pytest.raises(TypeError, match="input leaf 1 .* has type int"):
        fo.donated(lambda p, s: (p, s))(x, {"count": 3})
    assert torch.equal(x, torch.ones(3))  # nothing was written


def test_donated_refuses_steps_that_autograd_records():
    import pytest

    w = torch.tensor([1.0, 2.0], requires_grad=True)
    lr = torch.tensor(0.1, requires_grad=True)
    step = fo.donated(lambda p, s: (p - lr * p, s))
    with pytest.raises(ValueError, match="autograd records this step.*torch.no_grad"):
        step(w * 3, ())
    with pytest.raises(ValueError, match="autograd records"):
        torch.func.grad(lambda p: step(p, ())[0].sum())(torch.ones(2))
    with torch.no_grad():  # a training loop's update: allowed
        p, _ = step(w, ())
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, 1.8]))


def test_unravel_does_not_hold_the_original_leaves():
    import gc
    import weakref

    tree = {"a": torch.ones(1000), "b": torch.zeros(3)}
    alive = weakref.ref(tree["a"])
    flat, unravel = fo.ravel(tree)
    del tree
    gc.collect()
    assert alive() is None
    assert torch.equal(unravel(flat)["a"], torch.ones(1000))


def _jit_problem():
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g)}
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 6, generator=g)
    flat, unravel = fo.ravel(params)
    tx = fo.adamw(1e-2, weight_decay=1e-3)

    def train_step(flat, state, x, y):
        loss = lambda f: ((x @ unravel(f)["w"].T + unravel(f)["b"] - y) ** 2).mean()  # noqa: E731
        updates, state = tx.update(torch.func.grad(loss)(flat), state, flat)
        return fo.apply_updates(flat, updates), state

    return flat, tx, train_step, x, y


def test_jit_gives_the_pure_steps_numbers_in_the_input_buffers():
    flat, tx, train_step, x, y = _jit_problem()
    want, want_state = flat.clone(), tx.init(flat)
    for _ in range(4):
        want, want_state = train_step(want, want_state, x, y)
    state = tx.init(flat)
    fast = fo.jit(train_step)
    ptrs = [t.data_ptr() for t in [flat, *fo.tree_leaves(state)]]
    for _ in range(4):
        flat, state = fast(flat, state, x, y)
    torch.testing.assert_close(flat, want, rtol=1e-6, atol=1e-7)
    for a, b in zip(fo.tree_leaves(state), fo.tree_leaves(want_state)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [t.data_ptr() for t in [flat, *fo.tree_leaves(state)]] == ptrs  # donated


def test_jit_refuses_bad_input_before_any_work():
    import pytest

    flat, tx, train_step, x, y = _jit_problem()
    with pytest.raises(ValueError, match="warmup=0"):
        fo.jit(train_step, warmup=0)
    with pytest.raises(TypeError, match="graph='yes'"):
        fo.jit(train_step, graph="yes")
    state = tx.init(flat)
    with pytest.raises(ValueError, match="graph=True.*cpu.*CUDA"):
        fo.jit(train_step, graph=True)(flat, state, x, y)
    with pytest.raises(TypeError, match="leaf 1 .* is a int"):
        fo.jit(lambda p, s: (p, s))(flat, {"count": 3})
    with pytest.raises(ValueError, match="share memory"):
        fo.jit(train_step)(flat, (state[0]._replace(mu=[flat[:2]], nu=[flat]), *state[1:]), x, y)
    with pytest.raises(ValueError, match="no tensors"):
        fo.jit(lambda p, s: (p, s))({}, ())
    assert torch.equal(flat, _jit_problem()[0])  # nothing was written
