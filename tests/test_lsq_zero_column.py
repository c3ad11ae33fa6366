"""A fit that ends where a parameter's Jacobian column is zero: the drivers probe the cost
along that parameter and report a maximum as a failure, while a minimum keeps its success
(funcopt/least_squares_probe.py)."""

import importlib
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import funcopt as fo
import funcopt.least_squares_batched as lsb
from funcopt import least_squares_probe as lsp
from funcopt import nist
from funcopt.least_squares_parallel import least_squares_parallel

F64, F32 = torch.float64, torch.float32
DTYPES = pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
NOT_A_MINIMUM = "a stationary point that is not a minimum"


def _cos_and_line(a):
    return torch.stack([torch.cos(a[0]), a[1] - 1])


def _bowl_and_line(a):
    return torch.stack([a[0] ** 2 + 1, a[1] - 1])


def _cost(r):
    return 0.5 * float((r.double() ** 2).sum())


@DTYPES
@pytest.mark.parametrize("solver", ["auto", "cg"])
@pytest.mark.parametrize("case", ["square", "cos"])
def test_a_maximum_along_a_zero_column_is_a_failure(dtype, solver, case):
    """a^2 - 1 from 0 (J = 0 at the start, cost 0.5, the minimum 0 at a = +-1) and [cos a0,
    a1 - 1] from 0 (a1 is fitted, a0's column stays zero at the maximum of cos^2): both
    stopped with success on gtol/ftol; now a failure naming parameter [0], at a cost the true
    minimum (float64 math) undercuts."""
    fn, x0, lower = {
        "square": (lambda a: a**2 - 1, torch.zeros(1, dtype=dtype), torch.ones(1, dtype=F64)),
        "cos": (_cos_and_line, torch.zeros(2, dtype=dtype),
                torch.tensor([math.pi / 2, 1.0], dtype=F64)),
    }[case]
    x, info = fo.least_squares(fn, x0, solver=solver)
    assert not info.success, info.reason
    if solver == "cg" and case == "square":  # no gnorm without scaling: ftol/xtol at x0
        assert info.reason.startswith("no step was accepted from the start point")
    else:
        assert info.reason.startswith(NOT_A_MINIMUM) and "parameter [0]" in info.reason
        assert "start from another point" in info.reason
    assert x[0] == 0 and info.cost == pytest.approx(0.5, rel=1e-6)
    assert _cost(fn(lower)) < 1e-12 < info.cost


@DTYPES
@pytest.mark.parametrize("solver", ["auto", "cg"])
def test_a_minimum_along_a_zero_column_stays_a_success(dtype, solver):
    """[a0^2 + 1, a1 - 1] from 0: a0 = 0 is the minimum (cost 0.5 = 0.5 * 1^2, float64
    math), with a zero column there and r != 0; the probes cost two evaluations."""
    x, info = fo.least_squares(_bowl_and_line, torch.zeros(2, dtype=dtype), solver=solver)
    assert info.success, info.reason
    torch.testing.assert_close(x, torch.tensor([0.0, 1.0], dtype=dtype), rtol=0, atol=1e-6)
    assert info.cost == pytest.approx(_cost(_bowl_and_line(torch.tensor([0.0, 1.0]))), rel=1e-6)
    for h in (1e-3, -1e-3):  # the point is a minimum along a0: the reference's own check
        assert _cost(_bowl_and_line(torch.tensor([h, 1.0], dtype=F64))) > 0.5


def test_an_unused_parameter_keeps_a_nist_fit():
    """Misra1a with a parameter the model ignores (a zero column everywhere, a constant cost
    along it) still reaches NIST's certified values with success; the unused parameter keeps
    its start."""
    p = nist.load("Misra1a")
    fit = nist.residual_fn(p)

    def padded(b):
        return fit(b[:-1]) + 0.0 * b[-1]

    x0 = torch.cat([p.starts[0], torch.tensor([3.0], dtype=F64)])
    b, info = fo.least_squares(padded, x0)
    assert info.success, info.reason
    assert nist.significant_digits(b[:-1], p.certified).min() >= 6 and b[-1] == 3.0
    assert nist.significant_digits(2.0 * info.cost, p.certified_rss) >= 6


@DTYPES
def test_batched_maxima_fail_and_minima_succeed(dtype):
    _, info = fo.least_squares(torch.cos, torch.zeros(3, 1, dtype=dtype), batched=True)
    assert info.success.tolist() == [False] * 3
    assert info.reason.tolist() == [lsb.NOT_A_MINIMUM] * 3
    assert all(t.startswith(NOT_A_MINIMUM) for t in info.reasons())
    x, info = fo.least_squares(lambda p: p**2 + 1, torch.zeros(3, 1, dtype=dtype), batched=True)
    assert info.success.all(), info.reasons()
    assert (x == 0).all() and torch.allclose(info.cost, torch.full((3,), 0.5, dtype=F64))


def _mixed(k):
    """Row b: k[b, 0] cos p0 + k[b, 1] (p0^2 + 1) + k[b, 2] (p0 - 2), and the constant 0.5."""

    def r(P):
        p = P[:, 0]
        first = k[:, 0] * torch.cos(p) + k[:, 1] * (p * p + 1) + k[:, 2] * (p - 2)
        return torch.stack([first, 0.5 + 0 * p], 1)

    return r


@DTYPES
def test_a_batch_flags_only_its_maximum(dtype):
    """A maximum (cos), a minimum along a zero column (p^2 + 1) and an ordinary fit (p - 2,
    beside a constant residual): only the first loses its success, and every row ends as the
    single driver ends the same problem."""
    k = torch.eye(3, dtype=dtype)
    P, info = fo.least_squares(_mixed(k), torch.zeros(3, 1, dtype=dtype), batched=True)
    assert info.success.tolist() == [False, True, True], info.reasons()
    assert int(info.reason[0]) == lsb.NOT_A_MINIMUM
    for b in range(3):
        one = _mixed(k[b:b + 1])
        x, single = fo.least_squares(lambda a, one=one: one(a[None])[0],
                                     torch.zeros(1, dtype=dtype))
        assert single.success == bool(info.success[b]), (b, single.reason)
        torch.testing.assert_close(P[b], x, rtol=1e-5, atol=1e-6)
    assert float(P[2, 0]) == pytest.approx(2.0, rel=1e-5)  # its minimum, cost 0.125
    assert float(info.cost[2]) == pytest.approx(0.125, rel=1e-5)


def test_probes_run_only_for_zero_columns(monkeypatch):
    """The batched probe evaluates the residuals twice per zero column, and not at all for
    a batch without one; the count is in ``evaluations``."""
    calls = []
    probe = lsb.probe_zero_columns

    def counted(norms, *a):
        return probe(lambda xb: (calls.append(1), norms(xb))[1], *a)

    monkeypatch.setattr(lsb, "probe_zero_columns", counted)
    t = torch.linspace(0, 3, 20, dtype=F64)

    def decay(P):
        model = P[:, :1] * torch.exp(-P[:, 1:] * t)
        return model - 2.0 * torch.exp(-0.7 * t) - 0.01 * torch.sin(7 * t)

    _, info = fo.least_squares(decay, torch.ones(2, 2, dtype=F64), batched=True)
    assert info.success.all() and not calls
    _, plain = fo.least_squares(torch.cos, torch.full((2, 1), 0.5, dtype=F64), batched=True)
    _, top = fo.least_squares(torch.cos, torch.zeros(2, 1, dtype=F64), batched=True)
    assert len(calls) == 2 and not top.success.any() and plain.success.all()

    def off(norms, x, *a):
        zero = torch.zeros(x.shape[0], dtype=torch.int64)
        return zero != 0, zero - 1, zero

    monkeypatch.setattr(lsb, "probe_zero_columns", off)
    _, without = fo.least_squares(torch.cos, torch.zeros(2, 1, dtype=F64), batched=True)
    assert without.success.all()  # the old answer, which the probe corrects
    assert (top.evaluations - without.evaluations).tolist() == [2, 2]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 10.0), st.sampled_from([-1.0, 1.0]),
                          st.floats(0.1, 10.0), st.sampled_from([-1.0, 1.0])),
                min_size=1, max_size=4))
def test_success_at_zero_is_the_sign_of_the_curvature(rows):
    """r = s a^2 + c from a = 0, where J = 0: the cost 0.5 (s a^2 + c)^2 has d^2/da^2 = 2 s c
    at 0, a minimum for s c > 0 and a maximum for s c < 0 (float64 math). The single and the
    batched fits succeed exactly at the minima."""
    s = torch.tensor([m * sg for m, sg, _, _ in rows], dtype=F64)
    c = torch.tensor([m * sg for _, _, m, sg in rows], dtype=F64)
    want = [bool(v > 0) for v in s * c]
    _, info = fo.least_squares(lambda a: s[:, None] * a * a + c[:, None],
                               torch.zeros(len(rows), 1, dtype=F64), batched=True)
    assert info.success.tolist() == want, info.reasons()
    for b in range(len(rows)):
        _, one = fo.least_squares(lambda a, b=b: s[b] * a * a + c[b], torch.zeros(1, dtype=F64))
        assert one.success == want[b], one.reason


@DTYPES
def test_the_data_parallel_driver_probes_too(dtype):
    """Without a process group the data-parallel driver is one process: the maximum fails
    with the batched code, the minimum along a zero column keeps its success."""
    _, info = least_squares_parallel(_cos_and_line, torch.zeros(2, dtype=dtype))
    assert info.success.tolist() == [False] and info.reason.tolist() == [lsb.NOT_A_MINIMUM]
    x, info = least_squares_parallel(_bowl_and_line, torch.zeros(2, dtype=dtype))
    assert info.success.tolist() == [True]
    torch.testing.assert_close(x, torch.tensor([0.0, 1.0], dtype=dtype), rtol=0, atol=1e-6)


def _shard(rank, first):
    """Rank 0 holds the residual of a0 (``first``), rank 1 that of a1, a1 - 1."""
    return (lambda a: first(a[0])[None]) if rank == 0 else (lambda a: (a[1] - 1)[None])


def _saddle_shard(rank):
    """Rank 0 holds 1 + a0 a1, rank 1 a2 - 1: the summed columns of a0 and a1 are zero."""
    return (lambda a: (1 + a[0] * a[1])[None]) if rank == 0 else (lambda a: (a[2] - 1)[None])


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = [least_squares_parallel(_shard(rank, first), torch.zeros(2, dtype=F64))[1]
               for first in (torch.cos, lambda v: v * v + 1)]
        out.append(least_squares_parallel(_saddle_shard(rank), torch.zeros(3, dtype=F64))[1])
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_probe_the_summed_columns():
    """Over 2 gloo processes each rank's own Jacobian has a zero column (the other rank's
    parameter); only the summed column of a0 is zero. Both ranks report the maximum (cos)
    as a failure and the minimum (a0^2 + 1) as a success, as one process does; the saddle
    1 + a0 a1 (two summed zero columns) fails on both after the same combined probes."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(os.path.join(d, "init"), d), nprocs=2, join=True,
                           start_method="spawn")
        results = [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(2)]
    one = [least_squares_parallel(fn, torch.zeros(2, dtype=F64))[1]
           for fn in (_cos_and_line, _bowl_and_line)]
    saddle = least_squares_parallel(lambda a: torch.stack([1 + a[0] * a[1], a[2] - 1]),
                                    torch.zeros(3, dtype=F64))[1]
    assert saddle.success.tolist() == [False]
    for top, bowl, cross in results:
        assert top.success.tolist() == [False] and top.reason.tolist() == [lsb.NOT_A_MINIMUM]
        assert bowl.success.tolist() == [True]
        assert (top.evaluations == one[0].evaluations).all()
        assert (bowl.evaluations == one[1].evaluations).all()
        assert cross.success.tolist() == [False] and cross.reason.tolist() == [lsb.NOT_A_MINIMUM]
        assert (cross.evaluations == saddle.evaluations).all()


def test_at_most_max_probed_zero_columns_are_probed():
    """Many zero columns (a network's dead units): the single fit probes
    ``MAX_PROBED`` of them, two evaluations each, then ``PATTERNS`` combined directions over
    all of them, two each; it still finds a maximum among them when one of the probed
    columns has it."""
    n = 3 * lsp.MAX_PROBED + 1  # zero columns 0 .. n - 2; the last parameter fits a line

    def flat(a):  # a[j]^2 at 0: zero columns, minima along each
        return torch.cat([a[:-1] ** 2 + 1, (a[-1:] - 1)])

    _, info = fo.least_squares(flat, torch.zeros(n, dtype=F64))
    _, base = fo.least_squares(lambda a: a[-1:] - 1, torch.zeros(n, dtype=F64))
    assert info.success
    assert info.evaluations - base.evaluations == 2 * lsp.MAX_PROBED + 2 * lsp.PATTERNS

    def with_top(a):  # parameter 0 (always probed: the first of the spaced ones) is a maximum
        return torch.cat([torch.cos(a[:1]), a[1:-1] ** 2 + 1, (a[-1:] - 1)])

    _, top = fo.least_squares(with_top, torch.zeros(n, dtype=F64))
    assert not top.success and NOT_A_MINIMUM in top.reason


def _saddle(a):  # 1 + a0 a1 beside a fitted line: J's columns for a0 and a1 are zero at 0
    return torch.stack([1 + a[..., 0] * a[..., 1], a[..., 2] - 1], -1)


@DTYPES
def test_a_saddle_across_two_zero_columns_is_a_failure(dtype):
    """r = [1 + a0 a1, a2 - 1] from 0: flat along a0 and along a1 (the per-column probes see
    no fall), but the cost falls along a0 = -a1 (float64 math): a failure in the single, the
    batched and the data-parallel drivers, while the same problem with a0^2 + a1^2 added (a
    minimum) keeps its success."""
    h = 1e-3
    for d in ((h, 0.0), (0.0, h)):
        assert _cost(_saddle(torch.tensor([*d, 1.0], dtype=F64))) == 0.5
    assert _cost(_saddle(torch.tensor([h, -h, 1.0], dtype=F64))) < 0.5
    x, info = fo.least_squares(_saddle, torch.zeros(3, dtype=dtype))
    assert not info.success and info.reason.startswith(NOT_A_MINIMUM)
    assert "2 parameters [0], [1]" in info.reason and "a combination of them" in info.reason
    assert x[:2].tolist() == [0.0, 0.0] and info.cost == pytest.approx(0.5, rel=1e-6)
    _, batch = fo.least_squares(_saddle, torch.zeros(2, 3, dtype=dtype), batched=True)
    assert batch.reason.tolist() == [lsb.NOT_A_MINIMUM] * 2
    _, par = least_squares_parallel(_saddle, torch.zeros(3, dtype=dtype))
    assert par.reason.tolist() == [lsb.NOT_A_MINIMUM]

    def bowl(a):
        return _saddle(a) + torch.stack([a[..., 0] ** 2 + a[..., 1] ** 2, 0 * a[..., 0]], -1)

    _, info = fo.least_squares(bowl, torch.zeros(3, dtype=dtype))
    assert info.success, info.reason


@DTYPES
def test_minima_along_every_zero_column_stay_a_success(dtype):
    """r = [a0^2 + 1, a1^2 + 1, a2^2 + 1, a3 - 1] from 0: a minimum (cost 1.5, float64 math)
    with three zero columns; the single and batched fits succeed after 2 * 3 per-column and
    2 * PATTERNS combined evaluations."""
    def fn(a):
        return torch.cat([a[..., :3] ** 2 + 1, a[..., 3:] - 1], -1)

    x, info = fo.least_squares(fn, torch.zeros(4, dtype=dtype))
    assert info.success, info.reason
    assert x.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0], abs=1e-6)
    assert info.cost == pytest.approx(_cost(fn(torch.tensor([0.0, 0, 0, 1]))), rel=1e-6)
    _, base = fo.least_squares(lambda a: a[3:] - 1, torch.zeros(4, dtype=dtype))
    assert info.evaluations - base.evaluations == 2 * 3 + 2 * lsp.PATTERNS
    _, batch = fo.least_squares(fn, torch.zeros(3, 4, dtype=dtype), batched=True)
    assert batch.success.all(), batch.reasons()


def _rows(k):
    """Row b: [k[b, 0] cos p0 + k[b, 1] (p0^2 + 1), k[b, 2] (p1^2 + 1) + k[b, 3] (p1 - 1)]."""

    def r(P):
        p, q = P[:, 0], P[:, 1]
        return torch.stack([k[:, 0] * torch.cos(p) + k[:, 1] * (p * p + 1),
                            k[:, 2] * (q * q + 1) + k[:, 3] * (q - 1)], 1)

    return r


def test_combined_probes_run_only_for_two_zero_columns(monkeypatch):
    """Row 0 has one zero column (p0, a minimum): 2 probes. Row 1 has two (minima): 4 and
    2 * PATTERNS combined. Row 2 has two, and a maximum (cos p0) the per-column probes find:
    4, no combined ones. ``evaluations`` counts exactly these, in the batched fit and in the
    single fit of each row (against the fits with the probe off)."""
    k = torch.tensor([[0, 1, 0, 1], [0, 1, 1, 0], [1, 0, 1, 0]], dtype=F64)
    want = [2, 4 + 2 * lsp.PATTERNS, 4]
    calls = []
    probe = lsb.probe_zero_columns

    def counted(norms, *a):
        return probe(lambda xb: (calls.append(1), norms(xb))[1], *a)

    monkeypatch.setattr(lsb, "probe_zero_columns", counted)
    _, info = fo.least_squares(_rows(k), torch.zeros(3, 2, dtype=F64), batched=True)
    assert info.success.tolist() == [True, True, False], info.reasons()
    assert len(calls) == 4 + 2 * lsp.PATTERNS  # columns 0 and 1, then the patterns (row 1)
    singles = []
    for b in range(3):
        one = _rows(k[b:b + 1])
        singles.append(fo.least_squares(lambda a, one=one: one(a[None])[0],
                                        torch.zeros(2, dtype=F64))[1])
    monkeypatch.setattr(lsb, "probe_zero_columns", lambda norms, x, *a: (
        torch.zeros(x.shape[0], dtype=torch.bool), torch.full((x.shape[0],), -1),
        torch.zeros(x.shape[0], dtype=torch.int64)))
    monkeypatch.setattr(importlib.import_module("funcopt.least_squares"), "zero_column_check",
                        lambda fn, params, reason, dense: (reason, True, 0))
    _, off = fo.least_squares(_rows(k), torch.zeros(3, 2, dtype=F64), batched=True)
    assert (info.evaluations - off.evaluations).tolist() == want
    for b in range(3):
        one = _rows(k[b:b + 1])
        _, without = fo.least_squares(lambda a, one=one: one(a[None])[0],
                                      torch.zeros(2, dtype=F64))
        assert singles[b].success == bool(info.success[b]), singles[b].reason
        assert singles[b].evaluations - without.evaluations == want[b]


def test_a_maximum_beyond_the_probed_columns_that_outweighs_the_rest():
    """r = [1 + sum_j c_j a_j^2, 0.5] over 40 zero columns, c_1 = -100 and the others 1:
    column 1 is not among the MAX_PROBED probed, but along all of them together the cost
    falls (38 - 100 < 0; float64 math at h = 1e-3), so the all +1 pattern fails the fit.
    With c_1 = -1 the rises outweigh it: see the strict xfail in test_adversarial_dec06c."""
    c = torch.ones(40, dtype=F64)
    c[1] = -100.0
    spaced = torch.linspace(0, 39, lsp.MAX_PROBED).round().long().tolist()
    assert 1 not in spaced

    def fn(a):
        return torch.stack([1 + (c * a * a).sum(), torch.tensor(0.5, dtype=F64)])

    assert _cost(fn(torch.full((40,), 1e-3, dtype=F64))) < _cost(fn(torch.zeros(40, dtype=F64)))
    _, info = fo.least_squares(fn, torch.zeros(40, dtype=F64))
    assert not info.success and "the 40 parameters" in info.reason


NONZERO = st.tuples(st.floats(0.1, 10.0), st.sampled_from([-1.0, 1.0])).map(lambda t: t[0] * t[1])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(NONZERO, NONZERO, NONZERO, NONZERO), min_size=1, max_size=4))
def test_two_zero_columns_fail_where_an_axis_or_a_diagonal_falls(rows):
    """r = c + al a^2 + be b^2 + ga a b from a = b = 0 (J = 0): along a direction d the cost
    0.5 (c + t^2 q(d))^2 falls for small t where c q(d) < 0 (float64 math). With two zero
    columns the probes move along e_a, e_b, (1, 1) and (1, -1): the single and batched fits
    fail exactly where c q(d) < 0 for one of these; in particular every true minimum (c q
    positive definite) keeps its success. A negative direction away from all four (e.g. c =
    1, al = 1, be = 10, ga = -7) is the documented miss."""
    p = torch.tensor(rows, dtype=F64)
    c, al, be, ga = p.unbind(1)
    q = torch.stack([al, be, al + be + ga, al + be - ga], 1)
    assume(bool((q.abs() > 1e-3).all()))
    want = [bool(v) for v in ((c[:, None] * q) > 0).all(1)]
    for b in range(len(rows)):  # a true minimum: c H positive definite
        H = c[b] * torch.tensor([[2 * al[b], ga[b]], [ga[b], 2 * be[b]]], dtype=F64)
        if bool((torch.linalg.eigvalsh(H) > 0).all()):
            assert want[b]

    def fn(P):
        a, bb = P[..., :1], P[..., 1:]
        return c[:, None] + al[:, None] * a * a + be[:, None] * bb * bb + ga[:, None] * a * bb

    _, info = fo.least_squares(fn, torch.zeros(len(rows), 2, dtype=F64), batched=True)
    assert info.success.tolist() == want, info.reasons()
    for b in range(len(rows)):
        _, one = fo.least_squares(lambda a, b=b: (c[b] + al[b] * a[0] ** 2 + be[b] * a[1] ** 2
                                                  + ga[b] * a[0] * a[1])[None],
                                  torch.zeros(2, dtype=F64))
        assert one.success == want[b], one.reason
