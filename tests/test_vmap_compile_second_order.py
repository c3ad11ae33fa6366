"""SOAP, PSGD Kron, Muon, KFAC and SINGD under ``torch.func.vmap`` and ``torch.compile``,
on empty and zero-size leaves, and their leaf checks.

vmap: a batch of independent problems (a leading dimension on params, grads and state) must
give a Python loop's numbers, in float64. Two forms: init and the steps inside one vmapped
function, and a state built by ``vmap(init)`` passed to a vmapped step (every state field
batched, the step counter included). SOAP's problems here use square matrices with random
gradients (every factor of full rank); rank-deficient factors, whose QR refresh funcopt makes
canonical so that a batched QR gives a loop's basis, are in ``tests/test_soap_vmap.py``.

compile: ``torch.compile(update, fullgraph=True)`` with the ``aot_eager`` backend (the Dynamo
and AOT tracing that decide graph breaks and recompiles, without Inductor's C++ build, the
slow part on a CPU); after the second step a recompile is an error.
"""

import optree
import pytest
import torch
from torch import nn
from torch.func import vmap

import funcopt as fo

B = 3
SQUARE = {"w": (3, 3), "m": (4, 4), "b": (4,)}
MATRICES = {"w": (3, 5), "m": (4, 2)}


def _stacked(shapes, seed, n=B):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn((n, *s), generator=gen, dtype=torch.float64) for k, s in shapes.items()}


def _row(tree, i):
    return optree.tree_map(lambda x: x[i], tree)


def _assert_rows(batched, loop, what):
    for i, ref in enumerate(loop):
        got = _row(batched, i)
        for a, b in zip(optree.tree_leaves(got), optree.tree_leaves(ref)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10, msg=f"{what}, problem {i}")


def _vmap_matches_loop(tx, shapes, steps=5, randomness="error"):
    params = _stacked(shapes, 0)
    grads = [_stacked(shapes, 10 + t) for t in range(steps)]

    def run(p, gs):
        s = tx.init(p)
        for g in gs:
            u, s = tx.update(g, s, p)
            p = fo.apply_updates(p, u)
        return p, s

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return fo.apply_updates(p, u), s

    loop = [run(_row(params, i), [_row(g, i) for g in grads]) for i in range(B)]
    _assert_rows(vmap(run, randomness=randomness)(params, grads), loop, "init inside vmap")
    p, s = params, vmap(tx.init)(params)
    for g in grads:
        p, s = vmap(step, randomness=randomness)(p, s, g)
    _assert_rows((p, s), loop, "state batched by vmap(init)")
    # the problems differ, so a batch that repeats one problem would have failed above
    assert not torch.allclose(p["w"][0], p["w"][1])


VMAP_CASES = {
    "soap": (lambda: fo.soap(0.1), SQUARE),
    "scale_by_soap": (lambda: fo.scale_by_soap(), SQUARE),
    "soap_random_refresh": (lambda: fo.soap(0.1, precondition_frequency=fo.precond_schedule()),
                            SQUARE),
    "muon": (lambda: fo.muon(0.02, weight_decay=0.1, other=fo.adamw(3e-4, 0.9, 0.95, 1e-10, weight_decay=0.1)), {**MATRICES, "b": (3,)}),
    "scale_by_muon": (lambda: fo.scale_by_muon(), MATRICES),
}


@pytest.mark.parametrize("name", sorted(VMAP_CASES))
def test_vmap_matches_loop(name):
    make, shapes = VMAP_CASES[name]
    _vmap_matches_loop(make(), shapes)


PSGD_SHAPES = {"w": (3, 5), "v": (3, 5), "b": (4,), "s": ()}


@pytest.mark.parametrize("randomness", ["same", "different"])
@pytest.mark.parametrize("make", [
    lambda: fo.psgd_kron(0.01, seed=3),
    lambda: fo.scale_by_psgd_kron(preconditioner_update_probability=0.5, seed=5),
], ids=["psgd_kron", "scale_by_psgd_kron_half"])
def test_psgd_vmap_matches_loop_with_the_same_seed(make, randomness):
    """The probes come from the generator state in the optimizer state (one op that vmap
    batches), so under either randomness each problem draws what a loop element built with the
    same seed draws."""
    _vmap_matches_loop(make(), PSGD_SHAPES, randomness=randomness)


# --------------------------------------------------------------------------- compile


def _compiled_matches_eager(tx, params, grads, extra=None):
    torch._dynamo.reset()
    extra = extra or [{}] * len(grads)

    def step(p, s, g, kw):
        u, s = tx.update(g, s, p, **kw)
        return fo.apply_updates(p, u), s

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    pe, se = params, tx.init(params)
    pc, sc = params, tx.init(params)
    for i, (g, kw) in enumerate(zip(grads, extra)):
        pe, se = step(pe, se, g, kw)
        if i == 2:  # steps 1 and 2 have compiled; a recompile from now on is an error
            torch.compiler.set_stance("fail_on_recompile")
        try:
            pc, sc = compiled(pc, sc, g, kw)
        finally:
            torch.compiler.set_stance("default")
        for a, b in zip(optree.tree_leaves((pc, sc)), optree.tree_leaves((pe, se))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10, msg=f"step {i}")
    moved = [not torch.allclose(a, b) for a, b in zip(optree.tree_leaves(pc),
                                                      optree.tree_leaves(params))]
    assert all(moved)


COMPILE_CASES = {
    "soap": (lambda: fo.soap(0.1), SQUARE),
    "psgd_kron": (lambda: fo.psgd_kron(0.01, preconditioner_update_probability=0.5), PSGD_SHAPES),
    "muon": (lambda: fo.muon(0.02), {**MATRICES, "b": (3,)}),
}


@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_compiled_update_matches_eager_without_recompiles(name):
    make, shapes = COMPILE_CASES[name]
    params = _row(_stacked(shapes, 0, 1), 0)
    grads = [_row(_stacked(shapes, 10 + t, 1), 0) for t in range(6)]
    _compiled_matches_eager(make(), params, grads)


# --------------------------------------------------------------------------- KFAC and SINGD


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _captures(model, n_problems, steps):
    """Per problem and step: gradients and curvature of an independent problem (its own
    parameters and data), captured eagerly at fixed parameters."""
    gen = torch.Generator().manual_seed(1)
    params, out = [], []
    for _ in range(n_problems):
        p = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype)
             for k, v in model.named_parameters()}
        caps = []
        for _ in range(steps):
            x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 3, (8,), generator=gen)
            caps.append(fo.func.capture_curvature(model, p, x, y))
        params.append(p)
        out.append(caps)
    return params, out


NATURAL = {
    "kfac": lambda m: fo.kfac(m, 0.05, momentum=0.5, T=2),
    "kfac_eigh": lambda m: fo.kfac(m, 0.05, T=2, method="eigh", kl_clip=None),
    "singd": lambda m: fo.singd(m, 0.05, T=2),
    "singd_diagonal": lambda m: fo.singd(m, 0.05, T=2, structures=("diagonal", "dense"),
                                         normalize_lr_cov=True),
}


@pytest.mark.parametrize("name", sorted(NATURAL))
def test_natural_gradient_vmap_over_problems_matches_loop(name):
    model, steps = _model(), 5
    tx = NATURAL[name](model)
    params, caps = _captures(model, B, steps)

    def run(p, gs, layers):
        s = tx.init(p)
        for g, lay in zip(gs, layers):
            u, s = tx.update(g, s, p, curvature=lay)
            p = fo.apply_updates(p, u)
        return p, s

    loop = [run(params[i], [c.grads for c in caps[i]], [c.layers for c in caps[i]])
            for i in range(B)]
    stack = lambda *xs: torch.stack(xs)  # noqa: E731
    P = optree.tree_map(stack, *params)
    grads = [optree.tree_map(stack, *[caps[i][t].grads for i in range(B)]) for t in range(steps)]
    layers = [{k: type(v)(torch.stack([caps[i][t].layers[k].a for i in range(B)]),
                          torch.stack([caps[i][t].layers[k].g for i in range(B)]),
                          v.num_loss_terms) for k, v in caps[0][t].layers.items()}
              for t in range(steps)]
    lay_dims = [{k: type(v)(0, 0, None) for k, v in lay.items()} for lay in layers]
    batched = vmap(run, in_dims=(0, 0, lay_dims))(P, grads, layers)
    _assert_rows(batched, loop, name)


@pytest.mark.parametrize("name", ["kfac", "singd"])
def test_natural_gradient_compiles_without_recompiles(name):
    model = _model()
    params, caps = _captures(model, 1, 6)
    extra = [{"curvature": c.layers} for c in caps[0]]
    _compiled_matches_eager(NATURAL[name](model), params[0], [c.grads for c in caps[0]], extra)


def test_natural_gradient_traced_needs_curvature_every_step():
    model = _model()
    params, caps = _captures(model, 1, 2)
    tx = fo.scale_by_kfac(model, T=5)
    state = tx.init(params[0])
    with pytest.raises(ValueError, match="every step needs"):
        vmap(lambda g, s: tx.update(g, s)[0], in_dims=(0, None))(
            optree.tree_map(lambda x: x[None], caps[0][0].grads), state)


# --------------------------------------------------------------------------- empty, zero-size


def _step(tx, params, steps=2):
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(params, state, params)
    return updates


def test_soap_on_empty_tree_and_zero_size_leaf():
    assert _step(fo.soap(0.1), {}) == {}
    w = torch.randn(3, 3, dtype=torch.float64)
    got = _step(fo.soap(0.1), {"z": torch.zeros(3, 0, dtype=torch.float64), "w": w}, 3)
    assert got["z"].shape == (3, 0)
    torch.testing.assert_close(got["w"], _step(fo.soap(0.1), {"w": w}, 3)["w"])


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4)])
def test_psgd_zero_size_leaf_gets_a_zero_size_update(shape):
    w = torch.randn(3, 4, dtype=torch.float64)
    got = _step(fo.psgd_kron(0.01), {"z": torch.zeros(shape, dtype=torch.float64), "w": w}, 3)
    assert got["z"].shape == shape
    torch.testing.assert_close(got["w"], _step(fo.psgd_kron(0.01), {"w": w}, 3)["w"])


@pytest.mark.parametrize("shape", [(3, 0), (0, 4)])
def test_muon_zero_size_leaf_gets_a_zero_size_update(shape):
    w = torch.randn(3, 4, dtype=torch.float64)
    for make in (fo.muon, fo.scale_by_muon):
        got = _step(make(), {"z": torch.zeros(shape, dtype=torch.float64), "w": w})
        assert got["z"].shape == shape
        torch.testing.assert_close(got["w"], _step(make(), {"w": w})["w"])


@pytest.mark.parametrize("shape", [(3, 4), (5,)])
def test_muon_on_a_bare_tensor(shape):
    """A bare tensor goes to one group; the other group (with weight decay) sees nothing and
    does not ask for parameters (it said 'add_decayed_weights needs the current parameters')."""
    p = torch.randn(shape, dtype=torch.float64)
    tx = fo.muon(0.02, weight_decay=0.1, other=fo.adamw(3e-4, 0.9, 0.95, 1e-10, weight_decay=0.1))
    torch.testing.assert_close(_step(tx, p), _step(tx, {"p": p})["p"])


def test_muon_other_transform_and_default_adamw():
    """``other`` takes the non-matrix leaves; the default is ``fo.adamw(3e-4, 0.9, 0.95,
    1e-10, weight_decay=0)``."""
    params = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    got = _step(fo.muon(), params, 3)
    ref = _step(fo.adamw(3e-4, 0.9, 0.95, 1e-10, weight_decay=0.0), {"b": params["b"]}, 3)
    torch.testing.assert_close(got["b"], ref["b"])
    got = _step(fo.muon(other=fo.sgd(0.5)), params, 3)
    torch.testing.assert_close(got["b"], -0.5 * params["b"])


# --------------------------------------------------------------------------- leaf checks


INT_CASES = {
    "soap": lambda m: fo.soap(0.1), "scale_by_soap": lambda m: fo.scale_by_soap(),
    "psgd_kron": lambda m: fo.psgd_kron(), "scale_by_psgd_kron": lambda m: fo.scale_by_psgd_kron(),
    "scale_by_muon": lambda m: fo.scale_by_muon(), "muon": lambda m: fo.muon(),
}


@pytest.mark.parametrize("name", sorted(INT_CASES))
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_leaf_is_a_type_error_naming_it(name, dtype):
    params = {"w": torch.randn(3, 3), "n": torch.ones(3, 3, dtype=dtype)}
    tx = INT_CASES[name](None)
    with pytest.raises(TypeError, match=r"\['n'\].*" + str(dtype).split(".")[1]):
        state = tx.init(params)
        tx.update(params, state, params)


@pytest.mark.parametrize("make", [fo.kfac, fo.singd])
def test_natural_gradient_integer_update_leaf_is_a_type_error(make):
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tx = make(model)
    state = tx.init(params)
    bad = dict(params, **{"0.bias": torch.ones(5, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"\['0.bias'\].*int64"):
        tx.update(bad, state, params)


@pytest.mark.parametrize("make", [lambda: fo.soap(0.1), fo.scale_by_soap])
def test_soap_state_mismatch_names_the_leaf_and_shapes(make):
    tx = make()
    params = {"w": torch.randn(3, 4)}
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"\['w'\].*\(4, 3\).*\(3, 4\)"):
        tx.update({"w": torch.randn(4, 3)}, state)
    extra = {"w": torch.randn(3, 4), "x": torch.randn(2)}
    with pytest.raises(ValueError, match="2 leaves but the state holds 1"):
        tx.update(extra, state)


def test_soap_cholesky_qr_fallback_is_device_side_when_traced(monkeypatch):
    """While tracing, CholeskyQR2's fallback to Householder QR (a failed factorisation, a NaN)
    is a torch.where, not a host read, and picks what the eager path picks."""
    from funcopt.transforms import soap_qr

    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(6, 2, generator=g) @ torch.randn(2, 6, generator=g)
    nan = torch.randn(6, 6, generator=g)
    nan[2, 3] = float("nan")
    mats = [low_rank, torch.zeros(6, 6), nan, torch.randn(6, 6, generator=g)]
    eager = soap_qr._orthonormal(mats, cholesky=True)
    monkeypatch.setattr(soap_qr, "is_tracing", lambda: True)
    traced = soap_qr._orthonormal(mats, cholesky=True)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    compiled = torch.compile(lambda ms: soap_qr._orthonormal(ms, cholesky=True),
                             fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(mats), eager):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-6)
