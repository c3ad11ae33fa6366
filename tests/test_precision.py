"""Stochastic rounding: unbiased within its standard error, deterministic under a generator."""

import pytest
import torch

from funcopt.transforms.precision import apply_updates_stochastic, stochastic_round_bf16


def test_mean_matches_float32_within_standard_error():
    torch.manual_seed(0)
    x = torch.randn(64) * 3
    n = 4000
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([stochastic_round_bf16(x, gen).float() for _ in range(n)])
    lo = x.to(torch.bfloat16).float()  # one neighbour; the other is at most one spacing away
    assert set(draws.unique().tolist()) <= set(torch.cat([lo, torch.nextafter(lo.bfloat16(), torch.full_like(lo, float("inf")).bfloat16()).float(), torch.nextafter(lo.bfloat16(), torch.full_like(lo, -float("inf")).bfloat16()).float()]).tolist())
    se = draws.std(0) / n ** 0.5
    assert torch.all((draws.mean(0) - x).abs() <= 5 * se + 1e-12)


def test_small_updates_not_lost():
    p = {"w": torch.ones(10000, dtype=torch.bfloat16)}
    u = {"w": torch.full((10000,), 1e-3)}  # far below bfloat16's spacing at 1 (2^-7)
    gen = torch.Generator().manual_seed(0)
    out = apply_updates_stochastic(p, u, gen)["w"].float()
    assert (p["w"] + u["w"].bfloat16()).float().eq(1.0).all()  # nearest rounding loses it
    se = out.std() / 100
    assert abs(float(out.mean()) - 1.001) < 5 * float(se)
    assert apply_updates_stochastic(p, u)["w"].dtype == torch.bfloat16


def test_deterministic_under_generator_and_pure():
    x = torch.randn(100)
    a = stochastic_round_bf16(x, torch.Generator().manual_seed(3))
    b = stochastic_round_bf16(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    p = {"w": torch.randn(5, dtype=torch.bfloat16), "f": torch.randn(5)}
    u = {"w": torch.randn(5), "f": torch.randn(5)}
    p0 = {k: v.clone() for k, v in p.items()}
    out = apply_updates_stochastic(p, u, torch.Generator().manual_seed(0))
    assert all(torch.equal(p[k], p0[k]) for k in p)
    assert torch.equal(out["f"], p["f"] + u["f"])


def test_errors():
    with pytest.raises(TypeError, match="float32"):
        stochastic_round_bf16(torch.zeros(3, dtype=torch.float64))
    assert torch.isinf(stochastic_round_bf16(torch.tensor([float("inf")]))).all()
