"""Batch-size tests, sample-indexed schedules and the adaptive training loop."""

import math
from bisect import bisect_right

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from funcopt.batch_size_loop import (
    Batching,
    find_batch_test_state,
    fit_adaptive,
    gradient_and_stats,
    split_batch,
)
from funcopt.compose import chain
from funcopt.func.per_sample import (
    PerSampleStats,
    per_sample_grads,
    sample_loss,
    stats_from_per_sample_grads,
)
from funcopt.testing import check_transform
from funcopt.transforms.adaptive_batch import (
    NormTestState,
    augmented_inner_product_test,
    inner_product_test,
    multistep_samples,
    norm_test,
    scale_by_sample_schedule,
    warmup_cosine_samples,
    warmup_linear_samples,
)

SETTINGS = settings(max_examples=25, deadline=None)


def paper_statistics(per_sample, eta, theta, nu):
    """Float64 transcription of the three tests on materialised per-sample gradients."""
    flat = torch.cat([v.reshape(v.shape[0], -1) for v in per_sample.values()], 1).double()
    g = flat.mean(0)
    g2 = float(g @ g)
    var_norm = float(torch.var(flat, dim=0, correction=1).sum())
    ip = flat @ g
    var_ip = float(torch.var(ip, correction=1))
    ortho = flat - torch.outer(ip, g) / g2
    var_orth = float(torch.var(ortho, dim=0, correction=1).sum())
    return (var_norm / (eta**2 * g2), var_ip / (theta**2 * g2**2), var_orth / (nu**2 * g2))


def random_grads(seed, b, d, scale):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=gen, dtype=torch.float64)
    return {"w": mean + scale * torch.randn(b, d, generator=gen, dtype=torch.float64),
            "v": torch.randn(b, 2, 2, generator=gen, dtype=torch.float64)}


@SETTINGS
@given(seed=st.integers(0, 10_000), b=st.integers(2, 24), d=st.integers(1, 12),
       scale=st.floats(0.01, 5.0), eta=st.floats(0.05, 2.0), theta=st.floats(0.05, 2.0),
       nu=st.floats(0.05, 2.0), b0=st.integers(1, 64), extra=st.integers(0, 200))
def test_statistics_and_growth_rule_match_the_paper(seed, b, d, scale, eta, theta, nu, b0, extra):
    per_sample = random_grads(seed, b, d, scale)
    _, stats = stats_from_per_sample_grads(per_sample)
    t_norm, t_ip, t_orth = paper_statistics(per_sample, eta, theta, nu)
    b_max = b0 + extra
    params = {"w": torch.zeros(d, dtype=torch.float64), "v": torch.zeros(2, 2, dtype=torch.float64)}
    cases = [(norm_test(eta, b0, b_max), t_norm),
             (inner_product_test(theta, b0, b_max), t_ip),
             (augmented_inner_product_test(theta, nu, b0, b_max), max(t_ip, t_orth))]
    mean = {k: v.mean(0) for k, v in per_sample.items()}  # the step's gradient
    for tx, want in cases:
        state = tx.init(params)
        out, new = tx.update(mean, state, params, per_sample_stats=stats)
        assert out is mean  # the gradient passes through unchanged
        # the stored statistic is T clipped to [0, b_max] (0 where T is undefined)
        want = 0.0 if math.isnan(want) else min(want, float(b_max))
        assert math.isclose(float(new.statistic), want, rel_tol=1e-6, abs_tol=1e-9)
        expected = min(b_max, max(b0, math.ceil(float(new.statistic))))
        assert int(new.batch_size) == expected
        assert b0 <= int(new.batch_size) <= b_max
        assert int(new.samples) == b and new.batch_size.dtype == torch.int64


@SETTINGS
@given(seeds=st.lists(st.integers(0, 10_000), min_size=1, max_size=6),
       b0=st.integers(1, 16), b_max=st.integers(16, 300), interval=st.integers(1, 3))
def test_batch_size_never_shrinks_nor_exceeds_its_maximum(seeds, b0, b_max, interval):
    tx = norm_test(0.3, b0, b_max, test_interval=interval)
    params = {"w": torch.zeros(5, dtype=torch.float64), "v": torch.zeros(2, 2, dtype=torch.float64)}
    state = tx.init(params)
    prev = b0
    for k, seed in enumerate(seeds):
        _, stats = stats_from_per_sample_grads(random_grads(seed, 4, 5, 3.0))
        _, state = tx.update(params, state, params, per_sample_stats=stats)
        now = int(state.batch_size)
        assert prev <= now <= b_max
        if k % interval != 0:
            assert now == prev  # no test on this step: the rule keeps b
        prev = now


def stats_of(b, g2, s2, p1=None, p2=None):
    t = lambda v: None if v is None else torch.tensor(float(v), dtype=torch.float64)
    return PerSampleStats(t(b), t(g2), t(s2), t(p1), t(p2))


def test_undefined_statistics_keep_or_grow_the_batch():
    params = {"w": torch.zeros(3)}
    tx = norm_test(0.1, 8, 100)
    s = tx.init(params)
    _, s1 = tx.update(params, s, per_sample_stats=stats_of(1, 1.0, 1.0))  # b=1: no variance
    # undefined (no variance from one sample): stored as 0, a finite state that asks for nothing
    assert int(s1.batch_size) == 8 and float(s1.statistic) == 0.0
    _, s2 = tx.update(params, s, per_sample_stats=stats_of(4, 0.0, 2.0))  # g=0, noise > 0
    assert int(s2.batch_size) == 100
    _, s3 = tx.update(params, s, per_sample_stats=stats_of(4, 0.0, 0.0))  # all zero
    assert int(s3.batch_size) == 8


def test_missing_statistics_are_named():
    params = {"w": torch.zeros(3)}
    tx = norm_test()
    with pytest.raises(ValueError, match="per_sample_stats"):
        tx.update(params, tx.init(params), params)
    tx = inner_product_test()
    with pytest.raises(ValueError, match="inner products"):
        tx.update(params, tx.init(params), params, per_sample_stats=stats_of(4, 1.0, 2.0))
    with pytest.raises(ValueError, match="max_batch_size"):
        norm_test(0.1, 64, 32)
    with pytest.raises(ValueError, match="eta"):
        norm_test(-1.0)


def ref_cosine(n, warm, decay, min_lr, lr):  # the reference code's formula
    if n < warm:
        return lr * n / warm
    if n > decay:
        return min_lr
    return min_lr + 0.5 * (1 + math.cos(math.pi * (n - warm) / (decay - warm))) * (lr - min_lr)


@SETTINGS
@given(n=st.integers(0, 5000), warm=st.integers(1, 1000), span=st.integers(1, 3000),
       lr=st.floats(1e-4, 1.0), frac=st.floats(0.0, 1.0))
def test_sample_schedules_match_formulas(n, warm, span, lr, frac):
    min_lr = lr * frac
    got = float(warmup_cosine_samples(lr, warm, warm + span, min_lr)(torch.tensor(n)))
    assert math.isclose(got, ref_cosine(n, warm, warm + span, min_lr, lr), rel_tol=1e-5, abs_tol=1e-9)
    lin = float(warmup_linear_samples(lr, warm, warm + span, min_lr)(n))
    want = lr * n / warm if n < warm else lr - min(1.0, (n - warm) / span) * (lr - min_lr)
    assert math.isclose(lin, want, rel_tol=1e-5, abs_tol=1e-9)
    assert min(min_lr, 0.0) <= lin <= lr * (1 + 1e-6)
    marks = [warm, warm + span]
    ms = float(multistep_samples(lr, marks, 0.5)(n))
    assert math.isclose(ms, lr * 0.5 ** bisect_right(marks, n), rel_tol=1e-6)


def test_scale_by_sample_schedule_uses_samples_seen_before_the_step():
    sched = warmup_linear_samples(1.0, 100, 200)
    tx = scale_by_sample_schedule(sched)
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    seen = 0
    for b in (10, 30, 70):
        u, state = tx.update({"w": torch.ones(2)}, state, params, batch_size=b)
        torch.testing.assert_close(u["w"], torch.full((2,), -float(sched(seen))))
        seen += b
    assert int(state.samples) == 110
    fixed = scale_by_sample_schedule(0.5)
    s = fixed.init(params)._replace(learning_rate=torch.tensor(0.25))  # an adapter writes it
    u, _ = fixed.update({"w": torch.ones(2)}, s, params, batch_size=3)
    torch.testing.assert_close(u["w"], torch.full((2,), -0.25))


@SETTINGS
@given(b=st.integers(1, 500), w=st.integers(1, 4), m=st.integers(1, 64), acc=st.integers(1, 3))
def test_split_batch_covers_the_batch(b, w, m, acc):
    parts = [split_batch(b, w, r, m, acc) for r in range(w)]
    flat = [p for rank in parts for p in rank]
    assert sum(e - s for s, e in flat) == b
    assert sorted(flat) == flat and all(s < e for s, e in flat)
    assert all(flat[i][1] == flat[i + 1][0] for i in range(len(flat) - 1))
    assert flat[0][0] == 0 and max(e - s for s, e in flat) <= max(m, 1)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(120, 5, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return model, {k: v.detach() for k, v in model.named_parameters()}, x, y


def test_accumulated_micro_batches_equal_one_batch():
    model, params, x, y = problem()
    whole = gradient_and_stats(model, ce, params, [(x[:50], y[:50])], inner=True)
    parts = gradient_and_stats(model, ce, params,
                               [(x[:7], y[:7]), (x[7:30], y[7:30]), (x[30:50], y[30:50])],
                               inner=True)
    for a, b in zip(whole[1], parts[1]):
        torch.testing.assert_close(a, b)
    for k in params:
        torch.testing.assert_close(whole[0][k], parts[0][k])
    psg = per_sample_grads(sample_loss(model, ce))(params, x[:50], y[:50])
    mean, ref = stats_from_per_sample_grads(psg)
    for a, b in zip(ref, parts[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make", [lambda: norm_test(0.6, 4, 64),
                                  lambda: augmented_inner_product_test(0.6, 0.8, 4, 64)])
def test_fit_adaptive_matches_a_materialised_reference_loop(make):
    model, params, x, y = problem()
    lr = 0.5
    tx = chain(make(), scale_by_sample_schedule(lr))
    p_fast, state, hist = fit_adaptive(model, ce, tx, params, x, y, max_samples=300,
                                       batching=Batching(max_micro_batch_size=9, seed=3))
    # reference: materialised vmap per-sample gradients, paper formulas, same data order
    gen = torch.Generator().manual_seed(3)
    order = torch.cat([torch.randperm(120, generator=gen) for _ in range(4)])
    p, b, seen, sizes = dict(params), 4, 0, []
    is_norm = isinstance(find_batch_test_state(state), NormTestState)
    while seen < 300:
        idx = order[seen:seen + b]
        psg = per_sample_grads(sample_loss(model, ce))(p, x[idx], y[idx])
        t_norm, t_ip, t_orth = paper_statistics(psg, 0.6, 0.6, 0.8)
        t = t_norm if is_norm else max(t_ip, t_orth)
        sizes.append(b)
        p = {k: v - lr * psg[k].mean(0) for k, v in p.items()}
        seen += b
        b = min(64, max(b, math.ceil(t)))
    assert [r["batch_size"] for r in hist] == sizes
    assert len(set(sizes)) > 1  # the batch did grow in this setting
    assert max(r["micro_batches"] for r in hist) > 1  # accumulation was exercised
    for k in p:
        torch.testing.assert_close(p_fast[k], p[k])


@pytest.mark.parametrize("make", [lambda: norm_test(0.3, 2, 50),
                                  lambda: inner_product_test(0.3, 2, 50),
                                  lambda: augmented_inner_product_test(0.3, 0.4, 2, 50),
                                  lambda: scale_by_sample_schedule(warmup_cosine_samples(0.1, 5, 50)),
                                  lambda: scale_by_sample_schedule(0.1)])
def test_transforms_follow_the_contract(make):
    per_sample = random_grads(7, 6, 5, 2.0)
    _, stats = stats_from_per_sample_grads(per_sample)
    params = {"w": torch.zeros(5, dtype=torch.float64), "v": torch.zeros(2, 2, dtype=torch.float64)}
    state = check_transform(make(), params, per_sample_stats=stats, batch_size=6)
    assert int(state.count) == 3 and int(state.samples) == 18


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("seed", 1.5), ("max_micro_batch_size", -1), ("accumulation_steps", None),
    ("chunk_size", True)])
def test_batching_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"Batching: {field}"):
        Batching(**{field: value})


def test_fit_adaptive_refuses_a_batching_that_is_not_one():
    model, params, x, y = problem()
    with pytest.raises(TypeError, match="batching must be a Batching"):
        fit_adaptive(model, ce, scale_by_sample_schedule(0.1), params, x, y, max_samples=8,
                     batching={"batch_size": 4})
    with pytest.raises(ValueError, match=r"batching=Batching\(batch_size=b\)"):
        fit_adaptive(model, ce, scale_by_sample_schedule(0.1), params, x, y, max_samples=8)
