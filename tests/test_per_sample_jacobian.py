"""Per-sample residuals: Jacobians, residuals and Levenberg-Marquardt runs against the generic
reverse-mode path over the whole batch (an independent computation of the same numbers)."""

import importlib

import pytest
import torch
from torch.func import functional_call

import funcopt as fo
from funcopt.func import jacobian

# the module (funcopt.func re-exports its function of the same name)
jacobian_module = importlib.import_module("funcopt.func.jacobian")

DEFAULT_DTYPE = torch.float64  # applied per test by tests/conftest.py


def _mlp(d_in=4, hidden=6, d_out=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, d_out))


def _problem(n=9, d_in=4, d_out=3):
    """An MLP, its params (nested, with an integer leaf the model reads), a model_fn, data."""
    net = _mlp(d_in, 6, d_out)
    params = {"net": {k: v.detach().clone() for k, v in net.named_parameters()},
              "gain": torch.tensor(2)}  # integer leaf: held fixed, no column

    def model_fn(p, x):
        return p["gain"] * functional_call(net, p["net"], (x,))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, d_out, generator=g)
    labels = torch.randint(0, d_out, (n,), generator=g)
    return params, model_fn, x, y, labels


ADAPTERS = [
    ("mse", lambda f, **kw: fo.mse_residuals(f, **kw)),
    ("cross_entropy", lambda f, **kw: fo.cross_entropy_residuals(f, **kw)),
]


def _batch(kind, x, y, labels):
    return (x, y) if kind == "mse" else (x, labels)


@pytest.mark.parametrize("kind,adapter", ADAPTERS)
@pytest.mark.parametrize("mode", ["auto", "reverse", "forward"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_per_sample_jacobian_equals_dense(kind, adapter, mode, chunk_size):
    params, model_fn, x, y, labels = _problem()
    batch = _batch(kind, x, y, labels)
    dense, per = adapter(model_fn), adapter(model_fn, per_sample=True)
    assert isinstance(per, fo.PerSampleResiduals) and not isinstance(dense, fo.PerSampleResiduals)
    J0, r0 = jacobian(dense, params, batch, mode="reverse")
    J1, r1 = jacobian(per, params, batch, mode=mode, chunk_size=chunk_size)
    n = sum(v.numel() for v in params["net"].values())
    assert J1.shape == J0.shape == (r0.numel(), n)
    torch.testing.assert_close(J1, J0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r1, r0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(per(params, batch), dense(params, batch), rtol=1e-13, atol=0.0)


def test_max_memory_chunks_whole_samples_and_bind_keeps_the_route(monkeypatch):
    params, model_fn, x, y, _ = _problem(n=11)
    per = fo.mse_residuals(model_fn, per_sample=True)
    J0, r0 = jacobian(fo.mse_residuals(model_fn), params, (x, y))
    seen = []
    real = jacobian_module._per_sample_jacobian
    monkeypatch.setattr(jacobian_module, "_per_sample_jacobian",
                        lambda *a, **k: seen.append(1) or real(*a, **k))
    for J, r in (jacobian(per, params, (x, y), max_memory=4000),  # a few samples per chunk
                 jacobian(per.bind((x, y)), params)):
        torch.testing.assert_close(J, J0, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r, r0, rtol=1e-12, atol=1e-14)
    assert len(seen) == 2


def test_explicit_scale_matches_the_mse_adapter():
    params, model_fn, x, y, _ = _problem()
    k = y.shape[1]
    per = fo.per_sample_residuals(lambda p, s: model_fn(p, s[0][None])[0] - s[1],
                                  scale=lambda n: (n * k) ** -0.5)
    J0, r0 = jacobian(fo.mse_residuals(model_fn), params, (x, y))
    J1, r1 = jacobian(per, params, (x, y))
    torch.testing.assert_close(J1, J0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r1, r0, rtol=1e-12, atol=1e-14)
    # a constant scale multiplies J and r
    J2, r2 = jacobian(fo.per_sample_residuals(per.fn, scale=3.0), params, (x, y))
    c = (x.shape[0] * k) ** 0.5
    torch.testing.assert_close(J2, 3.0 * c * J0, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(r2, 3.0 * c * r0, rtol=1e-12, atol=1e-13)


LM_OPTIONS = [
    {},
    {"rule": fo.TrustRegion()},
    {"geodesic": fo.Geodesic(), "chunk_size": 5},
]


@pytest.mark.parametrize("kind,adapter", ADAPTERS)
@pytest.mark.parametrize("options", LM_OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_levenberg_marquardt_takes_the_same_steps(kind, adapter, options):
    params, model_fn, x, y, labels = _problem(n=24)
    batch = _batch(kind, x, y, labels)
    runs = []
    for per_sample in (False, True):
        tx = fo.levenberg_marquardt(adapter(model_fn, per_sample=per_sample), **options)
        p, state, costs = params, tx.init(params), []
        for _ in range(3):
            updates, state = tx.update(None, state, p, batch=batch)
            p = fo.apply_updates(p, updates)
            costs.append(float(state.cost))
        runs.append((p, costs))
    (p0, c0), (p1, c1) = runs
    assert c0[-1] < c0[0]
    torch.testing.assert_close(c1, c0, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(p1, p0, rtol=1e-9, atol=1e-11)
    assert torch.equal(p1["gain"], params["gain"])


@pytest.mark.parametrize("kind,adapter", ADAPTERS)
def test_matrix_free_products_use_the_batched_call(kind, adapter):
    """The matrix-free (CG) path never forms J; its products equal those of the dense J."""
    params, model_fn, x, y, labels = _problem()
    batch = _batch(kind, x, y, labels)
    J, r = jacobian(adapter(model_fn), params, batch)
    gn = fo.func.gauss_newton_products(adapter(model_fn, per_sample=True), params, batch)
    v = torch.randn(J.shape[1], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gn.residuals, r, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(gn.jvp(v), J @ v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gn.gnvp(v), J.T @ (J @ v), rtol=1e-12, atol=1e-14)


def test_least_squares_with_bound_per_sample_residuals():
    params, model_fn, x, y, _ = _problem(n=20)
    dense = fo.mse_residuals(model_fn)
    p0, info0 = fo.least_squares(lambda p: dense(p, (x, y)), params, max_steps=4)
    p1, info1 = fo.least_squares(fo.mse_residuals(model_fn, per_sample=True).bind((x, y)),
                                 params, max_steps=4)
    assert info1.steps == info0.steps == 4
    assert info1.cost == pytest.approx(info0.cost, rel=1e-10)
    torch.testing.assert_close(p1, p0, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------- misuse


def test_batch_leaves_must_agree_in_leading_size():
    params, model_fn, x, y, labels = _problem()
    per = fo.mse_residuals(model_fn, per_sample=True)
    with pytest.raises(ValueError, match=r"disagree in leading size \[9, 8\]"):
        per(params, (x, y[:8]))
    with pytest.raises(ValueError, match="disagree in leading size"):
        jacobian(fo.cross_entropy_residuals(model_fn, per_sample=True), params, (x, labels[:3]))
    with pytest.raises(ValueError, match="0-d tensor"):
        per(params, (x, torch.tensor(1.0)))
    with pytest.raises(TypeError, match="not a tensor"):
        per(params, (x, 1.0))
    with pytest.raises(ValueError, match="no samples"):
        per(params, (x[:0], y[:0]))


def test_model_output_must_have_one_row_per_sample():
    params, model_fn, x, y, labels = _problem()
    flat = lambda p, inp: model_fn(p, inp).reshape(-1)  # folds samples into one row
    with pytest.raises(ValueError, match=r"batch of 1 sample returned shape \(3,\)"):
        jacobian(fo.mse_residuals(flat, per_sample=True), params, (x, y))
    pooled = lambda p, inp: model_fn(p, inp).sum()  # no sample dimension at all
    with pytest.raises(ValueError, match=r"one output row per input sample"):
        fo.cross_entropy_residuals(pooled, per_sample=True)(params, (x, labels))
    with pytest.raises(ValueError, match="differ in shape"):
        fo.mse_residuals(model_fn, per_sample=True)(params, (x, y[:, :2]))


def test_calls_without_or_with_two_batches_and_bad_results_are_reported():
    params, model_fn, x, y, _ = _problem()
    per = fo.mse_residuals(model_fn, per_sample=True)
    with pytest.raises(TypeError, match="take \\(params, batch\\)"):
        per(params)
    with pytest.raises(TypeError, match="take \\(params, batch\\)"):
        fo.levenberg_marquardt(per).update(None, fo.levenberg_marquardt(per).init(params), params)
    with pytest.raises(TypeError, match="bound to a batch"):
        jacobian(per.bind((x, y)), params, (x, y))
    with pytest.raises(TypeError, match="int64 tensor"):
        fo.per_sample_residuals(lambda p, s: s[1].long())(params, (x, y))
    with pytest.raises(TypeError, match="returned a float"):
        fo.per_sample_residuals(lambda p, s: 1.0)(params, (x, y))
    with pytest.raises(ValueError, match="finite number"):
        fo.per_sample_residuals(lambda p, s: s[1], scale=lambda n: float("nan"))(params, (x, y))
    with pytest.raises(TypeError, match="scale is a str"):
        fo.per_sample_residuals(lambda p, s: s[1], scale="mean")


def test_batch_norm_in_training_mode_is_refused_under_vmap():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 1))
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    model_fn = lambda p, inp: functional_call(net, p, (inp,))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    with pytest.raises((RuntimeError, ValueError)):
        jacobian(fo.mse_residuals(model_fn, per_sample=True), params, (x, y))


@pytest.mark.parametrize("per_sample", [False, True])
def test_cross_entropy_residuals_refuse_float_labels(per_sample):
    """Float labels would be truncated to classes by .long(): both routes refuse them."""
    model = torch.nn.Linear(3, 4)
    params = {k: v.detach() for k, v in model.named_parameters()}
    fn = fo.cross_entropy_residuals(
        lambda p, x: torch.func.functional_call(model, p, (x,)), per_sample=per_sample)
    x = torch.randn(5, 3)
    with pytest.raises(TypeError, match="integer class indices"):
        fn(params, (x, torch.tensor([0.0, 1.7, 2.0, 3.0, 1.0])))
    assert fn(params, (x, torch.tensor([0, 1, 2, 3, 1]))).shape == (5,)
