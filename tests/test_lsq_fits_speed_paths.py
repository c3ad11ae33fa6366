"""The batched driver's short paths agree with the general ones they replace.

* ``local_model(..., method="gram")`` (few passes over ``J``) against the SVD model of the
  same Jacobians: the same norms, scaling, gradient cosine and steps, with non-finite
  problems, zero and badly scaled columns in the batch;
* ``restart_trial`` against ``start_trial`` selected into the trial of the fresh problems.
"""

from __future__ import annotations

import torch

from funcopt.transforms import lm_batched
from funcopt.transforms.levenberg_marquardt import lm_options
from funcopt.transforms.lm_damping import TrustRegion

DT = torch.float64


def _batch(seed: int = 0, B: int = 12, m: int = 7, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(B, m, n, generator=g, dtype=DT)
    r = torch.randn(B, m, generator=g, dtype=DT)
    J[1, :, 2] = 0.0  # a zero column
    J[2, :, 0] *= 1e-170  # a column far below the others (its square underflows)
    J[3] *= 1e200  # a large Jacobian
    J[4, 2, 1] = float("nan")
    J[5, 0, 0] = float("inf")
    r[6, 3] = float("nan")
    r[7] = 0.0  # zero residual
    x = torch.randn(B, n, generator=g, dtype=DT)
    return J, r, x


def _state(x: torch.Tensor, first: bool):
    s = lm_batched.init_state(x, 1e-3)
    if first:
        return s
    g = torch.Generator().manual_seed(3)
    return s._replace(count=s.count + 2, scale=torch.rand(x.shape, generator=g, dtype=DT) * 3,
                      damping=torch.rand(x.shape[0], generator=g, dtype=DT),
                      radius=torch.rand(x.shape[0], generator=g, dtype=DT) + 0.1)


def test_gram_model_matches_the_svd_model():
    J, r, x = _batch()
    for scaling in (True, False):
        o = lm_options(rule=TrustRegion(), scaling=scaling)
        for first in (True, False):
            state = _state(x, first)
            a = lm_batched.local_model(J, r, x, state, o, "gram")
            b = lm_batched.local_model(J, r, x, state, o, "svd")
            assert torch.equal(a.finite, b.finite)
            assert a.finite.tolist() == [True] * 4 + [False] * 3 + [True] * 5
            for name in ("rnorm", "d", "cos", "damping", "sigma", "scale"):
                u, v = getattr(a, name), getattr(b, name)
                assert torch.allclose(u, v, rtol=1e-12, atol=0, equal_nan=True), name
            for mu in (0.0, 1e-3, 1.0):
                mu_t = torch.full_like(a.rnorm, mu)
                # row 2's 1e-170 column is a direction at the rounding level of the Gram
                # matrix, which the two methods resolve differently by design
                ok = a.finite & (a.rnorm > 0)
                ok[2] = False
                for u, v in zip(lm_batched._step(a, mu_t), lm_batched._step(b, mu_t)):
                    assert torch.allclose(u[ok], v[ok], rtol=1e-9, atol=0)
            bad = ~a.finite
            assert (a.w[bad] == 0).all() and (a.sh2[bad] == 0).all() and (a.cos[bad] == 0).all()


def test_restart_trial_equals_start_trial_selected():
    J, r, x = _batch(1)
    for rule in (TrustRegion(), lm_options().rule):
        o = lm_options(rule=rule, scaling=True)
        state = _state(x, first=False)
        loc = lm_batched.local_model(J, r, x, state, o, "gram")
        g = torch.Generator().manual_seed(5)
        t = lm_batched.Trial(*(
            (torch.rand(f.shape, generator=g, dtype=DT) if f.is_floating_point()
             else torch.randint(0, 5, f.shape, generator=g).to(f.dtype))
            for f in lm_batched.start_trial(loc, state, o)))
        fresh = torch.rand(x.shape[0], generator=g) < 0.5
        got = lm_batched.restart_trial(loc, state, t, fresh)
        ref = lm_batched.start_trial(loc, state, o)
        for name, u, v, old in zip(lm_batched.Trial._fields, got, ref, t):
            mask = fresh.reshape(-1, *([1] * (u.ndim - 1)))
            want = torch.where(mask, v, old)
            assert u.dtype == want.dtype and torch.equal(u.isnan(), want.isnan()), name
            assert torch.equal(u.nan_to_num(), want.nan_to_num()), name
