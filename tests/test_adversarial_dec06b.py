"""Adversarial checks of the shape-decided LM scaling, the LM dense step's host checks and the
hooked curvature capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _lm_batches import residual, run
from torch.utils.checkpoint import checkpoint

import funcopt as fo
from funcopt.func.capture import capture_curvature

F64 = torch.float64


def _varying_batch_run(scaling, sizes=(5, 2, 5, 2, 5)):
    """Eager updates on batches of ``sizes`` rows (n = 3: m >= n flips each step)."""
    t = fo.levenberg_marquardt(residual, scaling=scaling)
    p = {"w": torch.zeros(3, dtype=F64)}
    return run(t, t.init(p), p, sizes)[2]


@pytest.mark.parametrize("sizes", [(5, 2, 5, 2, 5), (2, 5, 2, 5, 2)])
def test_default_scaling_does_not_mix_across_batches_of_varying_size(sizes):
    """scaling=None keeps the first step's choice (D where its m >= n, else D = I): the run
    equals the one with that choice passed explicitly, bit for bit up to rounding."""
    auto = _varying_batch_run(None, sizes)
    first = _varying_batch_run(sizes[0] >= 3, sizes)
    for (p0, s0, l0), (p1, s1, l1) in zip(auto, first):
        torch.testing.assert_close(p0, p1, rtol=1e-12, atol=0)
        torch.testing.assert_close(s0, s1, rtol=1e-12, atol=0)
        torch.testing.assert_close(l0, l1, rtol=1e-12, atol=0)


def test_overflowing_damping_message_does_not_call_true_the_default():
    """A wide problem (m < n: D = I by default) with a Jacobian near the float64 maximum."""
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(2, 5, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64)
    t = fo.levenberg_marquardt(lambda p: (A @ p["w"] - b) * 1e300)
    p = {"w": torch.zeros(5, dtype=F64)}
    with pytest.raises(ValueError, match="pass scaling=True") as e:
        t.update(None, t.init(p), p)
    assert "(the default)" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_trust_region_refuses_16bit_params_with_a_clear_error(dtype):
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(6, 3, generator=g).to(dtype), torch.randn(6, generator=g).to(dtype)
    calls = []

    def res(p):
        calls.append(1)
        return A @ p["w"] - b

    p = {"w": torch.zeros(3, dtype=dtype)}
    with pytest.raises(TypeError, match="TrustRegion.*Nielsen"):
        fo.least_squares(res, p)  # TrustRegion is least_squares' default
    t = fo.levenberg_marquardt(res, rule=fo.TrustRegion())
    calls.clear()
    with pytest.raises(TypeError, match=str(dtype)):
        t.update(None, t.init(p), p)
    assert not calls  # refused before any residual evaluation
    # the other rules run on 16-bit params and decrease the cost as float64 does
    t = fo.levenberg_marquardt(res, rule=fo.Nielsen())
    u, s = t.update(None, t.init(p), p)
    assert bool(s.accepted) and float(s.new_cost) < float(s.cost)


class _Net(nn.Module):
    def __init__(self, mode=None):
        super().__init__()
        self.a, self.b, self.mode = nn.Linear(4, 8), nn.Linear(8, 3), mode

    def forward(self, x):
        f = lambda t: self.b(torch.tanh(self.a(t)))  # noqa: E731
        return f(x) if self.mode is None else checkpoint(f, x, use_reentrant=False)


def test_hooked_capture_under_activation_checkpointing_matches_plain_model():
    """Non-reentrant checkpointing recomputes the layers in backward (with the capture's
    forward hooks gone): g and a must still be those of the plain model."""
    torch.manual_seed(0)
    plain = _Net()
    ck = _Net("ck")
    ck.load_state_dict(plain.state_dict())
    p = {k: v.detach() for k, v in plain.named_parameters()}
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    c0, c1 = capture_curvature(plain, p, x, y), capture_curvature(ck, p, x, y)
    assert set(c0.layers) == set(c1.layers) == {"a", "b"}
    for k in c0.layers:
        assert c0.layers[k].a.shape[0] == c1.layers[k].a.shape[0] == 5  # one call each
        torch.testing.assert_close(c1.layers[k].a, c0.layers[k].a)
        torch.testing.assert_close(c1.layers[k].g, c0.layers[k].g)
        assert c0.layers[k].g.abs().max() > 0
