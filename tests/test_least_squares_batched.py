"""least_squares(batched=True) and the sync-free Levenberg-Marquardt step: against scipy's
MINPACK (method="lm"), a Python loop of single fits, NIST StRD, and bad input."""

import numpy as np
import pytest
import torch
from _lm_rounding import FLOOR_STOPS, RTOL, assert_within, flip_radius, resolved

import funcopt as fo
from funcopt import nist
from funcopt.least_squares_batched import REASONS
from funcopt.testing import check_compile, check_vmap

DEFAULT_DTYPE = torch.float64
T = np.linspace(0.0, 3.0, 20)


def _data(B, seed=0):
    rng = np.random.default_rng(seed)
    p = np.stack([rng.uniform(1, 3, B), rng.uniform(0.5, 3, B), rng.uniform(-1, 1, B)], 1)
    return p[:, :1] * np.exp(-p[:, 1:2] * T) + p[:, 2:3] + 0.01 * rng.standard_normal((B, T.size))


def _batched_fn(Y):
    t, y = torch.tensor(T), torch.tensor(Y)
    return lambda p: p[:, :1] * torch.exp(-p[:, 1:2] * t) + p[:, 2:3] - y


@pytest.mark.parametrize("rule", [fo.TrustRegion(), fo.Nielsen(), fo.Classic()])
def test_batched_fits_match_scipy_minpack(rule):
    so = pytest.importorskip("scipy.optimize")
    Y = _data(16)
    p0 = torch.tensor([1.0, 1.0, 0.0]).repeat(16, 1)
    P, info = fo.least_squares(_batched_fn(Y), p0, batched=True, rule=rule)
    assert info.success.all() and info.steps.shape == (16,) and info.reason.dtype == torch.int64
    for b in range(16):
        ref = so.least_squares(lambda v, y=Y[b]: v[0] * np.exp(-v[1] * T) + v[2] - y,
                               np.array([1.0, 1.0, 0.0]), method="lm",
                               xtol=1e-15, ftol=1e-15, gtol=1e-15)
        np.testing.assert_allclose(P[b].numpy(), ref.x, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(float(info.cost[b]), ref.cost, rtol=1e-9)


def test_batched_equals_a_loop_of_single_fits_step_for_step():
    """Each problem has its own damping, trust region and stopping test: the steps of fitting it
    alone while they are ``resolved`` (the batched model is solved by eigh of ``J^T J``, the
    single one by Cholesky: the numbers agree to rounding), the same costs and evaluations
    there, and an end within ``flip_radius`` of the single fit's, on a tolerance test. At the
    solution rounding decides the steps taken and the test that stops the fit: problem 1 took
    9 updates batched and 11 alone on one CPU."""
    Y = _data(5, seed=3)
    p0 = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.2, 1.0], [0.5, 4.0, -1.0], [2.0, 2.0, 0.0],
                       [1.0, 0.1, 0.5]])
    fit = _batched_fn(Y)
    P, info = fo.least_squares(fit, p0, batched=True)
    heads = {}  # the batched fits stopped after n updates, by n
    for b in range(5):
        t, y = torch.tensor(T), torch.tensor(Y[b])
        fn = lambda v, t=t, y=y: v[0] * torch.exp(-v[1] * t) + v[2] - y  # noqa: E731
        p, one = fo.least_squares(fn, p0[b])
        assert bool(info.success[b]) and one.success
        assert info.reasons()[b] in FLOOR_STOPS and one.reason in FLOOR_STOPS
        assert_within(P[b], p, flip_radius(fn, p))
        n = next((k for k, h in enumerate(one.history)
                  if not resolved(h["predicted_reduction"])), None)
        assert n is not None and int(info.steps[b]) > n  # both reach their solution's rounding
        if n not in heads:
            heads[n] = fo.least_squares(fit, p0, batched=True, max_steps=n)[1]
        _, one_head = fo.least_squares(fn, p0[b], max_steps=n)
        assert int(heads[n].evaluations[b]) == one_head.evaluations
        # eigh and Cholesky steps differ by some cond(J) eps: costs by up to 5e-12 on the way
        torch.testing.assert_close(float(heads[n].cost[b]), one.history[n]["cost"], rtol=1e-10,
                                   atol=0)


@pytest.mark.parametrize("name", nist.available())
def test_nist_both_starts_as_one_batch(name):
    problem = nist.load(name)
    single = nist.residual_fn(problem)
    B, info = fo.least_squares(torch.func.vmap(single), problem.starts.clone(), batched=True)
    for s in range(2):
        digits = nist.significant_digits(B[s], problem.certified)
        assert digits.min() >= 6, (name, s, digits.tolist(), info.reasons()[s])
        rss = 2.0 * float(info.cost[s])
        assert (nist.significant_digits(rss, problem.certified_rss) >= 6
                or abs(rss - problem.certified_rss) < 1e-20), (name, s, rss)
    assert info.success.all()


def test_nan_in_some_problems_fails_those_only():
    """Problem 1 is NaN at its start, problem 3 is finite only at its start (every trial point
    is NaN): each ends with its own failure and cause; the others converge to scipy's answer."""
    Y = _data(5, seed=1)
    base = _batched_fn(Y)

    def fn(p):
        r = base(p)
        r = torch.where(torch.arange(5)[:, None] == 1, r * torch.nan, r)
        moved = (p[3] != torch.tensor([1.0, 1.0, 0.0])).any()
        return torch.where((torch.arange(5)[:, None] == 3) & moved, r * torch.nan, r)

    P, info = fo.least_squares(fn, torch.tensor([1.0, 1.0, 0.0]).repeat(5, 1), batched=True)
    assert info.success.tolist() == [True, False, True, False, True]
    assert "non-finite residuals" in info.reasons()[1]
    assert not info.reasons()[3].startswith(("ftol", "xtol", "gtol"))
    torch.testing.assert_close(P[1], torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(P[3], torch.tensor([1.0, 1.0, 0.0]))
    ok, _ = fo.least_squares(_batched_fn(Y[[0, 2, 4]]), torch.tensor([1.0, 1.0, 0.0]).repeat(3, 1),
                             batched=True)
    torch.testing.assert_close(P[[0, 2, 4]], ok)


def test_converged_problems_stop_moving():
    """A problem solved at its start (zero residual) stops at once, the other goes on."""
    t = torch.tensor(T)
    y = torch.stack([2 * torch.exp(-t), 3 * torch.exp(-0.5 * t)])
    fn = lambda p: p[:, :1] * torch.exp(-p[:, 1:2] * t) - y  # noqa: E731
    P, info = fo.least_squares(fn, torch.tensor([[2.0, 1.0], [1.0, 1.0]]), batched=True)
    assert info.steps[0] == 1 and info.reasons()[0] == "zero residual" and info.steps[1] > 3
    torch.testing.assert_close(P, torch.tensor([[2.0, 1.0], [3.0, 0.5]]))


def test_bad_batched_input_raises_before_work():
    calls = []

    def flat(p):
        calls.append(1)
        return (p - 1).reshape(-1)

    with pytest.raises(ValueError, match=r"shape \(B, m\) = \(4, m\).*got shape \(8,\)"):
        fo.least_squares(flat, torch.zeros(4, 2), batched=True)
    assert len(calls) == 1
    with pytest.raises(ValueError, match=r"disagree on the batch size.*\[4, 3\]"):
        fo.least_squares(lambda p: p["a"] - 1, {"a": torch.zeros(4, 2), "b": torch.zeros(3, 1)},
                         batched=True)
    with pytest.raises(ValueError, match="one row per problem.*got shape \\(3, 2\\)"):
        fo.least_squares(lambda p: (p - 1)[:3], torch.zeros(4, 2), batched=True)
    with pytest.raises(ValueError, match="mixes problems"):
        fo.least_squares(lambda p: p - p.sum(0), torch.zeros(4, 2), batched=True)
    with pytest.raises(ValueError, match=r"\['geodesic'\]"):
        fo.least_squares(lambda p: p - 1, torch.zeros(4, 2), batched=True,
                         geodesic=fo.Geodesic())


def test_reason_table():
    assert REASONS[0].startswith("max_steps")
    _, info = fo.least_squares(_batched_fn(_data(3)), torch.tensor([1.0, 1.0, 0.0]).repeat(3, 1),
                               batched=True, max_steps=1)
    assert not info.success.any() and info.reasons() == [REASONS[0]] * 3


# ------------------------------------------------------------------ the transform, traced

X = torch.linspace(0.0, 3.0, 12, dtype=torch.float64)


def _residual(p, y):
    return p[0] * torch.exp(-p[1] * X) - y


@pytest.mark.parametrize("rule", [fo.TrustRegion(), fo.Nielsen(), fo.Classic()])
def test_update_under_vmap_gives_a_python_loops_numbers(rule):
    """vmap over independent problems (params, state and data batched) against a loop of
    eager updates, float64, six steps. vmap runs other kernels (batched products and sums), so
    the numbers agree to rounding: while an update is ``resolved``, the parameters to 1e-10,
    the damping to ``RTOL`` and the decisions exactly; after it (at the solution: from the
    3rd update on for the second problem) the parameters within ``flip_radius``."""
    Ys = torch.stack([2.5 * torch.exp(-1.3 * X) + 0.1 * k * torch.sin(7 * X) for k in (1, 2, 3)])
    P = torch.tensor([[1.0, 0.5], [2.0, 1.0], [1.5, 2.0]])
    tx = fo.levenberg_marquardt(_residual, rule=rule)
    step = torch.func.vmap(lambda p, s, y: tx.update(None, s, p, batch=y))
    pv, sv = P, torch.func.vmap(tx.init)(P)
    loop = [(P[i], tx.init(P[i])) for i in range(3)]
    radius = [None] * 3
    for _ in range(6):
        uv, sv = step(pv, sv, Ys)
        pv = pv + uv
        for i, (pl, sl) in enumerate(loop):
            ul, sl = tx.update(None, sl, pl, batch=Ys[i])
            pl = pl + ul
            loop[i] = (pl, sl)
            if radius[i] is None and not resolved(sl.predicted_reduction):
                radius[i] = flip_radius(lambda p, y=Ys[i]: _residual(p, y), pl)
            if radius[i] is not None:
                assert_within(pv[i], pl, radius[i])
                continue
            torch.testing.assert_close(pv[i], pl, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(sv.damping[i], sl.damping, rtol=RTOL, atol=1e-300)
            assert int(sv.attempts[i]) == int(sl.attempts)
            assert bool(sv.accepted[i]) == bool(sl.accepted)


@pytest.mark.parametrize("rule", [fo.TrustRegion(), fo.Nielsen()])
def test_update_vmaps_and_compiles_fullgraph(rule):
    Y = 2.5 * torch.exp(-1.3 * X) + 0.1 * torch.sin(7 * X)
    fn = lambda p: p[0] * torch.exp(-p[1] * X) - Y  # noqa: E731
    check_vmap(fo.levenberg_marquardt(fn, rule=rule), torch.tensor([1.0, 0.5]))
    check_compile(fo.levenberg_marquardt(fn, rule=rule, max_attempts=3),
                  torch.tensor([1.0, 0.5]))


def test_what_cannot_be_traced_says_why():
    Y = 2.5 * torch.exp(-1.3 * X)
    fn = lambda p: p[0] * torch.exp(-p[1] * X) - Y  # noqa: E731
    for kw in (dict(solver="cg"), dict(geodesic=fo.Geodesic())):
        tx = fo.levenberg_marquardt(fn, **kw)
        p = torch.tensor([[1.0, 0.5]])
        with pytest.raises(ValueError, match="cannot run under torch.func transforms"):
            torch.func.vmap(lambda q, tx=tx: tx.update(None, tx.init(q), q)[0])(p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_hundred_thousand_fits_on_a_gpu():
    """10^5 fits of y = a exp(-b t) + c at once on one GPU (past cuSOLVER's batched
    eigensolver limit, which the model splits into chunks), each at scipy's cost."""
    from scipy.optimize import least_squares as scipy_lsq

    g = torch.Generator().manual_seed(0)
    B, t = 100_000, torch.linspace(0, 3, 30, dtype=torch.float64)
    truth = torch.stack([torch.rand(B, generator=g, dtype=torch.float64) * 2 + 1,
                         torch.rand(B, generator=g, dtype=torch.float64) * 2.5 + 0.5,
                         torch.rand(B, generator=g, dtype=torch.float64) * 2 - 1], 1)
    y = truth[:, :1] * torch.exp(-truth[:, 1:2] * t) + truth[:, 2:3]
    y = y + 0.01 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    tc, yc = t.cuda(), y.cuda()
    p0 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64, device="cuda").repeat(B, 1)
    fit, info = fo.least_squares(lambda p: p[:, :1] * torch.exp(-p[:, 1:2] * tc) + p[:, 2:3] - yc,
                                 p0, batched=True)
    assert bool(info.success.all()) and info.cost.shape == (B,)
    for i in (0, 1, B // 2, B - 1):
        ref = scipy_lsq(lambda q, i=i: q[0] * np.exp(-q[1] * t.numpy()) + q[2] - y[i].numpy(),
                        [1.0, 1.0, 0.0], method="lm", xtol=1e-12, ftol=1e-12, gtol=1e-12)
        assert abs(float(info.cost[i]) - ref.cost) <= 1e-8 * ref.cost


def _varied_batch(B=12, seed=5):
    rng = np.random.default_rng(seed)
    p0 = torch.tensor(np.stack([rng.uniform(0.3, 4, B), rng.uniform(0.05, 5, B),
                                rng.uniform(-2, 2, B)], 1))
    return _batched_fn(_data(B, seed)), p0


@pytest.mark.parametrize("rule", [fo.TrustRegion(), fo.Nielsen(), fo.Classic()])
def test_one_attempt_per_pass_takes_the_update_loops_steps(monkeypatch, rule):
    """The driver makes one attempt per problem and pass; each problem takes exactly the steps
    of the loop of whole updates (all attempts of an update before the next model)."""
    import funcopt.least_squares_batched as lsb

    fn, p0 = _varied_batch()
    P, info = fo.least_squares(fn, p0, batched=True, rule=rule)

    def update_loop(f, x, state, o, limits, model):
        return lsb.run_batched(f, x, state, o, limits, lambda xb, s: model(xb, s, None))

    monkeypatch.setattr(lsb, "run_flat", update_loop)
    Q, ref = fo.least_squares(fn, p0, batched=True, rule=rule)
    torch.testing.assert_close(P, Q, rtol=1e-13, atol=1e-15)
    for a, b in zip(info, ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0.0)
    assert (ref.steps > 3).all() and (ref.evaluations > ref.steps + 1).any()  # rejections happen


@pytest.mark.parametrize("per_pass", [1, 2])
def test_trust_region_search_spread_over_passes_gives_the_same_fits(monkeypatch, per_pass):
    """Off the CPU the damping search makes a few updates per pass and resumes on the next:
    the same damping, hence the same steps, evaluations and results as a search done at once."""
    import funcopt.least_squares_batched as lsb

    fn, p0 = _varied_batch(seed=7)
    P, info = fo.least_squares(fn, p0, batched=True)
    monkeypatch.setattr(lsb, "_newton_per_pass", lambda device: per_pass)
    Q, spread = fo.least_squares(fn, p0, batched=True)
    torch.testing.assert_close(P, Q, rtol=0.0, atol=0.0)
    for a, b in zip(info, spread):
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)
