"""A fit that ends where a parameter's Jacobian column is zero: the drivers probe the cost
along that parameter and report a maximum as a failure, while a minimum keeps its success
(funcopt/least_squares_probe.py)."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import funcopt as fo
import funcopt.least_squares_batched as lsb
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


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = [least_squares_parallel(_shard(rank, first), torch.zeros(2, dtype=F64))[1]
               for first in (torch.cos, lambda v: v * v + 1)]
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_probe_the_summed_columns():
    """Over 2 gloo processes each rank's own Jacobian has a zero column (the other rank's
    parameter); only the summed column of a0 is zero. Both ranks report the maximum (cos)
    as a failure and the minimum (a0^2 + 1) as a success, as one process does."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(os.path.join(d, "init"), d), nprocs=2, join=True,
                           start_method="spawn")
        results = [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(2)]
    one = [least_squares_parallel(fn, torch.zeros(2, dtype=F64))[1]
           for fn in (_cos_and_line, _bowl_and_line)]
    for top, bowl in results:
        assert top.success.tolist() == [False] and top.reason.tolist() == [lsb.NOT_A_MINIMUM]
        assert bowl.success.tolist() == [True]
        assert (top.evaluations == one[0].evaluations).all()
        assert (bowl.evaluations == one[1].evaluations).all()


def test_at_most_max_probed_zero_columns_are_probed():
    """Many zero columns (a network's dead units): the single fit probes
    ``MAX_PROBED`` of them, two evaluations each, and still finds a maximum among them when
    one of the probed columns has it."""
    from funcopt import least_squares_probe as lsp

    n = 3 * lsp.MAX_PROBED + 1  # zero columns 0 .. n - 2; the last parameter fits a line

    def flat(a):  # a[j]^2 at 0: zero columns, minima along each
        return torch.cat([a[:-1] ** 2 + 1, (a[-1:] - 1)])

    _, info = fo.least_squares(flat, torch.zeros(n, dtype=F64))
    _, base = fo.least_squares(lambda a: a[-1:] - 1, torch.zeros(n, dtype=F64))
    assert info.success
    assert info.evaluations - base.evaluations == 2 * lsp.MAX_PROBED

    def with_top(a):  # parameter 0 (always probed: the first of the spaced ones) is a maximum
        return torch.cat([torch.cos(a[:1]), a[1:-1] ** 2 + 1, (a[-1:] - 1)])

    _, top = fo.least_squares(with_top, torch.zeros(n, dtype=F64))
    assert not top.success and NOT_A_MINIMUM in top.reason
