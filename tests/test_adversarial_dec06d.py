"""Adversarial checks of the batched least-squares speed paths, the zero-column probe's
combined directions, load_checkpoint's template mode, levenberg_marquardt's traced scaling
choice and SOAP's non-finite handling."""

import math
import os

import numpy as np
import optree
import pytest
import torch
from _lm_batches import data as _data
from _lm_batches import residual as _res
from _lm_batches import run as _run
from _resume import sched as _sched
from _resume import train as _train
from scipy.optimize import least_squares as scipy_least_squares

import funcopt as fo
from funcopt import least_squares_probe as lsp
from funcopt.least_squares_parallel import least_squares_parallel

F64, F32 = torch.float64, torch.float32
DTYPES = pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
NOT_A_MINIMUM = "a stationary point that is not a minimum"

# --------------------------------------------------------------------------- 1. batched driver

_T = torch.linspace(0, 1, 6, dtype=F64)


def _t(a):
    return _T.to(a.dtype)


def _exp(a):
    t = _t(a)
    return a[0] * torch.exp(a[1] * t) - 2 * torch.exp(-1.5 * t) + 0.01 * torch.cos(7 * t)


def _edge(a):  # minimum at the edge a0 -> 0 of the region where sqrt is finite
    t = _t(a)
    return (torch.sqrt(a[0]) + 1) * t + (a[1] - 2)


def _nan_start(a):
    t = _t(a)
    return torch.log(a[0]) * t + a[1]


def _big(a):  # ||r|| ~ 1e200: its square overflows float64
    t = _t(a)
    return 1e200 * (a[0] * t + a[1] - t)


def _tiny(a):  # ||r|| ~ 1e-200: its square underflows float64 (exactly 0 in float32)
    t = _t(a)
    return 1e-200 * (a[0] * t + a[1] - 2 * t - 1)


def _zero(a):
    return 0 * a[0] * _t(a) + 0 * a[1]


def _zero_column(a):  # a1 unused: a zero Jacobian column everywhere
    t = _t(a)
    return (a[0] - 1) * t * (a[0] + 2) + 0 * a[1]


CASES = {"exp": (_exp, [1.0, 0.0]), "edge": (_edge, [1.0, 0.0]),
         "nan_start": (_nan_start, [-1.0, 0.0]), "big": (_big, [3.0, 2.0]),
         "tiny": (_tiny, [3.0, -2.0]), "zero": (_zero, [0.3, 0.7]),
         "zero_column": (_zero_column, [3.0, 5.0])}


def _batch_of(fns):
    return lambda X: torch.stack([f(X[i]) for i, f in enumerate(fns)])


def _info_of(info, b):
    return (bool(info.success[b]), info.reasons()[b], int(info.steps[b]),
            int(info.evaluations[b]))


@DTYPES
def test_a_mixed_batch_gives_each_problem_its_fit_alone(dtype):
    """Easy, edge-of-domain (NaN trial points), NaN-at-start, 1e200, 1e-200, zero-residual and
    zero-column problems in one batch: each gets exactly the parameters, flag, reason, steps
    and evaluation count of a batch of one (B = 1): problems do not affect each other."""
    names = list(CASES)
    X0 = torch.tensor([CASES[k][1] for k in names], dtype=dtype)
    x, info = fo.least_squares(_batch_of([CASES[k][0] for k in names]), X0.clone(), batched=True)
    for b, k in enumerate(names):
        xa, ia = fo.least_squares(_batch_of([CASES[k][0]]), X0[b:b + 1].clone(), batched=True)
        torch.testing.assert_close(x[b], xa[0], rtol=0, atol=0, equal_nan=True, msg=k)
        assert _info_of(info, b) == _info_of(ia, 0), k


@DTYPES
def test_batched_flags_and_answers_match_single_fits_and_scipy(dtype):
    """Each problem of the mixed batch against fo.least_squares on it alone (same success and
    answer to the dtype's convergence accuracy; a non-finite start is the single driver's
    ValueError and the batched driver's failure) and, for the finite float64 ones, against
    scipy's MINPACK lm (same success; parameters close, up to the flat direction of a zero
    column, which every driver leaves at its start)."""
    names = list(CASES)
    X0 = torch.tensor([CASES[k][1] for k in names], dtype=dtype)
    x, info = fo.least_squares(_batch_of([CASES[k][0] for k in names]), X0.clone(), batched=True)
    tol = 1e-6 if dtype == F64 else 2e-3
    for b, k in enumerate(names):
        fn = CASES[k][0]
        if k == "nan_start" or (k == "big" and dtype == F32):  # not finite at x0
            with pytest.raises(ValueError, match="non-finite"):
                fo.least_squares(fn, X0[b].clone())
            assert not bool(info.success[b]) and int(info.reason[b]) == 13
            torch.testing.assert_close(x[b], X0[b], rtol=0, atol=0)
            continue
        xs, single = fo.least_squares(fn, X0[b].clone())
        assert bool(info.success[b]) == single.success, (k, info.reasons()[b], single.reason)
        torch.testing.assert_close(x[b], xs, rtol=tol, atol=tol, msg=k)
        if dtype == F64 and k not in ("edge", "zero"):
            ref = scipy_least_squares(lambda a, fn=fn: fn(torch.tensor(a)).numpy(),
                                      np.array(CASES[k][1]), method="lm")
            assert ref.success and bool(info.success[b]), k
            np.testing.assert_allclose(x[b].numpy(), ref.x, rtol=1e-6, atol=1e-6, err_msg=k)
    assert not bool(info.success[names.index("edge")])  # NaN trial points: the domain's edge


def _wide(a):  # m = 2 residuals, n = 3 parameters: a curve of solutions
    return torch.stack([a[0] + a[1] * a[2] - 1, a[0] * a[1] - a[2]])


def test_batched_wide_first_step_is_the_single_fits_minimum_norm_step():
    """A wide J (2 x 3): the Gram matrix's third eigenvalue is a rounding-level number, not a
    direction; the batched driver takes the SVD model there (least_squares_batched.
    _spectral_model), so its first step is the minimum-norm Gauss-Newton step of pinv(J)."""
    x0 = torch.tensor([0.5, 0.5, 0.5], dtype=F64)
    xb, _ = fo.least_squares(_batch_of([_wide]), x0[None].clone(), batched=True, max_steps=1,
                             scaling=False)
    xs, _ = fo.least_squares(_wide, x0.clone(), max_steps=1, scaling=False)
    J = torch.func.jacrev(_wide)(x0)
    gauss_newton = x0 - torch.linalg.pinv(J) @ _wide(x0)  # the step inside the trust region
    torch.testing.assert_close(xs, gauss_newton, rtol=1e-12, atol=1e-12)  # the single fit
    torch.testing.assert_close(xb[0], xs, rtol=1e-10, atol=1e-12)


def _product(a):  # J has rank 1 everywhere (columns a1 t and a0 t)
    t = _t(a)
    return a[0] * a[1] * t - 2 * t + 0.05 * torch.sin(5 * t)


def test_batched_rank_deficient_tall_step_equals_the_single_fit():
    """A tall J of rank 1 everywhere: the batched first step stays in J's row space, as the
    single fit's (the SVD model where the Gram's eigenvalue is at its rounding level)."""
    x0 = torch.tensor([2.0, 0.1], dtype=F64)
    xb, _ = fo.least_squares(_batch_of([_product]), x0[None].clone(), batched=True,
                             max_steps=1, scaling=False)
    xs, _ = fo.least_squares(_product, x0.clone(), max_steps=1, scaling=False)
    torch.testing.assert_close(xb[0], xs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["square", "B=1"])
def test_batched_square_and_single_problem_match_the_single_fit(case):
    """m = n (Rosenbrock as 2 residuals) and a batch of one exponential fit: the batched
    driver's parameters, flag and steps are the single fit's (and scipy's parameters)."""
    def rosen(a):
        return torch.stack([10 * (a[1] - a[0] ** 2), 1 - a[0]])

    fn, x0 = (rosen, [-1.2, 1.0]) if case == "square" else (_exp, [1.0, 0.0])
    X0 = torch.tensor([x0], dtype=F64)
    xb, ib = fo.least_squares(_batch_of([fn]), X0.clone(), batched=True)
    xs, single = fo.least_squares(fn, X0[0].clone())
    ref = scipy_least_squares(lambda a: fn(torch.tensor(a)).numpy(), np.array(x0), method="lm")
    assert bool(ib.success[0]) and single.success and ref.success
    assert int(ib.steps[0]) == single.steps
    torch.testing.assert_close(xb[0], xs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(xb[0].numpy(), ref.x, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- 2. zero-column probe


def _saddle3(x):  # zero columns a, b, c at 0: a saddle in (a, c), a minimum along b
    return torch.stack([1 + x[0] * x[2] + 0.1 * x[1] ** 2, x[3] - 1])


def test_the_three_column_saddle_really_falls():
    """The reference for the xfail below: float64 math at x = h (1, 0, -1, 1) is below the
    cost at 0 (0.5), so 0 is not a minimum."""
    h = 1e-3
    at0 = 0.5 * float((_saddle3(torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64)) ** 2).sum())
    moved = 0.5 * float((_saddle3(torch.tensor([h, 0.0, -h, 1.0], dtype=F64)) ** 2).sum())
    assert moved < at0 == 0.5


# the combined probes use the zero columns' rank bits (least_squares_probe.sign_patterns):
# columns 0 and 2 of three zero columns get opposite signs in the bit-1 pattern
@pytest.mark.parametrize("driver", ["single", "batched", "parallel"])
def test_a_saddle_in_columns_zero_and_two_among_three_zero_columns_fails(driver):
    x0 = torch.zeros(4, dtype=F64)
    if driver == "single":
        _, info = fo.least_squares(_saddle3, x0)
        success = info.success
    elif driver == "batched":
        _, info = fo.least_squares(_batch_of([_saddle3]), x0[None], batched=True)
        success = bool(info.success[0])
    else:
        _, info = least_squares_parallel(_saddle3, x0)
        success = bool(info.success[0])
    assert not success


def test_probe_counts_equal_the_evaluations_it_makes():
    """probe_zero_columns' ``probes`` equals the rows it moves in its calls of ``norms``: a
    problem with three zero columns at a minimum (2 per column + 2 per pattern = 14), one with
    one zero column (2), one with none and one that is not a candidate (0)."""
    x = torch.zeros(4, 3, dtype=F64)
    col = torch.tensor([[0, 0, 0], [1, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=F64)
    moved_rows = torch.zeros(4, dtype=torch.int64)

    def norms(xb):
        moved_rows.add_((xb != x).any(-1).long())
        return 1 + (xb * xb).sum(-1)  # a minimum along every column

    falls, which, probes = lsp.probe_zero_columns(
        norms, x, col == 0, torch.ones(4, dtype=F64), torch.tensor([True, True, True, False]))
    assert not falls.any() and which.tolist() == [-1] * 4
    assert probes.tolist() == [2 * 3 + 2 * lsp.PATTERNS, 2, 0, 0]
    assert moved_rows.tolist() == probes.tolist()


def test_single_driver_counts_the_probes_in_its_evaluations():
    """Two zero columns at a minimum: the fit's evaluations are those of the same fit with the
    zero-column parameters removed plus the probes' 2 * 2 + 2 * PATTERNS."""
    def with_zero(p):
        a, b = p["w"]
        return torch.stack([1 + a * a + b * b, p["v"][0] - 1])

    def without(p):
        return torch.stack([torch.ones((), dtype=F64), p["v"][0] - 1])

    x, info = fo.least_squares(with_zero, {"w": torch.zeros(2, dtype=F64),
                                           "v": torch.zeros(1, dtype=F64)})
    _, base = fo.least_squares(without, {"v": torch.zeros(1, dtype=F64)})
    assert info.success and base.success and info.steps == base.steps
    assert info.evaluations == base.evaluations + 2 * 2 + 2 * lsp.PATTERNS


def test_a_fall_on_one_side_and_nan_on_the_other_is_a_failure():
    """r = 1 - a^2 for a >= 0, NaN below: the probe at -h is NaN (not a fall), the one at +h
    falls (float64 math: 1 - h^2 < 1), so the stop at a = 0 is not a minimum."""
    def fn(a):
        return torch.stack([torch.where(a[0] >= 0, 1 - a[0] ** 2,
                                        torch.full_like(a[0], float("nan"))), a[1] - 1])

    _, info = fo.least_squares(fn, torch.zeros(2, dtype=F64))
    assert not info.success and info.reason.startswith(NOT_A_MINIMUM)
    assert "parameter [0]" in info.reason


def test_probe_names_the_float_leaf_after_an_integer_leaf():
    """An int64 leaf (not fitted) before the float one: the failure names ['b'][0]."""
    def fn(p):
        return torch.stack([torch.cos(p["b"][0]), p["b"][1] - 1])

    _, info = fo.least_squares(fn, {"a": torch.tensor([3]), "b": torch.zeros(2, dtype=F64)})
    assert not info.success and "parameter ['b'][0]" in info.reason


# --------------------------------------------------------------------------- 3. checkpoints


BUILDERS = {
    "adam_schedule": lambda: fo.adam(_sched),
    "inject_schedule": lambda: fo.inject_hyperparams(fo.adam)(learning_rate=_sched, b1=0.9),
    "nested_inject": lambda: fo.inject_hyperparams(
        lambda learning_rate: fo.inject_hyperparams(fo.sgd)(learning_rate=learning_rate))(
            learning_rate=_sched),
    "schedule_free": lambda: fo.schedule_free(fo.sgd(_sched), _sched),
}


# The inject builders were a strict xfail: the inner scale_by_learning_rate's copy of the
# injected (marked) rate was unmarked, so template mode loaded schedule(0) there; its init now
# marks that copy too (funcopt.base.mark_if_schedule_value).
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, name):
    """3 steps, save, load into tx.init(params) (template mode), 3 more steps: parameters and
    every state leaf equal 6 uninterrupted steps (bit for bit), schedule records included."""
    params = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)}
    tx = BUILDERS[name]()
    p6, s6 = _train(tx, params, tx.init(params), 6)
    p3, s3 = _train(tx, params, tx.init(params), 3)
    fo.save_checkpoint(tmp_path / "c.pt", p3, s3, step=3)
    ck = fo.load_checkpoint(tmp_path / "c.pt", params, tx.init(params))
    for a, b in zip(optree.tree_leaves(ck.opt_state), optree.tree_leaves(s3)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    p, s = _train(tx, ck.params, ck.opt_state, 3, start=3)
    torch.testing.assert_close(p, p6, rtol=0, atol=0)
    for a, b in zip(optree.tree_leaves(s), optree.tree_leaves(s6)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_schedule_record_loaded_into_a_number_template_takes_the_number(tmp_path):
    """Saved with a schedule (record 0.1 / 4 after 3 steps), loaded into fo.adam(0.02): the
    template's number, which update reads, wins; saved with 0.02 and loaded into a schedule
    template: the saved record is kept (update evaluates the schedule, 0.1 / 4 next)."""
    params = {"w": torch.ones(2, dtype=F64)}
    tx_s, tx_n = fo.adam(_sched), fo.adam(0.02)
    _, s3 = _train(tx_s, params, tx_s.init(params), 3)
    fo.save_checkpoint(tmp_path / "s.pt", params, s3)
    ck = fo.load_checkpoint(tmp_path / "s.pt", params, tx_n.init(params))
    assert float(ck.opt_state[-1].learning_rate) == 0.02
    _, n3 = _train(tx_n, params, tx_n.init(params), 3)
    fo.save_checkpoint(tmp_path / "n.pt", params, n3)
    ck = fo.load_checkpoint(tmp_path / "n.pt", params, tx_s.init(params))
    assert float(ck.opt_state[-1].learning_rate) == 0.02
    g = {"w": torch.ones(2, dtype=F64)}
    u, _ = tx_s.update(g, ck.opt_state, params)
    other = ck.opt_state[:-1] + (ck.opt_state[-1]._replace(
        learning_rate=torch.tensor(999.0, dtype=F64)),)
    v, _ = tx_s.update(g, type(ck.opt_state)(*other) if hasattr(ck.opt_state, "_fields")
                       else other, params)
    torch.testing.assert_close(u, v, rtol=0, atol=0)  # the record is not read
    assert torch.isfinite(u["w"]).all() and bool((u["w"] != 0).all())


def test_hyperparameters_of_another_dtype_load_in_template_mode(tmp_path):
    """inject_hyperparams' float64 hyperparameters saved, the transform rebuilt with float32
    hyperparameters: template mode loads (the template's float32 values), saved mode is one
    ValueError naming the field and the fix."""
    params = {"w": torch.ones(2, dtype=F64)}
    tx64 = fo.inject_hyperparams(fo.adam, hyperparam_dtype=F64)(learning_rate=0.1)
    tx32 = fo.inject_hyperparams(fo.adam, hyperparam_dtype=F32)(learning_rate=0.1)
    _, s = _train(tx64, params, tx64.init(params), 2)
    fo.save_checkpoint(tmp_path / "c.pt", params, s)
    ck = fo.load_checkpoint(tmp_path / "c.pt", params, tx32.init(params))
    assert ck.opt_state.hyperparams["learning_rate"].dtype == F32
    torch.testing.assert_close(ck.opt_state.count, s.count, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"InjectHyperparamsState.hyperparams\[.*hyperparams='template'"):
        fo.load_checkpoint(tmp_path / "c.pt", params, tx32.init(params), hyperparams="saved")


def test_corrupt_files_and_other_structures_are_one_value_error(tmp_path):
    params = {"w": torch.ones(2, dtype=F64)}
    tx = fo.adam(0.1)
    path = tmp_path / "c.pt"
    fo.save_checkpoint(path, params, tx.init(params))
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        fo.load_checkpoint(tmp_path / "cut.pt", params, tx.init(params))
    flipped = bytearray(data)
    i = data.find(b"structure") + 40
    flipped[i] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    with pytest.raises(ValueError):
        fo.load_checkpoint(tmp_path / "flip.pt", params, tx.init(params))
    with pytest.raises(ValueError, match="does not match the template"):
        fo.load_checkpoint(path, params, fo.sgd(0.1, momentum=0.9).init(params))
    other = fo.inject_hyperparams(fo.adam)(learning_rate=0.1)  # a hyperparameter leaf more
    with pytest.raises(ValueError, match="does not match the template"):
        fo.load_checkpoint(path, params, other.init(params))


def test_optimizer_state_dict_restores_the_saved_lr_as_torch_does():
    """fo.Optimizer follows torch.optim: load_state_dict restores the saved groups' lr (as
    torch.optim.Adam does), and the next step equals torch's."""
    torch.manual_seed(0)
    w0 = torch.randn(3, dtype=F64)

    def make(cls, lr):
        w = torch.nn.Parameter(w0.clone())
        opt = fo.Optimizer([w], fo.inject_hyperparams(fo.adam)(learning_rate=lr)) \
            if cls is None else cls([w], lr=lr)
        return w, opt

    def step(w, opt):
        opt.zero_grad()
        (w * w).sum().backward()
        opt.step()

    saved = {}
    for cls in (None, torch.optim.Adam):
        w, opt = make(cls, 0.1)
        step(w, opt)
        sd = opt.state_dict()
        w2, opt2 = make(cls, 0.5)
        with torch.no_grad():
            w2.copy_(w)
        opt2.load_state_dict(sd)
        assert opt2.param_groups[0]["lr"] == 0.1
        step(w2, opt2)
        saved[cls] = w2.detach().clone()
    torch.testing.assert_close(saved[None], saved[torch.optim.Adam], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- 4. LM traced path

_X, _Y = _data()


def _lm_steps(t, state, p, sizes):
    p, state, _ = _run(t, state, p, sizes, (_X, _Y))  # data made outside vmap
    return p["w"], state.scale, state.damping


@pytest.mark.parametrize("scaling", [None, True, False])
def test_lm_vmap_equals_the_loop_with_explicit_scaling(scaling):
    """Mini-batches of 2, 5, 2, 5 rows (n = 3) under vmap over two starts equal the eager
    loop for scaling None, True and False."""
    t = fo.levenberg_marquardt(_res, scaling=scaling)
    W = torch.stack([torch.zeros(3, dtype=F64), torch.full((3,), 0.1, dtype=F64)])
    run = lambda w: _lm_steps(t, t.init({"w": w}), {"w": w}, (2, 5, 2, 5))  # noqa: E731
    got = torch.func.vmap(run)(W)
    for b in range(2):
        for g, want in zip(got, run(W[b])):
            torch.testing.assert_close(g[b], want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("scaling", [None, True])
def test_lm_checkpoint_after_an_eager_wide_step_then_vmap(tmp_path, scaling):
    """An eager first step on 2 rows (m < n: D = I kept as scale -1 with scaling=None), saved
    and loaded, then 5 and 2 rows under vmap over two copies: each equals the eager loop."""
    t = fo.levenberg_marquardt(_res, scaling=scaling)
    p0 = {"w": torch.full((3,), 0.1, dtype=F64)}
    u, s1 = t.update(None, t.init(p0), p0, batch=(_X[:2], _Y[:2]))
    fo.save_checkpoint(tmp_path / "c.pt", fo.apply_updates(p0, u), s1)
    ck = fo.load_checkpoint(tmp_path / "c.pt", p0, t.init(p0))
    if scaling is None:
        assert ck.opt_state.scale.tolist() == [-1.0] * 3
    want = _lm_steps(t, ck.opt_state, ck.params, (5, 2))
    S = optree.tree_map(lambda a: torch.stack([a, a]), ck.opt_state)
    P = {"w": torch.stack([ck.params["w"]] * 2)}
    got = torch.func.vmap(lambda s, p: _lm_steps(t, s, p, (5, 2)))(S, P)
    for g, w in zip(got, want):
        torch.testing.assert_close(g[1], w, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- 5. SOAP


def _soap_run(tx, params, grads):
    state = tx.init(params)
    outs = []
    for g in grads:
        u, state = tx.update(g, state, params)
        outs.append(u)
        params = optree.tree_map(torch.add, params, u)
    return outs


def _soap_data():
    gen = torch.Generator().manual_seed(0)
    p = {"a": torch.randn(4, 3, generator=gen, dtype=F64),
         "b": torch.randn(3, 5, generator=gen, dtype=F64)}
    gs = [{k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in p.items()}
          for _ in range(4)]
    return p, gs


@pytest.mark.parametrize("bad", ["nan_first", "inf_first", "nan_third"])
def test_soap_a_non_finite_leaf_does_not_touch_a_finite_leaf(bad):
    """A NaN (or one inf) gradient of leaf a: a's updates are non-finite from that step on
    (from the next one for the first step, which only initialises the basis), b's updates equal the all-finite run's bit for bit."""
    p, gs = _soap_data()
    tx = fo.soap(1e-2, precondition_frequency=1)
    ref = _soap_run(tx, p, gs)
    k = 2 if bad == "nan_third" else 0
    gs[k] = dict(gs[k])
    gs[k]["a"] = gs[k]["a"].clone()
    if bad == "inf_first":
        gs[k]["a"][0, 0] = math.inf
    else:
        gs[k]["a"].fill_(math.nan)
    out = _soap_run(tx, p, gs)
    for i, u in enumerate(out):
        torch.testing.assert_close(u["b"], ref[i]["b"], rtol=0, atol=0)
        assert bool(torch.isfinite(u["a"]).all()) == (i < k or i == k == 0)  # step 0: no move


def test_soap_vmap_with_one_problem_nan_keeps_the_finite_problem_exact():
    p, gs = _soap_data()
    P = {k: torch.stack([v, v + 1]) for k, v in p.items()}
    G = [{k: torch.stack([v, 2 * v]) for k, v in g.items()} for g in gs]
    G[0]["a"] = G[0]["a"].clone()
    G[0]["a"][0] = math.nan
    tx = fo.scale_by_soap(precondition_frequency=1)
    got = torch.func.vmap(lambda pp, gg: _soap_run(tx, pp, gg))(P, G)
    want = _soap_run(tx, {k: v[1] for k, v in P.items()},
                     [{k: v[1] for k, v in g.items()} for g in G])
    for i in range(len(gs)):
        for k in ("a", "b"):
            scale = float(want[i][k].abs().max()) or 1.0
            torch.testing.assert_close(got[i][k][1], want[i][k], rtol=0, atol=1e-12 * scale)
        assert bool(torch.isfinite(got[i]["a"][0]).all()) == (i == 0)
        assert bool(torch.isfinite(got[i]["b"][0]).all())


def test_checkpoint_module_path_is_not_a_string_only(tmp_path):
    """load_checkpoint takes an os.PathLike as save_checkpoint does."""
    params = {"w": torch.ones(2, dtype=F64)}
    tx = fo.adam(0.1)
    fo.save_checkpoint(os.fspath(tmp_path / "c.pt"), params, tx.init(params), step=7)
    assert fo.load_checkpoint(tmp_path / "c.pt", params, tx.init(params)).step == 7
