"""KFAC against a float64 dense reference (explicit Kronecker products and solves)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funcopt as fo
from funcopt.func import supported_layers
from funcopt.testing import check_transform


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one thread is fastest, and the CI machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2),
                         nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()


def batches(model, n, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 5) if isinstance(model[0], nn.Linear) else (n, 2, 4, 4)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=gen)) for _ in range(steps)]


def reference_step(V, A, G, damping, method, pi_damping):
    """vec(u) = F^{-1} vec(V) with F built densely with torch.kron (row-major vec)."""
    dA, dG = A.shape[0], G.shape[0]
    if method == "eigh":
        F_ = torch.kron(G, A) + damping * torch.eye(dA * dG, dtype=torch.float64)
    else:
        pi = ((A.trace() / dA) / (G.trace() / dG)).sqrt() if pi_damping else torch.tensor(1.0)
        s = damping ** 0.5
        F_ = torch.kron(G + s / pi * torch.eye(dG, dtype=torch.float64),
                        A + pi * s * torch.eye(dA, dtype=torch.float64))
    return torch.linalg.solve(F_, V.reshape(-1)).reshape(V.shape)


def grad_matrix(grads, spec):
    w = grads[spec.weight].reshape(spec.dim_out, -1)
    return torch.cat([w, grads[spec.bias][:, None]], 1) if spec.bias else w


@pytest.mark.parametrize("method", ["inverse", "eigh"])
@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_matches_a_float64_dense_reference(make, method):
    model = make()
    params = {k: v.detach() for k, v in model.named_parameters()}
    specs, _ = supported_layers(model)
    damping, decay, T = 1e-2, 0.8, 2
    tx = fo.scale_by_kfac(model, damping=damping, decay=decay, T=T, method=method)
    state = tx.init(params)
    run_A, run_G, frozen = {}, {}, {}
    for t, (x, y) in enumerate(batches(model, 7, 6)):
        cap = fo.func.capture_curvature(model, params, x, y)
        upd, state = tx.update(cap.grads, state, params, curvature=cap)
        for name, spec in specs.items():
            a, g = cap.layers[name].a, cap.layers[name].g
            if t % T == 0:  # reference running averages, from the rows directly
                A_new = sum(torch.outer(r, r) for r in a) / a.shape[0]
                G_new = sum(torch.outer(r, r) for r in g) * x.shape[0]
                run_A[name] = A_new if t == 0 else decay * run_A[name] + (1 - decay) * A_new
                run_G[name] = G_new if t == 0 else decay * run_G[name] + (1 - decay) * G_new
                frozen[name] = (run_A[name], run_G[name])
            ref = reference_step(grad_matrix(cap.grads, spec), *frozen[name], damping, method,
                                 True)
            torch.testing.assert_close(grad_matrix(upd, spec), ref, rtol=1e-8, atol=1e-10)
        params = fo.apply_updates(params, fo.tree_scale(upd, -0.1))


def test_without_pi_damping():
    model = mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    (x, y), = batches(model, 9, 1)
    cap = fo.func.capture_curvature(model, params, x, y)
    tx = fo.scale_by_kfac(model, damping=0.1, pi_damping=False)
    upd, _ = tx.update(cap.grads, tx.init(params), params, curvature=cap)
    for name, spec in supported_layers(model)[0].items():
        A, G = fo.func.kronecker_factors(cap.layers[name])
        ref = reference_step(grad_matrix(cap.grads, spec), A, G, 0.1, "inverse", False)
        torch.testing.assert_close(grad_matrix(upd, spec), ref)


@pytest.mark.parametrize("method", ["inverse", "eigh"])
def test_singular_factors_and_zero_gradients_give_finite_updates(method):
    model = mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.zeros(2, 5, dtype=torch.float64)  # rank-1 A (only the bias column)
    cap = fo.func.capture_curvature(model, params, x, torch.tensor([0, 1]))
    damping = 0.0 if method == "inverse" else 1e-8
    tx = fo.scale_by_kfac(model, damping=damping, method=method, T=1)
    upd, _ = tx.update(cap.grads, tx.init(params), params, curvature=cap)
    assert all(torch.isfinite(u).all() for u in upd.values())
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    cap0 = fo.func.capture_curvature(model, zero, x, torch.tensor([0, 1]))
    upd, _ = tx.update(cap0.grads, tx.init(zero), zero, curvature=cap0)
    assert all(torch.isfinite(u).all() for u in upd.values())


def test_contract_and_alias_trains():
    model = mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    (x, y), = batches(model, 32, 1)
    cap = fo.func.capture_curvature(model, params, x, y)
    check_transform(fo.kfac(model, 1e-2, T=2), params, curvature=cap)
    tx = fo.kfac(model, 0.5, momentum=0.5, damping=1e-2, T=1)
    state = tx.init(params)
    first = None
    for _ in range(15):
        cap = fo.func.capture_curvature(model, params, x, y)
        first = cap.loss if first is None else first
        upd, state = tx.update(cap.grads, state, params, curvature=cap)
        params = fo.apply_updates(params, upd)
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    assert loss < 0.5 * first


def test_bad_options():
    model = mlp()
    with pytest.raises(ValueError, match="method"):
        fo.scale_by_kfac(model, method="svd")
    with pytest.raises(ValueError, match="decay"):
        fo.scale_by_kfac(model, decay=1.0)
    with pytest.raises(ValueError, match="eigh"):
        fo.scale_by_kfac(model, method="eigh", damping=0.0)
    with pytest.raises(TypeError, match="nn.Module"):
        fo.scale_by_kfac({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="supported layer"):
        fo.scale_by_kfac(nn.Sequential(nn.LayerNorm(3)))
