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
    tx = fo.kfac(model, 0.5, momentum=0.5, damping=1e-2, T=1, kl_clip=None)
    state = tx.init(params)
    first = None
    for _ in range(15):
        cap = fo.func.capture_curvature(model, params, x, y)
        first = cap.loss if first is None else first
        upd, state = tx.update(cap.grads, state, params, curvature=cap)
        params = fo.apply_updates(params, upd)
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    assert loss < 0.5 * first


@pytest.mark.parametrize("lr", [0.3, lambda t: 0.3 / (1.0 + t)], ids=["number", "schedule"])
def test_kl_clip_matches_a_float64_reference(lr):
    """nu = min(1, sqrt(kappa / (eta^2 sum_l |<V_l, u_l>|))) scales every layer (Ba et al.)."""
    model = mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    specs, _ = supported_layers(model)
    kappa = 1e-3
    tx = fo.scale_by_kfac(model, damping=1e-2, T=1, kl_clip=kappa, learning_rate=lr)
    plain = fo.scale_by_kfac(model, damping=1e-2, T=1)
    state, pstate = tx.init(params), plain.init(params)
    for t, (x, y) in enumerate(batches(model, 8, 3)):
        cap = fo.func.capture_curvature(model, params, x, y)
        upd, state = tx.update(cap.grads, state, params, curvature=cap)
        ref, pstate = plain.update(cap.grads, pstate, params, curvature=cap)
        eta = lr(t) if callable(lr) else lr
        vu = sum(float((grad_matrix(cap.grads, s) * grad_matrix(ref, s)).sum())
                 for s in specs.values())
        nu = min(1.0, (kappa / (eta ** 2 * abs(vu))) ** 0.5)
        assert nu < 1.0  # the clip is active in this test
        for k in ref:
            torch.testing.assert_close(upd[k], nu * ref[k])
        torch.testing.assert_close(state.learning_rate, torch.tensor(float(eta)))


def test_learning_rate_of_the_clip_is_read_from_the_state():
    model = mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    (x, y), = batches(model, 8, 1)
    cap = fo.func.capture_curvature(model, params, x, y)
    tx = fo.scale_by_kfac(model, damping=1e-2, T=1, kl_clip=1e-3, learning_rate=1.0)
    state = tx.init(params)
    state = state._replace(learning_rate=torch.tensor(0.5))
    got, _ = tx.update(cap.grads, state, params, curvature=cap)
    ref, _ = fo.scale_by_kfac(model, damping=1e-2, T=1, kl_clip=1e-3, learning_rate=0.5).update(
        cap.grads, state, params, curvature=cap)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def digits_batches(steps, n=64):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(x), generator=gen)
    return [(x[perm[i * n:(i + 1) * n]], torch.tensor(y)[perm[i * n:(i + 1) * n]])
            for i in range(steps)]


def digits_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10))


def run_digits(tx, model, steps):
    params = {k: v.detach() for k, v in model.named_parameters()}
    state, losses = tx.init(params), []
    for x, y in digits_batches(steps):
        cap = fo.func.capture_curvature(model, params, x, y)
        losses.append(float(cap.loss))
        upd, state = tx.update(cap.grads, state, params, curvature=cap)
        params = fo.apply_updates(params, upd)
    return losses


def test_default_damping_trains_a_digits_cnn_and_divergence_is_named():
    """Damping 1e-3, lr 1e-2, momentum 0.9: unclipped KFAC blows up (the factors turn
    non-finite and the error says so); the default KL clip keeps it training."""
    model = digits_cnn()
    losses = run_digits(fo.kfac(model, 1e-2, momentum=0.9), model, 25)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]
    with pytest.raises(FloatingPointError, match=r"not finite.*raise damping.*kl_clip"):
        run_digits(fo.kfac(model, 1e-2, momentum=0.9, kl_clip=None, T=5), model, 25)


def test_non_finite_curvature_is_a_clear_error():
    model = mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.full((4, 5), float("nan"), dtype=torch.float64)
    cap = fo.func.capture_curvature(model, params, x, torch.tensor([0, 1, 2, 0]))
    tx = fo.scale_by_kfac(model, T=1)
    with pytest.raises(FloatingPointError, match="layer '0'.*step 0"):
        tx.update(cap.grads, tx.init(params), params, curvature=cap)


def test_bad_options():
    model = mlp()
    with pytest.raises(ValueError, match="method"):
        fo.scale_by_kfac(model, method="svd")
    with pytest.raises(ValueError, match="decay"):
        fo.scale_by_kfac(model, decay=1.0)
    with pytest.raises(ValueError, match="eigh"):
        fo.scale_by_kfac(model, method="eigh", damping=0.0)
    with pytest.raises(ValueError, match="kl_clip"):
        fo.scale_by_kfac(model, kl_clip=0.0)
    with pytest.raises(TypeError, match="nn.Module"):
        fo.scale_by_kfac({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="supported layer"):
        fo.scale_by_kfac(nn.Sequential(nn.LayerNorm(3)))


def accumulated_run(tx, model, batches, k):
    """``multi_steps(tx, k)`` on micro-batches, curvature merged over each step's micro-batches."""
    acc = fo.multi_steps(tx, k)
    params = {n: v.detach() for n, v in model.named_parameters()}
    state, merged = acc.init(params), None
    for x, y in batches:
        for j in range(k):
            rows = slice(j * len(x) // k, (j + 1) * len(x) // k)
            cap = fo.func.capture_curvature(model, params, x[rows], y[rows])
            merged = cap if j == 0 else fo.func.merge_curvature([merged, cap])
            upd, state = acc.update(cap.grads, state, params, curvature=merged)
            params = fo.apply_updates(params, upd)
    return params


def whole_batch_run(tx, model, batches):
    params = {n: v.detach() for n, v in model.named_parameters()}
    state = tx.init(params)
    for x, y in batches:
        cap = fo.func.capture_curvature(model, params, x, y)
        upd, state = tx.update(cap.grads, state, params, curvature=cap)
        params = fo.apply_updates(params, upd)
    return params


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_gradient_accumulation_equals_the_concatenated_batch(make):
    model = make()
    data = batches(model, 8, 4)
    make_tx = lambda: fo.kfac(model, 0.1, momentum=0.9, damping=1e-2, T=2)  # noqa: E731
    got = accumulated_run(make_tx(), model, data, k=2)
    ref = whole_batch_run(make_tx(), model, data)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-11)
