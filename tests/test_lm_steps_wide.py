"""Levenberg-Marquardt on a wide network (many more parameters ``n`` than residuals ``m``).

``docs/least_squares.md`` ("Step counts on wide networks") advises ``scaling=False`` there:
``D = I`` and ``lambda_0 = 1e-3 max diag(J^T J)``, with the Nielsen rule (the default) or
``rule=fo.Classic()`` (``lambda`` times 0.1 on an accepted step, times 10 on a rejected one, as
torch-levenberg-marquardt). These tests check that both take the steps of an independent
float64 reference written here with plain torch: the minimum-norm form
``delta = -J^T (J J^T + lambda I)^{-1} r`` and the gain ratio
``rho = (F(x) - F(x + delta)) / (0.5 ||J delta||^2 + lambda ||delta||^2)``.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev

import funcopt as fo

F64 = torch.float64


def _problem(width: int = 40, samples: int = 24):
    """An MLP 2-w-w-1 (tanh) of ``w^2 + 5 w + 1`` parameters and targets from a smaller
    teacher, float64: ``n`` is about 70 times ``m`` for the defaults."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 2, generator=g, dtype=F64)
    y = (torch.sin(2.0 * x[:, :1]) * torch.cos(x[:, 1:])).to(F64)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, 1)).to(F64)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    fwd = lambda p, xx: functional_call(model, p, (xx,))  # noqa: E731
    return fwd, params, (x, y)


def _adapt(rule: str, lam: float, nu: float, rho: float, ok: bool) -> tuple[float, float]:
    """Nielsen (1999): accept ``lambda max(1/3, 1 - (2 rho - 1)^3)``, ``nu = 2``; reject
    ``lambda nu``, ``nu = 2 nu``. Classic: ``lambda / 10`` on accept, ``10 lambda`` on reject."""
    if rule == "classic":
        return (lam / 10.0 if ok else lam * 10.0), nu
    if ok:
        return lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 2.0
    return lam * nu, 2.0 * nu


def _reference(fwd, params, batch, steps: int, rule: str = "classic", attempts: int = 10):
    """Losses ``0.5 ||r||^2`` (``r = (f - y) / sqrt(m)``) after each of ``steps`` updates of
    ``rule`` (``"classic"`` or ``"nielsen"``) with ``D = I`` in the minimum-norm form."""
    x, y = batch
    keys = list(params)
    sizes = [params[k].numel() for k in keys]
    shapes = [params[k].shape for k in keys]
    m = y.numel()

    def res(v):
        tree = dict(zip(keys, (t.reshape(s) for t, s in zip(v.split(sizes), shapes))))
        return ((fwd(tree, x) - y) / m**0.5).reshape(-1)

    v = torch.cat([params[k].reshape(-1) for k in keys])
    lam, nu, out = None, 2.0, []
    for _ in range(steps):
        r, J = res(v), jacrev(res)(v)
        lam = 1e-3 * float((J * J).sum(0).max()) if lam is None else lam
        F = 0.5 * float(r @ r)
        for _ in range(attempts):
            u = torch.linalg.solve(J @ J.T + lam * torch.eye(m, dtype=F64), r)
            delta = -(J.T @ u)
            rn = res(v + delta)
            pred = 0.5 * float((J @ delta) @ (J @ delta)) + lam * float(delta @ delta)
            rho = (F - 0.5 * float(rn @ rn)) / pred
            ok = rho > 1e-4
            lam, nu = _adapt(rule, lam, nu, rho, ok)
            if ok:
                v, F = v + delta, 0.5 * float(rn @ rn)
                break
        out.append(F)
    return out


@pytest.mark.parametrize("rule", ["nielsen", "classic"])
@pytest.mark.parametrize("solver", ["auto", "qr"])
def test_without_scaling_takes_the_reference_steps(rule, solver):
    fwd, params, batch = _problem()
    n = sum(v.numel() for v in params.values())
    assert n > 50 * batch[1].numel()  # the wide regime the advice is for
    ref = _reference(fwd, params, batch, steps=6, rule=rule)
    obj = fo.Classic() if rule == "classic" else fo.Nielsen()
    tx = fo.levenberg_marquardt(fo.mse_residuals(fwd, per_sample=True), rule=obj,
                                scaling=False, solver=solver)
    state, p, got = tx.init(params), params, []
    for _ in range(6):
        upd, state = tx.update(None, state, p, batch=batch)
        p = fo.apply_updates(p, upd)
        got.append(float(state.new_cost))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-6, atol=1e-14)
    assert ref[-1] < 1e-3 * ref[0]  # the reference itself makes progress: a real comparison


def test_wide_fit_reaches_the_target_with_either_setting():
    """Both the default (column scaling, Nielsen) and the advised ``scaling=False`` fit the
    wide MLP to 1e-4 of its initial loss within 30 steps; the advised one in the reference's
    number of steps, and in no more than the default (6 against 7, float64)."""
    fwd, params, batch = _problem()
    res = fo.mse_residuals(fwd, per_sample=True)
    F0 = 0.5 * float(((fwd(params, batch[0]) - batch[1]) ** 2).mean())

    def steps(**kw):
        tx = fo.levenberg_marquardt(res, **kw)
        state, p = tx.init(params), params
        for k in range(1, 31):
            upd, state = tx.update(None, state, p, batch=batch)
            p = fo.apply_updates(p, upd)
            if float(state.new_cost) <= 1e-4 * F0:
                return k
        return None

    advised = steps(scaling=False)
    ref = _reference(fwd, params, batch, steps=30, rule="nielsen")
    first = next(k + 1 for k, v in enumerate(ref) if v <= 1e-4 * F0)
    default = steps()
    assert advised == first
    assert default is not None and advised <= default


def test_the_default_scaling_is_decided_by_the_shape():
    """``scaling=None`` (the default): MINPACK's column scaling where ``m >= n``, ``D = I``
    on a wider problem; the steps equal those of the explicit setting, in the transform, in
    ``least_squares`` and its batched driver."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(6, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 1e3, 1e-2],
                                                                               dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    for rows, cols, want in [(6, 3, True), (2, 3, False), (3, 3, True)]:
        res = lambda p, A=A[:rows, :cols], b=b[:rows]: torch.tanh(A @ p) - 0.5 * b
        p0 = torch.full((cols,), 0.1, dtype=torch.float64)

        def steps(res=res, p0=p0, **kw):
            tx = fo.levenberg_marquardt(res, **kw)
            p, s, out = p0, tx.init(p0), []
            for _ in range(3):
                u, s = tx.update(None, s, p)
                p = fo.apply_updates(p, u)
                out.append(p)
            return torch.stack(out), s

        got, state = steps()
        same, other = steps(scaling=want), steps(scaling=not want)
        assert torch.equal(got, same[0]) and torch.equal(state.scale, same[1].scale)
        assert not torch.equal(got, other[0])
        x1, _ = fo.least_squares(res, p0, max_steps=5)
        x2, _ = fo.least_squares(res, p0, max_steps=5, scaling=want)
        assert torch.equal(x1, x2)
        batch = torch.vmap(res)
        xb, _ = fo.least_squares(batch, p0[None].repeat(2, 1), max_steps=5, batched=True)
        xb2, _ = fo.least_squares(batch, p0[None].repeat(2, 1), max_steps=5, batched=True,
                                  scaling=want)
        assert torch.equal(xb, xb2)
