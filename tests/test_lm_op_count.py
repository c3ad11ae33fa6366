"""The eager dense Levenberg-Marquardt step dispatches few operations and reads the device
rarely (its speed on a GPU is bound by the host for small networks), and takes the steps of
an independent float64 Levenberg-Marquardt written with numpy."""

from __future__ import annotations

import math

import numpy as np
import optree
import pytest
import torch
from _lm_stats import column_stats_deferred
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

import funcopt as fo
from funcopt.solvers import operators
from funcopt.transforms import lm_model

F64 = torch.float64
SYNC_OPS = ("_local_scalar_dense", "_linalg_check_errors", "nonzero")


class _Count(TorchDispatchMode):
    """ATen operations dispatched, and how many of them read a value on the host."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func.overloadpacket.__name__ in SYNC_OPS
        return func(*args, **(kwargs or {}))


def _sin_problem(points: int = 512, width: int = 32, dtype=torch.float32):
    """benchmarks/lm_peers.py's ``sin``: a 1-width-width-1 tanh MLP on ``sin(2x)``."""
    torch.manual_seed(0)
    x = torch.linspace(-math.pi, math.pi, points, dtype=dtype).unsqueeze(1)
    model = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, 1)).to(dtype)
    fwd = lambda p, inputs: functional_call(model, p, (inputs,))  # noqa: E731
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return fo.mse_residuals(fwd, per_sample=True), params, (x, torch.sin(2 * x))


OPS_PER_STEP = 280
"""Bound on the operations of one step (with its attempts) on the sin problem on the CPU:
about 276 were measured, 4 of them making ``J J^T`` exactly symmetric (349 before the norms,
column statistics and state were written in fewer operations, 859 before the step read the
device once per attempt; torch-levenberg-marquardt's step dispatched 187 there). The CPU reads
the Jacobian's column statistics in cache-sized blocks of rows (some 50 of those operations);
a GPU does it in one (:data:`OPS_PER_STEP_ONE_BLOCK`)."""

OPS_PER_STEP_ONE_BLOCK = 225
"""The same on the path a GPU takes (the column statistics in one block, ``J J^T`` in one
product), forced on the CPU: about 224 were measured (305 before)."""


def _one_block(monkeypatch):
    """The GPU's branches on the CPU: column statistics and Gram matrix in one piece."""
    monkeypatch.setattr(lm_model, "_rows_per_block", lambda m, n, device: m)
    monkeypatch.setattr(operators, "GRAM_BLOCK_WORK", (2**62, 2**62))


@pytest.mark.parametrize("one_block", [False, True])
def test_the_sin_step_dispatches_few_operations_and_reads_the_device_once_per_attempt(
        monkeypatch, one_block):
    if one_block:
        _one_block(monkeypatch)
    bound = OPS_PER_STEP_ONE_BLOCK if one_block else OPS_PER_STEP
    residual, params, batch = _sin_problem()
    tx = fo.levenberg_marquardt(residual, solver="cholesky")
    state = tx.init(params)
    counter, steps, attempts, tolists = _Count(), 8, 0, 0
    orig = torch.Tensor.tolist

    def tolist(t):
        nonlocal tolists
        tolists += 1
        return orig(t)

    for step in range(steps + 2):
        if step < 2:  # warm-up (the residual count per sample is found once)
            upd, state = tx.update(None, state, params, batch=batch)
        else:
            torch.Tensor.tolist = tolist  # type: ignore[method-assign]
            try:
                with counter:
                    upd, state = tx.update(None, state, params, batch=batch)
            finally:
                torch.Tensor.tolist = orig  # type: ignore[method-assign]
            attempts += int(state.attempts)
        params = fo.apply_updates(params, upd)
    assert counter.ops / steps <= bound, counter.ops / steps
    # one read with the linearisation, one per attempt; no other host read
    assert tolists == steps + attempts and counter.syncs == 0, (tolists, counter.syncs)


# ------------------------------------------------------------------ an independent reference


def _numpy_mlp(params: dict, x: np.ndarray):
    """Outputs and per-sample gradients (by hand-written backpropagation) of the
    1-H-H-1 tanh MLP, gradients as a dict of arrays ``(N, *shape)``."""
    W1, b1 = params["0.weight"], params["0.bias"]
    W2, b2 = params["2.weight"], params["2.bias"]
    W3, b3 = params["4.weight"], params["4.bias"]
    h1 = np.tanh(x @ W1.T + b1)
    h2 = np.tanh(h1 @ W2.T + b2)
    out = h2 @ W3.T + b3
    da2 = W3[0] * (1 - h2 * h2)  # (N, H)
    da1 = (da2 @ W2) * (1 - h1 * h1)
    grads = {"4.weight": h2[:, None, :], "4.bias": np.ones((len(x), 1)),
             "2.weight": da2[:, :, None] * h1[:, None, :], "2.bias": da2,
             "0.weight": da1[:, :, None] * x[:, None, :], "0.bias": da1}
    return out[:, 0], grads


def _numpy_lm(params: dict, x: np.ndarray, y: np.ndarray, keys: list, steps: int):
    """Nielsen-damped Levenberg-Marquardt with Marquardt/MINPACK scaling (``D = diag(d^2)``,
    ``d`` the running maximum of the column norms), float64 numpy; ``(cost, damping,
    attempts)`` after each step, as the transform's state reports them."""
    n_pts = len(x)
    shapes = {k: params[k].shape for k in keys}

    def residual_and_jacobian(p):
        out, g = _numpy_mlp(p, x)
        J = np.concatenate([g[k].reshape(n_pts, -1) for k in keys], axis=1)
        return (out - y) / math.sqrt(n_pts), J / math.sqrt(n_pts)

    def unflat(v):
        out, i = {}, 0
        for k in keys:
            size = int(np.prod(shapes[k]))
            out[k] = v[i:i + size].reshape(shapes[k])
            i += size
        return out

    v = np.concatenate([params[k].reshape(-1) for k in keys])
    lam, nu, scale, history = 1e-3, 2.0, None, []
    for _ in range(steps):
        r, J = residual_and_jacobian(unflat(v))
        fn = np.linalg.norm(r)
        col = np.linalg.norm(J, axis=0)
        d = col if scale is None else np.maximum(scale, col)
        scale = d = np.where(d > 0, d, 1.0)
        for attempt in range(1, 11):  # noqa: B007  (read after the loop)
            delta = np.linalg.solve(J.T @ J + lam * np.diag(d * d), -J.T @ r)
            new = np.linalg.norm(residual_and_jacobian(unflat(v + delta))[0])
            actual = 1 - (new / fn) ** 2 if 0.1 * new < fn else -1.0
            predicted = (np.linalg.norm(J @ delta) / fn) ** 2 + 2 * lam * (
                np.linalg.norm(d * delta) / fn) ** 2
            rho = actual / predicted if predicted > 0 else -math.inf
            accepted = rho > 1e-4
            if accepted:
                lam, nu = lam * max(1 / 3, 1 - (2 * rho - 1) ** 3), 2.0
            else:
                lam, nu = lam * nu, 2 * nu
            lam = min(max(lam, 1e-15), 1e16)
            if accepted or lam >= 1e16:
                break
        if accepted:
            v = v + delta
        history.append((0.5 * (new if accepted else fn) ** 2, lam,
                        attempt * (1 if accepted else -1)))
    return history


@pytest.mark.parametrize("solver", ["cholesky", "auto", "lu"])
def test_ten_steps_equal_a_float64_numpy_levenberg_marquardt(solver):
    """Losses, dampings and attempts of 10 steps of the transform (float64, per-sample MSE
    residuals of the sin MLP) against the numpy reference above (primal normal equations by
    LU, no scaled variables, its own Jacobian): the same decisions, and numbers within what
    the conditioning of ``J^T J + lambda D`` lets two solvers agree to."""
    residual, params, batch = _sin_problem(points=64, width=8, dtype=F64)
    keys = [str(p[0]) for p in optree.tree_paths(params)]
    want = _numpy_lm({k: v.numpy() for k, v in params.items()}, batch[0].numpy(),
                     batch[1][:, 0].numpy(), keys, steps=10)
    tx = fo.levenberg_marquardt(residual, solver=solver, scaling=True)  # n > m: not the default
    state = tx.init(params)
    for cost, lam, attempts in want:
        upd, state = tx.update(None, state, params, batch=batch)
        params = fo.apply_updates(params, upd)
        assert int(state.attempts) * (1 if bool(state.accepted) else -1) == attempts
        assert float(state.new_cost) == pytest.approx(cost, rel=1e-7)
        assert float(state.damping) == pytest.approx(lam, rel=1e-7)


# ------------------------------------------------------------------ the paths kept for the CPU


@pytest.mark.parametrize("shape", [(65, 7), (200, 50), (513, 130)])
def test_the_blocked_gram_matrix_is_symmetric_and_equals_one_product(monkeypatch, shape):
    monkeypatch.setattr(operators, "GRAM_BLOCK_WORK", (0, 0))  # blocks at every size
    A = torch.randn(*shape, dtype=F64)
    G = operators._gram_matrix(A)
    assert torch.equal(G, G.T)
    torch.testing.assert_close(G, A @ A.T, rtol=1e-13, atol=1e-12)


def test_the_gram_matrix_is_one_product_below_the_work_bound():
    """Its lower triangle is that of one product bit for bit, the upper one its mirror (the
    product's own upper triangle may differ in the last bits: a BLAS need not sum ``(i, j)``
    and ``(j, i)`` in one order)."""
    A = torch.randn(200, 50, dtype=F64)
    assert 200 * 200 * 50 < operators.GRAM_BLOCK_WORK[1]
    G = operators._gram_matrix(A)
    assert torch.equal(G.tril(), (A @ A.T).tril()) and torch.equal(G, G.T)


def test_a_zero_jacobian_column_keeps_the_blocked_statistics(monkeypatch):
    """A weight that never matters (an input that is always 0, as in the digits data) gives
    an exactly zero column: it is measured exactly without the scaled copy of ``J``."""
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(300, 1000, generator=gen)
    J[:, 7] = 0.0
    r = torch.randn(300, generator=gen)
    monkeypatch.setattr(lm_model, "_column_stats_scaled",
                        lambda *a, **k: pytest.fail("the scaled copy was made"))
    col, cos, ok = column_stats_deferred(J, r, torch.linalg.vector_norm(r))
    assert bool(ok) and float(col[7]) == 0.0
    Jd, rd = J.double(), r.double()
    want = torch.linalg.vector_norm(Jd, dim=0)
    torch.testing.assert_close(col.double(), want, rtol=1e-5, atol=0)
    g = (Jd.T @ rd).abs() / (want * torch.linalg.vector_norm(rd))
    torch.testing.assert_close(cos.double(), torch.where(want > 0, g, 0.0).max(), rtol=1e-4,
                               atol=0)


def test_a_tiny_column_still_takes_the_scaled_statistics():
    """Squares that underflow (a column of 1e-25) are not mistaken for a zero column."""
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(300, 1000, generator=gen)
    J[:, 7] = 1e-25 * torch.linspace(-1, 1, 300)
    r = torch.randn(300, generator=gen)
    assert not bool(column_stats_deferred(J, r, torch.linalg.vector_norm(r))[2])


# ------------------------------------------------------------------ the operations made fewer


def _old_scaled_norm(v: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The norm as it was computed before (``s = max |v|``, 1 where not positive and finite)."""
    keep = dim is not None
    s = torch.linalg.vector_norm(v, float("inf"), dim=dim, keepdim=keep)
    s = torch.where(s.nan_to_num(0.0, 0.0) > 0, s, 1.0)
    n = torch.linalg.vector_norm(v / s, dim=dim, keepdim=keep) * s
    return n if dim is None else n.squeeze(dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_norm_in_five_operations_is_the_scaled_norm_to_the_bit(dtype):
    """Same bits as the former formula for vectors of any normal scale, 0 for zeros, inf for
    an inf, NaN for a NaN; ``norm_parts`` multiplied gives the same number; and a vector of
    subnormal numbers (scaled by ``tiny`` now, exactly) still gets its norm."""
    gen = torch.Generator().manual_seed(0)
    info = torch.finfo(dtype)
    for exp in range(-30, 31, 3) if dtype == torch.float32 else range(-300, 301, 20):
        v = torch.randn(257, generator=gen, dtype=dtype) * 10.0 ** exp
        got = operators.scaled_norm(v)
        assert torch.equal(got, _old_scaled_norm(v)), exp
        c, nu = operators.norm_parts(v)
        assert torch.equal(c * nu, got)
        assert torch.equal(operators.max_and_norm(v)[0], v.abs().max())
        cols = torch.stack([v, 2 * v], dim=1)
        assert torch.equal(operators.scaled_norm(cols, dim=0), _old_scaled_norm(cols, dim=0))
    assert float(operators.scaled_norm(torch.zeros(5, dtype=dtype))) == 0.0
    big = torch.tensor([1.0, math.inf, -3.0], dtype=dtype)
    assert float(operators.scaled_norm(big)) == math.inf
    assert math.isnan(float(operators.scaled_norm(torch.tensor([1.0, math.nan], dtype=dtype))))
    sub = torch.tensor([3.0, -4.0], dtype=dtype) * info.tiny * info.eps * 4
    assert float(operators.scaled_norm(sub)) == 5 * info.tiny * info.eps * 4


def _stat_cases():
    gen = torch.Generator().manual_seed(1)
    J = torch.randn(400, 700, generator=gen)
    r = torch.randn(400, generator=gen)
    tiny = J.clone()
    tiny[:, 3] = 1e-25 * torch.linspace(-1, 1, 400)
    zero = J.clone()
    zero[:, 5] = 0.0
    nan = J.clone()
    nan[7, 9] = math.nan
    huge = J * 1e18  # squares overflow float32
    r_inf = r.clone()
    r_inf[0] = math.inf
    return [("plain", J, r), ("tiny", tiny, r), ("zero", zero, r), ("nan", nan, r),
            ("huge", huge, r), ("r inf", J, r_inf), ("r large", J, r * 1e37)]


@pytest.mark.parametrize("one_block", [False, True])
def test_the_checks_read_on_the_host_agree_with_the_device_check(monkeypatch, one_block):
    """``_checks_hold`` on the host values of the checks (and of ``max |r|``) decides as the
    0-d ``ok`` of ``_column_stats_deferred``; where they hold, the numbers agree with a float64
    reference, in one block (the GPU's) as in the CPU's blocks."""
    if one_block:
        _one_block(monkeypatch)
    from funcopt.transforms.lm_damping import host_values

    for name, J, r in _stat_cases():
        rmax, rnorm = operators.max_and_norm(r)
        col, cos, checks = lm_model._column_stats_unchecked(J, r, rnorm, rmax)
        vals = host_values(rmax, *checks)
        held = lm_model._checks_hold(vals[1:], vals[0], J)
        assert held == bool(column_stats_deferred(J, r, rnorm)[2]), name
        assert held == (name in ("plain", "zero", "r large")), name
        if held:
            Jd, rd = J.double(), r.double()
            want = torch.linalg.vector_norm(Jd, dim=0)
            torch.testing.assert_close(col.double(), want, rtol=1e-5, atol=0)
            g = (Jd.T @ (rd / torch.linalg.vector_norm(rd))).abs()
            top = torch.where(want > 0, g / want, 0.0).max()
            torch.testing.assert_close(cos.double(), top, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dual", [True, False])
def test_the_right_hand_side_check_from_the_host_agrees_with_the_device(dual):
    """``_rhs_finite`` from ``max |r|`` read on the host: a bool where it decides, equal to
    ``isfinite(rhs).all()`` for residuals near the largest number and powers of two below 1."""
    from funcopt.solvers import damped

    gen = torch.Generator().manual_seed(2)
    m, n = (20, 30) if dual else (30, 20)
    for scale in (1.0, 1e36, 3e38):
        for gamma in (1.0, 0.25, 2.0 ** -20):
            J = torch.rand(m, n, generator=gen) * gamma  # |J / gamma| < 2
            r = torch.randn(m, generator=gen).clamp(-1, 1) * scale
            dd = damped.direct_damped(J.clone(), r, None, gamma, True,
                                      "dual" if dual else "primal", None,
                                      np.float32(r.abs().max()))
            want = bool(torch.isfinite(dd.rhs).all())
            got = dd.finite if isinstance(dd.finite, bool) else bool(dd.finite)
            assert got == want, (scale, gamma)
            if dual:
                assert isinstance(dd.finite, bool)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_state_numbers_come_from_one_host_tensor(dtype):
    """``_tensors``: the numbers rounded to ``dtype``, the flags as bools, the count as int64
    (by a full where ``dtype`` cannot hold it exactly)."""
    from funcopt.transforms.levenberg_marquardt import _tensors

    for count in (3, 5000):
        out = _tensors((0.1, np.float32(2.5), math.nan), dtype, torch.device("cpu"),
                       (True, False), count)
        assert [t.dtype for t in out] == [dtype] * 3 + [torch.bool] * 2 + [torch.int64]
        assert all(t.shape == () for t in out)
        assert float(out[0]) == float(torch.tensor(0.1, dtype=dtype))
        assert float(out[1]) == 2.5 and math.isnan(float(out[2]))
        assert bool(out[3]) and not bool(out[4]) and int(out[5]) == count


def test_unravel_gives_one_dimensional_leaves_without_a_reshape():
    """The leaves cut from a buffer: 1-D pieces as split gives them, others reshaped, all
    views of the buffer with the leaves' values."""
    params = {"b": torch.arange(3.0), "w": torch.arange(6.0).reshape(2, 3),
              "s": torch.tensor(7.0)}
    x, unravel = fo.func.ravel_params(params)
    out = unravel(x)
    for k, v in params.items():
        assert out[k].shape == v.shape and torch.equal(out[k], v)
        assert out[k].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_the_per_sample_cross_entropy_residuals_equal_the_batched_ones():
    """The per-sample cross-entropy residuals (now taken on shape ``(1,)``) are the batched
    ones to the bit."""
    torch.manual_seed(3)
    model = torch.nn.Linear(5, 4)
    fwd = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(9, 5), torch.randint(0, 4, (9,)))
    per = fo.cross_entropy_residuals(fwd, per_sample=True)(params, batch)
    assert torch.equal(per, fo.cross_entropy_residuals(fwd)(params, batch))
