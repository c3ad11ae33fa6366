"""Adversarial checks of ``levenberg_marquardt(cuda_graph=True)`` (on a CPU its two pieces run
eagerly, with the code that CUDA captures) against the eager update, and of
``python -m funcopt.bench --resume``: each finding as a test, and guards for the claims that
hold."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from test_bench_merge import _error
from test_bench_resume import ARGS, _main
from torch.func import functional_call

import funcopt as fo
from funcopt.bench import resume
from funcopt.bench.__main__ import _parser, _settings
from funcopt.bench.optimizers import OPTIMIZERS

F64 = torch.float64
T = torch.linspace(0, 1, 20, dtype=F64)
Y = 2.0 * torch.exp(-1.3 * T) + 0.1
P0 = {"a": torch.tensor(1.0, dtype=F64), "k": torch.tensor(0.5, dtype=F64),
      "c": torch.tensor(0.0, dtype=F64)}


def _curve(p, scale=1.0):
    return scale * (p["a"] * torch.exp(-p["k"] * T) + p["c"] - Y)


def _fit(res, params, graphed, steps, batches=(None,), **kw):
    """``steps`` updates; returns the params, the last state and each update's (accepted,
    attempts)."""
    tx = fo.levenberg_marquardt(res, cuda_graph=graphed, **kw)
    state, trace = tx.init(params), []
    for i in range(steps):
        b = batches[i % len(batches)]
        upd, state = tx.update(None, state, params, **({} if b is None else {"batch": b}))
        params = fo.apply_updates(params, upd)
        trace.append((bool(state.accepted), int(state.attempts)))
    return params, state, trace


def _both(res, params, steps, batches=(None,), **kw):
    return [_fit(res, params, g, steps, batches, **kw) for g in (False, True)]


def _close(a, b, tol):
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=tol, atol=tol), k


# --------------------------------------------------------------------- findings


def test_a_damping_at_its_maximum_still_makes_an_attempt():
    """With ``scaling=False``, ``lambda_0 = 1e-3 max diag(J^T J)`` is 2e18 for residuals of
    scale 1e10, above ``max_damping`` (1e16). The eager update attempts a step at that
    damping (tiny relative to ``J^T J``, so accepted) and fits; the graphed update counted
    the rule as exhausted before its first attempt and returned zero steps forever."""
    (p1, _, t1), (p2, _, t2) = _both(functools.partial(_curve, scale=1e10), P0, 30,
                                     scaling=False)
    assert t1[:6] == t2[:6]  # then at the solution, rounding decides
    assert float(p2["k"]) == pytest.approx(1.3, rel=1e-6)
    _close(p1, p2, 1e-7)


def test_a_damping_beyond_the_dtype_raises_as_the_eager_update():
    """Residuals of scale 1e160 with ``scaling=False``: ``lambda_0 = 1e-3 max diag(J^T J)``
    overflows. The eager update raises, naming scaling=True; the graphed one went on with
    the damping clipped to max_damping, which is ~0 next to ``J^T J`` (~1e320): a Gauss-Newton
    step rejected at every update, params unchanged, without a word."""
    for graphed in (False, True):
        tx = fo.levenberg_marquardt(functools.partial(_curve, scale=1e160), scaling=False,
                                    cuda_graph=graphed)
        with pytest.raises(ValueError, match="damping lambda = inf .* pass scaling=True"):
            tx.update(None, tx.init(P0), P0)


def test_every_update_makes_at_least_one_attempt():
    """Once the damping sits at ``max_damping`` (zero residuals: every attempt is rejected),
    each update still makes one attempt, as the eager one does (its state says 1)."""
    res = lambda p: p["a"] - 1.0  # noqa: E731
    (_, s1, t1), (_, s2, t2) = _both(res, {"a": torch.ones(3, dtype=F64)}, 4)
    assert t1 == t2 and int(s2.attempts) == 1 and float(s2.damping) == 1e16


def test_integer_leaves_of_the_params_are_read_at_every_update():
    """An integer leaf enters the residuals but is not fitted: the graphed update kept the
    value of the first call's leaf (the program's unravel put it back), so a later call with
    another value fitted the old residuals, silently."""
    res = lambda p: p["a"] * T * p["n"] - 3.0 * T  # noqa: E731
    for graphed in (False, True):
        tx = fo.levenberg_marquardt(res, cuda_graph=graphed)
        out = []
        for n in (1, 3):
            p = {"a": torch.tensor(0.0, dtype=F64), "n": torch.tensor(n)}
            upd, _ = tx.update(None, tx.init(p), p)
            out.append(float(fo.apply_updates(p, upd)["a"]))
        assert out[0] == pytest.approx(3.0, rel=1e-2) and out[1] == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_params_are_a_clear_error(dtype):
    """torch has no Cholesky for 16-bit numbers (CPU or CUDA): it said
    NotImplementedError "cholesky_cpu" not implemented for 'BFloat16'."""
    tx = fo.levenberg_marquardt(_curve, cuda_graph=True)
    p = {k: v.to(dtype) for k, v in P0.items()}
    with pytest.raises(TypeError, match="cuda_graph=True") as e:
        tx.update(None, tx.init(p), p)
    assert str(dtype) in str(e.value) and "float32" in str(e.value)


@pytest.mark.parametrize("graphed", [False, True])
def test_a_state_of_another_dtype_is_a_clear_error(graphed):
    """init on float64 params, update on float32 ones: a RuntimeError from deep inside
    (addmv / "expected scalar type Double but found Float")."""
    tx = fo.levenberg_marquardt(_curve, cuda_graph=graphed)
    state = tx.init(P0)
    p32 = {k: v.float() for k, v in P0.items()}
    with pytest.raises(ValueError, match="torch.float64 state .* torch.float32 params"):
        tx.update(None, state, p32)


@pytest.mark.parametrize("kw, word", [
    ({"form": "Dual"}, "form='Dual'"), ({"form": "bogus"}, "form='bogus'"),
    ({"jacobian_mode": "rev"}, "jacobian_mode='rev'"),
    ({"chunk_size": -3}, "chunk_size=-3"), ({"chunk_size": 0}, "chunk_size=0"),
    ({"chunk_size": 2.5}, "chunk_size=2.5"),
])
@pytest.mark.parametrize("graphed", [False, True])
def test_bad_form_jacobian_mode_and_chunk_size_are_refused(kw, word, graphed):
    """They were taken without a word: form='Dual' ran the primal form, a negative
    chunk_size failed later in torch.cat."""
    with pytest.raises(ValueError, match="pass") as e:
        fo.levenberg_marquardt(_curve, cuda_graph=graphed, **kw)
    assert word in str(e.value)


def test_a_first_update_under_inference_mode_does_not_break_later_ones():
    """The program built under torch.inference_mode() held inference tensors, which a later
    update outside it cannot copy into (RuntimeError); the eager update has no such state."""
    out = []
    for graphed in (False, True):
        tx = fo.levenberg_marquardt(_curve, cuda_graph=graphed)
        p, s = P0, tx.init(P0)
        for i in range(4):
            with torch.inference_mode(i == 0):
                upd, s = tx.update(None, s, p)
            p = fo.apply_updates(p, upd)
        out.append(p)
    _close(*out, 1e-9)


def test_a_batch_constant_that_changes_every_call_warns():
    """Each value of a Python number in the batch gets its own program (right numbers), and
    each program keeps copies of the batch (and, on CUDA, two captured graphs): a number that
    changes every call grew the cache by one program per update, without a word."""
    tx = fo.levenberg_marquardt(lambda p, b: p["a"] * b[0] - b[1] * b[0], cuda_graph=True)
    p = {"a": torch.tensor(0.0, dtype=F64)}
    state = tx.init(p)
    with warnings.catch_warnings():  # the program warning is a UserWarning (torch's own
        warnings.simplefilter("error", UserWarning)  # first-use deprecations are not it)
        for i in range(8):  # a few shapes or constants are what programs are for
            tx.update(None, state, p, batch=(T, float(i)))
    with pytest.warns(UserWarning, match="pass numbers that change as tensors"):
        for i in range(8, 40):
            tx.update(None, state, p, batch=(T, float(i)))


def test_an_edited_partial_or_callable_builder_is_other_code():
    """resume's code digests named a ``functools.partial`` "partial" and a callable object
    by its class alone: a plugin registering ``partial(build, beta=...)`` and then editing
    ``beta`` had its old saved runs taken as this code's."""
    build = OPTIMIZERS["adamw"]
    one = resume._defined(functools.partial(build, weight_decay=0.1))
    two = resume._defined(functools.partial(build, weight_decay=0.2))
    assert one != two and resume._defined(build) in one

    class Builder:
        def __call__(self, problem, lr):
            return build(problem, lr=lr)

    digest = resume._defined(Builder())
    assert digest.split()[-1] == resume._defined(Builder).split()[-1]  # this file's digest
    assert len(digest.split()) == 2


def test_a_second_command_on_the_same_out_is_refused(tmp_path):
    """Two commands saving runs into one --out overwrite each other's runs.json (each keeps
    only its own list), so a cut-off pair loses runs; the second is refused while the first
    holds the folder, and may go once it is done."""
    args = _parser().parse_args(ARGS)
    args.command = "python -m funcopt.bench ..."
    settings = _settings(args, ["digits-logreg"], ["sgd-momentum", "adamw"], torch.device("cpu"))
    out = tmp_path / "rep"
    first = resume.SavedRuns(out, settings, resume=True)
    for again in (True, False):  # neither --resume nor --force (which deletes runs.json)
        with pytest.raises(ValueError, match="another command"):
            resume.SavedRuns(out, settings, resume=again)
    msg = _error([*ARGS, "--out", str(out), "--resume"])
    assert msg.startswith(f"error: --out {out}: another command")
    first.close()
    assert not out.exists()  # made for the lock, left empty: removed
    resume.SavedRuns(out, settings, resume=True).close()


# --------------------------------------------------------------------- guards


def test_the_final_cost_is_scipys_on_small_curve_fits():
    scipy_opt = pytest.importorskip("scipy.optimize")
    import numpy as np

    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 4, 40, dtype=F64)
    models = {"exp": (lambda q: q[0] * torch.exp(-q[1] * t) + q[2], [2.5, 1.3, 0.5],
                      [1.0, 0.3, 0.0]),
              "gauss": (lambda q: q[0] * torch.exp(-(t - q[1]) ** 2 / q[2]), [3.0, 2.0, 0.7],
                        [1.0, 1.5, 1.0])}
    for model, true, start in models.values():
        y = model(torch.tensor(true, dtype=F64)) + 0.05 * torch.randn(40, generator=g,
                                                                      dtype=F64)
        res = lambda p, model=model, y=y: model(p["q"]) - y  # noqa: E731
        ref = scipy_opt.least_squares(lambda q, res=res: res({"q": torch.tensor(q)}).numpy(),
                                      np.array(start), method="lm")
        p, _, _ = _fit(res, {"q": torch.tensor(start, dtype=F64)}, True, 60)
        cost = 0.5 * float((res(p) ** 2).sum())
        assert cost == pytest.approx(ref.cost, rel=1e-9)


@pytest.mark.parametrize("res, params", [
    (lambda p: p["a"] ** 3 - torch.tensor([1.0, 8.0, 27.0], dtype=F64),
     {"a": torch.ones(3, dtype=F64)}),  # m == n
    (lambda p: torch.stack([p["a"].sum() - 1, (p["a"] ** 2).sum() - 2]),
     {"a": torch.arange(5, dtype=F64) * 0.1}),  # m < n: the dual Gram
    (lambda p: (p["a"] + p["b"]) * torch.exp(-p["k"] * T) - Y,
     {"a": torch.tensor(0.5, dtype=F64), "b": torch.tensor(0.2, dtype=F64),
      "k": torch.tensor(0.3, dtype=F64)}),  # rank-deficient: a and b enter as a + b
    (lambda p: p["a"] * T - 3 * T,
     {"a": torch.tensor(0.0, dtype=F64), "b": torch.tensor(5.0, dtype=F64)}),  # b unused
])
@pytest.mark.parametrize("kw", [{}, {"scaling": False}, {"rule": fo.Classic()},
                                {"form": "primal", "solver": "cholesky"}])
def test_shapes_and_rank_deficiency_take_the_eager_steps(res, params, kw):
    (p1, _, t1), (p2, _, t2) = _both(res, params, 5, **kw)  # later: rounding decides
    assert t1 == t2
    _close(p1, p2, 1e-8)


def test_residual_scale_does_not_change_the_steps():
    """1e-150 and 1e150 times the residuals (float64): the steps of scale 1."""
    ref, _, _ = _fit(_curve, P0, True, 10)
    for scale in (1e-150, 1e150):
        p, s, _ = _fit(functools.partial(_curve, scale=scale), P0, True, 10)
        _close(ref, p, 1e-10)
        assert torch.isfinite(s.residual_norm) and bool(s.accepted)


def test_a_non_finite_trial_point_is_a_rejected_attempt():
    """NaN residuals beyond a = 1.5, where the first steps go: rejected attempts, never a NaN
    in the params; the eager update's attempts."""
    res = lambda p: torch.where(p["a"] > 1.5, torch.nan, (p["a"] - 3.0) * T)  # noqa: E731
    (p1, s1, t1), (p2, s2, t2) = _both(res, {"a": torch.tensor(1.0, dtype=F64)}, 6)
    assert t1 == t2 and t2[0] == (True, 6)
    assert torch.isfinite(p2["a"]) and float(p2["a"]) <= 1.5
    _close(p1, p2, 1e-12)


def test_a_nan_in_the_batch_raises_as_the_eager_update():
    for graphed in (False, True):
        tx = fo.levenberg_marquardt(lambda p, b: p["a"] * b - 1, cuda_graph=graphed)
        p = {"a": torch.tensor(1.0, dtype=F64)}
        s = tx.init(p)
        _, s = tx.update(None, s, p, batch=torch.ones(3, dtype=F64))
        with pytest.raises(ValueError, match="non-finite residuals"):
            tx.update(None, s, p, batch=torch.tensor([1.0, torch.nan, 1.0], dtype=F64))


def test_eager_and_graphed_updates_share_one_state():
    """A checkpoint of either goes on in the other: alternating them is the eager fit."""
    eager = fo.levenberg_marquardt(_curve)
    graphed = fo.levenberg_marquardt(_curve, cuda_graph=True)
    p1 = p2 = P0
    s1 = s2 = eager.init(P0)
    for tx in (eager, graphed, graphed, eager, graphed, eager, eager, graphed):
        u1, s1 = eager.update(None, s1, p1)
        u2, s2 = tx.update(None, s2, p2)
        p1, p2 = fo.apply_updates(p1, u1), fo.apply_updates(p2, u2)
    _close(p1, p2, 1e-9)
    for name, a, b in zip(s1._fields, s1, s2):
        assert a.dtype == b.dtype and a.shape == b.shape, name


def test_a_batch_constant_is_keyed_by_its_value():
    """A Python number in the batch is not baked in: each value gives its own fit."""
    res = lambda p, b: p["a"] * b[0] - b[1] * b[0]  # noqa: E731
    tx = fo.levenberg_marquardt(res, cuda_graph=True)
    p = {"a": torch.tensor(0.0, dtype=F64)}
    for c in (1.0, 2.0, 1.0, 5.0):
        upd, _ = tx.update(None, tx.init(p), p, batch={0: T, 1: c})
        assert float(upd["a"]) == pytest.approx(c, rel=1e-2)


def test_per_sample_cross_entropy_over_two_batch_sizes_takes_the_eager_steps():
    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=F64)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    res = fo.cross_entropy_residuals(lambda p, xx: functional_call(model, p, (xx,)),
                                     per_sample=True)
    batches = [(x[:32], labels[:32]), (x[32:], labels[32:])]
    (p1, _, t1), (p2, _, t2) = _both(res, params, 10, batches)
    assert t1 == t2
    _close(p1, p2, 1e-8)


def test_a_resume_under_other_threads_is_refused_and_taken_runs_are_named(tmp_path,
                                                                         monkeypatch, capsys):
    """--threads changes the timings: the saved runs of another count are refused; under the
    same settings every saved run is taken (none run again) and the header says where and
    when they were measured."""
    out = tmp_path / "rep"
    argv = [*ARGS, "--out", str(out)]
    assert _main(monkeypatch, argv, cut=3)[0] == 130
    msg = _error([*argv, "--resume", "--threads", "2"])
    assert "threads 1" in msg and "threads is 2" in msg
    rc, runs = _main(monkeypatch, [*argv, "--resume"], cut=1)  # cut before any run of its own
    assert rc == 130 and runs.calls == []
    rc, runs = _main(monkeypatch, [*argv, "--resume"])
    assert rc == 0 and len(runs.calls) >= 1
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert [r["runs"] for r in meta["resumed"]] == [2]
    header = (out / "report.md").read_text().split("## Results")[0]
    assert "2 of the runs" in header and "measured there" in header


def test_runs_json_that_cannot_be_written_stops_the_saving_not_the_runs(tmp_path, monkeypatch,
                                                                        capsys):
    """A full disk (or a read-only file) at the second save: one warning, every run made, the
    report written; the runs saved before stay for --resume until the report replaces them."""
    real, calls = resume.os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(resume.os, "fsync", fsync)
    out = tmp_path / "rep"
    rc, runs = _main(monkeypatch, [*ARGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and len(runs.calls) >= 8 and len(calls) == 2
    assert err.count("cannot be saved") == 1 and "No space left" in err
    assert (out / "report.md").is_file() and not (out / "runs.json").exists()


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_empty_residuals_are_one_clear_error_in_the_transform(cuda_graph):
    """A residual function that returns no elements: one ValueError saying there is nothing
    to fit (was torch.cat's 'expected a non-empty list of Tensors')."""
    params = {"a": torch.ones(2, dtype=torch.float64)}
    tx = fo.levenberg_marquardt(lambda q: q["a"][:0], cuda_graph=cuda_graph)
    with pytest.raises(ValueError, match="no residuals"):
        tx.update(None, tx.init(params), params)


def _flipped_pair(c):
    """r = (1000 p0, p1 - c) with the second Jacobian entry of the wrong sign (-1)."""
    def fn(p):
        return torch.stack([1000 * p[0], 2 * p[1].detach() - p[1] - c])
    return fn


# Was a strict xfail: the rounding floor stepped a zero parameter at scale 1 and measured the
# wrong Jacobian's error (floor 4e33). A zero parameter now moves at the scale ||r|| / ||J_j||
# (least_squares_options.rounding_steps); tests/test_lsq_probe_rounding.py guards the other
# drivers.
def test_a_wrong_jacobian_at_a_zero_point_of_tiny_scale_is_not_success():
    """A fit of tiny scale (minimum at p1 = 6.8e-48) with a wrong-sign Jacobian that ends at
    x = 0 on ftol after rejected updates: gnorm is 1, far above the rounding floor, a stall."""
    c = 6.782894149762711e-48
    x, info = fo.least_squares(_flipped_pair(c), torch.tensor([1.0, 0.5 * c],
                                                              dtype=torch.float64))
    assert float(x[0]) == 0.0 and float(x[1]) == 0.0  # where the fit ends (exact arithmetic)
    assert not info.success, info.reason


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_the_gram_operator_as_a_matrix_is_exactly_symmetric(form):
    """GramOperator.as_matrix without a formed Gram matrix: exactly symmetric on any CPU (a
    BLAS may sum (i, j) and (j, i) in different orders), and J^T J + lambda I to rounding."""
    from funcopt.solvers.operators import GramOperator

    g = torch.Generator().manual_seed(3)
    J = torch.randn(40, 24, generator=g, dtype=torch.float64)
    A = GramOperator(J, 0.5, form=form).as_matrix()
    assert torch.equal(A, A.mT)
    G = J.mT @ J if form == "primal" else J @ J.mT
    torch.testing.assert_close(A, G + 0.5 * torch.eye(G.shape[0], dtype=torch.float64))
