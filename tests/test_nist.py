"""NIST StRD nonlinear regression: certified parameters and RSS to 6 significant digits."""

import pytest
import torch

import funcopt as fo
from funcopt import nist

DIGITS = 6.0


def _solve(name, start):
    problem = nist.load(name)
    b, info = fo.least_squares(nist.residual_fn(problem), problem.starts[start].clone())
    return problem, b, info


def _check(problem, b, info):
    digits = nist.significant_digits(b, problem.certified)
    assert digits.min() >= DIGITS, f"{problem.name}: parameter digits {digits.tolist()} ({info.reason})"
    rss = 2.0 * info.cost
    # Lanczos1's certified RSS (1.4e-25) is below float64 resolution of its data: compare absolutely.
    ok = nist.significant_digits(rss, problem.certified_rss) >= DIGITS or abs(rss - problem.certified_rss) < 1e-20
    assert ok, f"{problem.name}: RSS {rss!r} vs certified {problem.certified_rss!r}"
    assert torch.isfinite(b).all()


@pytest.mark.parametrize("start", [0, 1])
@pytest.mark.parametrize("name", nist.LOWER)
def test_lower_difficulty(name, start):
    _check(*_solve(name, start))


HARDER = [n for n in nist.available() if n not in nist.LOWER]


@pytest.mark.parametrize("start", [0, 1])
@pytest.mark.parametrize("name", HARDER)
def test_average_and_higher_difficulty(name, start):
    _check(*_solve(name, start))


def test_shipped_problems():
    """The problems whose certified data could be obtained (see benchmarks/RESULTS_lm.md)."""
    assert set(nist.LOWER) <= set(nist.available())
    assert len(nist.available()) >= 21


def test_reader_parses_the_shipped_files():
    for name in nist.available():
        p = nist.load(name)
        assert p.starts.shape == (2, p.certified.numel())
        assert p.x.shape[0] == p.y.shape[0] > p.certified.numel()
        assert p.certified_rss >= 0
        # the certified point is a stationary point of the model: a relative gradient check
        r = nist.residual_fn(p)(p.certified)
        torch.testing.assert_close(r @ r, torch.tensor(p.certified_rss, dtype=r.dtype), rtol=1e-6, atol=1e-18)


def test_reader_errors():
    with pytest.raises(FileNotFoundError, match="shipped problems"):
        nist.load("NoSuchProblem")
